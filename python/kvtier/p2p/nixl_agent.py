"""NixlEndpoint: one NIXL agent of a member (UCX backend), its registered host memory, the peers'
agent metadata it loaded, and one-sided READs from those peers that end by a deadline, never hang.

kvtier.p2p.nixl_path builds the peers' data path on it (docs/nixl.md). The ``nixl``
package is optional: it is imported when an endpoint is made, so importing this module costs
nothing and ``nixl_unavailable_reason()`` tells a member whether it can offer NIXL at all.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

from kvtier.errors import InvalidArgumentError, UnavailableError

log = logging.getLogger("kvtier.p2p.nixl")

# Agent metadata is a few hundred bytes plus ~100 per registered region; a peer sending more is
# wrong, and NIXL would parse whatever it is given.
MAX_METADATA_BYTES = 1 << 20
# Every NIXL 1.5 agent metadata blob starts with its serializer's tag: refusing others here keeps
# obvious garbage (a frame of another message, a truncated read) out of NIXL's parser.
_METADATA_TAG = b"nixlSerDes|"
# With UCX's cma transport (UCX_TLS containing shm) a post copies synchronously in the calling
# thread, so a deadline can only be checked between posts: one post moves at most this much.
DEFAULT_MAX_POST_BYTES = 64 << 20
# How long a read polls without sleeping: 32 MiB over UCX tcp at ~1 GB/s. Sleeping while UCX over
# TCP waits for progress from this thread stalls the read; past this a peer is slow anyway.
SPIN_S = 0.05

# NIXL's progress thread waits this long between passes. nixl's Python API sets 0: a thread that
# spins a whole core for as long as the agent lives, which a serving process cannot give away
# (docs/nixl.md, "Progress": what 0, 100 and 1000 cost idle and under load).
PROGRESS_DELAY_US = 100

# ReadOutcome.status values.
DONE = "done"
DEADLINE = "deadline"  # the peer did not answer in time (stopped, overloaded, network down)
PEER_LOST = "peer_lost"  # the peer's process or connection went away (UCX peer failure)
FAILED = "failed"  # NIXL refused or failed the transfer (bad descriptors, backend error)


def _import_nixl():
    """nixl's agent API, or UnavailableError naming why not."""
    try:
        from nixl import _bindings
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:  # also the meta package finding no nixl_cuXX backend wheel
        raise UnavailableError(
            f"NIXL transport needs the 'nixl' package (pip install --no-deps nixl nixl-cu13): {e}"
        ) from e
    _quiet_nixl_logger()
    # NIXL's status errors (nixlBackendError, nixlRemoteDisconnectError, ...) share no base class
    # but Exception: collect them, so that only they are caught and any other error stays a bug.
    errors = tuple(
        c
        for n, c in vars(_bindings).items()
        if n.startswith("nixl") and n.endswith("Error") and isinstance(c, type) and issubclass(c, Exception)
    )
    return nixl_agent, nixl_agent_config, errors


_agent_lock = threading.Lock()


def new_agent(name: str, progress_thread: bool):
    """A NIXL agent without backends (create them on it), whose progress thread, if on, waits
    PROGRESS_DELAY_US between passes. nixl's API builds its native config itself and fixes that
    delay at 0; the native constructor is wrapped while this agent is made to set it."""
    nixl_agent, nixl_agent_config, _ = _import_nixl()
    from nixl import _api

    bindings = _api.nixlBind
    native = bindings.nixlAgent

    def with_delay(agent_name, config):
        config.pthrDelay = PROGRESS_DELAY_US
        return native(agent_name, config)

    with _agent_lock:
        bindings.nixlAgent = with_delay
        try:
            return nixl_agent(name, nixl_agent_config(enable_prog_thread=progress_thread, backends=[]))
        finally:
            bindings.nixlAgent = native


def _quiet_nixl_logger() -> None:
    """NIXL's import configures its Python logger at INFO with a handler on stdout (no
    propagation), which would mix into the output of a CLI or a member process speaking JSON on
    stdout: its lines go to stderr, at WARNING unless NIXL_LOG_LEVEL asks for a level."""
    logger = logging.getLogger("nixl")
    if "NIXL_LOG_LEVEL" not in os.environ:
        logger.setLevel(logging.WARNING)
    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout:
            h.setStream(sys.stderr)


