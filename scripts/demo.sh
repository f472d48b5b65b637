#!/usr/bin/env bash
# The README's first command: set up (scripts/setup_env.sh: Debian packages, a venv in .venv, the
# CPU build of torch, the build tools), install kvtier from this checkout and run `kvtier demo`
# (arguments go to it). Afterwards `source .venv/bin/activate` gives the same environment.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
source scripts/setup_env.sh
t1=$(date +%s)
python -m pip install -q --no-build-isolation .
t2=$(date +%s)
kvtier demo "$@"
t3=$(date +%s)
echo "demo.sh: set-up $((t1 - t0)) s, kvtier build + install $((t2 - t1)) s, demo $((t3 - t2)) s," \
  "total $((t3 - t0)) s"
