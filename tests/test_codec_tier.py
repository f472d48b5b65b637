"""Encoded chunks below the GPU (kvtier.codec_tier, config key codec.name): round trips through
the CPU tier, disk slots and peers with each codec, the codec in the blob fingerprint, capacity
in chunks, and a blob of another codec costing a miss."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zstandard")

from _util import wait_until
from kvtier import KVCache, Layout
from kvtier.codec_tier import chunk_ranges, chunk_shape, codec_fingerprint, gpu_round_chunks, slot_nbytes
from kvtier.codecs import PagedChunks, codec_names, make_codec, read_header
from kvtier.config import KVTierConfig
from kvtier.config.sections import CODECS
from kvtier.errors import CacheGeometryError, InvalidArgumentError

CODEC_OPTIONS = {"none": {}, "fp8": {"scale_dtype": "bfloat16"}, "byteplane_zstd": {"level": 1}}
CHUNK_TOKENS = 32


def vllm_kv(dtype=torch.bfloat16, pages=32, heads=4, dim=64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    kv = [(torch.randn(2, pages, 16, heads, dim, generator=g) * 2).to(dtype).to(device) for _ in range(2)]
    return kv, Layout.from_vllm(kv, chunk_tokens=CHUNK_TOKENS)


def raw_blobs(layout, tokens, pages) -> list[bytes]:
    """The raw blobs of the chunks of ``tokens`` in ``pages``, through a codec-less cache."""
    with KVCache(layout, cpu_bytes=16 * layout.chunk_bytes, method="cpu", model_id="raw") as raw:
        raw.store(tokens, pages).wait()
        keys = raw.keyer.keys(tokens)
        out = []
        for k in keys:
            views = raw.tier.acquire_blobs(k)
            out.append(bytes(views[0]))
            raw.tier.release_blobs(k)
        return out


def through_codec(codec, layout, blob: bytes) -> bytes:
    """What a chunk's raw blob becomes after the codec's own encode and decode."""
    shape, dtype = chunk_shape(layout)
    t = torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).view(shape)
    return bytes(codec.decode(codec.encode(t)).view(-1).view(torch.uint8).numpy())


def toks(n_chunks, base=7):
    return list(range(base, base + n_chunks * CHUNK_TOKENS))


def test_config_names_the_codecs_of_kvtier_codecs():
    assert list(CODECS) == codec_names()


def test_config_key_reaches_the_cache_and_bad_values_are_refused():
    _, layout = vllm_kv()
    cfg = KVTierConfig.load(env={"KVTIER_CODEC_NAME": "fp8", "KVTIER_CODEC_FP8_SCALE_DTYPE": "float32"})
    with KVCache(layout, **{**cfg.cache_kwargs(), "cpu_bytes": 4 * layout.chunk_bytes}) as cache:
        assert cache.codec.spec == make_codec("fp8", scale_dtype="float32").spec
        assert cache.stats()["codec"] == cache.codec.spec
    with pytest.raises(InvalidArgumentError, match=r"codec\.name: invalid value 'lz4'.*'none', 'fp8'"):
        KVTierConfig.load(env={}, codec={"name": "lz4"})
    with pytest.raises(InvalidArgumentError, match=r"codec\.zstd_level"):
        KVTierConfig.load(env={"KVTIER_CODEC_ZSTD_LEVEL": "99"})
    with pytest.raises(InvalidArgumentError, match="codec_fp8_scale_dtype"):
        KVCache(layout, cpu_bytes=4 * layout.chunk_bytes, codec_name="fp8", codec_fp8_scale_dtype="float16")
    with pytest.raises(InvalidArgumentError, match=r"verify_stores.*codec_name is .fp8.*raw blobs"):
        KVCache(layout, cpu_bytes=4 * layout.chunk_bytes, codec_name="fp8", verify_stores=True)
    kv8 = [torch.zeros(2, 4, 16, 4, 64, dtype=torch.float8_e4m3fn)]
    with pytest.raises(InvalidArgumentError, match="float8_e4m3fn"):
        KVCache(Layout.from_vllm(kv8, chunk_tokens=CHUNK_TOKENS), cpu_bytes=1 << 20, codec_name="fp8")


@pytest.mark.parametrize("name", ["none", "fp8", "byteplane_zstd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_tier_round_trip_equals_the_codecs_own(name, dtype):
    """What a load puts into pages is exactly the codec's decode of the chunk's encoding: the raw
    bytes for lossless codecs, fp8's values (held to their bound in test_codecs.py) for fp8."""
    kv, layout = vllm_kv(dtype)
    codec = make_codec(name, **CODEC_OPTIONS[name])
    tokens = toks(4)
    want = [through_codec(codec, layout, b) for b in raw_blobs(layout, tokens, range(8))]
    with KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, method="cpu", codec_name=name) as cache:
        assert cache.store(tokens, range(8)).wait() == 4
        assert cache.lookup(tokens) == 4 * CHUNK_TOKENS
        assert cache.load(tokens, range(16, 24)).wait() == 4 * CHUNK_TOKENS
        s = cache.stats()
    got = raw_blobs(layout, tokens, range(16, 24))
    assert got == want
    if codec.lossless:
        assert got == raw_blobs(layout, tokens, range(8))
    else:
        for t in kv:
            x, y = t[:, :8].float(), t[:, 16:24].float()
            assert 0 < (y - x).norm() / x.norm() < 0.07
    if name != "none":
        assert s["codec_chunks_encoded"] == 4 and s["codec_chunks_decoded"] == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_in_host_pages_stores_the_staged_paths_blobs(monkeypatch, dtype):
    """fp8 with the pages in host memory is coded in place (no staging tier): its blobs are the
    staged path's, byte for byte, so a disk or a peer written by either serves the other."""
    import kvtier.codec_tier

    _kv, layout = vllm_kv(dtype, seed=4)  # the tensors stay alive: the layout points into them
    tokens = toks(4)
    blobs = {}
    for in_pages in (True, False):
        monkeypatch.setattr(kvtier.codec_tier, "_HOST_PAGES", in_pages)
        with KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, method="cpu", codec_name="fp8") as cache:
            assert (cache.tier._staging is None) == in_pages
            assert cache.store(tokens, range(8)).wait() == 4
            keys = cache.keyer.keys(tokens)
            blobs[in_pages] = [bytes(v) for v in cache.tier.acquire_blobs(b"".join(keys))]
            cache.tier.release_blobs(b"".join(keys))
    assert len(blobs[True]) == 4 and blobs[True] == blobs[False]


