# Sourced by .ci/run and scripts/demo.sh: from a bare Debian 12 (as root, or as a user with sudo)
# or a machine already set up, brings what building and running kvtier needs, and leaves a
# virtual environment active:
#   - Debian packages: the compiler, Python with its headers and venv module, liburing (linked
#     statically into the core), plus any names given in KVTIER_EXTRA_PKGS; only the missing ones
#     are installed, with sudo when not root;
#   - a virtual environment: the active one, else KVTIER_VENV (default .venv), made from python3
#     (or $PYTHON) if it does not exist; nothing is installed into a system Python;
#   - torch 2.13.0, the CPU build unless KVTIER_TORCH=cuda (scripts/install_torch.sh);
#   - the build tools, for builds without isolation: scikit-build-core, pybind11, ninja, and CMake
#     from PyPI (Debian 12's 3.25 is older than the 3.26 the build needs).
# PYTHON is then the venv's interpreter.
_kvtier_pkgs=(ca-certificates g++ make python3 python3-dev python3-venv liburing-dev ${KVTIER_EXTRA_PKGS:-})
if command -v apt-get >/dev/null 2>&1; then
  _missing=()
  for _p in "${_kvtier_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$_p" 2>/dev/null | grep -q "install ok installed" || _missing+=("$_p")
  done
  if [ "${#_missing[@]}" -gt 0 ]; then
    _sudo=()
    if [ "$(id -u)" -ne 0 ]; then
      if ! command -v sudo >/dev/null 2>&1; then
        echo "kvtier setup: installing ${_missing[*]} needs root or sudo" >&2
        return 1 2>/dev/null || exit 1
      fi
      _sudo=(sudo)
    fi
    echo "kvtier setup: apt-get install ${_missing[*]}"
    "${_sudo[@]}" apt-get update -qq
    "${_sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${_missing[@]}" >/dev/null
  fi
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
  KVTIER_VENV=${KVTIER_VENV:-.venv}
  if [ ! -x "$KVTIER_VENV/bin/python" ]; then
    echo "kvtier setup: python -m venv $KVTIER_VENV"
    "${PYTHON:-$(command -v python3 || command -v python)}" -m venv "$KVTIER_VENV"
  fi
  # shellcheck disable=SC1091
  source "$KVTIER_VENV/bin/activate"
fi
export PYTHON=python
python -m pip install -q --upgrade pip
bash "$(dirname "${BASH_SOURCE[0]}")/install_torch.sh"
python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja
