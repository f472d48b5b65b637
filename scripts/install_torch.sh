#!/usr/bin/env bash
# Installs PyTorch 2.13.0 into the current Python environment, the CPU build unless told otherwise,
# and never lets a later requirement replace it.
#
# Where it comes from, in order:
#   1. a wheel pip already finds without an index (its find-links / a local wheelhouse), if any;
#   2. PyTorch's CPU wheel index (KVTIER_TORCH_INDEX to name another, e.g. a CUDA one).
# KVTIER_TORCH=cuda installs the build on PyPI instead (CUDA 12/13 runtime, several GB, ~15
# nvidia-* packages): what a machine with an NVIDIA GPU wants.
set -euo pipefail
PY=${PYTHON:-python}
VERSION=2.13.0
CPU_INDEX=${KVTIER_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

have=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ "${have%%+*}" = "$VERSION" ]; then
  echo "install_torch: torch $have already installed"
  exit 0
fi
if [ "${KVTIER_TORCH:-cpu}" = cuda ]; then
  "$PY" -m pip install -q "torch==$VERSION"
elif "$PY" -m pip install -q --no-index --no-deps "torch==$VERSION" >/dev/null 2>&1; then
  # Found locally: its dependencies from the usual index (torch itself is now satisfied).
  "$PY" -m pip install -q "torch==$VERSION"
else
  "$PY" -m pip install -q "torch==$VERSION" --index-url "$CPU_INDEX"
fi
"$PY" -c "import torch; print('install_torch: torch', torch.__version__, '| CUDA build:', torch.version.cuda or 'no')"