@pytest.mark.parametrize("name", ["fp8", "byteplane_zstd"])
def test_disk_round_trip_after_eviction_and_restart(tmp_path, name):
    _, layout = vllm_kv(seed=3)
    codec = make_codec(name, **CODEC_OPTIONS[name])
    tokens = toks(6)
    want = [through_codec(codec, layout, b) for b in raw_blobs(layout, tokens, range(12))]
    slot = -(-slot_nbytes(layout, codec) // 4096) * 4096
    opts = dict(method="cpu", codec_name=name, disk_dir=str(tmp_path), disk_bytes=64 << 20, disk_admit_min_seen=1)
    with KVCache(layout, cpu_bytes=2 * slot, **opts) as cache:  # 2 chunks in the pool: 4 go to disk
        cache.store(tokens, range(12)).wait()
        cache.drain()  # write-through and write-backs run on their own
        disk = cache.stats()["disk"]
        assert disk["writes"] >= 4  # at least the 4 evicted ones, encoded
        assert disk["write_bytes"] == disk["writes"] * slot_nbytes(layout, codec)  # encoded chunks
        assert cache.lookup_tiers(tokens)[:2] == ["disk", "disk"]
    with KVCache(layout, cpu_bytes=2 * slot, **opts) as cache:  # a restart: every chunk from disk
        assert cache.lookup_tiers(tokens) == ["disk"] * 6
        assert cache.load(tokens, range(16, 28)).wait() == 6 * CHUNK_TOKENS
        assert cache.stats()["disk"]["chunks_promoted"] == 6
    assert raw_blobs(layout, tokens, range(16, 28)) == want


def twelve_chunks_and_a_disk(tmp_path, name: str, seed: int):
    """A 64-page layout, 12 chunks of tokens, their blobs after ``name``'s round trip, the
    codec's block size and the KVCache options of a disk tier in ``tmp_path``."""
    _, layout = vllm_kv(seed=seed, pages=64)
    codec = make_codec(name, **CODEC_OPTIONS[name])
    tokens = toks(12)
    want = [through_codec(codec, layout, b) for b in raw_blobs(layout, tokens, range(24))]
    slot = -(-slot_nbytes(layout, codec) // 4096) * 4096
    opts = dict(method="cpu", codec_name=name, disk_dir=str(tmp_path), disk_bytes=64 << 20, disk_admit_min_seen=1)
    return layout, tokens, want, slot, opts


@pytest.mark.parametrize("name", ["fp8", "byteplane_zstd"])
def test_a_disk_hit_starts_every_read_at_once(tmp_path, name):
    """A load of chunks that are only on disk starts all their reads before its first round
    (the pool's prefetch), instead of one round's reads after another; the bytes are those of
    the codec's round trip, and a pool with no room beside a round prefetches nothing."""
    layout, tokens, want, slot, opts = twelve_chunks_and_a_disk(tmp_path, name, seed=4)
    with KVCache(layout, cpu_bytes=16 * slot, **opts) as cache:
        cache.store(tokens, range(24)).wait()
        cache.persist()
    with KVCache(layout, cpu_bytes=16 * slot, **opts) as cache:  # a restart: every chunk from disk
        assert cache.lookup_tiers(tokens) == ["disk"] * 12
        assert cache.load(tokens, range(32, 56)).wait() == 12 * CHUNK_TOKENS
        disk = cache.stats()["disk"]
        assert disk["chunks_prefetched"] == 12 and disk["chunks_promoted"] == 0, disk
    assert raw_blobs(layout, tokens, range(32, 56)) == want
    with KVCache(layout, cpu_bytes=4 * slot, **opts) as cache:  # room for one round only
        assert cache.load(tokens, range(32, 56)).wait() == 12 * CHUNK_TOKENS  # round by round
        disk = cache.stats()["disk"]
        assert disk["chunks_prefetched"] == 0 and disk["chunks_promoted"] == 12, disk


@pytest.mark.parametrize("name", ["fp8", "byteplane_zstd"])
def test_a_load_with_chunks_only_in_the_pool_reads_the_disk_round_by_round(tmp_path, name):
    """Where some of a load's chunks are in the pool only (not on disk), starting every disk read
    at once could evict them before their round: the rounds read the disk as they go."""
    layout, tokens, want, slot, opts = twelve_chunks_and_a_disk(tmp_path, name, seed=6)
    with KVCache(layout, cpu_bytes=16 * slot, **opts) as cache:
        cache.store(tokens[: 4 * CHUNK_TOKENS], range(8)).wait()
        cache.persist()
    # Restarted with admission after two sightings: the other 8 chunks stay in the pool only.
    with KVCache(layout, cpu_bytes=16 * slot, **{**opts, "disk_admit_min_seen": 2}) as cache:
        cache.store(tokens, range(24)).wait()
        assert cache.lookup_tiers(tokens) == ["disk"] * 4 + ["cpu"] * 8
        assert cache.load(tokens, range(32, 56)).wait() == 12 * CHUNK_TOKENS
        disk = cache.stats()["disk"]
        assert disk["chunks_prefetched"] == 0 and disk["chunks_promoted"] == 4, disk
    assert raw_blobs(layout, tokens, range(32, 56)) == want


def test_a_disk_written_under_one_codec_is_refused_under_another(tmp_path):
    _, layout = vllm_kv(seed=4)
    tokens = toks(2)
    base = dict(method="cpu", disk_dir=str(tmp_path), disk_bytes=16 << 20)
    with KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, codec_name="fp8", **base) as cache:
        cache.store(tokens, range(4)).wait()
    for other in ("none", "byteplane_zstd"):
        with pytest.raises(CacheGeometryError, match="codec=fp8"):
            KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, codec_name=other, **base)
    # fp8 with other scales writes other bytes: refused too
    with pytest.raises(CacheGeometryError):
        KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, codec_name="fp8", codec_fp8_scale_dtype="float32", **base)
    with KVCache(
        layout, cpu_bytes=8 * layout.chunk_bytes, codec_name="none", disk_reset_on_mismatch=True, **base
    ) as cache:
        assert cache.lookup(tokens) == 0  # wiped: a miss, never fp8 bytes handed back as KV


