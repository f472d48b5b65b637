"""Tests for kvtier._core.BlockAllocator and Arena: a stateful model check, threads, arena bytes."""

from __future__ import annotations

import contextlib
import gc
import itertools
import random
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from kvtier import _core
from kvtier.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    KVTierError,
    ResourceExhaustedError,
)

MiB = 1 << 20
BLOCK_BYTES = 64


@contextlib.contextmanager
def raises_exactly(cls):
    """pytest.raises, but the class must be exactly `cls` (not a sibling sharing a builtin base)."""
    with pytest.raises(cls) as info:
        yield info
    assert type(info.value) is cls, f"raised {type(info.value).__name__}, not {cls.__name__}"


class AllocatorModel(RuleBasedStateMachine):
    """Drives one BlockAllocator with random legal and illegal calls and compares it with a model.

    The model is a dict of allocated id -> pin count plus the counters of BlockAllocatorStats.
    Every illegal call must raise its kvtier.errors class and change nothing (the invariants then
    compare the whole state again).
    """

    @initialize(num_blocks=st.integers(min_value=1, max_value=12))
    def setup(self, num_blocks):
        self.n = num_blocks
        self.alloc = _core.BlockAllocator(num_blocks, BLOCK_BYTES)
        self.pins: dict[int, int] = {}  # allocated id -> pins
        self.allocations = 0
        self.frees = 0
        self.failed = 0
        self.peak = 0

    # ---- helpers ---------------------------------------------------------------------------
    def free_ids(self):
        return sorted(set(range(self.n)) - set(self.pins))

    def unpinned(self):
        return sorted(i for i, p in self.pins.items() if p == 0)

    def pinned(self):
        return sorted(i for i, p in self.pins.items() if p > 0)

    def take(self, ids):
        for i in ids:
            assert 0 <= i < self.n, f"id {i} out of range"
            assert i not in self.pins, f"id {i} handed out while already allocated"
            self.pins[i] = 0
        self.allocations += len(ids)
        self.peak = max(self.peak, len(self.pins))

    # ---- legal calls -----------------------------------------------------------------------
    @rule()
    def allocate(self):
        if len(self.pins) == self.n:
            with raises_exactly(ResourceExhaustedError):
                self.alloc.allocate()
            self.failed += 1
        else:
            self.take([self.alloc.allocate()])

    @rule(k=st.integers(min_value=0, max_value=14))
    def allocate_batch(self, k):
        if k > self.n - len(self.pins):
            with raises_exactly(ResourceExhaustedError):
                self.alloc.allocate_batch(k)
            self.failed += 1
        else:
            ids = self.alloc.allocate_batch(k)
            assert len(ids) == k
            assert len(set(ids)) == k, f"duplicate ids in one batch: {ids}"
            self.take(ids)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def pin(self, data):
        i = data.draw(st.sampled_from(sorted(self.pins)), label="pin id")
        self.alloc.pin(i)
        self.pins[i] += 1

    @precondition(lambda self: self.pinned())
    @rule(data=st.data())
    def unpin(self, data):
        i = data.draw(st.sampled_from(self.pinned()), label="unpin id")
        self.alloc.unpin(i)
        self.pins[i] -= 1

    @precondition(lambda self: self.unpinned())
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.sampled_from(self.unpinned()), label="free id")
        self.alloc.free(i)
        del self.pins[i]
        self.frees += 1

    @rule(data=st.data())
    def free_batch(self, data):
        unpinned = self.unpinned()
        ids_strategy = st.lists(st.sampled_from(unpinned), unique=True) if unpinned else st.just([])
        ids = data.draw(ids_strategy, label="free_batch ids")
        self.alloc.free_batch(ids)
        for i in ids:
            del self.pins[i]
        self.frees += len(ids)

    # ---- deliberate errors: each must raise its class and leave everything as it was --------
    @precondition(lambda self: self.free_ids())
    @rule(data=st.data(), how=st.sampled_from(["free", "free_batch", "pin", "unpin", "pin_count"]))
    def misuse_free_block(self, data, how):
        """Double free (and pin/unpin of a block nobody holds)."""
        i = data.draw(st.sampled_from(self.free_ids()), label="free id")
        with raises_exactly(FailedPreconditionError):
            if how == "free_batch":
                self.alloc.free_batch(self.unpinned() + [i])
            else:
                getattr(self.alloc, how)(i)

    @rule(
        data=st.data(),
        how=st.sampled_from(["free", "free_batch", "pin", "unpin", "pin_count"]),
    )
    def misuse_foreign_id(self, data, how):
        """Ids this allocator never had: past the end, negative, and wider than 32 bits."""
        i = data.draw(
            st.one_of(
                st.integers(min_value=self.n, max_value=2**32 + 20),
                st.integers(min_value=-(2**40), max_value=-1),
                st.sampled_from([2**32, 2**32 + 1, 2**63 - 1]),
                # A truncating binding would map these onto real, allocated blocks.
                st.sampled_from(sorted(self.pins) or [0]).map(lambda j: j + 2**32),
            ),
            label="foreign id",
        )
        with raises_exactly(InvalidArgumentError):
            if how == "free_batch":
                self.alloc.free_batch(self.unpinned() + [i])
            else:
                getattr(self.alloc, how)(i)
        assert not self.alloc.is_allocated(i)

    @precondition(lambda self: self.unpinned())
    @rule(data=st.data())
    def misuse_unpin_unpinned(self, data):
        i = data.draw(st.sampled_from(self.unpinned()), label="unpinned id")
        with raises_exactly(FailedPreconditionError):
            self.alloc.unpin(i)

    @precondition(lambda self: self.pinned())
    @rule(data=st.data(), in_batch=st.booleans())
    def misuse_free_pinned(self, data, in_batch):
        i = data.draw(st.sampled_from(self.pinned()), label="pinned id")
        with raises_exactly(FailedPreconditionError):
            if in_batch:
                self.alloc.free_batch(self.unpinned() + [i])
            else:
                self.alloc.free(i)

    @precondition(lambda self: self.unpinned())
    @rule(data=st.data())
    def misuse_duplicate_in_batch(self, data):
        ids = data.draw(st.lists(st.sampled_from(self.unpinned()), min_size=1, unique=True), label="batch")
        dup = data.draw(st.sampled_from(ids), label="duplicate")
        pos = data.draw(st.integers(min_value=0, max_value=len(ids)), label="position")
        batch = ids[:pos] + [dup] + ids[pos:]
        with raises_exactly(FailedPreconditionError):
            self.alloc.free_batch(batch)

    # ---- invariants ------------------------------------------------------------------------
    @invariant()
    def stats_match_model(self):
        if not hasattr(self, "alloc"):
            return
        s = self.alloc.stats()
        assert s == {
            "num_blocks": self.n,
            "block_bytes": BLOCK_BYTES,
            "free_blocks": self.n - len(self.pins),
            "used_blocks": len(self.pins),
            "peak_used_blocks": self.peak,
            "pinned_blocks": len(self.pinned()),
            "allocations": self.allocations,
            "frees": self.frees,
            "failed_allocations": self.failed,
        }

    @invariant()
    def every_block_state_matches(self):
        if not hasattr(self, "alloc"):
            return
        for i in range(self.n):
            assert self.alloc.is_allocated(i) == (i in self.pins), f"block {i}"
            if i in self.pins:
                assert self.alloc.pin_count(i) == self.pins[i], f"pins of block {i}"

    def teardown(self):
        if not hasattr(self, "alloc"):
            return
        # Give everything back and take every block once more: none lost, none duplicated.
        for i, p in list(self.pins.items()):
            for _ in range(p):
                self.alloc.unpin(i)
        self.alloc.free_batch(sorted(self.pins))
        assert sorted(self.alloc.allocate_batch(self.n)) == list(range(self.n))
        with raises_exactly(ResourceExhaustedError):
            self.alloc.allocate()


AllocatorModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorModel = AllocatorModel.TestCase


# ---- plain tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_blocks=0, block_bytes=64),
        dict(num_blocks=4, block_bytes=0),
        dict(num_blocks=2**32, block_bytes=64),
    ],
)
def test_bad_constructor_arguments_are_invalid_argument(kwargs):
    with raises_exactly(InvalidArgumentError):
        _core.BlockAllocator(**kwargs)


def test_allocator_larger_than_its_arena_is_invalid_argument():
    arena = _core.Arena("host", MiB)
    with raises_exactly(InvalidArgumentError):
        _core.BlockAllocator(17, 64 * 1024, arena)
    # Regression: num_blocks * block_bytes wrapped around 2**64 and slipped past the size check.
    with raises_exactly(InvalidArgumentError):
        _core.BlockAllocator(2, 2**63, arena)
    with raises_exactly(InvalidArgumentError):
        _core.BlockAllocator(16, 2**60, arena)
    _core.BlockAllocator(16, 64 * 1024, arena)  # exactly fits


@pytest.mark.parametrize("op", ["free", "pin", "unpin", "pin_count"])
def test_id_wider_than_32_bits_does_not_alias_a_real_block(op):
    # Regression: the binding cast int64 -> uint32, so 2**32 acted on block 0.
    alloc = _core.BlockAllocator(4, 64)
    assert alloc.allocate() == 0
    with raises_exactly(InvalidArgumentError):
        getattr(alloc, op)(2**32)
    assert not alloc.is_allocated(2**32)
    assert alloc.is_allocated(0)
    assert alloc.pin_count(0) == 0
    assert alloc.stats()["used_blocks"] == 1


