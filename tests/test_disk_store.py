"""Tests for kvtier._core.DiskStore, the disk tier's slot store.

Round trips, restart recovery, a writer killed with SIGKILL mid-writes, hypothesis-generated
truncation and corruption of the cache file, ENOSPC on a small loop-mounted file system,
layout-fingerprint and geometry changes (refused unless reset), bad directories and file systems. Every store test runs
on both I/O backends; io_uring skips loudly where the kernel refuses it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvtier import _core
from kvtier.errors import (
    CacheGeometryError,
    CorruptionError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4096
FP = bytes(range(16))
CACHE_FILE = _core.DISK_CACHE_FILE_NAME


def slot_bytes(blob: int) -> int:
    return BLOCK + (blob + BLOCK - 1) // BLOCK * BLOCK


def capacity_for(blob: int, slots: int) -> int:
    return BLOCK + slots * slot_bytes(blob)


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") + (i * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "little")


def blob_for(i: int, n: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


def filled(i: int, n: int) -> np.ndarray:
    buf = _core.aligned_buffer(n)
    buf[:] = blob_for(i, n)
    return buf


def io_uring_skip_reason() -> str | None:
    works, reason = _core.probe_io_uring()
    return None if works else f"SKIPPED (io_uring unavailable here): {reason}"


@pytest.fixture(params=["posix", "io_uring"])
def backend(request) -> str:
    if request.param == "io_uring":
        reason = io_uring_skip_reason()
        if reason:
            pytest.skip(reason)
    return request.param


def disk_dir_base() -> str | None:
    """A directory on a file system that takes O_DIRECT: KVTIER_TEST_DISK_DIR, else the temp dir."""
    return os.environ.get("KVTIER_TEST_DISK_DIR") or None


@pytest.fixture
def cache_dir():
    d = tempfile.mkdtemp(prefix="kvtier_disk_", dir=disk_dir_base())
    probe = os.path.join(d, "odirect_probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"SKIPPED (needs an O_DIRECT file system; set KVTIER_TEST_DISK_DIR): {d}: {e}")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def open_store(d: str, blob: int, slots: int, backend: str = "auto", **kw) -> _core.DiskStore:
    kw.setdefault("layout_fingerprint", FP)
    return _core.DiskStore(d, capacity_for(blob, slots), blob, backend=backend, queue_depth=8, **kw)


def write_keys(store: _core.DiskStore, keys) -> None:
    for i in keys:
        store.write(key(i), filled(i, store.blob_bytes))


def assert_exact(store: _core.DiskStore, i: int) -> None:
    out = _core.aligned_buffer(store.blob_bytes)
    store.read(key(i), out)
    np.testing.assert_array_equal(out, blob_for(i, store.blob_bytes), err_msg=f"key {i}")


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("blob", [BLOCK, 10_000, 256 * KiB])
def test_round_trip_through_disk(cache_dir, backend, blob):
    with open_store(cache_dir, blob, 16, backend) as store:
        assert store.backend == backend
        write_keys(store, range(10))
        for i in range(10):
            assert_exact(store, i)
        assert store.lookup(b"".join(key(i) for i in [0, 1, 2, 99, 3])) == 3
        assert store.contains(key(9)) and not store.contains(key(10))
        st_ = store.stats()
        assert st_["writes"] == 10 and st_["reads"] == 10
        assert st_["slots_used"] == 10 and st_["slots_total"] == 16
        assert st_["direct_io"] is True
        assert st_["backend"] == backend
        with pytest.raises(NotFoundError):
            store.read(key(50), _core.aligned_buffer(blob))
    assert os.path.getsize(os.path.join(cache_dir, CACHE_FILE)) <= capacity_for(blob, 16)


def test_eviction_is_lru_at_capacity(cache_dir, backend):
    with open_store(cache_dir, 8192, 4, backend) as store:
        write_keys(store, range(4))
        assert_exact(store, 0)  # key 1 is now the least recently used
        write_keys(store, [4])
        assert not store.contains(key(1))
        for i in (0, 2, 3, 4):
            assert_exact(store, i)
        assert store.stats()["evictions"] == 1


def test_threads_share_a_store(cache_dir, backend):
    blob = 64 * KiB
    errors: list[BaseException] = []
    with open_store(cache_dir, blob, 64, backend) as store:

        def worker(t: int) -> None:
            try:
                for i in range(t * 10, t * 10 + 10):
                    store.write(key(i), filled(i, blob))
                    assert_exact(store, i)
            except BaseException as e:  # noqa: BLE001 - surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert store.stats()["slots_used"] == 40


# ---- restart recovery ------------------------------------------------------------------------------


def test_restart_recovery_every_chunk_back_bit_exact(cache_dir, backend):
    other = "posix" if backend == "io_uring" else backend
    blob = 32 * KiB
    with open_store(cache_dir, blob, 64, backend) as store:
        write_keys(store, range(50))
        store.erase(key(7))
    # Reopen, on the other backend where there is one: the file format is the same.
    with open_store(cache_dir, blob, 64, other) as store:
        st_ = store.stats()
        assert st_["recovered_slots"] == 49
        assert st_["skipped_slots_at_open"] == 0
        assert st_["reformatted_at_open"] is False
        assert not store.contains(key(7))
        for i in range(50):
            if i != 7:
                assert_exact(store, i)


def test_wrong_layout_fingerprint_is_refused_and_the_cache_kept(cache_dir, backend):
    with open_store(cache_dir, 8192, 8, backend) as store:
        write_keys(store, range(5))
    other_fp = bytes(16)
    with pytest.raises(CacheGeometryError) as err:
        open_store(cache_dir, 8192, 8, backend, layout_fingerprint=other_fp)
    assert FP.hex() in str(err.value) and other_fp.hex() in str(err.value)
    with open_store(cache_dir, 8192, 8, backend) as store:  # every chunk is still there
        assert store.stats()["recovered_slots"] == 5
        for i in range(5):
            assert_exact(store, i)
    with open_store(cache_dir, 8192, 8, backend, layout_fingerprint=other_fp, reset_on_mismatch=True) as store:
        st_ = store.stats()
        assert st_["reformatted_at_open"] is True and st_["recovered_slots"] == 0
        write_keys(store, [100])  # the store is fully usable for its own layout
        assert_exact(store, 100)


def test_geometry_change_is_refused_unless_reset(cache_dir, backend):
    with open_store(cache_dir, 8192, 8, backend, geometry_label="chunk_tokens=16") as store:
        write_keys(store, range(3))
    for kw in ({"blob": 16384}, {"geometry_label": "chunk_tokens=32"}):
        with pytest.raises(CacheGeometryError, match="chunk_tokens=16"):
            open_store(
                cache_dir, kw.get("blob", 8192), 8, backend, geometry_label=kw.get("geometry_label", "chunk_tokens=16")
            )
    with open_store(cache_dir, 8192, 8, backend, geometry_label="chunk_tokens=16") as store:
        assert store.stats()["recovered_slots"] == 3
    with open_store(cache_dir, 16384, 8, backend, reset_on_mismatch=True) as store:
        st_ = store.stats()
        assert st_["reformatted_at_open"] is True
        assert "chunk_bytes 8192" in st_["reformat_reason"]
        assert st_["recovered_slots"] == 0


# ---- SIGKILL in the middle of writes ----------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    from kvtier import _core

    d, backend, blob, slots, n_threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    cap = 4096 + slots * (4096 + (blob + 4095) // 4096 * 4096)
    store = _core.DiskStore(d, cap, blob, bytes(range(16)), backend=backend, queue_depth=16)
    lock = threading.Lock()

    def key(i):
        return i.to_bytes(8, "little") + (i * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "little")

    def run(t):
        buf = _core.aligned_buffer(blob)
        i = t
        while True:
            buf[:] = np.random.default_rng(i).integers(0, 256, blob, dtype=np.uint8)
            store.write(key(i), buf)
            with lock:
                print(i, flush=True)
            i += n_threads

    for t in range(n_threads):
        threading.Thread(target=run, args=(t,), daemon=True).start()
    threading.Event().wait()
    """
)


@pytest.mark.multiproc
@pytest.mark.parametrize("verify_at_open", ["auto", "headers"])
def test_writer_killed_mid_writes_leaves_only_complete_chunks(cache_dir, backend, verify_at_open):
    blob, slots, n_threads = 512 * KiB, 256, 4
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, cache_dir, backend, str(blob), str(slots), str(n_threads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    done: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(done) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            done.append(int(line))
        assert len(done) >= 40, f"writer produced {len(done)} chunks; stderr: {proc.stderr.read()}"
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-write: four threads keep writes in flight
        proc.wait(timeout=30)
    # Chunks reported after our last read may have completed too; read the rest of stdout.
    done.extend(int(line) for line in proc.stdout.read().split())
    proc.stdout.close()
    proc.stderr.close()
    assert max(done) < slots, "the test assumes no eviction happened"

    with open_store(cache_dir, blob, slots, backend, verify_at_open=verify_at_open) as store:
        st_ = store.stats()
        assert st_["payloads_verified_at_open"] is (verify_at_open == "auto")
        torn_seen = 0
        for i in range(max(done) + 2 * n_threads + 1):
            if not store.contains(key(i)):
                assert i not in done, f"chunk {i} completed before the kill but is gone"
                continue
            out = _core.aligned_buffer(blob)
            try:
                store.read(key(i), out)
            except CorruptionError:
                # Only possible without payload verification at open, and only for a write the
                # kill interrupted; it is dropped, never returned.
                assert verify_at_open == "headers" and i not in done
                assert not store.contains(key(i))
                torn_seen += 1
                continue
            np.testing.assert_array_equal(out, blob_for(i, blob), err_msg=f"chunk {i}")
        for i in done:
            assert store.contains(key(i)), f"chunk {i} completed before the kill but is gone"
        assert store.stats()["corrupt_detected"] == torn_seen


# ---- truncation and corruption of the cache file (hypothesis) ----------------------------------------

N_CHUNKS = 12
CORRUPT_BLOB = 8192


@pytest.fixture(scope="module")
def pristine_cache():
    """A closed cache file holding N_CHUNKS chunks, copied by each example."""
    d = tempfile.mkdtemp(prefix="kvtier_disk_pristine_", dir=disk_dir_base())
    try:
        with open_store(d, CORRUPT_BLOB, N_CHUNKS, "posix") as store:
            write_keys(store, range(N_CHUNKS))
    except InvalidArgumentError as e:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"SKIPPED (needs an O_DIRECT file system; set KVTIER_TEST_DISK_DIR): {e}")
    yield os.path.join(d, CACHE_FILE)
    shutil.rmtree(d, ignore_errors=True)


