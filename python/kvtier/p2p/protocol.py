"""The peer wire protocol: versioned, length-bounded binary frames and their bodies.

Every frame starts with a 16-byte header::

    magic "KT" | version u8 | kind u8 | request_id u32 | body_len u32 | body_crc32 u32

followed by ``body_len`` bytes of body (``body_crc32`` = zlib.crc32 of them). A BLOB frame's body
(key, fingerprint, payload length, checksum algorithm) is followed by the raw payload and an
8-byte trailer (payload checksum u32, ``b"KE"``, 2 zero bytes), so the sender checksums each piece
as it sends it and the receiver as it lands, with no extra pass over memory.

Every length is checked against a bound before anything is allocated or read: a frame that breaks
one raises :class:`ProtocolError`, and the connection that carried it is closed. Nothing here
touches sockets; see ``transport.py``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from kvtier.errors import KVTierError

PROTOCOL_VERSION = 1
MAGIC = b"KT"
TRAILER_MAGIC = b"KE"

HEADER = struct.Struct("<2sBBIII")
HEADER_BYTES = HEADER.size  # 16
TRAILER = struct.Struct("<I2sxx")
TRAILER_BYTES = TRAILER.size  # 8

KEY_BYTES = 16
FINGERPRINT_BYTES = 16
NONCE_BYTES = 32
MAC_BYTES = 32
MAX_NODE_ID = 64
MAX_HOST = 253

# Bounds. Pre-auth frames are tiny so an unauthenticated socket can make us allocate nothing.
MAX_PREAUTH_BODY = 1024
MAX_CONTROL_BODY = 1 << 20
MAX_DIGEST_BODY = 32 << 20
MAX_KEYS_PER_REQUEST = 4096
MAX_PIGGYBACK = 64
MAX_DELTA_HASHES = 4096
MAX_MEMBERS_IN_SYNC = 16384
MAX_BLOOM_BITS = 1 << 28
MAX_SHARED_TENSORS = 4096  # a layout's tensors (one per layer at most, or one cross-layer)
MAX_TENSOR_DIMS = 8
MAX_HANDLE_BYTES = 4096  # one opaque handle (cudaIpcMemHandle_t is 64 bytes; a path < 4096)
MAX_PAGES_PER_CHUNK = 1 << 16


class ProtocolError(KVTierError):
    """A peer sent a malformed, oversized or unexpected frame; its connection is dropped."""


class ChecksumError(ProtocolError):
    """A payload or body did not match its checksum."""


class Kind:
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    AUTH_OK = 4
    ERROR = 5
    PING = 10
    ACK = 11
    PING_REQ = 12
    NACK = 13
    SYNC = 14
    SYNC_REPLY = 15
    DIGEST_REQ = 20
    DIGEST = 21
    DIGEST_DELTAS = 22
    CONFIRM = 30
    CONFIRM_REPLY = 31
    GET = 32
    BLOB = 33
    MISS = 34
    GET_END = 35
    # Same-host GPU sharing (gpu_share.py): map the peer's KV pages, lease chunks, copy, release.
    GPU_OPEN = 40
    GPU_HANDLES = 41
    GPU_PIN = 42
    GPU_PINNED = 43
    GPU_UNPIN = 44
    GPU_UNPINNED = 45
    # NIXL data path (nixl_path.py): the holder's agent metadata, leases on CPU-tier blocks that
    # the puller then READs one-sided, and their release. Only after the handshake, like all above.
    NIXL_META_REQ = 50
    NIXL_META = 51
    NIXL_LEASE = 52
    NIXL_LEASED = 53
    NIXL_RELEASE = 54
    NIXL_RELEASED = 55
    # A lease whose checksums may follow (to a holder offering CAP_NIXL_LATE_SUMS): the reply
    # marks the blocks whose CRC32C the holder is still computing, while the puller READs them;
    # NIXL_SUMS_REQ asks for them.
    NIXL_LEASE_LATE = 56
    NIXL_LEASED_LATE = 57
    NIXL_SUMS_REQ = 58
    NIXL_SUMS = 59


_PREAUTH = {Kind.HELLO, Kind.CHALLENGE, Kind.AUTH, Kind.AUTH_OK, Kind.ERROR}
_KNOWN = {v for k, v in vars(Kind).items() if not k.startswith("_")}


def max_body(kind: int, authenticated: bool) -> int:
    if not authenticated:
        return MAX_PREAUTH_BODY
    if kind in (Kind.DIGEST, Kind.DIGEST_DELTAS, Kind.SYNC, Kind.SYNC_REPLY):
        return MAX_DIGEST_BODY
    return MAX_CONTROL_BODY


# Checksum algorithms of BLOB payloads, negotiated in the handshake (bit i = algorithm i).
CRC32 = 0  # zlib.crc32: always available
CRC32C = 1  # Castagnoli, with the CPU's instruction: kvtier's core (csrc/storage/crc32c)


def _load_crc32c():
    try:
        from kvtier import _core  # the CPU's CRC32C instruction: faster than zlib.crc32 (docs/p2p.md, "Checksums")

        return _core.crc32c
    except (ImportError, AttributeError):
        return None


_crc32c = _load_crc32c()
ALGORITHMS = {CRC32: zlib.crc32}
if _crc32c is not None:
    ALGORITHMS[CRC32C] = _crc32c
LOCAL_ALGORITHMS_MASK = sum(1 << a for a in ALGORITHMS)
ALGORITHM_NAMES = {CRC32: "crc32", CRC32C: "crc32c"}


def restrict_algorithms(names: list[str]) -> None:
    """Offer only these checksum algorithms in handshakes from now on (benches compare them)."""
    global LOCAL_ALGORITHMS_MASK
    ids = [a for a, n in ALGORITHM_NAMES.items() if n in names and a in ALGORITHMS]
    if not ids:
        raise ValueError(f"none of {names} is available here (have {sorted(ALGORITHM_NAMES[a] for a in ALGORITHMS)})")
    LOCAL_ALGORITHMS_MASK = sum(1 << a for a in ids)


# Capabilities a member offers, in the high bits of the same handshake field (so the HMAC covers
# them; a member that knows none of them sends none and ignores ours).
CAP_NIXL = 1 << 16  # pull my blocks with one-sided NIXL READs (NIXL_META_REQ, NIXL_LEASE)
CAP_NIXL_LATE_SUMS = 1 << 17  # my leases may name checksums later (NIXL_LEASE_LATE, NIXL_SUMS_REQ)
CAPS_MASK = 0xFFFF0000


def pick_algorithm(mask_a: int, mask_b: int) -> int:
    common = mask_a & mask_b & LOCAL_ALGORITHMS_MASK
    if common & (1 << CRC32C):
        return CRC32C
    if common & (1 << CRC32):
        return CRC32
    raise ProtocolError(f"no common checksum algorithm (masks {mask_a:#x}, {mask_b:#x})")


def checksum_fn(algo: int):
    fn = ALGORITHMS.get(algo)
    if fn is None:
        raise ProtocolError(f"unknown or unavailable checksum algorithm {algo}")
    return fn


# -- headers ---------------------------------------------------------------------------------


def encode_frame(kind: int, request_id: int, body: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, request_id & 0xFFFFFFFF, len(body), zlib.crc32(body)) + body


@dataclass(frozen=True)
class Header:
    kind: int
    request_id: int
    body_len: int
    body_crc: int


def decode_header(raw: bytes | memoryview, authenticated: bool) -> Header:
    magic, version, kind, rid, body_len, body_crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if kind not in _KNOWN:
        raise ProtocolError(f"unknown frame kind {kind}")
    if not authenticated and kind not in _PREAUTH:
        raise ProtocolError(f"frame kind {kind} before authentication")
    limit = max_body(kind, authenticated)
    if body_len > limit:
        raise ProtocolError(f"frame kind {kind} declares {body_len} body bytes, limit {limit}")
    return Header(kind, rid, body_len, body_crc)


def check_body(header: Header, body: bytes) -> None:
    if zlib.crc32(body) != header.body_crc:
        raise ChecksumError(f"body checksum mismatch in frame kind {header.kind}")


# -- body reader -----------------------------------------------------------------------------


class Reader:
    """Bounds-checked cursor over a body; every read past the end is a ProtocolError."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes) -> None:
        self._buf = buf
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._buf):
            raise ProtocolError(f"truncated body: wanted {n} bytes at {self._pos} of {len(self._buf)}")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def text(self, limit: int) -> str:
        n = self.u8() if limit < 256 else self.u16()
        if n > limit:
            raise ProtocolError(f"string of {n} bytes exceeds {limit}")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None

    def count(self, limit: int, what: str) -> int:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"{what}: count {n} exceeds {limit}")
        return n

    def rest(self) -> bytes:
        """The bytes not read yet."""
        return self.take(len(self._buf) - self._pos)

    def done(self) -> None:
        if self._pos != len(self._buf):
            raise ProtocolError(f"{len(self._buf) - self._pos} trailing bytes in body")


