#!/usr/bin/env bash
# Clang's thread-safety analysis over the C++ core: every csrc/*.cc (tests included) is compiled
# with -Wthread-safety as an error, as the CPU build (KVTIER_HAVE_CUDA=0; the .cu kernels hold no
# locks) and, where the CUDA toolkit's headers are found, as the CUDA build too (KVTIER_CHECK_CUDA=0
# skips that).
# Needs clang++ (Debian: apt-get install clang).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CLANGXX:-clang++}
command -v "$CXX" >/dev/null || { echo "check_thread_safety: $CXX not found (apt-get install clang)" >&2; exit 1; }
py_inc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
pb_inc=$(python -c "import pybind11; print(pybind11.get_include())")
np_inc=$(python -c "import numpy; print(numpy.get_include())" 2>/dev/null || true)
flags=(-std=c++17 -fsyntax-only -Wthread-safety -Wthread-safety-beta -Werror=thread-safety-analysis
       -Werror=thread-safety-attributes -Werror=thread-safety-precise -Werror=thread-safety-reference
       -Icsrc -I"$py_inc" -I"$pb_inc" -DKVTIER_HAVE_LIBURING=1 '-DKVTIER_VERSION="0"')
[ -n "$np_inc" ] && flags+=(-I"$np_inc")
cuda_inc=""
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime_api.h" ]; then cuda_inc="$d/include"; break; fi
done
fail=0
n=0
for f in $(find csrc -name '*.cc' | sort); do
  variants=("-DKVTIER_HAVE_CUDA=0")
  [ "${KVTIER_CHECK_CUDA:-1}" = 1 ] && [ -n "$cuda_inc" ] && grep -q "KVTIER_HAVE_CUDA" "$f" && variants+=("-DKVTIER_HAVE_CUDA=1 -I$cuda_inc")
  for v in "${variants[@]}"; do
    # shellcheck disable=SC2086
    if ! "$CXX" "${flags[@]}" $v "$f"; then
      echo "check_thread_safety: $f ($v) failed" >&2
      fail=1
    fi
    n=$((n + 1))
  done
done
[ "$fail" = 0 ] && echo "check_thread_safety: $n compilations clean"
exit "$fail"
