"""Same-host pool sharing between peers (kvtier.p2p.gpu_share and the GPU_* frames): a peer maps
another's pool, leases the chunks it holds, copies them page to page, and releases them.

On a machine with no GPU the pools live in /dev/shm files (``share_pool="shm"``); the frames, the
leases, the pins in the exporter's pool and the fallbacks are the same as for CUDA IPC
(tests/test_p2p_gpu.py copies GPU memory through the same service path)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier.errors import InvalidArgumentError
from kvtier.p2p import PeerConfig
from kvtier.p2p import protocol as P
from kvtier.p2p.gpu_share import LeaseTable, SharedMemory
from kvtier.p2p.transport import Deadline

torch = pytest.importorskip("torch")

from _util import wait_until
from kvtier.pool import PagedKVPool

SECRET = b"share-test-secret-0123456789"
PEERS = {"secret": SECRET, "gossip_interval_s": 0.05, "ack_timeout_s": 0.04, "request_timeout_s": 1.0}
CT = 32

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")


def make_pool(share="shm", kv_layout="vllm", write_through=False, **peer_kw):
    return PagedKVPool(
        num_layers=2,
        kv_heads=2,
        head_dim=16,
        num_pages=48,
        page_tokens=8,
        chunk_tokens=CT,
        dtype=torch.float32,
        kv_layout=kv_layout,
        cpu_bytes=8 * 2 * 2 * 2 * 8 * 16 * 4 * 4,
        method="cpu",
        write_through=write_through,
        peers={**PEERS, "share_pool": share, **peer_kw},
    )


def pages_of(pool, pages):
    if pool.kv_layout == "vllm":
        return [t[:, pages].clone() for t in pool.kv]
    return [pool.kv[pages].clone()]


def compute(pool, tokens, seed):
    """'Prefill' ``tokens`` into ``pool``: random KV in the sequence's pages, then commit."""
    seq = pool.begin(tokens)
    g = torch.Generator().manual_seed(seed)
    for t in [pool.kv] if pool.kv_layout == "cross_layer" else pool.kv:
        if pool.kv_layout == "vllm":
            t[:, seq.page_table] = torch.randn(t[:, seq.page_table].shape, generator=g)
        else:
            t[seq.page_table] = torch.randn(t[seq.page_table].shape, generator=g)
    pool.commit(seq, tokens)
    return seq


@pytest.fixture
def pair(request):
    kw = getattr(request, "param", {})
    a = make_pool(**kw.get("a", {}))
    b = make_pool(**kw.get("b", {}), seeds=(a.cache.stats()["peers"]["address"],))
    wait_until(lambda: len(a.cache.peers.members()) == 1 and len(b.cache.peers.members()) == 1)
    yield a, b
    b.close()
    a.close()


# -- frames and leases ------------------------------------------------------------------------


def test_share_frames_roundtrip_and_reject_bad_geometry():
    t = P.SharedTensor(0, (2, 48, 8), (384, 8, 1), 0, "bfloat16", b"h" * 64, 1536, 0, b"r", 8, b"e", True)
    h = P.GpuHandles(True, "", "cuda", 1, (t, t))
    assert P.GpuHandles.decode(h.encode()) == h
    assert P.GpuHandles.decode(P.GpuHandles(False, "another host").encode()).reason == "another host"
    pin = P.GpuPinned(9, 2000, 4, tuple(range(8)))
    assert P.GpuPinned.decode(pin.encode()) == pin and pin.chunks == 2
    assert P.decode_gpu_open(P.encode_gpu_open("boot-1", ("cuda", "shm"))) == ("boot-1", ("cuda", "shm"))
    with pytest.raises(P.ProtocolError, match="whole number"):
        P.GpuPinned.decode(P.GpuPinned(1, 1, 4, (1, 2, 3)).encode())
    with pytest.raises(P.ProtocolError, match="pages per chunk"):
        P.GpuPinned.decode(P.GpuPinned(1, 1, 0, ()).encode())
    with pytest.raises(P.ProtocolError, match="page dim"):
        P.GpuHandles.decode(P.GpuHandles(True, "", "cuda", 3, (t,)).encode())
    with pytest.raises(P.ProtocolError, match="no tensors"):
        P.GpuHandles.decode(P.GpuHandles(True, "", "cuda", 0, ()).encode())
    big = bytearray(P.GpuHandles(True, "", "shm", 0, (t,)).encode())
    at = big.index(b"h" * 64) - 2
    big[at : at + 2] = (P.MAX_HANDLE_BYTES + 1).to_bytes(2, "little")
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.GpuHandles.decode(bytes(big))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 3))
def test_garbage_share_bodies_raise_protocol_error_only(data, which):
    decoders = [P.GpuHandles.decode, P.GpuPinned.decode, P.decode_gpu_open, P.decode_lease]
    try:
        decoders[which](data)
    except P.ProtocolError:
        pass