FILE_BYTES = capacity_for(CORRUPT_BLOB, N_CHUNKS)
damage = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, FILE_BYTES), st.just(b"")),
    st.tuples(
        st.just("overwrite"),
        st.integers(0, FILE_BYTES - 1),
        st.binary(min_size=1, max_size=64),
    ),
    # Aimed at slot headers, where a random offset rarely lands.
    st.tuples(
        st.just("overwrite"),
        st.builds(
            lambda s, o: BLOCK + s * slot_bytes(CORRUPT_BLOB) + o, st.integers(0, N_CHUNKS - 1), st.integers(0, 95)
        ),
        st.binary(min_size=1, max_size=8),
    ),
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(damages=st.lists(damage, min_size=1, max_size=4), verify=st.sampled_from(["auto", "headers"]))
def test_truncated_or_corrupted_file_gives_misses_never_wrong_bytes(pristine_cache, backend, damages, verify):
    d = tempfile.mkdtemp(prefix="kvtier_disk_damaged_", dir=disk_dir_base())
    try:
        path = os.path.join(d, CACHE_FILE)
        shutil.copyfile(pristine_cache, path)
        changed = False
        with open(path, "r+b") as f:
            for kind, offset, data in damages:
                if kind == "truncate":
                    f.truncate(offset)
                    changed = True
                else:
                    f.seek(offset)
                    old = f.read(len(data))
                    f.seek(offset)
                    f.write(data)
                    changed |= old != data[: len(old)] or len(old) < len(data)
        with open_store(d, CORRUPT_BLOB, N_CHUNKS, backend, verify_at_open=verify) as store:
            st_ = store.stats()
            present = 0
            for i in range(N_CHUNKS):
                if not store.contains(key(i)):
                    continue
                out = _core.aligned_buffer(CORRUPT_BLOB)
                try:
                    store.read(key(i), out)
                except CorruptionError:
                    assert verify == "headers", "a verified-at-open chunk failed its checksum"
                    assert not store.contains(key(i))
                    continue
                np.testing.assert_array_equal(out, blob_for(i, CORRUPT_BLOB), err_msg=f"chunk {i}")
                present += 1
            if not changed:
                assert present == N_CHUNKS
            assert st_["recovered_slots"] <= N_CHUNKS
            # The store stays usable whatever it found.
            write_keys(store, [1000])
            assert_exact(store, 1000)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- disk full ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def loop_mounted_ext4(size_bytes: int):
    """A small ext4 file system on a loop device; skips loudly where that cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("SKIPPED (needs root to loop-mount a small ext4 for the ENOSPC test)")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("SKIPPED (mkfs.ext4 not installed; the ENOSPC test needs a small ext4)")
    work = tempfile.mkdtemp(prefix="kvtier_enospc_", dir=disk_dir_base())
    image, mnt = os.path.join(work, "fs.img"), os.path.join(work, "mnt")
    os.mkdir(mnt)
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size_bytes)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", image], check=True, capture_output=True)
        r = subprocess.run(["mount", "-o", "loop", image, mnt], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"SKIPPED (cannot loop-mount an ext4 image here: {r.stderr.strip()})")
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_preallocation_beyond_free_space_is_a_clear_error(backend):
    with loop_mounted_ext4(16 * MiB) as mnt:
        with pytest.raises(ResourceExhaustedError, match="capacity_bytes"):
            _core.DiskStore(mnt, 64 * MiB, MiB, FP, backend=backend)
        assert not os.path.exists(os.path.join(mnt, CACHE_FILE)), "a failed open left its file behind"


def test_enospc_fails_the_write_pauses_admission_keeps_cached_chunks(backend):
    blob = 1 * MiB
    with loop_mounted_ext4(24 * MiB) as mnt:
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb") as f:
            f.write(b"\xff" * (6 * MiB))
            f.flush()
            os.fsync(f.fileno())
        # A sparse (not preallocated) file larger than the file system: writes meet ENOSPC.
        store = _core.DiskStore(
            mnt, capacity_for(blob, 40), blob, FP, backend=backend, preallocate=False, nospace_retry_s=0.2
        )
        with store:
            assert store.stats()["preallocated"] is False
            written = []
            failed_key = None
            for i in range(40):
                try:
                    store.write(key(i), filled(i, blob))
                    written.append(i)
                except ResourceExhaustedError as e:
                    assert "space" in str(e)
                    failed_key = i
                    break
            assert failed_key is not None, "the small file system never filled up"
            assert written, "not even one chunk fit"
            assert not store.contains(key(failed_key)), "a failed store became visible"
            st_ = store.stats()
            assert st_["enospc"] == 1 and st_["nospace"] is True
            # Admission is paused: refused at once, counted.
            with pytest.raises(ResourceExhaustedError, match="stopped admitting"):
                store.write(key(500), filled(500, blob))
            assert store.stats()["writes_refused_nospace"] == 1
            for i in written:  # nothing cached was lost
                assert_exact(store, i)
            # Space returns: after the retry interval a probe write succeeds and admission resumes.
            os.unlink(filler)
            time.sleep(0.3)
            store.write(key(failed_key), filled(failed_key, blob))
            assert store.stats()["nospace"] is False
            assert_exact(store, failed_key)
            written.append(failed_key)
        with _core.DiskStore(mnt, capacity_for(blob, 40), blob, FP, backend=backend, preallocate=False) as store:
            assert store.stats()["recovered_slots"] == len(written)
            for i in written:
                assert_exact(store, i)


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_directories_are_named(tmp_path):
    missing = str(tmp_path / "no-such-dir")
    with pytest.raises(InvalidArgumentError, match="no-such-dir"):
        _core.DiskStore(missing, MiB, 8192, FP)
    plain = tmp_path / "plain-file"
    plain.write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        _core.DiskStore(str(plain), MiB, 8192, FP)


def test_unwritable_directory_is_named(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o500)
        try:
            with pytest.raises(InvalidArgumentError, match="not writable"):
                _core.DiskStore(str(d), MiB, 8192, FP)
        finally:
            d.chmod(0o700)
        return
    # root writes anywhere a mode allows nothing: use a read-only bind mount instead.
    ro = tmp_path / "ro-mount"
    ro.mkdir()
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(d), str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"SKIPPED (root, and no read-only bind mount possible: {r.stderr.strip()})")
    try:
        with pytest.raises(InvalidArgumentError, match="not writable"):
            _core.DiskStore(str(ro), MiB, 8192, FP)
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_file_system_refusing_o_direct_is_a_clear_error_or_explicit_fallback(backend):
    if os.geteuid() != 0:
        pytest.skip("SKIPPED (needs root to mount a ramfs, a file system without O_DIRECT)")
    mnt = tempfile.mkdtemp(prefix="kvtier_ramfs_")
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"SKIPPED (cannot mount a ramfs here: {r.stderr.strip()})")
    try:
        works, reason = _core.probe_direct_io(mnt)
        assert not works and "O_DIRECT" in reason and mnt in reason
        assert os.listdir(mnt) == [], "the probe left a file"
        with pytest.raises(InvalidArgumentError, match="O_DIRECT") as info:
            _core.DiskStore(mnt, MiB, 8192, FP, backend=backend)
        assert "ramfs" in str(info.value) and mnt in str(info.value)
        assert not os.path.exists(os.path.join(mnt, CACHE_FILE)), "the refused open left a file"
        with _core.DiskStore(mnt, MiB, 8192, FP, backend=backend, allow_buffered_io=True) as store:
            assert store.stats()["direct_io"] is False
            write_keys(store, [1])
            assert_exact(store, 1)
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        os.rmdir(mnt)


def test_tmpfs_either_works_or_is_refused_clearly(backend):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("SKIPPED (no /dev/shm tmpfs here)")
    d = tempfile.mkdtemp(prefix="kvtier_tmpfs_", dir="/dev/shm")
    try:
        # Linux >= 6.6 lets tmpfs take O_DIRECT; older kernels refuse it.
        try:
            store = _core.DiskStore(d, MiB, 8192, FP, backend=backend)
        except InvalidArgumentError as e:
            assert "O_DIRECT" in str(e) and "tmpfs" in str(e)
            return
        with store:
            assert store.stats()["fs_type"] == "tmpfs"
            write_keys(store, [3])
            assert_exact(store, 3)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_bad_arguments_raise_named_errors_and_leave_the_store_usable(cache_dir):
    with pytest.raises(InvalidArgumentError, match="layout_fingerprint"):
        _core.DiskStore(cache_dir, MiB, 8192, b"short")
    with pytest.raises(InvalidArgumentError, match="backend"):
        _core.DiskStore(cache_dir, MiB, 8192, FP, backend="aio")
    with pytest.raises(InvalidArgumentError, match="capacity_bytes"):
        _core.DiskStore(cache_dir, -1, 8192, FP)
    with pytest.raises(InvalidArgumentError, match="capacity_bytes"):
        _core.DiskStore(cache_dir, 4096, 8192, FP)
    with pytest.raises(InvalidArgumentError, match="blob_bytes"):
        _core.DiskStore(cache_dir, MiB, 0, FP)
    with pytest.raises(InvalidArgumentError, match="queue_depth"):
        _core.DiskStore(cache_dir, MiB, 8192, FP, queue_depth=0)
    with pytest.raises(InvalidArgumentError, match="io_timeout_s"):
        _core.DiskStore(cache_dir, MiB, 8192, FP, io_timeout_s=0)
    with pytest.raises(InvalidArgumentError, match="verify_at_open"):
        _core.DiskStore(cache_dir, MiB, 8192, FP, verify_at_open="never")

    store = _core.DiskStore(cache_dir, MiB, 8192, FP)
    with pytest.raises(FailedPreconditionError, match="in use"):
        _core.DiskStore(cache_dir, MiB, 8192, FP)
    good = filled(1, 8192)
    with pytest.raises(InvalidArgumentError, match="key"):
        store.write(b"too short", good)
    big = _core.aligned_buffer(8192 + BLOCK)
    with pytest.raises(InvalidArgumentError, match="aligned"):
        store.write(key(1), big[1 : 1 + 8192])
    with pytest.raises(InvalidArgumentError, match="blob_bytes"):
        store.write(key(1), big)
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        store.write(key(1), big[::2][:8192])
    with pytest.raises(InvalidArgumentError, match="writable"):
        store.read(key(1), bytes(8192))
    with pytest.raises(InvalidArgumentError, match="keys"):
        store.lookup(b"x" * 17)
    with pytest.raises(InvalidArgumentError, match="timeout_s"):
        store.flush(timeout_s=-1)
    assert store.stats()["writes"] == 0
    store.write(key(1), good)  # still usable
    assert_exact(store, 1)
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(FailedPreconditionError, match="closed"):
        store.contains(key(1))


def test_probe_direct_io(cache_dir, tmp_path):
    assert _core.probe_direct_io(cache_dir) == (True, "")
    assert os.listdir(cache_dir) == []
    works, reason = _core.probe_direct_io(str(tmp_path / "missing"))
    assert not works and "missing" in reason


def test_aligned_buffer():
    buf = _core.aligned_buffer(3 * BLOCK + 5)
    assert buf.dtype == np.uint8 and buf.shape == (3 * BLOCK + 5,)
    assert buf.ctypes.data % BLOCK == 0
    assert not buf.any()
    with pytest.raises(InvalidArgumentError, match="nbytes"):
        _core.aligned_buffer(-1)


def test_close_waits_for_calls_in_other_threads(cache_dir, backend):
    blob = 256 * KiB
    store = open_store(cache_dir, blob, 64, backend)
    errors: list[BaseException] = []
    started = threading.Event()

    def writer() -> None:
        try:
            started.set()
            for i in range(60):  # fewer than the 64 slots: nothing is evicted
                store.write(key(i), filled(i, blob))
        except FailedPreconditionError:
            pass  # closed under it: the expected way out
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(10)
    time.sleep(0.02)
    store.close()
    t.join(timeout=30)
    assert not t.is_alive() and not errors, errors
    # Whatever completed before the close is on disk, exact.
    with open_store(cache_dir, blob, 64, backend) as again:
        n = again.stats()["recovered_slots"]
        assert again.lookup(b"".join(key(i) for i in range(60))) == n
        for i in range(n):
            assert_exact(again, i)
