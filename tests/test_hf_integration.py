"""kvtier.integrations.transformers: a prefix restored from each tier gives the logits and greedy
tokens of a recompute, for tiny random Llama, Qwen2 and Mistral models built locally.

Two references, because a single forward over a whole prompt and a forward over its suffix with
the prefix cached multiply matrices of different shapes (last-bit differences in fp32):
- the model's own prefix reuse: the warm-up prompt's DynamicCache, cropped to the shared prefix,
  then the suffix. kvtier restores a byte copy of that same K/V, so it must be bit-identical;
- a full recompute of the prompt: equal within a tight tolerance, greedy tokens identical.
GPU variants (bf16) carry the gpu marker.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvtier.integrations.transformers import KVTierHF
from transformers import DynamicCache

CHUNK = 32  # tokens per chunk: prompts span two full chunks and part of a third
PREFIX = 2 * CHUNK
NEW_TOKENS = 8
VOCAB = 256
# Random weights make flat logits. Seed 5 (with the prompts below) keeps every greedy step's
# top-2 gap >= 0.017 in fp32 and bf16 on CPU (about 10 bf16 ulps), so a token comparison tests
# the KV, not which side of a near-tie rounding falls on.
MODEL_SEED = 5
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"hidden_size": 128}),  # head_dim 32, qkv bias
    # A window shorter than the prompts, so that the sliding-window mask matters.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}),
}
# transformers 5.x names the forward's cache argument `cache` (4.x: `past_key_values`).
_FORWARD_PARAMS = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
CACHE_KW = "cache" if "cache" in _FORWARD_PARAMS else "past_key_values"


def build_model(family: str, dtype=torch.float32, device="cpu"):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(MODEL_SEED)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    return getattr(transformers, model_cls)(config).eval().to(device=device, dtype=dtype)


def prompts(device="cpu"):
    """(warm, prompt): two prompts sharing a PREFIX-token prefix, then different suffixes."""
    gen = torch.Generator().manual_seed(1000)
    prefix = torch.randint(0, VOCAB, (1, PREFIX), generator=gen)
    prompt = torch.cat([prefix, torch.randint(0, VOCAB, (1, 13), generator=gen)], 1)
    warm = torch.cat([prefix, torch.randint(0, VOCAB, (1, 10), generator=gen)], 1)
    return warm.to(device), prompt.to(device)


def filler(seed: int, device="cpu"):
    """A prompt with another prefix: two full chunks that push older chunks out of the CPU tier."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, PREFIX + 5), generator=gen).to(device)


def chunk_bytes(model) -> int:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    elem = torch.tensor([], dtype=model.dtype).element_size()
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * CHUNK * head_dim * elem