def test_lease_table_unpins_on_release_and_on_expiry():
    unpinned = []
    leases = LeaseTable(unpinned.append)
    a = leases.add([b"a"], 100.0)
    leases.add([b"b"], 0.0)
    assert leases.expire() == 1 and unpinned == [[b"b"]]
    assert leases.release(a) and unpinned == [[b"b"], [b"a"]]
    assert not leases.release(a)  # once
    leases.add([b"c"], 100.0)
    leases.release_all()
    assert unpinned[-1] == [b"c"] and len(leases) == 0


def test_shared_memory_refuses_files_it_did_not_make(tmp_path):
    shm = SharedMemory()
    try:
        t = shm.allocate((4, 3), torch.float32)
        (s,) = shm.export([t])
        assert os.path.exists(s.storage_handle.decode())
        other = P.SharedTensor(-1, (4, 3), (3, 1), 0, "float32", str(tmp_path / "x").encode(), 48, 0)
        with pytest.raises(InvalidArgumentError, match="not a kvtier file"):
            shm.open([other])
        with pytest.raises(InvalidArgumentError, match="byte size"):
            shm.open([P.SharedTensor(-1, (4, 4), (4, 1), 0, "float32", s.storage_handle, 48, 0)])
        (m,) = shm.open([s])
        t[2, 1] = 7.0
        assert m[2, 1].item() == 7.0  # one memory, two mappings
        with pytest.raises(InvalidArgumentError, match="not allocated"):
            shm.export([torch.zeros(4, 3)])
    finally:
        shm.close()
    assert not os.path.exists(s.storage_handle.decode())


# -- two pools in one process, peers of each other ----------------------------------------------


@pytest.mark.parametrize("kv_layout", ["vllm", "cross_layer"])
def test_b_copies_chunks_only_in_a_pool_bit_exact(kv_layout):
    a = make_pool(kv_layout=kv_layout)
    b = make_pool(kv_layout=kv_layout, seeds=(a.cache.stats()["peers"]["address"],))
    try:
        tokens = list(range(100, 100 + 4 * CT))
        sa = compute(a, tokens, seed=1)
        # Not in A's CPU tier (no write-through, no eviction): only its pool holds the chunks.
        assert a.cache.lookup_tiers(tokens) == []
        wait_until(lambda: b.cache.lookup(tokens) == 4 * CT)
        sb = b.begin(tokens + [7])
        assert sb.lower_hit_tokens == 4 * CT
        sb.wait()
        n = 4 * CT // 8
        for x, y in zip(pages_of(a, sa.page_table[:n]), pages_of(b, sb.page_table[:n])):
            assert torch.equal(x, y)
        st = b.cache.stats()["peers"]
        assert st["gpu_chunks_copied"] == 4 and st.get("chunks_pulled", 0) == 0 and st["gpu_maps"] == 1
        sa_st = a.cache.stats()["peers"]
        assert sa_st["gpu_chunks_leased"] == 4 and sa_st["gpu_opens_served"] == 1
        # The lease ends (B releases it in the background once its copy landed): A's chunks are
        # then referenced by A's own sequence only.
        wait_until(lambda: [c.refs for c in a._chunks.values()] == [1, 1, 1, 1])
        a.release(sa)
        assert a.stats()["gpu_referenced_chunks"] == 0
        b.release(sb)
    finally:
        b.close()
        a.close()


