#!/bin/sh
# Install mxward on a Debian 12 machine (as root): Python venv in /opt/mxward, the documented
# configuration in /etc/mxward/mxward.toml (kept if it exists), data in /var/lib/mxward, and the
# systemd unit (enabled only with --enable). Re-running upgrades in place.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${MXWARD_PREFIX:-/opt/mxward}

export DEBIAN_FRONTEND=noninteractive
if ! python3 -c 'import ensurepip, venv' 2>/dev/null || ! command -v python3 >/dev/null; then
    apt-get update -q
    apt-get install -y -q python3 python3-venv
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "mxward needs Python 3.11 or newer" >&2; exit 1; }
# A C compiler and Python's headers: setup.py compiles the request path with mypyc (about a
# sixth less CPU per policy request). MXWARD_COMPILE=0 installs pure Python and skips them.
if [ "${MXWARD_COMPILE:-auto}" != 0 ] && { ! command -v gcc >/dev/null || ! python3 -c \
    'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; }; then
    apt-get update -q
    apt-get install -y -q gcc python3-dev
fi

python3 -m venv "$prefix"
"$prefix/bin/pip" install -q --upgrade pip
"$prefix/bin/pip" install -q "$here[speed]"
ln -sf "$prefix/bin/mxward" /usr/local/bin/mxward

install -d -m 0755 /etc/mxward
[ -e /etc/mxward/mxward.toml ] || install -m 0644 "$here/config/mxward.example.toml" /etc/mxward/mxward.toml
install -d -m 0750 /var/lib/mxward
if [ -d /etc/systemd/system ]; then
    install -m 0644 "$here/deploy/systemd/mxward.service" /etc/systemd/system/mxward.service
    if [ "${1:-}" = "--enable" ] && command -v systemctl >/dev/null; then
        systemctl daemon-reload && systemctl enable --now mxward.service
    fi
fi
"$prefix/bin/mxward" --config /etc/mxward/mxward.toml config-check
echo "mxward installed in $prefix; configuration: /etc/mxward/mxward.toml"