def put_foreign_blob(cache, layout, key: bytes) -> None:
    """Put a `none` blob of the right size into ``key``'s slot (as a buggy writer would)."""
    shape, dtype = chunk_shape(layout)
    foreign = make_codec("none").encode(torch.zeros(shape[0] // 2, shape[1], dtype=dtype))
    view = np.asarray(cache.tier.begin_put(key))
    view[: foreign.numel()] = foreign.numpy()
    view[foreign.numel() :] = 0
    cache.tier.commit_put(key)


def test_fp8_in_host_pages_loads_rounds_ahead_and_stops_at_a_foreign_blob(caplog):
    """fp8 in host pages with a pool of more than two rounds: each round's load is issued before
    the round before is decoded, and the chunks come back as the codec's round trip; a slot of
    another codec in the second round ends the load there, the pages of that chunk and of those
    after it untouched."""
    _kv, layout = vllm_kv(pages=64, seed=6)  # the tensors stay alive: the layout points into them
    codec = make_codec("fp8", **CODEC_OPTIONS["fp8"])
    tokens = toks(12)
    want = [through_codec(codec, layout, b) for b in raw_blobs(layout, tokens, range(24))]
    with KVCache(layout, cpu_bytes=16 * slot_nbytes(layout, codec), method="cpu", codec_name="fp8") as cache:
        assert cache.tier.capacity_chunks >= 8 and cache.tier._host_segments is not None
        keys = cache.keyer.keys(tokens)
        assert cache.store(tokens[: 6 * CHUNK_TOKENS], range(12)).wait() == 6
        put_foreign_blob(cache, layout, keys[6])
        assert cache.store(tokens, range(24)).wait() == 5  # the other 5; the 7th is held (foreign)
        assert cache.lookup(tokens) == 12 * CHUNK_TOKENS
        before = raw_blobs(layout, tokens, range(32, 56))
        assert cache.load(tokens, range(32, 56)).wait() == 6 * CHUNK_TOKENS
        got = raw_blobs(layout, tokens, range(32, 56))
        assert got[:6] == want[:6] and got[6:] == before[6:]
        assert cache.stats()["codec_decode_failures"] == 1 and "written by 'none'" in caplog.text
        more = toks(12, base=5000)
        want = [through_codec(codec, layout, b) for b in raw_blobs(layout, more, range(24))]
        assert cache.store(more, range(24)).wait() == 12
        assert cache.load(more, range(32, 56)).wait() == 12 * CHUNK_TOKENS
        assert raw_blobs(layout, more, range(32, 56)) == want


def test_a_blob_of_another_codec_in_a_slot_is_a_miss():
    kv, layout = vllm_kv(seed=5)
    tokens = toks(3)
    with KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, method="cpu", codec_name="fp8") as cache:
        keys = cache.keyer.keys(tokens)
        cache.store(tokens[: 2 * CHUNK_TOKENS], range(4)).wait()
        put_foreign_blob(cache, layout, keys[2])  # the third chunk's slot
        assert cache.lookup(tokens) == 3 * CHUNK_TOKENS
        before = [t[:, 12:16].clone() for t in kv]
        assert cache.load(tokens, range(8, 14)).wait() == 2 * CHUNK_TOKENS
        assert cache.stats()["codec_decode_failures"] == 1
        assert all(torch.equal(t[:, 12:14], b[:, :2]) for t, b in zip(kv, before, strict=True))  # untouched


def test_begin_puts_reserves_in_order_and_stops_where_the_tier_is_full():
    """The batched put the GPU stacks use: addresses of blob_bytes blocks in key order, 0 for a
    chunk already held, shorter where no block is left (every block being written), and
    commit_puts makes exactly the written bytes visible; a key never begun is an error naming
    its index, after the keys before it are committed."""
    import ctypes

    from kvtier.errors import NotFoundError

    _, layout = vllm_kv(seed=3)
    tokens, others = toks(4), toks(2, base=10**6)
    with KVCache(layout, cpu_bytes=3 * layout.chunk_bytes, method="cpu") as cache:
        tier, keys, more = cache.tier, cache.keyer.keys(tokens), cache.keyer.keys(others)
        assert tier.capacity_chunks == 3
        cache.store(tokens[:CHUNK_TOKENS], range(2)).wait()  # keys[0] is held
        got = tier.begin_puts(b"".join(keys[:3])).tolist()
        assert got[0] == 0 and len(got) == 3 and 0 not in got[1:], got  # two free blocks
        got += tier.begin_puts(keys[3]).tolist()  # evicts keys[0], the one block not being written
        assert len(got) == 4 and len(set(got[1:])) == 3, got
        assert tier.begin_puts(more[0]).tolist() == []  # every block is being written
        n = tier.blob_bytes
        for i, a in enumerate(got[1:], start=1):
            ctypes.memset(a, i, n)
        tier.commit_puts(b"".join(keys[1:]))
        assert cache.lookup_tiers(tokens) == []  # keys[0] was evicted: the prefix starts with a miss
        for i in range(1, 4):
            views = tier.acquire_blobs(keys[i])
            assert bytes(views[0]) == bytes([i]) * n
            tier.release_blobs(keys[i])
        assert len(tier.begin_puts(more[0])) == 1  # committed blocks can be evicted again
        with pytest.raises(NotFoundError, match=r"commit_puts: keys\[1\]"):
            tier.commit_puts(more[0] + more[1])  # more[1] was never begun
        assert tier.lookup(more[0]) == 1  # the one before it is committed


def test_capacity_in_chunks_grows_by_the_ratio():
    _, layout = vllm_kv(pages=64, heads=8, dim=128)  # 1 MiB chunks
    cpu_bytes = 8 * layout.chunk_bytes
    with KVCache(layout, cpu_bytes=cpu_bytes, method="cpu") as raw:
        raw_chunks = raw.stats()["capacity_chunks"]
    fp8 = make_codec("fp8", scale_dtype="bfloat16")
    slot = slot_nbytes(layout, fp8)
    assert layout.chunk_bytes / slot > 1.95  # bf16 scales per 128 values: 2 / (1 + 2/128) ~ 1.97
    with KVCache(layout, cpu_bytes=cpu_bytes, method="cpu", codec_name="fp8") as cache:
        chunks = cache.stats()["capacity_chunks"]
        assert chunks == cpu_bytes // (-(-slot // 4096) * 4096)
        assert chunks / raw_chunks >= 1.875
        tokens = toks(chunks, base=1)  # as many chunks as it holds, from 32 pages of 64
        for c in range(chunks):
            cache.store(tokens[: (c + 1) * CHUNK_TOKENS], [p % 64 for p in range(2 * (c + 1))]).wait()
        assert cache.lookup(tokens) == chunks * CHUNK_TOKENS  # all of them, none evicted
        assert cache.stats()["codec_bytes_encoded"] == chunks * fp8.encoded_nbytes(*chunk_shape(layout))


def test_a_reduced_slot_holds_more_chunks_and_refuses_blobs_that_do_not_fit(caplog):
    """byteplane_zstd with codec.slot_fraction < 1: capacity grows by 1/fraction; a chunk whose
    blob compresses less than the slot allows is not stored (the store ends there, counted), and
    what was stored loads bit-exact."""
    caplog.set_level("INFO", logger="kvtier.codec_tier")
    kv, layout = vllm_kv(pages=32, seed=12)
    zstd = make_codec("byteplane_zstd", **CODEC_OPTIONS["byteplane_zstd"])
    worst = slot_nbytes(layout, zstd)
    slot = slot_nbytes(layout, zstd, 0.8)
    assert slot % 16 == 0 and 0.8 * worst <= slot < 0.8 * worst + 16
    cpu_bytes = 12 * layout.chunk_bytes
    with KVCache(layout, cpu_bytes=cpu_bytes, method="cpu", codec_name="byteplane_zstd") as full_slots:
        at_worst = full_slots.stats()["capacity_chunks"]
    tokens = toks(4)
    # Chunks 0, 1 and 3 of normal values (the bf16 exponents compress well); chunk 2 of random
    # bits (they do not).
    kv[0][:, 4:6] = torch.randint(-(2**15), 2**15, kv[0][:, 4:6].shape, dtype=torch.int16).view(torch.bfloat16)
    want = raw_blobs(layout, tokens, range(8))
    with KVCache(
        layout, cpu_bytes=cpu_bytes, method="cpu", codec_name="byteplane_zstd", codec_slot_fraction=0.8
    ) as cache:
        st = cache.stats()
        assert st["codec_slot_bytes"] == slot and st["codec_slot_fraction"] == 0.8
        assert st["capacity_chunks"] == cpu_bytes // (-(-slot // 4096) * 4096) > at_worst
        assert cache.store(tokens, range(8)).wait() == 2
        assert cache.stats()["codec_blob_too_large"] == 1 and "exceeds" in caplog.text
        assert cache.lookup(tokens) == 2 * CHUNK_TOKENS
        assert cache.load(tokens, range(16, 24)).wait() == 2 * CHUNK_TOKENS
        assert raw_blobs(layout, tokens[: 2 * CHUNK_TOKENS], range(16, 20)) == want[:2]  # lossless: raw bytes
        # The slot is part of the blobs' fingerprint: peers and disks of another slot refuse them.
        assert cache.blob_fingerprint == codec_fingerprint(layout, zstd, 0.8) != codec_fingerprint(layout, zstd)
    with pytest.raises(InvalidArgumentError, match=r"slot_fraction=0\.5 applies to variable-size codecs"):
        KVCache(layout, cpu_bytes=cpu_bytes, method="cpu", codec_name="fp8", codec_slot_fraction=0.5)
    with pytest.raises(InvalidArgumentError, match=r"codec_slot_fraction: invalid value 1.5"):
        KVCache(layout, cpu_bytes=cpu_bytes, method="cpu", codec_name="byteplane_zstd", codec_slot_fraction=1.5)


def test_a_disk_written_with_one_slot_size_is_refused_with_another(tmp_path):
    _kv, layout = vllm_kv(seed=13)
    tokens = toks(2)
    opts = dict(cpu_bytes=8 * layout.chunk_bytes, method="cpu", codec_name="byteplane_zstd", disk_dir=str(tmp_path))
    opts["disk_bytes"] = 64 * layout.chunk_bytes + (1 << 20)
    with KVCache(layout, **opts, codec_slot_fraction=0.9) as cache:
        cache.store(tokens, range(4)).wait()
    with pytest.raises(CacheGeometryError, match="slot="):
        KVCache(layout, **opts)
    with KVCache(layout, **opts, codec_slot_fraction=0.9) as again:
        assert again.lookup_tiers(tokens) == ["disk", "disk"]


def test_fingerprint_names_the_codec():
    _, layout = vllm_kv()
    fps = {codec_fingerprint(layout, make_codec(n, **o)) for n, o in CODEC_OPTIONS.items()}
    fps.add(codec_fingerprint(layout, make_codec("fp8", scale_dtype="float32")))
    assert len(fps) == 4
    assert codec_fingerprint(layout, make_codec("none")) == layout.fingerprint  # raw disks keep opening


def test_peers_exchange_encoded_chunks_and_refuse_another_codec():
    from kvtier.p2p import PeerConfig

    secret = b"codec-tier-test-secret-0123456789"
    peers = {"secret": secret, "gossip_interval_s": 0.05, "ack_timeout_s": 0.04, "request_timeout_s": 2.0}
    (_, la), (_, lb), (_, lc) = vllm_kv(seed=1), vllm_kv(seed=2), vllm_kv(seed=3)
    tokens = toks(3)
    want = [through_codec(make_codec("fp8", scale_dtype="bfloat16"), la, b) for b in raw_blobs(la, tokens, range(6))]
    a = KVCache(la, cpu_bytes=8 * la.chunk_bytes, method="cpu", codec_name="fp8", peers=PeerConfig(**peers))
    seeds = (a.stats()["peers"]["address"],)
    b = KVCache(lb, cpu_bytes=8 * lb.chunk_bytes, method="cpu", codec_name="fp8", peers={**peers, "seeds": seeds})
    c = KVCache(lc, cpu_bytes=8 * lc.chunk_bytes, method="cpu", codec_name="none", peers={**peers, "seeds": seeds})
    try:
        assert b.blob_fingerprint != c.blob_fingerprint
        a.store(tokens, range(6)).wait()
        wait_until(lambda: b.lookup(tokens) == 3 * CHUNK_TOKENS)
        assert b.load(tokens, range(8, 14)).wait() == 3 * CHUNK_TOKENS
        assert b.stats()["peers"]["chunks_pulled"] == 3
        assert b.stats()["codec_chunks_decoded"] == 3  # pulled as fp8 blobs, decoded here
        assert raw_blobs(lb, tokens, range(8, 14)) == want
        # `none` never pulls fp8 blobs: the handshake refuses it
        wait_until(lambda: c.stats()["peers"]["auth_failures_outbound"] + a.stats()["peers"]["auth_failures"] > 0)
        assert c.lookup(tokens) == 0
    finally:
        c.close()
        b.close()
        a.close()


def test_a_standalone_node_serves_a_codec_cache_s_disk(tmp_path):
    """`kvtier peer` on the disk directory an fp8 cache wrote: its spec (from the layout and the
    codec, or from the model shape and the codec settings) names fp8 slots, so it opens the
    directory, rebuilds its digest from the chunks there and serves them to an fp8 cache; a node
    given the raw layout's spec is refused by the directory."""
    from kvtier.p2p import PeerConfig
    from kvtier.p2p.node import PeerNode, layout_spec, resolve_spec

    secret = b"codec-node-test-secret-0123456789"
    peers = {"secret": secret, "gossip_interval_s": 0.05, "ack_timeout_s": 0.04, "request_timeout_s": 2.0}
    (_, la), (_, lb) = vllm_kv(seed=5), vllm_kv(seed=6)
    codec = make_codec("fp8", scale_dtype="bfloat16")
    shape = {"kind": "vllm", "num_layers": 2, "kv_heads": 4, "head_dim": 64, "dtype": "bfloat16", "page_tokens": 16}
    shape["chunk_tokens"] = CHUNK_TOKENS
    expect = (slot_nbytes(la, codec), codec_fingerprint(la, codec))
    assert resolve_spec(layout_spec(la, codec)) == expect
    assert resolve_spec({**shape, "codec": {"name": "fp8"}}) == expect  # bfloat16 scales: the default
    assert resolve_spec({**shape, "codec": {"name": "fp8", "fp8_scale_dtype": "float32"}}) != expect
    with pytest.raises(InvalidArgumentError, match="codec must be an object with 'name'"):
        resolve_spec({**shape, "codec": {"name": "fp8", "scale": "bf16"}})
    with pytest.raises(InvalidArgumentError, match="unknown codec 'lz9'"):
        resolve_spec({**shape, "codec": {"name": "lz9"}})

    tokens = toks(3)
    want = [through_codec(codec, la, b) for b in raw_blobs(la, tokens, range(6))]
    disk = dict(disk_dir=str(tmp_path), disk_bytes=16 << 20, disk_backend="posix")
    with KVCache(la, cpu_bytes=8 * la.chunk_bytes, method="cpu", codec_name="fp8", peers=peers, **disk) as p:
        p.store(tokens, range(6)).wait()
        p.drain()
    node_opts = dict(cache_dir=str(tmp_path), cpu_bytes=8 * la.chunk_bytes, disk_bytes=16 << 20, disk_backend="posix")
    with pytest.raises(CacheGeometryError, match="codec=fp8"):
        PeerNode(layout_spec(la), PeerConfig(**peers), **node_opts)
    node = PeerNode(layout_spec(la, codec), PeerConfig(**peers), **node_opts).start()
    b = None
    try:
        assert node.service.stats()["digest"]["keys"] == 3
        seeds = (node.service.stats()["address"],)
        b = KVCache(lb, cpu_bytes=8 * lb.chunk_bytes, method="cpu", codec_name="fp8", peers={**peers, "seeds": seeds})
        wait_until(lambda: b.lookup(tokens) == 3 * CHUNK_TOKENS)
        assert b.load(tokens, range(8, 14)).wait() == 3 * CHUNK_TOKENS
        assert b.stats()["peers"]["chunks_pulled"] == 3
        assert raw_blobs(lb, tokens, range(8, 14)) == want
    finally:
        if b is not None:
            b.close()
        node.close()


@pytest.mark.parametrize("kind", ["vllm", "flashinfer_nhd", "flashinfer_hnd", "mla", "hf", "cross_layer"])
def test_chunk_ranges_gather_and_scatter_as_the_copy_engine_does(kind):
    """The GPU path's segment copies, done here with memmove on host pages: the gathered blobs
    equal the copy engine's, and scattering them into other pages reproduces the chunks."""
    import ctypes

    from test_cache import KVModel

    m = KVModel(kind, torch.bfloat16, 16, num_pages=24, chunk_pages=2, seed=7)
    layout, tokens = m.layout, toks(3)
    src_pages = np.array([9, 3, 7, 1, 5, 11])
    want = raw_blobs(layout, tokens, src_pages)
    buf = np.zeros(3 * layout.chunk_bytes, dtype=np.uint8)
    for src, dst, n in zip(*chunk_ranges(layout, src_pages, buf.ctypes.data), strict=True):
        ctypes.memmove(int(dst), int(src), int(n))
    assert [bytes(buf[i * layout.chunk_bytes : (i + 1) * layout.chunk_bytes]) for i in range(3)] == want
    dst_pages = np.array([20, 12, 13, 23, 14, 15])
    for page, blob, n in zip(*chunk_ranges(layout, dst_pages, buf.ctypes.data), strict=True):
        ctypes.memmove(int(page), int(blob), int(n))
    assert raw_blobs(layout, tokens, dst_pages) == want


@pytest.mark.parametrize(
    ("chunk_mib", "want"),
    [(1, 64), (4, 16), (8, 8), (16, 8), (32, 8), (64, 4), (80, 3), (256, 1), (512, 1)],
)
def test_gpu_rounds_hold_64_mib_and_at_least_8_chunks_up_to_256_mib(chunk_mib, want):
    """A round of the GPU stacked path: 64 MiB of raw KV, at least 8 chunks where 8 fit in
    256 MiB (big chunks: each round costs the host a fixed amount), and never less than one."""
    assert gpu_round_chunks(chunk_mib << 20) == want


def test_codec_on_the_gpu_needs_a_gpu_layout():
    _, layout = vllm_kv()
    with pytest.raises(InvalidArgumentError, match=r"codec\.device 'gpu' needs a layout on a CUDA device"):
        KVCache(layout, cpu_bytes=4 * layout.chunk_bytes, codec_name="fp8", codec_device="gpu")


GPU_STACK_MODES = {  # (_FUSED_PAGES, _CHECK_IN_DECODE) of kvtier.codec_tier
    "gathered": (False, False),
    "in_pages_check_read_back": (True, False),
    "in_pages_check_in_decode": (True, True),
}


def set_gpu_stack_mode(monkeypatch, mode: str) -> None:
    import kvtier.codec_tier

    pages, in_decode = GPU_STACK_MODES[mode]
    monkeypatch.setattr(kvtier.codec_tier, "_FUSED_PAGES", pages)
    monkeypatch.setattr(kvtier.codec_tier, "_CHECK_IN_DECODE", in_decode)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("codec_device", "mode"),
    [("host", "gathered"), *(("gpu", m) for m in GPU_STACK_MODES)],
)
@pytest.mark.parametrize("name", ["fp8", "byteplane_zstd"])
def test_gpu_pages_round_trip_through_the_codec_tier(monkeypatch, name, codec_device, mode):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    set_gpu_stack_mode(monkeypatch, mode)
    kv, layout = vllm_kv(device="cuda")
    codec = make_codec(name, **CODEC_OPTIONS[name])
    tokens = toks(4)
    cpu_kv = [t.cpu() for t in kv]
    want = [
        through_codec(codec, layout, b)
        for b in raw_blobs(Layout.from_vllm(cpu_kv, chunk_tokens=CHUNK_TOKENS), tokens, range(8))
    ]
    with KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, codec_name=name, codec_device=codec_device) as cache:
        assert cache.store(tokens, range(8)).wait() == 4
        assert cache.load(tokens, range(16, 24)).wait() == 4 * CHUNK_TOKENS
        assert cache.stats()["codec_device"] == codec_device
        from kvtier.planner import CodecCost

        assert CodecCost.of_cache(cache).decode_on_gpu == (codec_device == "gpu")
    torch.cuda.synchronize()
    cpu_kv = [t.cpu() for t in kv]
    assert raw_blobs(Layout.from_vllm(cpu_kv, chunk_tokens=CHUNK_TOKENS), tokens, range(16, 24)) == want