def test_pinned_chunks_survive_the_exporters_evictions(pair):
    a, _b = pair
    tokens = list(range(5000, 5000 + 2 * CT))
    a.release(compute(a, tokens, seed=2))
    keys = a.keyer.keys(tokens)
    pages = a.share_pin(keys)
    assert len(pages) == 2
    before = [p.clone() for p in pages_of(a, [p for ps in pages for p in ps])]
    # Fill A's pool with other prompts: everything unreferenced goes, the pinned chunks stay.
    for i in range(4):
        a.release(compute(a, list(range(10**6 * (i + 1), 10**6 * (i + 1) + 10 * CT)), seed=10 + i))
    assert all(k in a._chunks for k in keys)
    after = pages_of(a, [p for ps in pages for p in ps])
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    a.share_unpin(keys)
    a.release(compute(a, list(range(9 * 10**6, 9 * 10**6 + 12 * CT)), seed=20))  # the whole pool
    assert not any(k in a._chunks for k in keys)  # evictable again


def test_a_lease_the_importer_never_releases_expires():
    a = make_pool()
    try:
        tokens = list(range(300, 300 + 2 * CT))
        a.release(compute(a, tokens, seed=3))
        svc = a.cache.peers
        from kvtier.p2p.transport import Identity, connect

        me = Identity("raw-client", a.layout.fingerprint, svc._blob_bytes, SECRET)
        host, port = svc.address
        conn = connect(host, port, me, Deadline(2.0), 1.0)
        try:
            from kvtier.p2p.gpu_share import host_id

            _, body = conn.request(
                P.Kind.GPU_OPEN, 1, P.encode_gpu_open(host_id(), ("shm",)), Deadline(2.0), P.Kind.GPU_HANDLES
            )
            assert P.GpuHandles.decode(body).ok
            _, body = conn.request(
                P.Kind.GPU_PIN, 2, P.encode_keys(a.keyer.keys(tokens)), Deadline(2.0), P.Kind.GPU_PINNED
            )
            pin = P.GpuPinned.decode(body)
            assert pin.chunks == 2 and pin.lease_ms == 2000  # 2 x request_timeout_s
            assert a.stats()["gpu_referenced_chunks"] == 2
            # The client vanishes without GPU_UNPIN: the lease runs out and the pins go.
            wait_until(lambda: a.stats()["gpu_referenced_chunks"] == 0, timeout=5.0)
            assert svc.stats()["gpu_leases_expired"] == 1
            # A release after expiry is answered, and changes nothing.
            _, body = conn.request(
                P.Kind.GPU_UNPIN, 3, P.encode_lease(pin.lease_id), Deadline(2.0), P.Kind.GPU_UNPINNED
            )
            assert body == b"\x00"
        finally:
            conn.close()
    finally:
        a.close()


def test_pin_without_open_gets_nothing():
    a = make_pool()
    try:
        tokens = list(range(300, 300 + CT))
        a.release(compute(a, tokens, seed=3))
        from kvtier.p2p.transport import Identity, connect

        svc = a.cache.peers
        conn = connect(*svc.address, Identity("x", a.layout.fingerprint, svc._blob_bytes, SECRET), Deadline(2.0), 1.0)
        try:
            _, body = conn.request(
                P.Kind.GPU_PIN, 1, P.encode_keys(a.keyer.keys(tokens)), Deadline(2.0), P.Kind.GPU_PINNED
            )
            assert P.GpuPinned.decode(body).chunks == 0
            assert a.stats()["gpu_referenced_chunks"] == 0
            _, body = conn.request(
                P.Kind.GPU_OPEN, 2, P.encode_gpu_open("another-boot-id", ("shm",)), Deadline(2.0), P.Kind.GPU_HANDLES
            )
            reply = P.GpuHandles.decode(body)
            assert not reply.ok and reply.reason == "another host"
        finally:
            conn.close()
    finally:
        a.close()


