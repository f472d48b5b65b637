#!/usr/bin/env bash
# Build kvtier with its C++ tests and benches (CUDA compiled when nvcc is found, liburing linked
# when present), install it with its test and plot extras, and run every test: ctest, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${KVTIER_BUILD_DIR:-build/test}

python -m pip install -q --no-build-isolation \
  --config-settings=build-dir="$BUILD_DIR" \
  --config-settings=cmake.define.KVTIER_BUILD_TESTS=ON \
  --config-settings=cmake.define.KVTIER_BUILD_BENCH=ON \
  -e ".[test,plot]"
python -m kvtier.cli info
ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 300
python -m pytest -q "$@"
