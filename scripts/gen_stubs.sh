#!/usr/bin/env bash
# Regenerate python/kvtier/_core.pyi, the type stubs of the compiled core, from the built module
# (pybind11-stubgen reads the signatures and docstrings pybind11 records). Run after changing a
# binding; tests/test_stubs.py fails while the stubs and the module disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "pybind11-stubgen>=2.5"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python -m pybind11_stubgen kvtier._core -o "$out"
cp "$out/kvtier/_core.pyi" python/kvtier/_core.pyi
echo "wrote python/kvtier/_core.pyi"
