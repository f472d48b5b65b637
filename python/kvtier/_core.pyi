"""
kvtier C++/CUDA core (private; use the kvtier package)
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
import typing_extensions
__all__: list[str] = ['Arena', 'BlockAllocator', 'CUDA_COMPILED', 'CUDA_RUNTIME_VERSION', 'CopyEngine', 'CpuTier', 'DISK_CACHE_FILE_NAME', 'DiskStore', 'IO_BACKEND_COMPILED', 'PageRows', 'TierOp', 'Transfer', 'aligned_buffer', 'copy_segments', 'crc32c', 'disk_cache_reset', 'fp8_decode_rows', 'fp8_encode_rows', 'fp8_host_isa', 'list_gpus', 'probe_direct_io', 'probe_io_uring', 'probe_pinned_memory', 'push_device']
class Arena:
    """
    One up-front allocation: device, pinned_host or host.
    """
    def __init__(self, kind: str, bytes: typing.SupportsInt | typing.SupportsIndex, device: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        ...
    def memoryview(self) -> memoryview:
        """
        Writable memoryview over a host arena; it keeps the arena alive.
        """
    @property
    def base_ptr(self) -> int:
        ...
    @property
    def device(self) -> int:
        ...
    @property
    def fallback_reason(self) -> str:
        ...
    @property
    def huge_pages(self) -> bool:
        ...
    @property
    def kind(self) -> str:
        ...
    @property
    def requested_kind(self) -> str:
        ...
    @property
    def size(self) -> int:
        ...
class BlockAllocator:
    """
    Fixed-size blocks with O(1) allocate/free and per-block pins (thread-safe).
    """
    def __init__(self, num_blocks: typing.SupportsInt | typing.SupportsIndex, block_bytes: typing.SupportsInt | typing.SupportsIndex, arena: Arena = None) -> None:
        ...
    def allocate(self) -> int:
        ...
    def allocate_batch(self, n: typing.SupportsInt | typing.SupportsIndex) -> list[int]:
        """
        n blocks, all or nothing (ResourceExhaustedError leaves nothing taken).
        """
    def block_address(self, block_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def free(self, block_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def free_batch(self, block_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    def is_allocated(self, block_id: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def pin(self, block_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def pin_count(self, block_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def stats(self) -> dict:
        ...
    def unpin(self, block_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def block_bytes(self) -> int:
        ...
    @property
    def num_blocks(self) -> int:
        ...
class PageRows:
    """
    Rows of pages of a pair of tensor lists (see PageCopier): row r starts at src_rows[r] / dst_rows[r], its page p at p * page_bytes[r].
    """
    def __init__(self, src_rows: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], dst_rows: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], page_bytes: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], src_pages: typing.SupportsInt | typing.SupportsIndex, dst_pages: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def copy(self, device: typing.SupportsInt | typing.SupportsIndex, src_pages: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], dst_pages: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], stream: typing.SupportsInt | typing.SupportsIndex, method: str = 'dma') -> None:
        """
        copy_segments(device, *segments(src_pages, dst_pages).T, stream, method), the ranges worked out here rather than in Python (a copy's host time is part of its cost).
        """
    def segments(self, src_pages: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], dst_pages: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> numpy.typing.NDArray[numpy.uint64]:
        """
        [n, 3] uint64 (source, destination, bytes): one range per run of pages contiguous on both sides, per row, rows in order.
        """
class Transfer:
    """
    One asynchronous gather or scatter. Keep the KV tensors and blobs alive until wait() returns.
    """
    def stream_wait_layer(self, layer: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Makes CUDA stream `stream` (an int, e.g. torch.cuda.Stream.cuda_stream) wait for layer `layer` on the device, without blocking the host. UnavailableError on the CPU path.
        """
    def wait(self, timeout_s: typing.SupportsFloat | typing.SupportsIndex) -> None:
        """
        Blocks until every byte has landed; DeadlineExceededError after timeout_s (the copy goes on).
        """
    def wait_layer(self, layer: typing.SupportsInt | typing.SupportsIndex, timeout_s: typing.SupportsFloat | typing.SupportsIndex) -> None:
        """
        Blocks until layer `layer` has landed for every chunk of the transfer.
        """
    @property
    def done(self) -> bool:
        ...
    @property
    def method(self) -> str:
        ...
    @property
    def num_layers(self) -> int:
        ...
class CopyEngine:
    """
    Moves the pages of chunks between KV tensors (host or GPU) and contiguous host blobs.
    
    segments: [(base, page_stride, page_bytes, num_pages)], one per segment (layer x K/V, ...);
    device: the GPU of the segments, or -1 for host memory (the CPU path);
    pages_per_chunk: pages of one chunk (one blob); layer_segments: [[segment index]] per layer
    (empty: one layer of every segment); method: 'auto', 'direct', 'staged', 'zero_copy' or 'cpu'.
    """
    def __init__(self, segments: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]], device: typing.SupportsInt | typing.SupportsIndex, pages_per_chunk: typing.SupportsInt | typing.SupportsIndex, layer_segments: collections.abc.Sequence[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]], method: str = 'auto', staging_bytes: typing.SupportsInt | typing.SupportsIndex = 67108864, cpu_threads: typing.SupportsInt | typing.SupportsIndex = 2) -> None:
        ...
    def gather(self, page_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], blob_ptrs: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], after_stream: typing.SupportsInt | typing.SupportsIndex = 0) -> Transfer:
        """
        Copies chunk c's pages page_ids[c*ppc:(c+1)*ppc] into blob_ptrs[c] (blob_bytes each).
        """
    def scatter(self, blob_ptrs: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], page_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], after_stream: typing.SupportsInt | typing.SupportsIndex = 0) -> Transfer:
        """
        Copies blob_ptrs[c] into pages page_ids[c*ppc:(c+1)*ppc], layer by layer.
        """
    @property
    def blob_bytes(self) -> int:
        ...
    @property
    def method(self) -> str:
        ...
    @property
    def num_layers(self) -> int:
        ...
