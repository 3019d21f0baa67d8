#!/usr/bin/env bash
# The whole benchmark suite on a fresh Debian 12 machine, as root: installs the peers
# (Postfix with smtp-sink, nginx with its mail module, Dovecot, ...) with .ci/install-peers.sh,
# builds the gateway into .venv (native core included), then runs benchmarks/run.py with the
# arguments given (e.g. --quick, --cores 16, --scenarios 1,4) and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-peers.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet .
GATEWAY_REQUIRE_NATIVE=1 .venv/bin/python benchmarks/run.py --gateway-src worktree "$@"
