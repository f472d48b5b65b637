"""A full filesystem under the disk tier, peers on: the peer key journal in the disk directory
cannot be appended, and store() must still return its future with the chunks holding the bytes
the pages held (never raise after submitting its copy), and close() must still drain and release.

Runs on a real small ext4 filesystem on a loop device (mounting needs root or passwordless sudo;
skipped with the reason elsewhere). tmpfs is not used: the disk tier needs O_DIRECT.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

torch = pytest.importorskip("torch")

from kvtier import KVCache, Layout

PAGES = 64
PPC = 2
FS_BYTES = 24 << 20


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        cmd = ["sudo", "-n", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def full_fs(tmp_path):
    """A mounted 24 MiB ext4 filesystem (its mount point), unmounted afterwards."""
    if os.geteuid() != 0 and (shutil.which("sudo") is None or _run(["true"]).returncode != 0):
        pytest.skip("mounting a loop filesystem needs root or passwordless sudo")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed (Debian: e2fsprogs)")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(FS_BYTES)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    mounted = _run(["mount", "-o", "loop", str(image), str(mnt)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop filesystem here: {mounted.stderr.strip()}")
    try:
        if os.geteuid() != 0:
            _run(["chown", str(os.geteuid()), str(mnt)])
        yield str(mnt)
    finally:
        _run(["umount", "-l", str(mnt)])


def fill(directory: str) -> None:
    """Write until the filesystem refuses another byte."""
    block = b"\0" * (256 << 10)
    with open(os.path.join(directory, "filler"), "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    try:  # the last partial blocks too
        with open(os.path.join(directory, "filler2"), "wb") as f:
            for _ in range(1 << 16):
                f.write(b"\0" * 1024)
                f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC, e


def page_bytes(tensors, p) -> bytes:
    return b"".join(t[i, p].contiguous().view(torch.uint8).numpy().tobytes() for t in tensors for i in range(2))


def test_store_on_a_full_disk_with_peers_returns_its_future_and_keeps_the_right_bytes(full_fs):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, PAGES, 4, 2, 8, generator=gen) for _ in range(2)]
    layout = Layout.from_vllm(tensors, chunk_tokens=4 * PPC)
    cache = KVCache(
        layout,
        cpu_bytes=64 * layout.chunk_bytes,
        method="cpu",
        disk_dir=full_fs,
        disk_bytes=1 << 20,
        peers={"listen": "127.0.0.1:0", "secret": "s" * 32},
    )
    try:
        fill(full_fs)
        tokens = list(range(4 * layout.chunk_tokens))
        pages = list(range(4 * PPC))
        before = [page_bytes(tensors, p) for p in pages]
        fut = cache.store(tokens, pages)  # the journal append fails: counted, not raised
        assert fut.wait() == 4
        for t in tensors:  # the caller reuses its pages once the future completed
            t[:, : 4 * PPC].zero_()
        dst = list(range(PAGES - 4 * PPC, PAGES))
        assert cache.load(tokens, dst).wait() == 4 * layout.chunk_tokens
        assert [page_bytes(tensors, p) for p in dst] == before
        assert cache.stats()["peers"]["journal_errors"] >= 1
    finally:
        cache.close()  # drains and releases on the full filesystem without raising


def test_a_disk_tier_larger_than_the_free_space_says_how_much_is_free(full_fs):
    import re

    from kvtier.errors import ResourceExhaustedError

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, PAGES, 4, 2, 8, generator=gen) for _ in range(2)]
    layout = Layout.from_vllm(tensors, chunk_tokens=4 * PPC)
    st = os.statvfs(full_fs)
    free = st.f_bavail * st.f_frsize
    with pytest.raises(ResourceExhaustedError, match="bytes free") as e:
        KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, method="cpu", disk_dir=full_fs, disk_bytes=4 * FS_BYTES)
    said = int(re.search(r"\((\d+) bytes free\)", str(e.value)).group(1))
    assert abs(said - free) <= free // 10, (said, free)
    assert os.listdir(full_fs) == ["lost+found"]  # the failed cache file is not left behind