@pytest.mark.gpu
@pytest.mark.parametrize("d2h_stream", [False, True], ids=["blobs_on_the_codec_stream", "blobs_on_a_d2h_stream"])
@pytest.mark.parametrize("round_chunks", [None, 2])
@pytest.mark.parametrize("mode", list(GPU_STACK_MODES))
def test_gpu_stacks_stop_at_a_refused_chunk_a_foreign_blob_and_a_full_tier(
    caplog, monkeypatch, round_chunks, d2h_stream, mode
):
    """codec.device gpu with fp8 encodes a call's chunks as stacks straight into pinned blocks
    and decodes them as stacks (gathered, or coded in their pages): a chunk holding NaN ends the
    store there (those before it are kept), a slot of another codec ends the load there (the
    pages of the chunks after it are left alone, also where the check is made by the decode on
    the device and later rounds are queued), and a full tier skips the rest, as on the host path.
    With rounds of 2 chunks a store queues each round before committing the one before it: a
    refusal or a full tier in one round gives back the next round's blocks."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import kvtier.codec_tier

    kv, layout = vllm_kv(device="cuda", seed=9)
    monkeypatch.setattr(kvtier.codec_tier, "_D2H_STREAM", d2h_stream)
    set_gpu_stack_mode(monkeypatch, mode)
    if round_chunks is not None:
        monkeypatch.setattr(kvtier.codec_tier, "_GPU_BATCH_BYTES", round_chunks * layout.chunk_bytes)
        monkeypatch.setattr(kvtier.codec_tier, "_GPU_BATCH_CHUNKS", round_chunks)
    fp8 = make_codec("fp8", **CODEC_OPTIONS["fp8"])
    cpu_layout = Layout.from_vllm([t.cpu() for t in kv], chunk_tokens=CHUNK_TOKENS)
    tokens = toks(6)
    want = [through_codec(fp8, layout, b) for b in raw_blobs(cpu_layout, tokens, range(12))]
    with KVCache(layout, cpu_bytes=4 * layout.chunk_bytes, codec_name="fp8", codec_device="gpu") as cache:
        assert cache.tier.inner.pinned and cache.tier.capacity_chunks >= 6
        keys = cache.keyer.keys(tokens)
        kv[1][0, 5, 0, 0, 0] = float("nan")  # page 5: the third chunk
        assert cache.store(tokens, range(12)).wait() == 2  # chunks
        assert cache.stats()["codec_encode_refused"] == 1 and "NaN" in caplog.text
        assert cache.lookup(tokens) == 2 * CHUNK_TOKENS
        assert bytes(cache.tier.media(b"".join(keys))) == bytes([1, 1, 0, 0, 0, 0])  # none after it
        # The fourth chunk's slot gets a blob of another codec; the third is stored again, clean.
        put_foreign_blob(cache, layout, keys[3])
        kv[1][0, 5, 0, 0, 0] = 0.0
        cpu_layout = Layout.from_vllm([t.cpu() for t in kv], chunk_tokens=CHUNK_TOKENS)
        want[2] = through_codec(fp8, layout, raw_blobs(cpu_layout, tokens, range(12))[2])
        assert cache.store(tokens, range(12)).wait() == 3  # the third, fifth and sixth
        torch.cuda.synchronize()
        before = raw_blobs(Layout.from_vllm([t.cpu() for t in kv], chunk_tokens=CHUNK_TOKENS), tokens, range(16, 28))
        assert cache.load(tokens, range(16, 28)).wait() == 3 * CHUNK_TOKENS
        assert cache.stats()["codec_decode_failures"] == 1 and "does not decode" in caplog.text
        torch.cuda.synchronize()
        got = raw_blobs(Layout.from_vllm([t.cpu() for t in kv], chunk_tokens=CHUNK_TOKENS), tokens, range(16, 28))
        assert got[:3] == want[:3]  # the three chunks loaded, into pages 16..21
        assert got[3:] == before[3:]  # the foreign slot's pages and those after it: untouched
        # five more chunks (several rounds with round_chunks=2), back bit-exact
        more = toks(5, base=999)
        cpu_layout = Layout.from_vllm([t.cpu() for t in kv], chunk_tokens=CHUNK_TOKENS)
        want_more = [through_codec(fp8, layout, b) for b in raw_blobs(cpu_layout, more, range(10))]
        assert cache.store(more, range(10)).wait() == 5
        assert cache.load(more, range(16, 26)).wait() == 5 * CHUNK_TOKENS
        torch.cuda.synchronize()
        got = raw_blobs(Layout.from_vllm([t.cpu() for t in kv], chunk_tokens=CHUNK_TOKENS), more, range(16, 26))
        assert got == want_more
        # a round dropped after the refusal gave its blocks back once its copies ended
        assert cache.stats()["codec_late_copies"] == (1 if round_chunks == 2 else 0)
        s = cache.tier.inner.stats()
        assert s["blocks"]["free_blocks"] + s["index"]["entries"] == cache.tier.capacity_chunks
    # A tier of 2 chunks: a store of 6 keeps the first 2 it can place and skips the rest.
    with KVCache(layout, cpu_bytes=2 * slot_nbytes(layout, fp8) + 8192, codec_name="fp8", codec_device="gpu") as small:
        n = small.tier.capacity_chunks
        op = small.tier.store(b"".join(keys), np.arange(12))
        assert op.chunks == n and op.skipped_full == 6 - n
        assert small.load(tokens, range(16, 16 + 2 * n)).wait() == n * CHUNK_TOKENS


def test_bad_input_is_refused_before_any_work_and_the_cache_stays_usable(caplog):
    kv, layout = vllm_kv(pages=8, seed=6)
    tokens = toks(2)
    with KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, method="cpu", codec_name="fp8") as cache:
        with pytest.raises(InvalidArgumentError, match=r"page_ids\[3\] = 99 is out of range"):
            cache.store(tokens, [0, 1, 2, 99])
        assert cache.lookup(tokens) == 0
        cache.store(tokens, range(4)).wait()
        before = [t.clone() for t in kv]
        for bad, match in (([4, 5, 6, 99], "out of range"), ([4, 5, 5, 6], r"page_ids\[2\] = 5 is repeated")):
            with pytest.raises(InvalidArgumentError, match=match):
                cache.load(tokens, bad)
        assert cache.stats()["codec_chunks_decoded"] == 0  # refused before decoding anything
        assert all(torch.equal(t, b) for t, b in zip(kv, before, strict=True))
        assert cache.load(tokens, range(4, 8)).wait() == 2 * CHUNK_TOKENS
        # KV holding a NaN: fp8 cannot encode it; the chunk is not stored (a miss), not an error
        kv[0][0, 0, 0, 0, 0] = float("nan")
        other = toks(2, base=5000)
        assert cache.store(other, range(4)).wait() == 0
        assert cache.stats()["codec_encode_refused"] == 1 and cache.lookup(other) == 0
        assert "NaN" in caplog.text


def test_a_paged_pool_evicts_into_an_encoded_tier_and_reloads_bit_exact():
    """PagedKVPool over a lossless codec's tier: chunks pushed out of the GPU pool come back
    through the encoded CPU tier exactly as computed."""
    from kvtier.pool import PagedKVPool

    pool = PagedKVPool(
        num_layers=2,
        kv_heads=2,
        head_dim=64,
        num_pages=8,
        page_tokens=16,
        chunk_tokens=32,
        dtype=torch.bfloat16,
        cpu_bytes=16 << 20,
        method="cpu",
        codec_name="byteplane_zstd",
    )
    g = torch.Generator().manual_seed(11)
    prompts = [list(range(1000 * p, 1000 * p + 64)) for p in range(4)]
    written = {}
    for p, tokens in enumerate(prompts):
        s = pool.begin(tokens)
        for j, page in enumerate(s.page_table):
            pool.kv[page] = torch.randn(pool.kv[page].shape, generator=g).to(torch.bfloat16)
            written[(p, j)] = pool.kv[page].clone()
        pool.commit(s, tokens)
        pool.release(s)
    assert pool.stats()["offloaded_chunks"] >= 2
    s = pool.begin(prompts[0])
    assert s.gpu_hit_tokens == 0 and s.lower_hit_tokens == 64
    s.wait()
    assert all(torch.equal(pool.kv[page], written[(0, j)]) for j, page in enumerate(s.page_table))
    assert pool.cache.stats()["codec_chunks_decoded"] == 2
    pool.release(s)


def paged_chunks(layout, pages, device="cpu") -> PagedChunks:
    """``pages`` of a layout on ``device`` as the codec codes them in place."""
    table = torch.tensor([[s.base_ptr, s.page_stride] for s in layout.segments], dtype=torch.int64).to(device)
    ids = torch.tensor(np.asarray(pages, dtype=np.int64)).to(device)
    return PagedChunks(ids, table, layout.pages_per_chunk, layout.segments[0].page_bytes)


def finite_kv_model(kind, dtype, device="cpu"):
    """test_cache's KVModel of ``kind`` holding finite values (its random bits hold NaN, which
    fp8 refuses), the same for every device."""
    from test_cache import KVModel

    m = KVModel(kind, dtype, 16, device=device, num_pages=24, chunk_pages=2, seed=11)
    g = torch.Generator().manual_seed(11)
    for t in (x for item in m.tensors for x in (item if isinstance(item, tuple) else (item,))):
        t.copy_(torch.randn(t.shape, generator=g) * 3)
    return m


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["vllm", "flashinfer_nhd", "flashinfer_hnd", "mla", "hf", "cross_layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_codes_chunks_in_their_pages_as_it_codes_them_gathered(kind, dtype, device):
    """Fp8Codec.encode_pages reads each chunk's rows where the layout keeps them and makes the
    blobs encode_many makes of the gathered chunks, byte for byte; decode_pages writes into
    other pages what decode_many gives. On the CPU the core's host pass, on a GPU its kernels
    (whose bytes are the host pass's)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    m = finite_kv_model(kind, dtype)
    layout, tokens = m.layout, toks(3)
    codec = make_codec("fp8", scale_dtype="bfloat16")
    shape, dt = chunk_shape(layout)
    src_pages, dst_pages = np.array([9, 3, 7, 1, 5, 11]), np.array([20, 12, 13, 23, 14, 15])
    blobs_in = raw_blobs(layout, tokens, src_pages)
    gathered = torch.stack([torch.frombuffer(bytearray(b), dtype=torch.uint8).view(dt).view(shape) for b in blobs_in])
    want, want_ok = codec.encode_many(gathered)
    decoded = codec.decode_many(want).view(3, -1).view(torch.uint8)
    if device == "cuda":  # the same values in GPU pages
        m = finite_kv_model(kind, dtype, device="cuda")
    blobs, ok = codec.encode_pages(paged_chunks(m.layout, src_pages, device), shape, dt)
    assert ok.all() and want_ok.all()
    assert torch.equal(blobs.cpu(), want)

    codec.decode_pages(blobs, read_header(blobs[0].cpu()), paged_chunks(m.layout, dst_pages, device))
    assert chunks_in_pages(m.layout, dst_pages) == [bytes(d.numpy()) for d in decoded]


def chunks_in_pages(layout, pages) -> list[bytes]:
    """The raw chunks in ``pages`` of a host or GPU layout, gathered by chunk_ranges."""
    import ctypes

    from kvtier import _core

    n, size = len(pages) // layout.pages_per_chunk, layout.chunk_bytes
    device = torch.device(layout.device)
    buf = torch.empty(n * size, dtype=torch.uint8, device=device)
    ranges = chunk_ranges(layout, pages, buf.data_ptr())
    if device.type == "cpu":
        for src, dst, k in zip(*ranges, strict=True):
            ctypes.memmove(int(dst), int(src), int(k))
    else:
        _core.copy_segments(device.index, *ranges, torch.cuda.current_stream().cuda_stream, "kernel")
        torch.cuda.synchronize()
    flat = buf.cpu().numpy()
    return [bytes(flat[i * size : (i + 1) * size]) for i in range(n)]


def test_fp8_decode_in_pages_checks_headers_and_stops_at_the_first_foreign_blob():
    """decode_pages with `decoded` and `stop`: the blobs before the first whose header is not the
    codec's are decoded, the count and the stop flag written; the pages of that chunk and those
    after it are untouched, and a later call that finds the flag set decodes nothing."""
    m = finite_kv_model("vllm", torch.bfloat16)
    layout = m.layout
    codec = make_codec("fp8", scale_dtype="bfloat16")
    shape, dt = chunk_shape(layout)
    blobs, _ = codec.encode_pages(paged_chunks(layout, [1, 2, 3, 4, 5, 6]), shape, dt)
    blobs[1, 4] ^= 1  # the second blob's header: the codec's version byte
    header = read_header(blobs[0])
    dst = np.array([20, 12, 13, 23, 14, 15])
    before = chunks_in_pages(layout, dst)
    decoded, stop = torch.full((1,), 7, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    codec.decode_pages(blobs, header, paged_chunks(layout, dst), decoded=decoded, stop=stop)
    assert int(decoded) == 1 and int(stop) == 1
    after = chunks_in_pages(layout, dst)
    assert after[0] == bytes(codec.decode_many(blobs[:1]).view(-1).view(torch.uint8).numpy())
    assert after[1:] == before[1:]
    # stopped: a good stack decodes nothing
    codec.decode_pages(blobs[2:], header, paged_chunks(layout, dst[4:]), decoded=decoded, stop=stop)
    assert int(decoded) == 0 and chunks_in_pages(layout, dst) == after
    stop.zero_()
    codec.decode_pages(blobs[2:], header, paged_chunks(layout, dst[4:]), decoded=decoded, stop=stop)
    assert int(decoded) == 1 and int(stop) == 0
    assert chunks_in_pages(layout, dst[4:]) == [bytes(codec.decode_many(blobs[2:]).view(-1).view(torch.uint8).numpy())]
    with pytest.raises(InvalidArgumentError, match=r"`stop` must be a one-element int32 tensor"):
        codec.decode_pages(blobs[2:], header, paged_chunks(layout, dst[4:]), decoded=decoded)


def test_fp8_in_pages_refuses_pages_that_do_not_hold_its_rows():
    from test_cache import KVModel

    layout = KVModel("vllm", torch.bfloat16, 16, num_pages=24, chunk_pages=2, seed=3).layout
    codec = make_codec("fp8")
    shape, dt = chunk_shape(layout)
    paged = paged_chunks(layout, [1, 2, 3, 4])
    with pytest.raises(InvalidArgumentError, match=r"not a whole number of .*-byte rows"):
        codec.encode_pages(paged._replace(page_bytes=paged.page_bytes + 2), shape, dt)
    with pytest.raises(InvalidArgumentError, match=r"segments of 2 pages of .* are not a chunk of"):
        codec.encode_pages(paged._replace(segments=paged.segments[:-1]), shape, dt)
    blobs, _ = codec.encode_pages(paged, shape, dt)
    with pytest.raises(InvalidArgumentError, match=r"2 blobs of .* do not decode into 1 chunks of pages"):
        codec.decode_pages(blobs, read_header(blobs[0]), paged._replace(page_ids=paged.page_ids[:2]))