@pytest.mark.parametrize("why", ["shares nothing", "another host"])
def test_a_peer_that_cannot_share_is_pulled_over_tcp(why):
    a = make_pool(share="off" if why == "shares nothing" else "shm", write_through=True)
    if why == "another host":
        a.cache.peers._host_id = "some-other-machine"  # as if A ran elsewhere
    b = make_pool(seeds=(a.cache.stats()["peers"]["address"],))
    try:
        tokens = list(range(700, 700 + 3 * CT))
        sa = compute(a, tokens, seed=4)
        a.cache.drain()
        wait_until(lambda: b.cache.lookup(tokens) == 3 * CT)
        sb = b.begin(tokens)
        sb.wait()
        n = 3 * CT // 8
        assert all(torch.equal(x, y) for x, y in zip(pages_of(a, sa.page_table[:n]), pages_of(b, sb.page_table[:n])))
        st = b.cache.stats()["peers"]
        assert st["chunks_pulled"] == 3 and st.get("gpu_chunks_copied", 0) == 0 and st["gpu_maps_refused"] == 1
    finally:
        b.close()
        a.close()


def test_pool_half_in_a_pool_half_in_a_cpu_tier(pair):
    """The leading chunks come from A's pool by copy, the rest (only in A's CPU tier after A's
    pool evicted them) over TCP, into one sequence, bit-exact."""
    a, b = pair
    tokens = list(range(1, 1 + 6 * CT))
    sa = compute(a, tokens, seed=6)
    a.release(sa)
    keys = a.keyer.keys(tokens)
    expect = {k: pages_of(a, list(a._chunks[k].pages)) for k in keys}
    # Evict the last three chunks from A's pool into its CPU tier (the pool's own eviction path).
    with a._lock:
        for k in keys[:3]:
            a._chunks[k].refs += 1  # keep the first three in the pool
        a._evict(3 * 4)
        for k in keys[:3]:
            a._chunks[k].refs -= 1
    a.cache.drain()
    assert [k in a._chunks for k in keys] == [True] * 3 + [False] * 3
    assert [a.cache.tier.lookup(k) for k in keys] == [0] * 3 + [1] * 3  # the CPU tier has the last three
    wait_until(lambda: b.cache.lookup(tokens) == 6 * CT)
    sb = b.begin(tokens)
    sb.wait()
    for i, k in enumerate(keys):
        got = pages_of(b, sb.page_table[i * 4 : (i + 1) * 4])
        assert all(torch.equal(x, y) for x, y in zip(expect[k], got)), i
    st = b.cache.stats()["peers"]
    assert st["gpu_chunks_copied"] == 3 and st["chunks_pulled"] == 3


def test_a_frozen_load_accepts_no_late_copy():
    from kvtier.p2p.service import _Frontier

    class Tier:
        def load(self, keys, pages, stream):
            raise AssertionError("nothing to scatter")

    f = _Frontier(Tier(), [b"k" * 16] * 2, np.arange(8), 4, 0, ["peer", "peer"])
    assert f.begin_direct()
    f.end_direct([0], True)
    assert f.freeze() == 1
    assert not f.begin_direct()  # the pages are the caller's again


def test_share_pool_config_is_checked():
    with pytest.raises(InvalidArgumentError, match="share_pool"):
        PeerConfig(secret=SECRET, share_pool="nvlink")
    with pytest.raises(InvalidArgumentError, match="needs a pool on a CUDA device"):
        make_pool(share="cuda")


# -- two processes ----------------------------------------------------------------------------