def _text(s: str, limit: int) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"string {s!r} is longer than {limit} bytes")
    return (struct.pack("<B", len(raw)) if limit < 256 else struct.pack("<H", len(raw))) + raw


# -- handshake -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    node_id: str
    nonce: bytes
    fingerprint: bytes
    blob_bytes: int
    algorithms: int

    def encode(self) -> bytes:
        return (
            _text(self.node_id, MAX_NODE_ID)
            + self.nonce
            + self.fingerprint
            + struct.pack("<QI", self.blob_bytes, self.algorithms)
        )

    @staticmethod
    def decode(body: bytes) -> Hello:
        r = Reader(body)
        node_id = r.text(MAX_NODE_ID)
        nonce, fp = r.take(NONCE_BYTES), r.take(FINGERPRINT_BYTES)
        blob_bytes, algos = r.u64(), r.u32()
        r.done()
        return Hello(node_id, nonce, fp, blob_bytes, algos)


@dataclass(frozen=True)
class Challenge:
    node_id: str
    nonce: bytes
    fingerprint: bytes
    blob_bytes: int
    algorithms: int
    mac: bytes = b""

    def encode_unsigned(self) -> bytes:
        return (
            _text(self.node_id, MAX_NODE_ID)
            + self.nonce
            + self.fingerprint
            + struct.pack("<QI", self.blob_bytes, self.algorithms)
        )

    def encode(self) -> bytes:
        return self.encode_unsigned() + self.mac

    @staticmethod
    def decode(body: bytes) -> Challenge:
        r = Reader(body)
        node_id = r.text(MAX_NODE_ID)
        nonce, fp = r.take(NONCE_BYTES), r.take(FINGERPRINT_BYTES)
        blob_bytes, algos = r.u64(), r.u32()
        mac = r.take(MAC_BYTES)
        r.done()
        return Challenge(node_id, nonce, fp, blob_bytes, algos, mac)