class TierOp:
    """
    What a CpuTier store or load started.
    """
    @property
    def already_cached(self) -> int:
        ...
    @property
    def chunks(self) -> int:
        ...
    @property
    def skipped_full(self) -> int:
        ...
    @property
    def transfer(self) -> Transfer:
        ...
class CpuTier:
    def __init__(self, segments: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]], device: typing.SupportsInt | typing.SupportsIndex, pages_per_chunk: typing.SupportsInt | typing.SupportsIndex, layer_segments: collections.abc.Sequence[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]], capacity_bytes: typing.SupportsInt | typing.SupportsIndex, method: str = 'auto', staging_bytes: typing.SupportsInt | typing.SupportsIndex = 67108864, cpu_threads: typing.SupportsInt | typing.SupportsIndex = 2, fail_every_nth: typing.SupportsInt | typing.SupportsIndex = 0, disk_dir: str = '', disk_bytes: typing.SupportsInt | typing.SupportsIndex = 0, layout_fingerprint: bytes = b'', disk_backend: str = 'auto', disk_admit_min_seen: typing.SupportsInt | typing.SupportsIndex = 2, disk_queue_depth: typing.SupportsInt | typing.SupportsIndex = 32, disk_io_timeout_s: typing.SupportsFloat | typing.SupportsIndex = 10.0, eviction_policy: str = 'lru', deterministic_writeback: bool = False, disk_max_writebacks_in_flight: typing.SupportsInt | typing.SupportsIndex = 64, disk_geometry_label: str = '', disk_reset_on_mismatch: bool = False, disk_persist_interval_s: typing.SupportsFloat | typing.SupportsIndex = 0.0, event_capacity: typing.SupportsInt | typing.SupportsIndex = 0, disk_write_through: bool = False) -> None:
        ...
    def abort_put(self, key: bytes) -> None:
        ...
    def acquire_blobs(self, keys: bytes) -> list:
        """
        Pin the leading cached chunks (pool only); read-only views of their blobs.
        """
    def begin_put(self, key: bytes) -> memoryview:
        """
        Reserve a block for key; returns a writable memoryview of blob_bytes to fill.
        """
    def begin_puts(self, keys: bytes) -> numpy.typing.NDArray[numpy.uint64]:
        """
        begin_put of each key in order, up to the first that gets no block (the tier full): the addresses of their blocks (blob_bytes each, valid until commit or abort), 0 for a key already cached; shorter than keys where the tier ran out of blocks. On another error nothing stays reserved.
        """
    def blob_checksum(self, blob: typing_extensions.Buffer) -> int:
        """
        The CRC32C of a held block's blob (a view from begin_put or acquire_blobs): the one noted, else computed now and kept.
        """
    def commit_put(self, key: bytes) -> None:
        ...
    def commit_puts(self, keys: bytes) -> None:
        """
        commit_put of each key in order; an error names the key's index (those before are committed).
        """
    def drain(self, timeout_s: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    def kept_blob_checksum(self, blob: typing_extensions.Buffer) -> int | None:
        """
        The CRC32C kept for a held block's blob (as blob_checksum), or None where none is kept (nothing is computed).
        """
    def load(self, keys: bytes, page_ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], after_stream: typing.SupportsInt | typing.SupportsIndex = 0) -> TierOp:
        ...
    def lookup(self, keys: bytes) -> int:
        ...
    def lookup_tiers(self, keys: bytes) -> bytes:
        """
        Per leading chunk: 1 = pool, 2 = disk only (bytes).
        """
    def media(self, keys: bytes) -> bytes:
        """
        Per key, where it is as bits: 1 = pool, 2 = disk (bytes); does not stop at a miss.
        """
    def note_blob_checksum(self, blob: typing_extensions.Buffer, crc32c: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Record the CRC32C of a block's bytes, for a view from begin_put (not yet committed or aborted) or acquire_blobs (not yet released) whose bytes it is the CRC32C of; the tier keeps it until the block is reserved again.
        """
    def persist(self, timeout_s: typing.SupportsFloat | typing.SupportsIndex) -> dict:
        """
        Write the pool's chunks the disk does not hold to disk (by timeout_s); returns what it did.
        """
    def prefetch(self, keys: bytes) -> int:
        """
        Start reading the leading disk-only chunks into the pool; returns reads started.
        """
    def release_blobs(self, keys: bytes) -> None:
        ...
    def set_admission_hook(self, hook: typing.Any) -> None:
        """
        hook(keys: list[bytes], seen: list[int]) -> list[bool], per batch of evicted chunks; None restores the built-in rule.
        """
    def stats(self) -> dict:
        ...
    def store(self, keys: bytes, page_ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], after_stream: typing.SupportsInt | typing.SupportsIndex = 0) -> TierOp:
        ...
    def take_events(self, max: typing.SupportsInt | typing.SupportsIndex = 0) -> bytes:
        """
        Take the oldest KV events (all with max=0) as packed 18-byte records: kind (0 stored, 1 removed, 2 cleared), medium (1 cpu, 2 disk), 16-byte key.
        """
    @property
    def arena_kind(self) -> str:
        ...
    @property
    def arena_region(self) -> tuple[int, int]:
        """
        (address, bytes) of the host arena holding every blob: what a transport registers once.
        """
    @property
    def blob_bytes(self) -> int:
        ...
    @property
    def capacity_chunks(self) -> int:
        ...
    @property
    def method(self) -> str:
        ...
    @property
    def pages_per_chunk(self) -> int:
        ...
    @property
    def pinned(self) -> bool:
        ...
class DiskStore:
    """
    The disk tier's slot store: one preallocated cache file in `dir`, O_DIRECT I/O, checksummed slots, LRU at capacity, recovery at open. Blocking methods release the GIL.
    """
    def __enter__(self) -> typing.Any:
        ...
    def __exit__(self, *args) -> None:
        ...
    def __init__(self, dir: str, capacity_bytes: typing.SupportsInt | typing.SupportsIndex, blob_bytes: typing.SupportsInt | typing.SupportsIndex, layout_fingerprint: bytes, backend: str = 'auto', queue_depth: typing.SupportsInt | typing.SupportsIndex = 32, posix_threads: typing.SupportsInt | typing.SupportsIndex = 4, io_timeout_s: typing.SupportsFloat | typing.SupportsIndex = 10.0, preallocate: bool = True, allow_buffered_io: bool = False, verify_at_open: str = 'auto', nospace_retry_s: typing.SupportsFloat | typing.SupportsIndex = 1.0, close_timeout_s: typing.SupportsFloat | typing.SupportsIndex = 15.0, geometry_label: str = '', reset_on_mismatch: bool = False) -> None:
        ...
    def close(self) -> None:
        """
        Waits for I/O in flight (close_timeout_s) and closes the cache file.
        """
    def contains(self, key: bytes) -> bool:
        ...
    def erase(self, key: bytes) -> None:
        ...
    def flush(self, timeout_s: typing.SupportsFloat | typing.SupportsIndex = 30.0) -> None:
        """
        Waits until no request is in flight.
        """
    def lookup(self, keys: bytes) -> int:
        """
        Number of leading keys (bytes of n * 16) on disk.
        """
    def read(self, key: bytes, out: typing.Any, timeout_s: typing.SupportsFloat | typing.SupportsIndex = 30.0) -> None:
        """
        Reads `key` into `out` (blob_bytes, 4096-aligned, writable) and verifies its checksums; raises CorruptionError (and drops the entry) on a mismatch, NotFoundError when absent.
        """
    def stats(self) -> dict:
        ...
    def write(self, key: bytes, data: typing.Any, timeout_s: typing.SupportsFloat | typing.SupportsIndex = 30.0) -> None:
        """
        Stores `data` (blob_bytes, 4096-aligned) under the 16-byte `key`; returns once it is on disk and visible.
        """
    @property
    def backend(self) -> str:
        ...
    @property
    def blob_bytes(self) -> int:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def num_slots(self) -> int:
        ...
    @property
    def path(self) -> str:
        ...
    @property
    def slot_bytes(self) -> int:
        ...
def aligned_buffer(nbytes: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.uint8]:
    """
    A zeroed numpy uint8 array of nbytes whose data is 4096-byte aligned (what O_DIRECT needs).
    """
def copy_segments(device: typing.SupportsInt | typing.SupportsIndex, src: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], dst: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], nbytes: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], stream: typing.SupportsInt | typing.SupportsIndex, method: str = 'dma') -> None:
    """
    Queues device-to-device copies of byte ranges (src[i] -> dst[i], nbytes[i] bytes) on GPU `device`'s stream `stream` (an int): 'dma' through the copy engines (batched), 'kernel' as one copy kernel on `device` (reading sources on another GPU through peer access), 'push' as that kernel on the sources' GPU (see push_device), writing through peer access and fenced on `stream` both ways. The caller synchronizes the stream.
    """
def crc32c(data: typing_extensions.Buffer, value: typing.SupportsInt | typing.SupportsIndex = 0) -> int:
    """
    CRC32C (Castagnoli) of a buffer, continuing from `value`; the CPU's instruction where it has one.
    """
def disk_cache_reset(dir: str) -> str:
    """
    Deletes the disk cache file in `dir` (whatever geometry it holds) and returns what it held. NotFoundError: none there; FailedPreconditionError: a running kvtier has it open.
    """
def fp8_decode_rows(device: typing.SupportsInt | typing.SupportsIndex, blobs: typing.SupportsInt | typing.SupportsIndex, raw: typing.SupportsInt | typing.SupportsIndex, chunks: typing.SupportsInt | typing.SupportsIndex, rows: typing.SupportsInt | typing.SupportsIndex, row_elems: typing.SupportsInt | typing.SupportsIndex, elem: str, scale: str, blob_stride: typing.SupportsInt | typing.SupportsIndex, scale_offset: typing.SupportsInt | typing.SupportsIndex, payload_offset: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex, page_ids: typing.SupportsInt | typing.SupportsIndex = 0, segments: typing.SupportsInt | typing.SupportsIndex = 0, num_segments: typing.SupportsInt | typing.SupportsIndex = 0, pages_per_chunk: typing.SupportsInt | typing.SupportsIndex = 0, page_bytes: typing.SupportsInt | typing.SupportsIndex = 0, header: typing.SupportsInt | typing.SupportsIndex = 0, header_bytes: typing.SupportsInt | typing.SupportsIndex = 0, decoded: typing.SupportsInt | typing.SupportsIndex = 0, stop: typing.SupportsInt | typing.SupportsIndex = 0, host_isa: str = 'auto', host_threads: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
    """
    Queues the inverse of fp8_encode_rows: each blob's rows decoded into raw chunks of `elem` (one after another at `raw`, or into pages given as to fp8_encode_rows). With header_bytes, only the blobs before the first whose first header_bytes differ from those at `header` are decoded; their number is written to the uint32 at `decoded`, and the uint32 at `stop` is set to 1 where one differed; with `stop` already nonzero nothing is decoded.
    """
def fp8_encode_rows(device: typing.SupportsInt | typing.SupportsIndex, raw: typing.SupportsInt | typing.SupportsIndex, blobs: typing.SupportsInt | typing.SupportsIndex, ok: typing.SupportsInt | typing.SupportsIndex, chunks: typing.SupportsInt | typing.SupportsIndex, rows: typing.SupportsInt | typing.SupportsIndex, row_elems: typing.SupportsInt | typing.SupportsIndex, elem: str, scale: str, blob_stride: typing.SupportsInt | typing.SupportsIndex, scale_offset: typing.SupportsInt | typing.SupportsIndex, payload_offset: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex, page_ids: typing.SupportsInt | typing.SupportsIndex = 0, segments: typing.SupportsInt | typing.SupportsIndex = 0, num_segments: typing.SupportsInt | typing.SupportsIndex = 0, pages_per_chunk: typing.SupportsInt | typing.SupportsIndex = 0, page_bytes: typing.SupportsInt | typing.SupportsIndex = 0, header: typing.SupportsInt | typing.SupportsIndex = 0, header_bytes: typing.SupportsInt | typing.SupportsIndex = 0, host_isa: str = 'auto', host_threads: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
    """
    Queues on GPU `device`'s stream `stream` (an int; device -1: done on the host by this call, stream unused) the fp8 encoding of `chunks` raw chunks (rows x row_elems elements of `elem` each, one after another at address `raw`) into blobs `blob_stride` bytes apart at `blobs`: one `scale` per row at scale_offset, e4m3 bytes at payload_offset (Fp8Codec's bytes with scale_over=(-1,)). ok[c] (a byte per chunk) ends 1, or 0 where chunk c holds NaN or inf. With page_ids (an address of chunks x pages_per_chunk int64), the raw chunks are read from pages instead (raw 0): chunk c is num_segments runs of pages_per_chunk pages of page_bytes, page j of segment s at segments[2s] + page_ids[c * pages_per_chunk + j] * segments[2s + 1] (uint64 base and stride pairs at address `segments`). With header_bytes, the header_bytes at address `header` start every blob and the bytes between scales and payload are zeroed; else header and padding are the caller's. host_isa ('auto' or 'portable') picks the host pass's build (fp8_host_isa); host_threads, how many threads it splits the rows among (the calling one and host_threads - 1 started for the call; small calls use one).
    """
def fp8_host_isa() -> str:
    """
    The build of the fp8 host pass (device -1) that host_isa='auto' runs on this CPU: 'avx2' or 'portable' (the baseline instruction set's). Both give the same bytes.
    """
def list_gpus() -> tuple:
    """
    ([gpu dicts], reason-if-none): GPUs usable at run time.
    """
def probe_direct_io(dir: str) -> tuple[bool, str]:
    """
    (works, reason): whether files in `dir` can be opened with O_DIRECT (the disk tier needs it).
    """
def probe_io_uring() -> tuple[bool, str]:
    """
    (works, reason): whether an io_uring ring round-trips a NOP on this kernel.
    """
def probe_pinned_memory() -> tuple[bool, str]:
    """
    (works, reason): whether pinned host memory can be allocated here.
    """
def push_device(device: typing.SupportsInt | typing.SupportsIndex, src: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    The GPU whose kernel copy_segments(device, ..., method='push') runs for sources at address `src`: the GPU the CUDA runtime says holds them, else `device` (the copy is then 'kernel').
    """
CUDA_COMPILED: bool = True
CUDA_RUNTIME_VERSION: int = 13000
DISK_CACHE_FILE_NAME: str = 'kvtier-disk-cache.kvt'
IO_BACKEND_COMPILED: str = 'io_uring'
__version__: str = '0.1.0'
