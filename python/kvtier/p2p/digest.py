"""Directory digests: a Bloom filter of the chunk keys a member holds, and the table of every
peer's filter that a lookup consults.

Keys are blake2b outputs, so their first 8 bytes are already uniform: the filter derives its
``k`` bit positions from them by double hashing, and deltas on the wire carry only those 8 bytes.
A filter only grows between rebuilds (evictions are not reported to Python), so a stale entry is
a false positive: one CONFIRM round trip that answers "no", never wrong data. The owner rebuilds
its filter from the keys still present (a new *generation*) to shed them.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from kvtier.p2p.protocol import DigestDelta, DigestSnapshot

_U32 = struct.Struct("<II")


def key_hash(key: bytes) -> bytes:
    """The 8 bytes of a chunk key that digests hash (keys are already uniform)."""
    return bytes(key[:8])


def bloom_geometry(capacity: int, fp_rate: float) -> tuple[int, int]:
    """(bits, hashes) for ``capacity`` keys at false-positive rate ``fp_rate``; bits a multiple
    of 64."""
    bits = max(64, math.ceil(-capacity * math.log(fp_rate) / (math.log(2) ** 2)))
    bits = (bits + 63) // 64 * 64
    hashes = max(1, min(32, round(bits / capacity * math.log(2))))
    return bits, hashes


def _positions(h: bytes, num_bits: int, num_hashes: int) -> np.ndarray:
    a, b = _U32.unpack(h)
    b |= 1
    return (a + np.arange(num_hashes, dtype=np.uint64) * b) % num_bits


class BloomFilter:
    """A Bloom filter over 8-byte key hashes: ``num_bits`` bits (multiple of 64), ``num_hashes``
    positions per key."""

    __slots__ = ("bits", "count", "num_bits", "num_hashes")

    def __init__(self, num_bits: int, num_hashes: int, bits: bytes | None = None) -> None:
        if num_bits % 64 or num_bits < 64:
            raise ValueError(f"num_bits must be a positive multiple of 64, got {num_bits}")
        self.num_bits = num_bits
        self.num_hashes = num_hashes
        if bits is None:
            self.bits = np.zeros(num_bits // 8, dtype=np.uint8)
        else:
            if len(bits) != num_bits // 8:
                raise ValueError(f"bits has {len(bits)} bytes, expected {num_bits // 8}")
            self.bits = np.frombuffer(bits, dtype=np.uint8).copy()
        self.count = 0

    def add_hash(self, h: bytes) -> None:
        pos = _positions(h, self.num_bits, self.num_hashes)
        np.bitwise_or.at(self.bits, (pos >> 3).astype(np.intp), (1 << (pos & 7)).astype(np.uint8))
        self.count += 1

    def add(self, key: bytes) -> None:
        self.add_hash(key_hash(key))

    def contains_hash(self, h: bytes) -> bool:
        pos = _positions(h, self.num_bits, self.num_hashes)
        return bool(np.all(self.bits[(pos >> 3).astype(np.intp)] & (1 << (pos & 7)).astype(np.uint8)))

    def __contains__(self, key: bytes) -> bool:
        return self.contains_hash(key_hash(key))

    def fill_ratio(self) -> float:
        return float(np.unpackbits(self.bits).mean())

    def to_bytes(self) -> bytes:
        return self.bits.tobytes()


LOG_VERSIONS = 64


class LocalDigest:
    """This member's own digest: the filter, its (generation, version), and recent deltas.

    ``add`` queues keys; ``flush`` turns the queue into one delta (version + 1) for gossip.
    ``rebuild`` starts a new generation from the keys still held (peers then fetch it whole).
    """

    def __init__(self, owner: str, num_bits: int, num_hashes: int, generation: int = 1, max_delta: int = 4096) -> None:
        self.owner = owner
        self.filter = BloomFilter(num_bits, num_hashes)
        self.generation = generation
        self.version = 0
        self._pending: list[bytes] = []
        self._pending_set: set[bytes] = set()
        self._max_delta = max_delta
        self._log: list[DigestDelta] = []  # the last LOG_VERSIONS deltas, for catch-up fetches

    def add(self, keys) -> None:
        for k in keys:
            h = key_hash(k)
            if h not in self._pending_set and not self.filter.contains_hash(h):
                self._pending.append(h)
                self._pending_set.add(h)

    @property
    def pending(self) -> int:
        """Keys added since the last ``flush``: not yet in a delta, so no peer sees them."""
        return len(self._pending)

    def flush(self) -> list[DigestDelta]:
        out = []
        while self._pending:
            batch, self._pending = self._pending[: self._max_delta], self._pending[self._max_delta :]
            for h in batch:
                self.filter.add_hash(h)
            self.version += 1
            out.append(DigestDelta(self.owner, self.generation, self.version, tuple(batch)))
        self._pending_set.clear()
        self._log = (self._log + out)[-LOG_VERSIONS:]
        return out

    def deltas_since(self, generation: int, version: int) -> list[DigestDelta] | None:
        """The deltas after (generation, version), or None when the log no longer reaches back
        that far (the asker then gets the whole filter)."""
        if generation != self.generation:
            return None
        if version == self.version:
            return []
        if not self._log or self._log[0].version > version + 1 or version > self.version:
            return None
        return [d for d in self._log if d.version > version]

    def rebuild(self, keys) -> None:
        self.filter = BloomFilter(self.filter.num_bits, self.filter.num_hashes)
        for k in keys:
            self.filter.add(k)
        self._pending.clear()
        self._pending_set.clear()
        self._log = []
        self.generation += 1
        self.version = 0

    def snapshot(self) -> DigestSnapshot:
        return DigestSnapshot(
            self.generation, self.version, self.filter.num_bits, self.filter.num_hashes, self.filter.to_bytes()
        )


class PeerDigests:
    """Every peer's filter, as this member last heard it, and the candidate search of a lookup.

    Deltas are applied whenever they arrive, in any order (adding to a Bloom filter commutes);
    per peer the *watermark* is the version up to which every delta is in. A peer whose announced
    version is above the watermark is stale: the service fetches the missing deltas from it (or
    the whole filter, after a rebuild). A stale copy is still consulted: it can only lack recent
    keys (a missed hit) or hold evicted ones (a false positive).
    """

    def __init__(self) -> None:
        self._filters: dict[str, BloomFilter] = {}
        self._have: dict[str, tuple[int, int]] = {}  # watermark: (generation, version)
        self._extra: dict[str, set[int]] = {}  # versions applied above the watermark
        self._latest: dict[str, tuple[int, int]] = {}

    def announce(self, owner: str, generation: int, version: int) -> None:
        """Gossip says ``owner`` is at (generation, version)."""
        if (generation, version) > self._latest.get(owner, (0, 0)):
            self._latest[owner] = (generation, version)

    def latest(self, owner: str) -> tuple[int, int]:
        return self._latest.get(owner, (0, 0))

    def apply_delta(self, d: DigestDelta) -> bool:
        """Apply a delta of the generation we hold; returns whether it was new to us."""
        self.announce(d.owner, d.generation, d.version)
        have = self._have.get(d.owner)
        f = self._filters.get(d.owner)
        if f is None or have[0] != d.generation or d.version <= have[1]:
            return False
        extra = self._extra.setdefault(d.owner, set())
        if d.version in extra:
            return False
        for h in d.hashes:
            f.add_hash(h)
        extra.add(d.version)
        v = have[1]
        while v + 1 in extra:
            v += 1
            extra.discard(v)
        self._have[d.owner] = (d.generation, v)
        return True

    def install(self, owner: str, snap: DigestSnapshot) -> None:
        if (snap.generation, snap.version) < self._have.get(owner, (0, 0)):
            return
        self._filters[owner] = BloomFilter(snap.num_bits, snap.num_hashes, snap.bits)
        self._have[owner] = (snap.generation, snap.version)
        self._extra.pop(owner, None)
        self.announce(owner, snap.generation, snap.version)

    def forget(self, owner: str) -> None:
        self._filters.pop(owner, None)
        self._have.pop(owner, None)
        self._extra.pop(owner, None)
        self._latest.pop(owner, None)

    def stale(self) -> list[str]:
        """Peers we are behind on, most behind first."""
        behind = [(o, v) for o, v in self._latest.items() if self._have.get(o, (0, 0)) < v]
        behind.sort(
            key=lambda ov: (self._have.get(ov[0], (0, 0))[0] == ov[1][0], self._have.get(ov[0], (0, 0))[1] - ov[1][1])
        )
        return [o for o, _ in behind]

    def owners(self) -> list[str]:
        return list(self._filters)

    def version_of(self, owner: str) -> tuple[int, int] | None:
        return self._have.get(owner)

    def candidates(self, keys: list[bytes], members: set[str] | None = None) -> list[list[str]]:
        """For each key, the peers whose filter may hold it (``members``: only these)."""
        owners = [o for o in self._filters if members is None or o in members]
        out: list[list[str]] = []
        for k in keys:
            h = key_hash(k)
            out.append([o for o in owners if self._filters[o].contains_hash(h)])
        return out

    def nbytes(self) -> int:
        return sum(f.bits.nbytes for f in self._filters.values())


def choose_sources(
    start: int, local: list[bool], cands: list[list[str]], max_sources: int, exclude: set[str], rng
) -> dict[str, list[int]]:
    """One round of a lookup's directory step: which peers to ask to confirm which chunks.

    Walks the chunks from ``start``; for a chunk not held locally it picks, among the peers whose
    digest may hold it (``cands[i]``, minus ``exclude``), the one whose digest covers the longest
    run from there (a false positive rarely matches several chained keys in a row), and assigns
    it that run. Stops at a chunk no candidate may hold, or when ``max_sources`` peers are in use
    and none of them covers the next chunk: the number of peers asked is bounded whatever the
    cluster size.
    """
    n = len(cands)
    asks: dict[str, list[int]] = {}
    i = start
    while i < n:
        if local[i]:
            i += 1
            continue
        c = [m for m in cands[i] if m not in exclude]
        if not c or (len(asks) >= max_sources and not any(m in asks for m in c)):
            break
        if len(asks) >= max_sources:
            c = [m for m in c if m in asks]

        def run(m, i=i):
            j = i
            while j < n and (local[j] or m in cands[j]):
                j += 1
            return j - i

        best = max(c, key=lambda m: (run(m), m in asks, rng.random()))
        length = run(best)
        asks.setdefault(best, []).extend(j for j in range(i, i + length) if not local[j])
        i += length
    return asks


def assemble_plan(local: list[bool], confirmed: dict[str, set[int]]) -> list[str]:
    """The leading chunks that can be had: "" for local ones, else a peer that confirmed it
    (the one that confirmed most, to keep pulls few and long). Stops at the first gap."""
    order = sorted(confirmed, key=lambda m: -len(confirmed[m]))
    plan: list[str] = []
    for j in range(len(local)):
        if local[j]:
            plan.append("")
            continue
        src = next((m for m in order if j in confirmed[m]), None)
        if src is None:
            break
        plan.append(src)
    return plan
