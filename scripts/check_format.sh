#!/usr/bin/env bash
# Formatting of the tree: clang-format (.clang-format) over the C++/CUDA sources and ruff format
# over the Python ones. Checks by default; `--fix` rewrites the files instead.
# Needs clang-format 18 (pip install clang-format==18.1.8) and ruff (pip install ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
fix=0
[ "${1:-}" = "--fix" ] && fix=1
mapfile -t cxx < <(git ls-files '*.cc' '*.h' '*.cu' '*.cuh' | grep -v '^third_party/')
if [ "$fix" = 1 ]; then
  clang-format -i "${cxx[@]}"
  ruff format .
else
  clang-format --dry-run -Werror "${cxx[@]}"
  ruff format --check .
fi
echo "check_format: ${#cxx[@]} C++/CUDA files and the Python tree are formatted"
