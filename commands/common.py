"""What every command shares: the layered settings, JSON output, the live progress line."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.config import Settings, dotted_overrides, load_settings, set_path

__all__ = [
    "settings",
    "configure",
    "echo_json",
    "progress_printer",
    "shared_videos",
    "default_model",
    "default_video",
    "ints",
    "OutOpt",
    "SourceOpt",
]

OutOpt = Annotated[Path, typer.Option("--out", help="Folder for JSON, CSV, plots and the markdown report.")]
SourceOpt = Annotated[
    list[str],
    typer.Option(
        "--source",
        "-s",
        help="Video file, rtsp/http URL, webcam index, image folder, pan:IMAGE or demo; prefix id= to name the stream.",
    ),
]


@dataclass
class _Options:
    config: Path | None = None
    sets: list[str] = field(default_factory=list)


_options = _Options()


def configure(config: Path | None, sets: list[str] | None) -> None:
    """The root command's ``--config`` and ``--set``, kept for every subcommand."""
    _options.config = config
    _options.sets = list(sets or [])


def settings(**overrides: Any) -> Settings:
    """Settings from file, environment, --set, then command flags (highest)."""
    tree = dotted_overrides(_options.sets)
    for dotted, value in overrides.items():
        if value is not None:
            set_path(tree, dotted.split("."), value)
    loaded = load_settings(_options.config, overrides=tree)
    os.umask(loaded.umask_bits())  # outputs (and a local Ray's workers, which inherit it) keep other users out
    return loaded


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def progress_printer() -> Callable[[Any], None]:
    """The live progress line: redrawn in place on a terminal, every 5 s into a log."""
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(progress: Any) -> None:
        now = time.monotonic()
        if tty:
            sys.stderr.write("\r\033[K" + progress.line())
            sys.stderr.flush()
        elif now - last[0] >= 5:
            sys.stderr.write(progress.line() + "\n")
            last[0] = now

    return show


def _shared() -> Path:
    return Path(os.environ.get("VAPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def default_model() -> str:
    """The shared int8 ONNX where it exists (machines without internet), else the official weights."""
    onnx = _shared() / "models" / "yolov8n_int8.onnx"
    return str(onnx) if onnx.is_file() else "yolov8n.pt"


def default_video() -> str:
    return str(_shared() / "videos" / "highway-320x240.avi")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def shared_videos() -> list[str]:
    """Every video under the shared folder, in name order."""
    return [str(p) for p in sorted((_shared() / "videos").glob("*")) if p.suffix in (".avi", ".mp4", ".mkv", ".mov")]
