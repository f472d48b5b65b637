#!/usr/bin/env bash
# The peers' suites again with NIXL as their data path: once over UCX's TCP transport, once over
# TCP plus shared memory (cma). nixl goes into a directory of its own (build/nixl-site) with
# --no-deps (its wheels declare an unbounded torch; the pinned CPU torch stays) and is put on
# PYTHONPATH for these runs only, so the main environment's runs keep testing the TCP stream and
# the mixed clusters here test both.
#
# Environment: KVTIER_BUILD_NIXL_SITE (default build/nixl-site; reused when nixl imports from it).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${KVTIER_BUILD_NIXL_SITE:-build/nixl-site}
NIXL_VERSION=1.5.1

if ! PYTHONPATH="$SITE" python -c "import nixl" >/dev/null 2>&1; then
  python -m pip install -q --no-deps --target "$SITE" "nixl==$NIXL_VERSION" "nixl-cu13==$NIXL_VERSION"
fi
# The runs below must really have NIXL: fail here, naming why, rather than skip every test.
PYTHONPATH="$SITE" python -c "
from kvtier.p2p.nixl_agent import nixl_unavailable_reason as why
assert why() is None, why()"

for tls in tcp "tcp,shm,self"; do
  echo "ci_nixl: UCX_TLS=$tls"
  UCX_TLS="$tls" PYTHONPATH="$SITE" python -m pytest -q -p no:cacheprovider \
    tests/test_p2p_nixl_path.py tests/test_p2p_nixl.py tests/test_p2p_units.py tests/test_p2p_multiproc.py
done
