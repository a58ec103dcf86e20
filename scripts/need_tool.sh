#!/usr/bin/env bash
# need_tool.sh COMMAND PACKAGE: install Debian's PACKAGE with apt if COMMAND is not on PATH
# (promtool: prometheus; chromium: chromium). Used by `make lint` and `make test`.
set -euo pipefail
command -v "$1" >/dev/null 2>&1 && exit 0
echo "$1 not found; installing $2 with apt-get" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$2" >&2