def test_error_messages_name_the_block():
    alloc = _core.BlockAllocator(4, 64)
    i = alloc.allocate()
    alloc.free(i)
    with pytest.raises(FailedPreconditionError, match=str(i)):
        alloc.free(i)
    with pytest.raises(InvalidArgumentError, match="99"):
        alloc.free(99)
    with pytest.raises(ResourceExhaustedError, match="5"):
        alloc.allocate_batch(5)
    # The builtin bases let callers that do not know kvtier still catch sensibly.
    assert issubclass(ResourceExhaustedError, MemoryError)
    assert issubclass(InvalidArgumentError, ValueError)


def test_threads_never_share_a_block():
    """allocate_batch / free_batch release the GIL; threads race on one allocator for real."""
    num_blocks, threads, rounds = 64, 8, 400
    alloc = _core.BlockAllocator(num_blocks, 64)
    owner = [-1] * num_blocks
    owner_lock = threading.Lock()
    errors: list[str] = []
    counts = {"alloc": 0, "free": 0, "failed": 0}
    counts_lock = threading.Lock()
    start = threading.Barrier(threads)

    def claim(tid, ids):
        with owner_lock:
            for i in ids:
                if owner[i] != -1:
                    errors.append(f"thread {tid} got block {i} held by thread {owner[i]}")
                owner[i] = tid

    def release(tid, ids):
        with owner_lock:
            for i in ids:
                if owner[i] != tid:
                    errors.append(f"thread {tid} frees block {i} held by {owner[i]}")
                owner[i] = -1

    def worker(tid):
        rng = random.Random(tid)
        held: list[int] = []
        n_alloc = n_free = n_failed = 0
        start.wait()
        for _ in range(rounds):
            if rng.random() < 0.55:
                try:
                    ids = alloc.allocate_batch(rng.randint(1, 12))
                except ResourceExhaustedError:
                    n_failed += 1
                    continue
                claim(tid, ids)
                held += ids
                n_alloc += len(ids)
            elif held:
                rng.shuffle(held)
                k = rng.randint(1, len(held))
                batch, held = held[:k], held[k:]
                release(tid, batch)  # give up ownership before the ids can be handed out again
                alloc.free_batch(batch)
                n_free += len(batch)
        release(tid, held)
        alloc.free_batch(held)
        n_free += len(held)
        with counts_lock:
            counts["alloc"] += n_alloc
            counts["free"] += n_free
            counts["failed"] += n_failed

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
        assert not t.is_alive(), "a worker thread hung"
    assert errors == []
    s = alloc.stats()
    assert s["used_blocks"] == 0 and s["free_blocks"] == num_blocks
    assert s["allocations"] == s["frees"] == counts["alloc"] == counts["free"]
    assert s["failed_allocations"] == counts["failed"]
    assert s["peak_used_blocks"] <= num_blocks
    assert sorted(alloc.allocate_batch(num_blocks)) == list(range(num_blocks))


# ---- Arena -------------------------------------------------------------------------------------


