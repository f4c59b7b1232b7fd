#!/usr/bin/env bash
# System packages the tests' RTSP camera needs (scripts/rtsp_server.py under /usr/bin/python3):
# GStreamer's RTSP server, its Python bindings and the plugins that decode the shared videos and
# encode H.264. Installs them on Debian/Ubuntu when missing and running as root; otherwise says so
# in one line (the RTSP tests then fail, naming what is missing). Called by `make setup`.
set -uo pipefail
PKGS=(python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
      gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-libav)
command -v dpkg-query >/dev/null || { echo "system_deps: not a Debian system; install GStreamer's RTSP server and python3-gi by hand (${PKGS[*]})"; exit 0; }
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system_deps: missing ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}' (the RTSP tests need them)"
  exit 0
fi
echo "system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }; }; then
  echo "system_deps: apt-get could not install ${missing[*]} (the RTSP tests need them)"
fi
exit 0