def encode_error(message: str) -> bytes:
    return message.encode("utf-8", "replace")[:512]


# -- membership (gossip) ---------------------------------------------------------------------

ALIVE, SUSPECT, DEAD = 0, 1, 2
STATE_NAMES = {ALIVE: "alive", SUSPECT: "suspect", DEAD: "dead"}


@dataclass(frozen=True)
class MemberRecord:
    """What gossip says about one member."""

    node_id: str
    host: str
    port: int
    incarnation: int
    state: int
    digest_generation: int = 0
    digest_version: int = 0

    def encode(self) -> bytes:
        return (
            _text(self.node_id, MAX_NODE_ID)
            + _text(self.host, MAX_HOST)
            + struct.pack(
                "<HQBII", self.port, self.incarnation, self.state, self.digest_generation, self.digest_version
            )
        )

    @staticmethod
    def read(r: Reader) -> MemberRecord:
        node_id = r.text(MAX_NODE_ID)
        host = r.text(MAX_HOST)
        port, inc, state, gen, ver = struct.unpack("<HQBII", r.take(19))
        if state not in STATE_NAMES:
            raise ProtocolError(f"bad member state {state}")
        if not node_id:
            raise ProtocolError("empty node id")
        return MemberRecord(node_id, host, port, inc, state, gen, ver)


@dataclass(frozen=True)
class DigestDelta:
    """Keys ``owner`` added to its digest between versions ``version - 1`` and ``version`` of
    generation ``generation``, as the 8-byte key prefixes the Bloom filter hashes."""

    owner: str
    generation: int
    version: int
    hashes: tuple[bytes, ...]

    def encode(self) -> bytes:
        return (
            _text(self.owner, MAX_NODE_ID)
            + struct.pack("<IIH", self.generation, self.version, len(self.hashes))
            + b"".join(self.hashes)
        )

    @staticmethod
    def read(r: Reader) -> DigestDelta:
        owner = r.text(MAX_NODE_ID)
        gen, ver, n = struct.unpack("<IIH", r.take(10))
        if n > MAX_DELTA_HASHES:
            raise ProtocolError(f"delta of {n} hashes exceeds {MAX_DELTA_HASHES}")
        raw = r.take(8 * n)
        return DigestDelta(owner, gen, ver, tuple(raw[i : i + 8] for i in range(0, 8 * n, 8)))

    def size(self) -> int:
        return 1 + len(self.owner.encode()) + 10 + 8 * len(self.hashes)