def _page_digest(pool, pages) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in pages_of(pool, pages):
        h.update(t.float().cpu().numpy().tobytes())
    return h.hexdigest()


def _exporter_process(mode, device, tokens, q, done):
    """Process A: a pool on ``device`` sharing through ``mode``; computes ``tokens`` into it, keeps
    them only in its pool (no write-through, nothing evicted), and serves until told to stop."""
    import torch
    from kvtier.pool import PagedKVPool

    pool = PagedKVPool(
        num_layers=2,
        kv_heads=2,
        head_dim=16,
        num_pages=48,
        page_tokens=8,
        chunk_tokens=CT,
        dtype=torch.bfloat16,
        device=device,
        kv_layout="vllm",
        cpu_bytes=1 << 20,
        peers={**PEERS, "share_pool": mode, "node_id": "A"},
    )
    seq = pool.begin(tokens)
    g = torch.Generator().manual_seed(8)
    for t in pool.kv:
        t[:, seq.page_table] = torch.randn(t[:, seq.page_table].shape, generator=g).to(t)
    pool.commit(seq, tokens)
    n = len(tokens) // 8
    q.put((pool.cache.stats()["peers"]["address"], _page_digest(pool, seq.page_table[:n]), os.getpid()))
    done.wait(120)
    q.put(pool.cache.stats()["peers"])
    pool.close()


def _importer(mode, device, seeds):
    return PagedKVPool(
        num_layers=2,
        kv_heads=2,
        head_dim=16,
        num_pages=48,
        page_tokens=8,
        chunk_tokens=CT,
        dtype=torch.bfloat16,
        device=device,
        kv_layout="vllm",
        cpu_bytes=1 << 20,
        peers={**PEERS, "share_pool": mode, "node_id": "B", "seeds": seeds},
    )


SHARE_MODES = [
    pytest.param("shm", "cpu", marks=pytest.mark.multiproc),
    pytest.param("cuda", "cuda", marks=[pytest.mark.multiproc, pytest.mark.gpu]),
]