def _allow_cuda_ipc_reads() -> None:
    """Let UCX's cuda_ipc transport serve READs (GETs) on a machine with NVIDIA GPUs.

    UCX's default (``UCX_CUDA_IPC_ENABLE_GET_ZCOPY=auto``) turns cuda_ipc's GET off when NVML
    reports no active NVLink on GPU 0 (one GPU, PCIe, or a VM that hides the links): every NIXL
    READ of GPU memory then fell back to UCX's software emulation over tcp or shared memory, ~1 GB/s
    on an H100 (docs/nixl.md, "Why no CUDA transport"). kvtier's pulls are READs, and a cuda_ipc GET
    is a device copy either way, so turn it on unless the user chose. Only where GPU device nodes
    exist: elsewhere UCX's CUDA module is not loaded and would warn about an unused variable."""
    if glob.glob("/dev/nvidia[0-9]*"):
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")


def nixl_unavailable_reason() -> str | None:
    """None when ``nixl`` imports here, else why not: a member without it offers only TCP."""
    try:
        _import_nixl()
    except UnavailableError as e:
        return str(e)
    return None


# Memory kinds a region or a read's side can be (NIXL's segment types).
HOST = "DRAM"  # host memory (kvtier's CPU pool: pinned where the machine allows)
GPU = "VRAM"  # CUDA device memory; its device index goes with it


@dataclass(frozen=True)
class Region:
    """Memory registered with the endpoint's agent: [addr, addr + nbytes) of ``mem`` (HOST, or GPU
    with its CUDA ``device`` index)."""

    addr: int
    nbytes: int
    _descs: object  # NIXL's registration list, handed back to deregister
    mem: str = HOST
    device: int = 0


@dataclass(frozen=True)
class ReadOutcome:
    """How a read ended. Only ``status == DONE`` means every byte arrived; on any other status the
    local blocks hold a mix of old and new bytes and must not be committed."""

    status: str
    detail: str
    seconds: float
    nbytes: int
    stuck: bool = False  # a request NIXL could not cancel: the peer may still write into the blocks

    @property
    def ok(self) -> bool:
        return self.status == DONE