@dataclass
class Gossip:
    """PING, ACK, NACK, PING_REQ, SYNC and SYNC_REPLY bodies: the sender, an optional target
    (PING_REQ: whom to probe; ACK/NACK relayed: who answered), member updates, digest deltas."""

    sender: MemberRecord
    target: str = ""
    members: list[MemberRecord] = field(default_factory=list)
    deltas: list[DigestDelta] = field(default_factory=list)

    def encode(self) -> bytes:
        parts = [self.sender.encode(), _text(self.target, MAX_NODE_ID), struct.pack("<I", len(self.members))]
        parts += [m.encode() for m in self.members]
        parts.append(struct.pack("<I", len(self.deltas)))
        parts += [d.encode() for d in self.deltas]
        return b"".join(parts)

    @staticmethod
    def decode(body: bytes, full_state: bool = False) -> Gossip:
        r = Reader(body)
        sender = MemberRecord.read(r)
        target = r.text(MAX_NODE_ID)
        limit = MAX_MEMBERS_IN_SYNC if full_state else MAX_PIGGYBACK
        members = [MemberRecord.read(r) for _ in range(r.count(limit, "members"))]
        deltas = [DigestDelta.read(r) for _ in range(r.count(limit, "deltas"))]
        r.done()
        return Gossip(sender, target, members, deltas)


# -- directory and data ----------------------------------------------------------------------


def encode_keys(keys: list[bytes]) -> bytes:
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise ValueError(f"{len(keys)} keys exceed {MAX_KEYS_PER_REQUEST} per request")
    return struct.pack("<I", len(keys)) + b"".join(keys)


def decode_keys(body: bytes) -> list[bytes]:
    r = Reader(body)
    n = r.count(MAX_KEYS_PER_REQUEST, "keys")
    raw = r.take(KEY_BYTES * n)
    r.done()
    return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]


