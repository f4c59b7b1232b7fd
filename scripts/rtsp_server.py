#!/usr/bin/python3
"""A real RTSP camera for tests and benchmarks: GStreamer's RTSP server serving a looped video.

Runs under the system Python (Debian's python3-gi and gir1.2-gst-rtsp-server-1.0; ``make setup``
installs them), not the project's virtualenv, so ``cluster/rtsp.py`` starts it as a subprocess.
The clip is decoded once into memory and served as H.264 (x264, zero-latency) at ``--fps``; each
client sees the frame a camera would show at that moment (the clip runs on the wall clock from the
server's start and loops), so a client that reconnects after 5 s has missed 5 s of video, as it would
with a real camera. Prints ``READY <url>`` once it listens.

Usage: /usr/bin/python3 scripts/rtsp_server.py VIDEO --port 8554 [--path /live] [--fps 25]
       [--user admin --password secret] [--frames N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstApp, GstRtspServer  # noqa: E402

__all__ = ["main"]


def decode_clip(path: str, max_frames: int | None) -> tuple[list[bytes], int, int]:
    """Every frame of the video as raw I420 buffers, with its width and height."""
    pipeline = Gst.parse_launch(
        f'filesrc location="{path}" ! decodebin ! videoconvert ! video/x-raw,format=I420 ! appsink name=sink sync=false'
    )
    sink = pipeline.get_by_name("sink")
    pipeline.set_state(Gst.State.PLAYING)
    frames: list[bytes] = []
    width = height = 0
    while max_frames is None or len(frames) < max_frames:
        sample = GstApp.AppSink.pull_sample(sink)
        if sample is None:
            break
        if not frames:
            caps = sample.get_caps().get_structure(0)
            width, height = caps.get_value("width"), caps.get_value("height")
        buf = sample.get_buffer()
        frames.append(buf.extract_dup(0, buf.get_size()))
    pipeline.set_state(Gst.State.NULL)
    if not frames:
        raise SystemExit(f"rtsp_server: no frame decoded from {path}")
    return frames, width, height


class LoopedClip(GstRtspServer.RTSPMediaFactory):
    """One media per client, fed by appsrc from the decoded clip on the wall clock."""

    def __init__(self, frames: list[bytes], width: int, height: int, fps: int) -> None:
        super().__init__()
        self.frames, self.fps, self.t0 = frames, fps, time.time()
        self.duration = Gst.SECOND // fps
        self.launch = (
            f"( appsrc name=src is-live=true format=time do-timestamp=false "
            f"caps=video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 "
            f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=2000 "
            f"! rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
        self.connect("media-configure", self._configure)

    def do_create_element(self, url: object) -> Gst.Element:
        return Gst.parse_launch(self.launch)

    def _configure(self, factory: object, media: GstRtspServer.RTSPMedia) -> None:
        src = media.get_element().get_child_by_name("src")
        state = {"n": 0, "start": int((time.time() - self.t0) * self.fps)}
        src.connect("need-data", self._need_data, state)

    def _need_data(self, src: Gst.Element, length: int, state: dict[str, int]) -> None:
        n = state["n"]
        if n == 0:  # stamp from the pipeline's running time now, or the first second would burst out unpaced
            running = src.get_current_running_time()
            state["base"] = 0 if running == Gst.CLOCK_TIME_NONE else running
        frame = self.frames[(state["start"] + n) % len(self.frames)]
        buf = Gst.Buffer.new_wrapped(frame)
        buf.pts = buf.dts = state["base"] + n * self.duration
        buf.duration = self.duration
        state["n"] = n + 1
        src.emit("push-buffer", buf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video")
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--path", default="/live")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--frames", type=int, default=None, help="use only the first N frames of the clip")
    parser.add_argument("--user", default=None)
    parser.add_argument("--password", default=None)
    args = parser.parse_args()
    Gst.init(None)
    frames, width, height = decode_clip(args.video, args.frames)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.address)
    server.set_service(str(args.port))
    factory = LoopedClip(frames, width, height, args.fps)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password or ""), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_role_from_structure(
            Gst.Structure.new_from_string("user, media.factory.access=true, media.factory.construct=true")
        )
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        raise SystemExit(f"rtsp_server: cannot listen on {args.address}:{args.port}")
    parent = os.getppid()
    # A test session that crashes never stops its camera: exit once the process that started us is gone.
    GLib.timeout_add_seconds(1, lambda: os.getppid() == parent or sys.exit(0))
    print(f"READY rtsp://{args.address}:{args.port}{args.path} {width}x{height} {len(frames)} frames", flush=True)
    try:
        GLib.MainLoop().run()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