@pytest.mark.parametrize(("mode", "device"), SHARE_MODES)
def test_another_process_copies_the_pool_pages_bit_exact(mode, device):
    import multiprocessing as mp

    if device == "cuda":  # with two GPUs: A's pool on GPU 0, B's on GPU 1 (peer to peer)
        b_device, a_device = f"cuda:{torch.cuda.device_count() - 1}", "cuda:0"
    else:
        a_device = b_device = "cpu"
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    tokens = list(range(40, 40 + 5 * CT))
    p = ctx.Process(target=_exporter_process, args=(mode, a_device, tokens, q, done))
    p.start()
    b = None
    try:
        address, digest, _pid = q.get(timeout=120)
        b = _importer(mode, b_device, (address,))
        wait_until(lambda: b.cache.lookup(tokens) == 5 * CT, timeout=20)
        t0 = time.monotonic()
        seq = b.begin(tokens + [3])
        seq.wait()
        took = time.monotonic() - t0
        assert seq.lower_hit_tokens == 5 * CT
        assert _page_digest(b, seq.page_table[: 5 * CT // 8]) == digest
        st = b.cache.stats()["peers"]
        assert st["gpu_chunks_copied"] == 5 and st.get("chunks_pulled", 0) == 0, st
        assert took < PEERS["request_timeout_s"] + 1.0
        b.release(seq)
        done.set()
        a_stats = q.get(timeout=60)
        assert a_stats["gpu_chunks_leased"] == 5 and a_stats.get("gpu_leases_expired", 0) == 0
    finally:
        done.set()
        if b is not None:
            b.close()
        p.join(60)
        if p.is_alive():
            p.kill()


@pytest.mark.multiproc
def test_an_exporter_killed_after_mapping_costs_a_miss_within_the_deadline():
    import glob
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    tokens = list(range(40, 40 + 5 * CT))
    p = ctx.Process(target=_exporter_process, args=("shm", "cpu", tokens, q, done))
    p.start()
    b = None
    try:
        address, _digest, pid = q.get(timeout=120)
        b = _importer("shm", "cpu", (address,))
        wait_until(lambda: b.cache.lookup(tokens) == 5 * CT, timeout=20)  # mapped A's pool, A confirmed
        assert b.cache.stats()["peers"]["gpu_maps"] == 1
        os.kill(pid, signal.SIGKILL)
        p.join(10)
        t0 = time.monotonic()
        seq = b.begin(tokens)  # the plan names A; A is gone
        seq.wait()
        took = time.monotonic() - t0
        assert seq.cached_tokens == 0  # a miss: the tokens are recomputed, nothing partial
        assert took < PEERS["request_timeout_s"] + 1.0
        b.release(seq)
        # B keeps serving: its own prompts work as before.
        s2 = b.begin(list(range(10_000, 10_000 + 2 * CT)))
        b.commit(s2, list(range(10_000, 10_000 + 2 * CT)))
        b.release(s2)
        assert b.begin(list(range(10_000, 10_000 + 2 * CT))).gpu_hit_tokens == 2 * CT
    finally:
        if p.is_alive():  # (a killed waiter leaves the event's lock held: never set it then)
            done.set()
        if b is not None:
            b.close()
        if p.is_alive():
            p.kill()
        p.join(10)
        for f in glob.glob(f"/dev/shm/kvtier-{pid}-*"):  # a killed process cannot remove its files
            os.unlink(f)


# -- the byte ranges a CUDA IPC copy is made of, checked on host memory ---------------------------


@pytest.mark.parametrize("page_dim", [0, 1])
@pytest.mark.parametrize("contiguous_runs", [True, False])
def test_page_copier_byte_ranges_copy_exactly_the_pages(page_dim, contiguous_runs):
    """PageCopier.segments is what the core copies on the GPU. Here each (src, dst, bytes) row is
    applied with memmove on CPU tensors (the addresses are host addresses), and the result must
    equal torch's copy of the same pages, with every other page untouched."""
    import ctypes

    from kvtier.p2p.cuda_ipc import PageCopier

    rng = np.random.default_rng(page_dim * 2 + contiguous_runs)
    shape_s = (40, 3, 2, 4, 8) if page_dim == 0 else (2, 40, 4, 8)
    shape_d = (52, 3, 2, 4, 8) if page_dim == 0 else (2, 52, 4, 8)
    src = [torch.randn(shape_s, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(3)]
    dst = [torch.zeros(shape_d, dtype=torch.bfloat16) for _ in range(3)]
    if contiguous_runs:
        sp, dp = np.arange(5, 29), np.arange(20, 44)
    else:
        sp, dp = rng.permutation(40)[:24], rng.permutation(52)[:24]
    copier = PageCopier(src, dst, page_dim)
    rows = copier.segments(sp, dp)
    if contiguous_runs:  # one range per outer row per tensor
        assert len(rows) == 3 * (1 if page_dim == 0 else 2)
    for a, b, n in rows.tolist():
        ctypes.memmove(b, a, n)
    want = [torch.zeros(shape_d, dtype=torch.bfloat16) for _ in range(3)]
    idx_s, idx_d = torch.as_tensor(sp), torch.as_tensor(dp)
    for s, w in zip(src, want):
        w.index_copy_(page_dim, idx_d, s.index_select(page_dim, idx_s))
    assert all(torch.equal(d, w) for d, w in zip(dst, want))
    with pytest.raises(InvalidArgumentError, match="destination pages outside"):
        copier.segments([0], [52])
    with pytest.raises(InvalidArgumentError, match="page shapes differ"):
        PageCopier(src, [torch.zeros(2, 52, 4, 9, dtype=torch.bfloat16)] * 3, 1)
    strided = [s.transpose(-1, -2).contiguous().transpose(-1, -2) for s in src]  # same shape, not contiguous
    assert PageCopier(strided, dst, page_dim).segments(sp, dp) is None  # copy() takes the torch path
