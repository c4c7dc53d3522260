#!/usr/bin/env bash
# Installs the Debian packages named, as root or through sudo, without their recommendations
# (nor their services' start-up: tests start their own etcd). The callers name only what is missing.
set -euo pipefail
[ $# -gt 0 ] || exit 0
echo "setup: installing Debian packages: $*" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: root or sudo is needed to install $*" >&2; exit 1; }
  sudo="sudo"
fi
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >&2