def test_host_arena_memoryview_reads_and_writes():
    arena = _core.Arena("host", 3 * MiB + 5)
    assert arena.kind == "host" and arena.requested_kind == "host"
    assert arena.size == 3 * MiB + 5
    assert arena.fallback_reason == ""
    assert arena.base_ptr % (2 * MiB) == 0
    mv = arena.memoryview()
    assert not mv.readonly
    assert mv.nbytes == arena.size
    assert mv[0] == 0 and mv[-1] == 0
    mv[0] = 0xAB
    mv[-1] = 0xCD
    mv[1000:1004] = b"kvkv"
    again = arena.memoryview()  # a second view sees the same bytes
    assert again[0] == 0xAB and again[-1] == 0xCD
    assert bytes(again[1000:1004]) == b"kvkv"


def test_pinned_arena_falls_back_to_host_or_is_pinned():
    arena = _core.Arena("pinned_host", MiB)
    assert arena.requested_kind == "pinned_host"
    pinned_ok, reason = _core.probe_pinned_memory()
    if arena.kind == "pinned_host":
        assert pinned_ok and arena.fallback_reason == ""
    else:
        assert arena.kind == "host"
        assert arena.fallback_reason, "a fallback must say why"
        assert not pinned_ok and reason
    mv = arena.memoryview()
    mv[:4] = b"\x01\x02\x03\x04"
    assert bytes(mv[:4]) == b"\x01\x02\x03\x04"


def test_arena_bad_arguments():
    with raises_exactly(InvalidArgumentError):
        _core.Arena("host", 0)
    with raises_exactly(InvalidArgumentError):
        _core.Arena("tape", MiB)
    # Regression: sizes near 2**64 wrapped the 2 MiB round-up and "succeeded" with no memory.
    with raises_exactly(ResourceExhaustedError):
        _core.Arena("host", 2**64 - 1)


def test_device_arena_without_gpu_raises_not_crashes():
    if _core.list_gpus()[0]:
        arena = _core.Arena("device", MiB)
        assert arena.kind == "device"
        with raises_exactly(InvalidArgumentError):
            arena.memoryview()
        pytest.skip("a GPU is present: the device arena was allocated")
    with pytest.raises(KVTierError) as info:
        _core.Arena("device", MiB)
    assert str(info.value)


def test_arena_backed_blocks_do_not_overlap():
    num_blocks, block_bytes = 48, 4096 + 128
    arena = _core.Arena("host", num_blocks * block_bytes)
    alloc = _core.BlockAllocator(num_blocks, block_bytes, arena)
    ids = alloc.allocate_batch(num_blocks)
    addrs = sorted((alloc.block_address(i), i) for i in ids)
    for (a, _), (b, _) in itertools.pairwise(addrs):
        assert a + block_bytes <= b, "blocks overlap"
    assert addrs[0][0] >= arena.base_ptr
    assert addrs[-1][0] + block_bytes <= arena.base_ptr + arena.size
    for i in ids:
        assert alloc.block_address(i) == arena.base_ptr + i * block_bytes

    # Fill every block with its own id, then check no write reached a neighbour.
    mv = arena.memoryview()
    for i in ids:
        off = alloc.block_address(i) - arena.base_ptr
        mv[off : off + block_bytes] = bytes([i % 251 + 1]) * block_bytes
    for i in ids:
        off = alloc.block_address(i) - arena.base_ptr
        expected = bytes([i % 251 + 1]) * block_bytes
        assert bytes(mv[off : off + block_bytes]) == expected, f"block {i}"

    with raises_exactly(InvalidArgumentError):
        alloc.block_address(num_blocks)
    with raises_exactly(InvalidArgumentError):
        alloc.block_address(-1)


def test_allocator_keeps_its_arena_alive():
    arena = _core.Arena("host", MiB)
    base = arena.base_ptr
    alloc = _core.BlockAllocator(16, 64 * 1024, arena)
    del arena
    gc.collect()
    # The arena is still mapped (the allocator holds it): addresses stay those of the arena.
    assert alloc.block_address(0) == base
    assert alloc.block_address(15) == base + 15 * 64 * 1024


def test_allocator_without_arena_has_null_addresses():
    alloc = _core.BlockAllocator(4, 64)
    assert alloc.block_address(3) == 0
