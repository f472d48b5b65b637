"""A disk cache directory of another geometry (chunk size, layout fingerprint) is never wiped
implicitly: KVCache refuses it with CacheGeometryError naming both geometries and leaves every
chunk in place; it is wiped only when asked (disk_reset_on_mismatch, `kvtier cache reset DIR`).

Runs the disk tier on pytest's tmp_path (which must accept O_DIRECT).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from _util import toks
from kvtier import KVCache, Layout, _core
from kvtier.cli import main as cli_main
from kvtier.errors import CacheGeometryError, FailedPreconditionError

N_CHUNKS = 24


def make_layout(chunk_tokens: int = 32, heads: int = 2):
    kv = [torch.randn(2, 64, 16, heads, 64, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    return kv, Layout.from_vllm(kv, chunk_tokens=chunk_tokens)


def open_cache(layout, d, **kw) -> KVCache:
    kw.setdefault("disk_persist_interval_s", 0)
    return KVCache(
        layout,
        cpu_bytes=2 * layout.chunk_bytes,
        disk_dir=str(d),
        disk_bytes=64 * layout.chunk_bytes + (1 << 20),
        disk_admit_min_seen=1,
        **kw,
    )


def fill(d, n: int = N_CHUNKS) -> tuple[Layout, list[list[int]]]:
    """n one-chunk prompts through a 2-chunk CPU tier: all but the last 2 are written back at
    eviction, the last 2 by the persist at close (or lost, without one: either way >= n - 2)."""
    _, layout = make_layout()
    prompts = [toks(layout.chunk_tokens, 100 + i) for i in range(n)]
    with open_cache(layout, d) as cache:
        for p in prompts:
            cache.store(p, [0, 1]).wait()
        cache.drain()
    return layout, prompts


def on_disk(layout, d, prompts, **kw) -> tuple[int, dict]:
    with open_cache(layout, d, **kw) as cache:
        disk = cache.stats()["disk"]
        return sum(cache.lookup(p) // layout.chunk_tokens for p in prompts), disk


def test_other_chunk_size_is_refused_naming_both_and_the_cache_is_kept(tmp_path):
    layout, prompts = fill(tmp_path)
    before, _ = on_disk(layout, tmp_path, prompts)
    assert before >= N_CHUNKS - 2
    _, other = make_layout(chunk_tokens=64)
    with pytest.raises(CacheGeometryError) as err:
        open_cache(other, tmp_path)
    msg = str(err.value)
    # Both geometries, as chunk bytes, layout fingerprints and chunk_tokens, and the way out.
    assert f"chunk_bytes {layout.chunk_bytes}" in msg and f"chunk_bytes {other.chunk_bytes}" in msg
    assert layout.fingerprint_hex in msg and other.fingerprint_hex in msg
    assert "chunk_tokens=32" in msg and "chunk_tokens=64" in msg
    assert "kvtier cache reset" in msg and "reset_on_mismatch" in msg
    assert isinstance(err.value, FailedPreconditionError)
    after, disk = on_disk(layout, tmp_path, prompts)  # the right config finds every chunk
    assert after == before
    assert disk["reformatted_at_open"] is False


def test_other_layout_is_refused_and_another_model_shares_the_directory(tmp_path):
    layout, prompts = fill(tmp_path)
    before, _ = on_disk(layout, tmp_path, prompts)
    _, wider = make_layout(heads=4)  # another layout (and chunk size)
    with pytest.raises(CacheGeometryError, match=wider.fingerprint_hex):
        open_cache(wider, tmp_path)
    # Another model of the same layout: its keys differ, so it finds nothing of the first one and
    # takes nothing from it at open.
    with open_cache(layout, tmp_path, model_id="other") as cache:
        assert cache.stats()["disk"]["recovered_slots"] == before
        assert sum(cache.lookup(p) for p in prompts) == 0
    assert on_disk(layout, tmp_path, prompts)[0] == before


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_tokens=st.sampled_from([16, 64, 128]), heads=st.sampled_from([2, 4]), reopen_first=st.booleans())
def test_any_mismatch_leaves_every_chunk(tmp_path_factory, chunk_tokens, heads, reopen_first):
    d = tmp_path_factory.mktemp("geom")
    layout, prompts = fill(d, n=8)
    before, _ = on_disk(layout, d, prompts) if reopen_first else (None, None)
    _, other = make_layout(chunk_tokens=chunk_tokens, heads=heads)
    for _ in range(2):  # a retry with the same wrong config does no harm either
        with pytest.raises(CacheGeometryError):
            open_cache(other, d)
    after, disk = on_disk(layout, d, prompts)
    assert after >= 6 and (before is None or after == before)
    assert disk["recovered_slots"] == after


def test_reset_on_mismatch_wipes_only_when_asked(tmp_path):
    layout, _ = fill(tmp_path)
    _, other = make_layout(chunk_tokens=64)
    with open_cache(other, tmp_path, disk_reset_on_mismatch=True) as cache:
        disk = cache.stats()["disk"]
        assert disk["reformatted_at_open"] is True
        assert "reset_on_mismatch" in disk["reformat_reason"]
        assert disk["recovered_slots"] == 0
    # The directory now holds the new geometry: the old one is the mismatch.
    with pytest.raises(CacheGeometryError):
        open_cache(layout, tmp_path)


def test_cli_cache_reset_wipes_and_refuses_a_cache_in_use(tmp_path, capsys):
    layout, prompts = fill(tmp_path)
    with open_cache(layout, tmp_path) as cache:
        assert cli_main(["cache", "reset", str(tmp_path)]) == 1  # in use: refused
        assert "in use" in capsys.readouterr().err
        assert cache.lookup(prompts[0]) == layout.chunk_tokens
    assert cli_main(["cache", "reset", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "deleted" in out and "chunk_tokens=32" in out
    _, other = make_layout(chunk_tokens=64)
    with open_cache(other, tmp_path) as cache:  # any geometry may use the directory now
        assert cache.stats()["disk"]["recovered_slots"] == 0
    assert on_disk(other, tmp_path, [])[0] == 0
    # A directory that does not exist is an error; one without a cache file is not (scripts
    # may reset unconditionally).
    proc = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "cache", "reset", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    assert _core.disk_cache_reset(str(tmp_path))  # the file of `other`
    assert cli_main(["cache", "reset", str(tmp_path)]) == 0
    assert "nothing to reset" in capsys.readouterr().out
