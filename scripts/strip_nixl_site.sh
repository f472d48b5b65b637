#!/usr/bin/env bash
# Build a NIXL site small enough to travel to the GPU machine (the device transfer limit is 64 MiB;
# the nixl-cu13 wheel is 56 MiB and unpacks to ~230 MiB): the wheel for the GPU machine's Python
# (default 3.12), only the UCX plugin and the libraries it and libnixl need, stripped (~32 MiB).
#
#   bash scripts/strip_nixl_site.sh [.device/nixl-site] [3.12]
# then carry .device and put the directory on PYTHONPATH there (scripts/gpu_nixl_check.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${1:-.device/nixl-site}
PYVER=${2:-3.12}
NIXL_VERSION=1.5.1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux_2_28_x86_64 -d "$tmp" "nixl-cu13==$NIXL_VERSION" "nixl==$NIXL_VERSION"
rm -rf "$SITE"
mkdir -p "$SITE"
for w in "$tmp"/*.whl; do python -m zipfile -e "$w" "$SITE"; done
cd "$SITE"
rm -rf nixl_ep* include bin pkgconfig nixl_cu13.scripts ./*.dist-info ./*.data
# Plugins other than UCX, telemetry exporters, perftest, InfiniBand transports (one host).
find nixl_cu13.libs/nixl .nixl_cu13.mesonpy.libs/plugins -name '*.so' ! -name 'libplugin_UCX.so' -delete 2>/dev/null || true
rm -f nixl_cu13.libs/ucx/libucx_perftest* nixl_cu13.libs/ucx/libuct_ib* nixl_cu13.libs/ucx/*.la
# Drop every bundled library nothing left needs.
python - <<'PY'
import glob, os, re, subprocess
def needed(f):
    out = subprocess.run(["readelf", "-d", f], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.*)\]", out)
dirs = ["nixl_cu13.libs", ".nixl_cu13.mesonpy.libs"]
roots = (glob.glob("nixl_cu13/*.so") + glob.glob("nixl_cu13.libs/nixl/*.so") + glob.glob("nixl_cu13.libs/ucx/*.so*")
         + glob.glob(".nixl_cu13.mesonpy.libs/plugins/*.so"))
present = {os.path.basename(p): p for d in dirs for p in glob.glob(d + "/*.so*")}
keep, todo = set(), list(roots)
while todo:
    for n in needed(todo.pop()):
        if n in present and n not in keep:
            keep.add(n)
            todo.append(present[n])
for n, p in present.items():
    if n not in keep:
        os.remove(p)
PY
find . -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
du -sh .