@pytest.fixture
def disk_dir(tmp_path):
    """A directory that takes O_DIRECT: KVTIER_TEST_DISK_DIR, else pytest's tmp_path."""
    base = os.environ.get("KVTIER_TEST_DISK_DIR")
    d = tempfile.mkdtemp(prefix="kvtier_hf_", dir=base) if base else str(tmp_path)
    probe = os.path.join(d, "odirect_probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT))
        os.unlink(probe)
    except OSError as e:
        pytest.skip(f"SKIPPED (needs an O_DIRECT file system; set KVTIER_TEST_DISK_DIR): {d}: {e}")
    yield d
    if base:
        shutil.rmtree(d, ignore_errors=True)


def make_kv(model, tier: str, disk_dir: str | None) -> KVTierHF:
    cb = chunk_bytes(model)
    if tier == "cpu":
        kv = KVTierHF(model, cpu_bytes=16 * cb, chunk_tokens=CHUNK, max_tokens=128)
    else:  # two chunks fit in the CPU tier; evicted chunks go to disk on first sight
        kv = KVTierHF(
            model,
            cpu_bytes=2 * cb,
            chunk_tokens=CHUNK,
            max_tokens=128,
            disk_dir=disk_dir,
            disk_bytes=32 * cb + (1 << 20),
            disk_admit_min_seen=1,
        )
    assert kv.layout.chunk_bytes == cb
    return kv


def push_to_disk(kv: KVTierHF, seed: int) -> None:
    """Store another prompt's two chunks: the CPU tier's older chunks are written to disk."""
    kv.forward_with_cache(filler(seed, kv.model.device))
    kv.drain()


def tier_counters(kv: KVTierHF) -> tuple[int, int]:
    st = kv.stats()["cache"]
    # A disk chunk comes back into the CPU tier by a load (promoted) or by the lookup before it
    # (prefetched); either way it was read from disk.
    disk = st.get("disk")
    return st["chunks_loaded"], (disk["chunks_promoted"] + disk["chunks_prefetched"]) if disk else 0


def assert_served_from(kv: KVTierHF, tier: str, before: tuple[int, int]) -> None:
    kv.drain()  # a read's counter moves when its copy ends: wait for every copy, not for time
    loaded, promoted = (a - b for a, b in zip(tier_counters(kv), before))
    assert loaded == PREFIX // CHUNK, kv.stats()
    assert promoted == (PREFIX // CHUNK if tier == "disk" else 0), kv.stats()


def own_prefix_cache(model, warm):
    """The model's own DynamicCache of ``warm``, cropped to the shared prefix (no kvtier)."""
    out = model(warm, **{CACHE_KW: DynamicCache()}, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.crop(-(warm.shape[1] - PREFIX))  # a negative crop removes that many tokens
    return out.logits, cache


def cache_tensors(cache):
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def greedy(model_or_kv, ids, **kw):
    return model_or_kv.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)


def assert_same_tokens(got, want, model, prompt):
    if torch.equal(got, want):
        return
    step = int((got[0, prompt.shape[1] :] != want[0, prompt.shape[1] :]).nonzero()[0])
    with torch.no_grad():
        top2 = model(want[:, : prompt.shape[1] + step]).logits[0, -1].float().topk(2).values
    raise AssertionError(
        f"greedy tokens differ from step {step}: {got.tolist()} != {want.tolist()}; "
        f"the reference's top-2 logit gap there is {float(top2[0] - top2[1]):.3g}"
    )


# ------------------------------------------------------------------------------------------------
# fp32 on CPU: bit-exact


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_restored_prefix_gives_the_logits_and_tokens_of_a_recompute(family, tier, request):
    model = build_model(family)
    warm, prompt = prompts()
    disk = request.getfixturevalue("disk_dir") if tier == "disk" else None
    with make_kv(model, tier, disk) as kv, torch.no_grad():
        miss = kv.forward_with_cache(warm)
        own_logits, own_cache = own_prefix_cache(model, warm)
        assert miss.cached_tokens == 0
        assert torch.equal(miss.logits, own_logits), "a miss must be the model's plain forward"
        if tier == "disk":
            push_to_disk(kv, seed=1)
            disk_stats = kv.stats()["cache"]["disk"]  # written on arrival or when evicted
            assert disk_stats["write_through_written"] + disk_stats["demotions_written"] >= PREFIX // CHUNK
        before = tier_counters(kv)  # before the lookup: its prefetch counts as a read from disk
        assert kv.lookup(prompt) == PREFIX
        hit = kv.forward_with_cache(prompt)
        assert hit.cached_tokens == PREFIX
        assert hit.logits.shape == (1, prompt.shape[1] - PREFIX, VOCAB)
        assert_served_from(kv, tier, before)

        own = model(prompt[:, PREFIX:], **{CACHE_KW: own_cache}, use_cache=True)
        assert torch.equal(hit.logits, own.logits), "restored prefix != the model's own prefix"
        for got, want in zip(cache_tensors(hit.cache), cache_tensors(own_cache)):
            assert torch.equal(got, want)  # every prompt token's K/V, restored and computed
        full = model(prompt).logits[:, PREFIX:]
        torch.testing.assert_close(hit.logits, full, rtol=1e-5, atol=1e-5)

        if tier == "disk":
            push_to_disk(kv, seed=2)  # the prefix was promoted by the hit; send it down again
        before = tier_counters(kv)
        tokens = greedy(kv, prompt)
        assert_served_from(kv, tier, before)
        _, own_cache = own_prefix_cache(model, warm)
        assert torch.equal(tokens, greedy(model, prompt, **{CACHE_KW: own_cache}))
        assert_same_tokens(tokens, greedy(model, prompt), model, prompt)  # full recompute
        assert kv.stats()["cached_tokens"] == 2 * PREFIX


@pytest.mark.parametrize("codec", ["fp8", "byteplane_zstd"])
def test_a_codec_cache_restores_the_codec_s_round_trip_of_the_prefix(codec):
    """Through the HF integration with ``codec.name`` set: the restored prefix is the codec's own
    encode/decode of the K/V the model computed (bit-exact for the lossless codec; fp8: the rows
    fp8 gives back), and the suffix's logits are the model's, fed exactly that prefix."""
    from kvtier.codecs import codec_from_settings

    model = build_model("llama")
    warm, prompt = prompts()
    coder = codec_from_settings(codec)  # the config's defaults, as the cache builds it
    kv = KVTierHF(model, cpu_bytes=16 * chunk_bytes(model), chunk_tokens=CHUNK, max_tokens=128, codec_name=codec)
    with kv, torch.no_grad():
        kv.forward_with_cache(warm)
        _, own_cache = own_prefix_cache(model, warm)
        hit = kv.forward_with_cache(prompt)
        assert hit.cached_tokens == PREFIX
        assert kv.stats()["cache"]["codec_chunks_decoded"] == PREFIX // CHUNK
        want = DynamicCache()
        for i, layer in enumerate(own_cache.layers):
            k, v = (
                coder.decode(coder.encode(t.reshape(-1, t.shape[-1]).contiguous())).view(t.shape)
                for t in (layer.keys, layer.values)
            )
            want.update(k, v, i)
        for got, exp, own in zip(cache_tensors(hit.cache), cache_tensors(want), cache_tensors(own_cache)):
            assert torch.equal(got[:, :, :PREFIX], exp)  # the rows the codec gives back, nothing else
            if codec == "byteplane_zstd":
                assert torch.equal(exp, own)  # lossless: the model's own K/V
        ref = model(prompt[:, PREFIX:], **{CACHE_KW: want}, use_cache=True).logits
        assert torch.equal(hit.logits, ref)
        if codec == "fp8":  # lossy, and not by nothing: some K/V moved
            assert any(not torch.equal(e, o) for e, o in zip(cache_tensors(want), cache_tensors(own_cache)))


def test_generate_on_a_miss_stores_the_prompt_and_the_next_request_hits():
    model = build_model("llama")
    warm, prompt = prompts()
    with make_kv(model, "cpu", None) as kv, torch.no_grad():
        assert_same_tokens(greedy(kv, warm), greedy(model, warm), model, warm)
        assert kv.lookup(prompt) == PREFIX  # generate stored the warm prompt's full chunks
        assert_same_tokens(greedy(kv, prompt), greedy(model, prompt), model, prompt)
        st = kv.stats()
        assert st["cached_tokens"] == PREFIX and st["cache"]["chunks_stored"] == PREFIX // CHUNK


def test_fully_cached_prompt_recomputes_its_last_token():
    model = build_model("qwen2")
    _, prompt = prompts()
    exact = prompt[:, :PREFIX]  # two whole chunks, all cached after the first call
    with make_kv(model, "cpu", None) as kv, torch.no_grad():
        kv.forward_with_cache(exact)
        hit = kv.forward_with_cache(exact)
        assert hit.cached_tokens == PREFIX - 1 and hit.logits.shape == (1, 1, VOCAB)
        own = model(exact, **{CACHE_KW: DynamicCache()}, use_cache=True)
        own_cache = own.cache if hasattr(own, "cache") else own.past_key_values
        own_cache.crop(-1)
        last = model(exact[:, -1:], **{CACHE_KW: own_cache}, use_cache=True).logits
        assert torch.equal(hit.logits, last)
        assert kv.stats()["cache"]["chunks_stored"] == PREFIX // CHUNK  # nothing stored twice


def test_logits_to_keep_and_decoding_on_from_the_returned_cache():
    model = build_model("mistral")
    warm, prompt = prompts()
    with make_kv(model, "cpu", None) as kv, torch.no_grad():
        kv.forward_with_cache(warm)
        logits, cache, cached = kv.forward_with_cache(prompt, logits_to_keep=1)
        assert cached == PREFIX and logits.shape == (1, 1, VOCAB)
        ids = prompt
        for _ in range(NEW_TOKENS):  # a hand-written decode loop on the returned cache
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            logits = model(ids[:, -1:], **{CACHE_KW: cache}, use_cache=True).logits
        assert_same_tokens(ids, greedy(model, prompt), model, prompt)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError naming the argument; the KVTierHF stays usable


def test_bad_input_is_a_clear_error_and_leaves_it_usable():
    model = build_model("llama")
    warm, prompt = prompts()
    with make_kv(model, "cpu", None) as kv:
        with pytest.raises(ValueError, match=r"batch size 2.*batch 1"):
            kv.forward_with_cache(torch.cat([warm, warm]))
        with pytest.raises(ValueError, match="batch size 2"):
            kv.generate(torch.cat([warm, warm]), max_new_tokens=2)
        too_long = torch.zeros(1, 129, dtype=torch.long)
        with pytest.raises(ValueError, match=r"129 tokens.*max_tokens=128"):
            kv.forward_with_cache(too_long)
        with pytest.raises(ValueError, match="max_tokens=128"):
            kv.generate(too_long, max_new_tokens=2)
        with pytest.raises(ValueError, match="2-D"):
            kv.forward_with_cache(warm[0])
        with pytest.raises(ValueError, match="integer"):
            kv.forward_with_cache(warm.float())
        with pytest.raises(ValueError, match="empty"):
            kv.forward_with_cache(warm[:, :0])
        with pytest.raises(ValueError, match=f"{CACHE_KW} is set by KVTierHF"):
            kv.generate(warm, max_new_tokens=2, **{CACHE_KW: DynamicCache()})
        with pytest.raises(ValueError, match="attention_mask must be all ones"):
            kv.forward_with_cache(warm, attention_mask=torch.zeros_like(warm))
        with pytest.raises(ValueError, match="token"):
            kv.forward_with_cache(torch.full((1, 40), -1))  # ids kvtier cannot key
        assert kv.stats()["requests"] == 0
        kv.forward_with_cache(warm)
        assert kv.forward_with_cache(prompt).cached_tokens == PREFIX
    with pytest.raises(ValueError, match="max_tokens"):
        KVTierHF(model, max_tokens=0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        KVTierHF(model, chunk_tokens=24, page_tokens=16)


def test_model_id_scopes_chunks_across_restarts(disk_dir):
    """A model built from a config has no checkpoint name, so by default its chunks are its own;
    under an explicit model_id they survive a restart on disk."""
    model = build_model("llama")
    warm, prompt = prompts()
    opts = {
        "cpu_bytes": 2 * chunk_bytes(model),
        "chunk_tokens": CHUNK,
        "max_tokens": 128,
        "disk_dir": disk_dir,
        "disk_bytes": 32 * chunk_bytes(model) + (1 << 20),
        "disk_admit_min_seen": 1,
    }
    with torch.no_grad():
        with KVTierHF(model, model_id="tiny-llama", **opts) as kv:
            kv.forward_with_cache(warm)
            push_to_disk(kv, seed=1)
        with KVTierHF(model, **opts) as kv:
            assert kv.cache.config.model_id.startswith("LlamaForCausalLM-")
            assert kv.lookup(prompt) == 0
        with KVTierHF(model, model_id="tiny-llama", **opts) as kv:
            hit = kv.forward_with_cache(prompt)
            assert hit.cached_tokens == PREFIX
            _, own_cache = own_prefix_cache(model, warm)
            own = model(prompt[:, PREFIX:], **{CACHE_KW: own_cache}, use_cache=True)
            assert torch.equal(hit.logits, own.logits)


# ------------------------------------------------------------------------------------------------
# bf16: CPU here, GPU with the gpu marker. Restored K/V is still a byte copy; logits within bf16
# tolerance of a full recompute; greedy tokens identical.


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_restored_prefix_gives_the_tokens_of_a_recompute(device, family, tier, request):
    if device == "cuda":
        device = request.getfixturevalue("gpu")
    model = build_model(family, dtype=torch.bfloat16, device=device)
    warm, prompt = prompts(device)
    disk = request.getfixturevalue("disk_dir") if tier == "disk" else None
    with make_kv(model, tier, disk) as kv, torch.no_grad():
        kv.forward_with_cache(warm)
        if tier == "disk":
            push_to_disk(kv, seed=1)
        before = tier_counters(kv)
        hit = kv.forward_with_cache(prompt)
        assert hit.cached_tokens == PREFIX
        assert_served_from(kv, tier, before)
        _, own_cache = own_prefix_cache(model, warm)
        for got, want in zip(cache_tensors(hit.cache), cache_tensors(own_cache)):
            assert torch.equal(got[:, :, :PREFIX], want)  # the restored prefix, byte for byte
        own = model(prompt[:, PREFIX:], **{CACHE_KW: own_cache}, use_cache=True).logits
        torch.testing.assert_close(hit.logits, own, rtol=1.6e-2, atol=1e-2)
        full = model(prompt).logits[:, PREFIX:]
        torch.testing.assert_close(hit.logits, full, rtol=1.6e-2, atol=1e-2)

        if tier == "disk":
            push_to_disk(kv, seed=2)
        before = tier_counters(kv)
        tokens = greedy(kv, prompt)
        assert_served_from(kv, tier, before)
        assert_same_tokens(tokens, greedy(model, prompt), model, prompt)


def test_a_load_that_fails_is_computed_and_its_pages_never_stored(monkeypatch):
    """A load whose copy fails (a read error, a peer gone mid-transfer) after writing junk into
    the staging area: the prompt is computed, and what is stored is the computed K/V: the next
    request restores the model's own K/V, bit for bit."""
    from kvtier.errors import CorruptionError

    model = build_model("llama")
    _, prompt = prompts()
    with make_kv(model, "cpu", None) as kv, torch.no_grad():
        real_load = kv.cache.load

        class FailedCopy:
            num_tokens = PREFIX

            def wait(self, timeout_s=None):
                raise CorruptionError("payload checksum mismatch (injected)")

            def done(self):
                return True

        def failing_load(tokens, page_ids, **kw):
            kv._staging.fill_(1e3)  # what the failed copy left
            monkeypatch.setattr(kv.cache, "load", real_load)
            return FailedCopy()

        monkeypatch.setattr(kv.cache, "load", failing_load)
        got = kv.forward_with_cache(prompt)
        assert got.cached_tokens == 0
        want = model(prompt, **{CACHE_KW: DynamicCache()}, use_cache=True).logits
        assert torch.equal(got.logits, want)
        assert kv.stats()["load_errors"] == 1
        hit = kv.forward_with_cache(prompt)
        assert hit.cached_tokens == PREFIX
        _, own = own_prefix_cache(model, prompt)
        assert torch.equal(hit.logits, model(prompt[:, PREFIX:], **{CACHE_KW: own}, use_cache=True).logits)