class NixlEndpoint:
    """One NIXL agent with the UCX backend.

    ``name`` must be unique among the agents that will load each other's metadata (the member's
    node id). UCX reads its settings (``UCX_TLS`` ...) from the environment when the agent is made.
    ``progress_thread``: NIXL's progress thread. A member that is read from needs it (or some
    thread polling), because UCX over TCP emulates a READ with messages the holder's side must
    answer; a reader drives its own progress while it polls. Not thread-safe: one caller at a time.
    """

    def __init__(self, name: str, *, progress_thread: bool = True, ucx_error_mode: str = "peer") -> None:
        if not name:
            raise InvalidArgumentError("NIXL agent name is empty: give the member's node id")
        if ucx_error_mode not in ("peer", "none"):
            raise InvalidArgumentError(f"NIXL ucx_error_mode {ucx_error_mode!r}: expected 'peer' or 'none'")
        _, _, self._errors = _import_nixl()
        # UCX logs to stdout unless told otherwise, which would corrupt a member process's or the
        # CLI's output there: stderr, unless the user chose a file.
        os.environ.setdefault("UCX_LOG_FILE", "stderr")
        _allow_cuda_ipc_reads()
        self.name = name
        # Backends are created below, not by the config, so that a failure names UCX.
        try:
            self._agent = new_agent(name, progress_thread)
            # Error mode "peer": UCX then uses only transports that report a dead peer, so a read
            # from a killed holder ends with an error instead of waiting for its deadline. "none"
            # admits the others (shared memory, CUDA IPC); then only the deadline ends such a read.
            self._agent.create_backend("UCX", {"ucx_error_handling_mode": ucx_error_mode})
        except (*self._errors, RuntimeError) as e:  # RuntimeError: no plugin found at all
            raise UnavailableError(
                f"NIXL agent {name!r}: UCX backend failed to start ({type(e).__name__}: {e}); "
                f"UCX_TLS={os.environ.get('UCX_TLS', '<unset>')!r} (needs a transport with peer failure "
                f"detection such as tcp, since 'shm' alone cannot start; on a machine with NVIDIA GPUs "
                f"it must also name cuda_copy)"
            ) from e
        self._regions: list[Region] = []
        self._peers: set[str] = set()
        self._stuck: list = []  # transfer handles NIXL could not cancel: kept alive, never reused

    # -- memory -------------------------------------------------------------------------------

    def register(self, addr: int, nbytes: int, mem: str = HOST, device: int = 0) -> Region:
        """Register [addr, addr + nbytes) of host memory (HOST) or of CUDA device ``device`` (GPU)
        for reads into it or from it."""
        if addr <= 0 or nbytes <= 0:
            raise InvalidArgumentError(f"NIXL register: addr {addr:#x} / nbytes {nbytes} must both be positive")
        _check_mem(mem, device)
        try:
            descs = self._agent.register_memory([(addr, nbytes, device, "")], mem)
        except self._errors as e:
            raise InvalidArgumentError(
                f"NIXL register of {nbytes} bytes of {mem} at {addr:#x} failed ({type(e).__name__}: {e})"
            ) from e
        region = Region(addr, nbytes, descs, mem, device)
        self._regions.append(region)
        return region

    def deregister(self, region: Region) -> None:
        """Undo ``register``. Peers holding the old metadata can no longer read it (their reads fail)."""
        if region not in self._regions:
            raise InvalidArgumentError(f"NIXL deregister: region {region.addr:#x}+{region.nbytes} is not registered")
        self._agent.deregister_memory(region._descs)
        self._regions.remove(region)

    # -- metadata -----------------------------------------------------------------------------

    def metadata(self) -> bytes:
        """This agent's metadata (name, UCX worker address, registered regions' keys) for peers.
        Send it only over an authenticated channel: NIXL checks nothing in it (a flipped byte in
        the worker address still loads)."""
        return bytes(self._agent.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata; returns the peer agent's name. Raises InvalidArgumentError naming
        why the metadata was refused (not bytes, too large, not NIXL's, unparsable, our own, known)."""
        if not isinstance(metadata, (bytes, bytearray)):
            raise InvalidArgumentError(f"NIXL peer metadata must be bytes, not {type(metadata).__name__}")
        if not 0 < len(metadata) <= MAX_METADATA_BYTES:
            raise InvalidArgumentError(f"NIXL peer metadata is {len(metadata)} bytes: expected 1..{MAX_METADATA_BYTES}")
        if not metadata.startswith(_METADATA_TAG):
            raise InvalidArgumentError(
                f"NIXL peer metadata does not start with {_METADATA_TAG!r}: not NIXL agent metadata"
            )
        try:
            name = self._agent.add_remote_agent(bytes(metadata))
        except self._errors as e:  # nixlMismatchError (unparsable), nixlInvalidParamError (our own name), ...
            raise InvalidArgumentError(
                f"NIXL refused peer metadata of {len(metadata)} bytes ({type(e).__name__}: {e})"
            ) from e
        name = name.decode() if isinstance(name, bytes) else str(name)
        self._peers.add(name)
        return name

    def remove_peer(self, name: str) -> None:
        """Forget a peer's metadata and disconnect from it (idempotent)."""
        if name in self._peers:
            self._peers.discard(name)
            try:
                self._agent.remove_remote_agent(name)
            except self._errors as e:  # already gone on NIXL's side: nothing left to undo
                log.debug("NIXL remove_remote_agent(%r): %s", name, e)

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    # -- reads --------------------------------------------------------------------------------

    def read(
        self,
        peer: str,
        pieces: list[tuple[int, int, int]],
        deadline_s: float,
        *,
        max_post_bytes: int = DEFAULT_MAX_POST_BYTES,
        local: tuple[str, int] = (HOST, 0),
        remote: tuple[str, int] = (HOST, 0),
    ) -> ReadOutcome:
        """One-sided READ of ``pieces`` = [(remote addr, local addr, nbytes), ...] from ``peer`` into
        this agent's registered memory, ended within ``deadline_s`` seconds (plus at most one post of
        ``max_post_bytes``, which a shared-memory copy does synchronously). Never raises for the
        transfer itself: the outcome says done, deadline, peer_lost or failed. Raises
        InvalidArgumentError for an unknown peer or malformed pieces (nothing was posted).
        ``local`` / ``remote``: the memory kind and device index of each side, (HOST, 0) or
        (GPU, device); every piece of a side lies in a region of that kind."""
        t0 = time.monotonic()
        at = t0 + deadline_s
        if peer not in self._peers:
            raise InvalidArgumentError(f"NIXL read from {peer!r}: no metadata loaded for that peer (add_peer first)")
        if deadline_s <= 0:
            raise InvalidArgumentError(f"NIXL read deadline {deadline_s} s must be positive")
        if max_post_bytes <= 0:
            raise InvalidArgumentError(f"NIXL read max_post_bytes {max_post_bytes} must be positive")
        (local_mem, local_dev), (remote_mem, remote_dev) = local, remote
        _check_mem(local_mem, local_dev)
        _check_mem(remote_mem, remote_dev)
        for i, p in enumerate(pieces):
            if len(p) != 3 or p[0] <= 0 or p[1] <= 0 or p[2] <= 0:
                raise InvalidArgumentError(
                    f"NIXL read piece {i} = {p!r}: expected (remote addr, local addr, nbytes), all positive"
                )
        total = sum(p[2] for p in pieces)
        if total == 0:
            return ReadOutcome(DONE, "nothing to read", 0.0, 0)

        handles: list = []
        try:
            for batch in _batches(pieces, max_post_bytes):
                if time.monotonic() >= at:
                    return self._end(
                        handles, DEADLINE, f"deadline passed after posting {len(handles)} requests", t0, total
                    )
                into = self._agent.get_xfer_descs([(lo, n, local_dev) for _, lo, n in batch], local_mem)
                source = self._agent.get_xfer_descs([(ro, n, remote_dev) for ro, _, n in batch], remote_mem)
                try:
                    h = self._agent.initialize_xfer("READ", into, source, peer)
                except self._errors as e:  # descriptors outside registered memory, unknown remote region
                    return self._end(
                        handles, FAILED, f"NIXL refused the read request ({type(e).__name__}: {e})", t0, total
                    )
                handles.append(h)
                state = self._agent.transfer(h)
                if state == "ERR":
                    return self._end(handles, FAILED, "NIXL failed to post the read", t0, total)
            pending = list(handles)
            pause = 0.0
            spin_until = time.monotonic() + SPIN_S
            while pending:
                states = [(h, self._agent.check_xfer_state(h)) for h in pending]
                if any(s == "ERR" for _, s in states):
                    return self._end(handles, FAILED, "NIXL reported a failed read", t0, total)
                pending = [h for h, s in states if s != "DONE"]
                if not pending:
                    break
                if time.monotonic() >= at:
                    return self._end(
                        handles, DEADLINE, f"{len(pending)} of {len(handles)} requests unfinished", t0, total
                    )
                # Polling is what moves the bytes when this agent has no progress thread (UCX over
                # TCP copies them in on progress), so spin a while; then back off, so that a slow
                # peer does not cost a core: 2-core machines serve while they wait.
                if time.monotonic() >= spin_until:
                    pause = min(max(pause * 2, 50e-6), 1e-3)
                    time.sleep(pause)
        except self._errors as e:  # transfer() / check_xfer_state() raise on failure: classify it
            kind = type(e).__name__
            status = PEER_LOST if kind == "nixlRemoteDisconnectError" else FAILED
            return self._end(handles, status, f"{kind}: {e}", t0, total)
        return self._end(handles, DONE, "", t0, total)

    def _end(self, handles: list, status: str, detail: str, t0: float, total: int) -> ReadOutcome:
        """Release every handle (cancelling unfinished ones) and build the outcome."""
        stuck = False
        for h in handles:
            try:
                h.release()
            except self._errors as e:
                # NIXL could not cancel it: the peer may still write into our blocks, so the
                # handle stays referenced (freeing it would be unsafe) and the caller is told.
                self._stuck.append(h)
                stuck = True
                detail = f"{detail}; a request could not be cancelled ({type(e).__name__})"
        return ReadOutcome(status, detail, time.monotonic() - t0, total if status == DONE else 0, stuck)

    def close(self) -> None:
        """Forget peers and deregister every region (the agent itself goes with the object)."""
        for name in list(self._peers):
            self.remove_peer(name)
        for region in list(self._regions):
            self.deregister(region)


def _check_mem(mem: str, device: int) -> None:
    if mem not in (HOST, GPU):
        raise InvalidArgumentError(f"NIXL memory kind {mem!r}: expected {HOST!r} (host) or {GPU!r} (CUDA device)")
    if not isinstance(device, int) or device < 0:
        raise InvalidArgumentError(f"NIXL device index {device!r} must be an int >= 0")


def _batches(pieces: list[tuple[int, int, int]], max_bytes: int):
    """Consecutive runs of ``pieces`` of at most ``max_bytes`` each (a larger piece alone)."""
    batch: list[tuple[int, int, int]] = []
    size = 0
    for p in pieces:
        if batch and size + p[2] > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += p[2]
    if batch:
        yield batch


__all__ = [
    "DEADLINE",
    "DONE",
    "FAILED",
    "GPU",
    "HOST",
    "MAX_METADATA_BYTES",
    "PEER_LOST",
    "NixlEndpoint",
    "ReadOutcome",
    "Region",
    "nixl_unavailable_reason",
]