def encode_bitmap(bits: list[bool]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            out[i >> 3] |= 1 << (i & 7)
    return struct.pack("<I", len(bits)) + bytes(out)


def decode_bitmap(body: bytes, expected: int) -> list[bool]:
    r = Reader(body)
    n = r.count(MAX_KEYS_PER_REQUEST, "bitmap")
    if n != expected:
        raise ProtocolError(f"bitmap of {n} entries, asked about {expected}")
    raw = r.take((n + 7) // 8)
    r.done()
    return [bool(raw[i >> 3] >> (i & 7) & 1) for i in range(n)]


BLOB_META = struct.Struct(f"<{KEY_BYTES}s{FINGERPRINT_BYTES}sQB")


def encode_blob_meta(key: bytes, fingerprint: bytes, length: int, algo: int) -> bytes:
    return BLOB_META.pack(key, fingerprint, length, algo)


def decode_blob_meta(body: bytes) -> tuple[bytes, bytes, int, int]:
    if len(body) != BLOB_META.size:
        raise ProtocolError(f"BLOB metadata of {len(body)} bytes, expected {BLOB_META.size}")
    return BLOB_META.unpack(body)


def encode_trailer(checksum: int) -> bytes:
    return TRAILER.pack(checksum & 0xFFFFFFFF, TRAILER_MAGIC)


def decode_trailer(raw: bytes | memoryview) -> int:
    checksum, magic = TRAILER.unpack(raw)
    if magic != TRAILER_MAGIC:
        raise ProtocolError("bad BLOB trailer")
    return checksum


@dataclass(frozen=True)
class DigestSnapshot:
    generation: int
    version: int
    num_bits: int
    num_hashes: int
    bits: bytes

    def encode(self) -> bytes:
        return struct.pack("<IIQB", self.generation, self.version, self.num_bits, self.num_hashes) + self.bits

    @staticmethod
    def decode(body: bytes) -> DigestSnapshot:
        r = Reader(body)
        gen, ver, nbits, k = struct.unpack("<IIQB", r.take(17))
        if not 64 <= nbits <= MAX_BLOOM_BITS or nbits % 64 or not 1 <= k <= 32:
            raise ProtocolError(f"bad digest geometry: {nbits} bits, {k} hashes")
        bits = r.take(nbits // 8)
        r.done()
        return DigestSnapshot(gen, ver, nbits, k, bits)


MAX_DELTAS_IN_REPLY = 256


def encode_digest_req(generation: int, version: int) -> bytes:
    """DIGEST_REQ: the (generation, version) of the owner's digest the asker has; (0, 0): none."""
    return struct.pack("<II", generation, version)


def decode_digest_req(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolError(f"DIGEST_REQ body of {len(body)} bytes, expected 8")
    return struct.unpack("<II", body)


def encode_deltas(deltas: list[DigestDelta]) -> bytes:
    return struct.pack("<I", len(deltas)) + b"".join(d.encode() for d in deltas)


def decode_deltas(body: bytes) -> list[DigestDelta]:
    r = Reader(body)
    out = [DigestDelta.read(r) for _ in range(r.count(MAX_DELTAS_IN_REPLY, "deltas"))]
    r.done()
    return out


# -- same-host GPU sharing (gpu_share.py) ----------------------------------------------------


def _blob(raw: bytes) -> bytes:
    if len(raw) > MAX_HANDLE_BYTES:
        raise ValueError(f"handle field of {len(raw)} bytes exceeds {MAX_HANDLE_BYTES}")
    return struct.pack("<H", len(raw)) + raw


def _read_blob(r: Reader) -> bytes:
    n = r.u16()
    if n > MAX_HANDLE_BYTES:
        raise ProtocolError(f"handle field of {n} bytes exceeds {MAX_HANDLE_BYTES}")
    return r.take(n)


@dataclass(frozen=True)
class SharedTensor:
    """How another process on this host maps one KV tensor: the fields of a CUDA IPC handle
    (``kvtier.p2p.cuda_ipc.IpcHandle``), or for the ``shm`` mechanism a file path in
    ``storage_handle`` and the other handles empty."""

    device: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: str
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False

    def encode(self) -> bytes:
        if len(self.shape) != len(self.stride) or len(self.shape) > MAX_TENSOR_DIMS:
            raise ValueError(f"bad tensor geometry {self.shape} / {self.stride}")
        return (
            struct.pack("<iB", self.device, len(self.shape))
            + struct.pack(f"<{len(self.shape)}q", *self.shape)
            + struct.pack(f"<{len(self.stride)}q", *self.stride)
            + struct.pack("<q", self.offset)
            + _text(self.dtype, 32)
            + _blob(self.storage_handle)
            + struct.pack("<QQ", self.storage_size_bytes, self.storage_offset_bytes)
            + _blob(self.ref_counter_handle)
            + struct.pack("<Q", self.ref_counter_offset)
            + _blob(self.event_handle)
            + struct.pack("<B", int(self.event_sync_required))
        )

    @staticmethod
    def read(r: Reader) -> SharedTensor:
        device, ndim = struct.unpack("<iB", r.take(5))
        if ndim > MAX_TENSOR_DIMS:
            raise ProtocolError(f"tensor of {ndim} dims exceeds {MAX_TENSOR_DIMS}")
        shape = struct.unpack(f"<{ndim}q", r.take(8 * ndim))
        stride = struct.unpack(f"<{ndim}q", r.take(8 * ndim))
        if any(d < 0 for d in shape) or any(s < 0 for s in stride):
            raise ProtocolError("negative tensor dimension or stride")
        (offset,) = struct.unpack("<q", r.take(8))
        dtype = r.text(32)
        storage = _read_blob(r)
        size, soff = struct.unpack("<QQ", r.take(16))
        rc = _read_blob(r)
        (rc_off,) = struct.unpack("<Q", r.take(8))
        ev = _read_blob(r)
        sync = r.u8()
        return SharedTensor(
            device, tuple(shape), tuple(stride), offset, dtype, storage, size, soff, rc, rc_off, ev, bool(sync)
        )


def encode_gpu_open(host_id: str, mechanisms: tuple[str, ...]) -> bytes:
    """GPU_OPEN: the asker's host identity and the mechanisms it can map (``cuda``, ``shm``)."""
    return _text(host_id, 64) + struct.pack("<B", len(mechanisms)) + b"".join(_text(m, 16) for m in mechanisms)


def decode_gpu_open(body: bytes) -> tuple[str, tuple[str, ...]]:
    r = Reader(body)
    host = r.text(64)
    n = r.u8()
    if n > 8:
        raise ProtocolError(f"{n} sharing mechanisms offered, at most 8")
    mechs = tuple(r.text(16) for _ in range(n))
    r.done()
    return host, mechs


@dataclass(frozen=True)
class GpuHandles:
    """GPU_HANDLES: the exporter's answer to GPU_OPEN. ``ok`` False: ``reason`` says why (another
    host, no GPU pool, no common mechanism); the asker then uses TCP for this peer."""

    ok: bool
    reason: str = ""
    mechanism: str = ""
    page_dim: int = 0
    tensors: tuple[SharedTensor, ...] = ()

    def encode(self) -> bytes:
        if len(self.tensors) > MAX_SHARED_TENSORS:
            raise ValueError(f"{len(self.tensors)} tensors exceed {MAX_SHARED_TENSORS}")
        return (
            struct.pack("<B", int(self.ok))
            + _text(self.reason, 255)
            + _text(self.mechanism, 16)
            + struct.pack("<BI", self.page_dim, len(self.tensors))
            + b"".join(t.encode() for t in self.tensors)
        )

    @staticmethod
    def decode(body: bytes) -> GpuHandles:
        r = Reader(body)
        ok = bool(r.u8())
        reason = r.text(255)
        mech = r.text(16)
        page_dim = r.u8()
        tensors = tuple(SharedTensor.read(r) for _ in range(r.count(MAX_SHARED_TENSORS, "shared tensors")))
        r.done()
        if ok and not tensors:
            raise ProtocolError("GPU_HANDLES accepted with no tensors")
        if any(page_dim >= len(t.shape) for t in tensors):
            raise ProtocolError(f"page dim {page_dim} outside a shared tensor's dims")
        return GpuHandles(ok, reason, mech, page_dim, tensors)


@dataclass(frozen=True)
class GpuPinned:
    """GPU_PINNED: the leading ``len(pages) // pages_per_chunk`` chunks of a GPU_PIN are held
    (not evicted, not rewritten) in the exporter's pages ``pages`` until ``GPU_UNPIN lease_id``
    or ``lease_ms`` after the reply, whichever comes first."""

    lease_id: int
    lease_ms: int
    pages_per_chunk: int
    pages: tuple[int, ...]

    @property
    def chunks(self) -> int:
        return len(self.pages) // self.pages_per_chunk if self.pages_per_chunk else 0

    def encode(self) -> bytes:
        return struct.pack("<QIII", self.lease_id, self.lease_ms, self.pages_per_chunk, len(self.pages)) + struct.pack(
            f"<{len(self.pages)}I", *self.pages
        )

    @staticmethod
    def decode(body: bytes) -> GpuPinned:
        r = Reader(body)
        lease, ms, ppc, n = struct.unpack("<QIII", r.take(20))
        if not 1 <= ppc <= MAX_PAGES_PER_CHUNK:
            raise ProtocolError(f"bad pages per chunk {ppc}")
        if n % ppc or n // ppc > MAX_KEYS_PER_REQUEST:
            raise ProtocolError(f"{n} pages is not a whole number of at most {MAX_KEYS_PER_REQUEST} chunks")
        pages = struct.unpack(f"<{n}I", r.take(4 * n))
        r.done()
        return GpuPinned(lease, ms, ppc, tuple(pages))


def encode_lease(lease_id: int) -> bytes:
    return struct.pack("<Q", lease_id)


def decode_lease(body: bytes) -> int:
    if len(body) != 8:
        raise ProtocolError(f"lease body of {len(body)} bytes, expected 8")
    return struct.unpack("<Q", body)[0]


# NIXL agent metadata is a few hundred bytes plus ~100 per registered region.
MAX_NIXL_METADATA = 64 << 10


@dataclass(frozen=True)
class NixlMeta:
    """NIXL_META: the holder's NIXL agent (``agent`` must be the node id it authenticated as), its
    metadata for the puller's agent, and the registered region holding its CPU tier's blocks.
    ``ok`` False: ``reason`` says why it offers no NIXL (the puller then uses the TCP stream)."""

    ok: bool
    reason: str = ""
    agent: str = ""
    metadata: bytes = b""
    region_addr: int = 0
    region_bytes: int = 0

    def encode(self) -> bytes:
        if len(self.metadata) > MAX_NIXL_METADATA:
            raise ValueError(f"NIXL metadata of {len(self.metadata)} bytes exceeds {MAX_NIXL_METADATA}")
        return (
            struct.pack("<B", int(self.ok))
            + _text(self.reason, 255)
            + _text(self.agent, 64)
            + struct.pack("<QQI", self.region_addr, self.region_bytes, len(self.metadata))
            + self.metadata
        )

    @staticmethod
    def decode(body: bytes) -> NixlMeta:
        r = Reader(body)
        ok = bool(r.u8())
        reason = r.text(255)
        agent = r.text(64)
        addr, size, n = struct.unpack("<QQI", r.take(20))
        if n > MAX_NIXL_METADATA:
            raise ProtocolError(f"NIXL metadata of {n} bytes exceeds {MAX_NIXL_METADATA}")
        metadata = r.take(n)
        r.done()
        if ok and (not agent or not metadata or addr == 0 or size == 0):
            raise ProtocolError("NIXL_META offered without an agent, metadata or region")
        return NixlMeta(ok, reason, agent, metadata, addr, size)


@dataclass(frozen=True)
class NixlLeased:
    """NIXL_LEASED: the leading ``len(blocks)`` chunks of a NIXL_LEASE are held (not evicted, not
    rewritten) until ``NIXL_RELEASE lease_id`` or ``lease_ms`` after the reply, whichever comes
    first; ``blocks[i]`` = (offset of chunk i's blob in the holder's region, CRC32C of the blob)."""

    lease_id: int
    lease_ms: int
    blocks: tuple[tuple[int, int], ...]
    # NIXL_LEASED_LATE only: late[i] = block i's CRC32C (0 in ``blocks``) comes by NIXL_SUMS.
    late: tuple[bool, ...] = ()

    def encode(self) -> bytes:
        n = len(self.blocks)
        flat = [v for b in self.blocks for v in b]
        return struct.pack("<QII", self.lease_id, self.lease_ms, n) + struct.pack(f"<{'QI' * n}", *flat)

    def encode_late(self) -> bytes:
        """NIXL_LEASED_LATE's body: NIXL_LEASED's, then the bitmap of late checksums."""
        return self.encode() + encode_bitmap(list(self.late) or [False] * len(self.blocks))

    @staticmethod
    def decode(body: bytes) -> NixlLeased:
        r = Reader(body)
        leased = NixlLeased._read(r)
        r.done()
        return leased

    @staticmethod
    def decode_late(body: bytes) -> NixlLeased:
        r = Reader(body)
        leased = NixlLeased._read(r)
        late = decode_bitmap(r.rest(), len(leased.blocks))
        return NixlLeased(leased.lease_id, leased.lease_ms, leased.blocks, tuple(late))

    @staticmethod
    def _read(r: Reader) -> NixlLeased:
        lease, ms, n = struct.unpack("<QII", r.take(16))
        if n > MAX_KEYS_PER_REQUEST:
            raise ProtocolError(f"{n} leased chunks exceed {MAX_KEYS_PER_REQUEST}")
        flat = struct.unpack(f"<{'QI' * n}", r.take(12 * n))
        return NixlLeased(lease, ms, tuple(zip(flat[0::2], flat[1::2])))


def encode_sums(crcs: list[int] | None) -> bytes:
    """NIXL_SUMS: the CRC32C of every block of a lease, in lease order; None (sent as none at
    all): the lease is gone (released, expired) or its checksums were not computed in time."""
    crcs = crcs or []
    return struct.pack(f"<I{len(crcs)}I", len(crcs), *crcs)


def decode_sums(body: bytes, expected: int) -> list[int] | None:
    r = Reader(body)
    n = r.count(MAX_KEYS_PER_REQUEST, "checksum list")
    if n not in (0, expected):
        raise ProtocolError(f"{n} checksums for a lease of {expected} blocks")
    crcs = list(struct.unpack(f"<{n}I", r.take(4 * n)))
    r.done()
    return crcs or None
