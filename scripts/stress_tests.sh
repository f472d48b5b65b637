#!/usr/bin/env bash
# Runs the pytest suite N times (default 20) while `stress` keeps every core busy, to find tests
# that depend on timing. Each run's output (one line a test, so a crash names its test) goes to
# $LOG_DIR/run-K.log, and a crashed run's core file (if the system writes one to the working
# directory) to $LOG_DIR/core-K; the summary lists the runs that failed and the tests that failed
# in them. Exit status 1 if any run failed.
#
#   scripts/stress_tests.sh [N] [pytest args...]
# Environment: LOG_DIR (default build/stress), STRESS_CPUS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
shift || true
LOG_DIR=${LOG_DIR:-build/stress}
CPUS=${STRESS_CPUS:-$(nproc)}
PY=${PYTHON:-python}
command -v stress >/dev/null || { echo "stress_tests: needs stress (apt-get install -y stress)" >&2; exit 2; }
mkdir -p "$LOG_DIR"
ulimit -c unlimited 2>/dev/null || true
stress -c "$CPUS" >/dev/null 2>&1 &
STRESS_PID=$!
trap 'kill "$STRESS_PID" 2>/dev/null || true' EXIT
failed=0
for k in $(seq 1 "$N"); do
  t0=$(date +%s)
  if "$PY" -m pytest -v -p no:cacheprovider "$@" >"$LOG_DIR/run-$k.log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed=$((failed + 1))
  fi
  echo "run $k/$N: $status in $(( $(date +%s) - t0 )) s, load $(cut -d' ' -f1 /proc/loadavg): $(tail -n 1 "$LOG_DIR/run-$k.log")"
  if [ "$status" != ok ]; then
    grep -E "^(FAILED|ERROR) |Fatal Python error" "$LOG_DIR/run-$k.log" | sed 's/^/    /' || true
    for c in core core.*; do [ -f "$c" ] && mv "$c" "$LOG_DIR/core-$k" && echo "    core: $LOG_DIR/core-$k"; done
  fi
done
echo "stress_tests: $failed of $N runs failed under stress -c $CPUS"
[ "$failed" -eq 0 ]
