#!/bin/sh
# The test command: install everything the tests need on Debian 12 (as root), then run the
# linters, the type checker and the whole test suite. Usage: sh tests/run.sh [pytest args]
set -eu
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
need=""
command -v postfix >/dev/null || need="$need postfix"
command -v swaks >/dev/null || need="$need swaks"
command -v redis-server >/dev/null || need="$need redis-server"
command -v socat >/dev/null || need="$need socat"
command -v ss >/dev/null || need="$need iproute2"
command -v rbldnsd >/dev/null || need="$need rbldnsd"
command -v p0f >/dev/null || need="$need p0f"
# Perl's Mail::DKIM: the independent DKIM implementation the interop tests compare with.
perl -MMail::DKIM -e1 2>/dev/null || need="$need libmail-dkim-perl"
python3 -c 'import ensurepip, venv' 2>/dev/null || need="$need python3-venv"
# A C compiler and Python's headers: the suite runs against the compiled request path (setup.py).
command -v gcc >/dev/null || need="$need gcc"
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
    || need="$need python3-dev"
if [ -n "$need" ]; then
    apt-get update -q
    # "No configuration": the package must not set up (or start) a system Postfix; the tests
    # run private instances on loopback.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get install -y -q $need
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# Compile the request path or fail: the suite tests what an installation with a compiler runs.
export MXWARD_COMPILE=1
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,speed]' --config-settings editable_mode=strict

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy policyd contentfilter shared
echo "== pytest"
# Everything installed above must work: a fixture that cannot start one (p0f) fails, not skips.
export MXWARD_TESTS_STRICT=1
.venv/bin/pytest "$@"
