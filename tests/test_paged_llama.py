"""The paged Llama (kvtier.examples.paged_llama) against a full recompute, for prefix hits served
from each tier: GPU pages, the CPU tier, the disk tier.

Why an exact comparison is honest: the engine prefills in steps aligned to chunk_tokens, and the
reference (contiguous K/V, no pool, no cache) runs the same step schedule, so each chunk's K/V and
each logit come from the same kernels on the same inputs in both; on a hit only the origin of the
prefix K/V differs. So, in fp32 on CPU: (1) the restored prefix K/V is bit-identical to the K/V
computed for it, (2) the logits of the computed tokens and of each decode step are bit-identical
to the reference's, (3) greedy decoding gives the same tokens. A reference that prefills the
whole prompt in one step sums in another order and agrees only to rounding (its own test).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _util import wrap_cpu_tiers
from kvtier.examples.paged_llama import (
    Engine,
    Llama,
    LlamaConfig,
    PagedKV,
    reference_generate,
)
from kvtier.pool import PagedKVPool

PT, CT = 4, 16  # page and chunk tokens
PREFIX, NEW = 48, 6  # a 3-chunk shared prefix; tokens generated per request
CONFIG = LlamaConfig(vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
POOL_PAGES, CPU_CHUNKS = 24, 6  # the pool holds 96 tokens; the CPU tier 6 chunks
TIERS = ["gpu", "cpu", "disk"]
LAYOUTS = ["cross_layer", "vllm"]


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    barriers spin: a few seconds become a minute. Both sides of each comparison run alike."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, CONFIG.vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_engine(tmp_path, *, kv_layout="cross_layer", device="cpu", dtype=torch.float32):
    model = Llama(CONFIG, seed=0, dtype=dtype, device=device)
    elem = torch.tensor([], dtype=dtype).element_size()
    chunk_bytes = CONFIG.layers * 2 * CT * CONFIG.kv_heads * CONFIG.head_dim * elem
    block_bytes = -(-chunk_bytes // 4096) * 4096  # CPU-tier blocks are 4 KiB aligned
    pool = PagedKVPool(
        **model.kv_geometry(),
        num_pages=POOL_PAGES,
        page_tokens=PT,
        chunk_tokens=CT,
        kv_layout=kv_layout,
        cpu_bytes=CPU_CHUNKS * block_bytes,
        disk_dir=str(tmp_path),
        disk_bytes=4 << 20,
        disk_admit_min_seen=1,
    )
    return Engine(model, pool)


def push_out_of_gpu(pool: PagedKVPool) -> None:
    """A request as large as the pool takes every page: every cached chunk leaves the GPU pool,
    offloaded to the CPU tier first. Never committed, so its pages are just freed."""
    pool.release(pool.begin(tokens(POOL_PAGES * PT, seed=1000)))


def push_out_of_cpu(pool: PagedKVPool) -> None:
    """Store filler chunks (their KV is never read) from a pool-sized request's pages: once the
    CPU tier's free blocks are used, it evicts its older chunks, writing them back to disk
    (disk_admit_min_seen=1); drain() waits for those writes."""
    filler = tokens(POOL_PAGES * PT, seed=2000)
    seq = pool.begin(filler)
    pool.cache.store(filler, seq.page_table).wait()
    pool.cache.drain()
    pool.release(seq)


def disk_promoted(pool: PagedKVPool) -> int:
    return pool.stats()["lower"]["disk"]["chunks_promoted"]


def serve_and_keep_kv(engine: Engine, prompt: list[int]) -> list[tuple]:
    """Serve ``prompt`` (prefill + commit), returning a copy of every layer's K/V of it."""
    seq = engine.start(prompt)
    engine.prefill(seq, prompt)
    engine.pool.commit(seq, prompt)
    kv = [
        tuple(x.clone() for x in PagedKV(engine.pool, seq).read(layer, len(prompt))) for layer in range(CONFIG.layers)
    ]
    engine.pool.release(seq)
    return kv


def hit_from(engine: Engine, tier: str, prompt_b: list[int]):
    """Put the shared prefix in ``tier`` (through a first request), then start ``prompt_b``.
    Returns (seq, the first request's prefix K/V per layer)."""
    pool = engine.pool
    kv_a = serve_and_keep_kv(engine, tokens(PREFIX, seed=1) + tokens(7, seed=2))
    if tier in ("cpu", "disk"):
        push_out_of_gpu(pool)
    if tier == "disk":
        push_out_of_cpu(pool)
    promoted = disk_promoted(pool)
    seq = engine.start(prompt_b)
    seq.wait()
    want = {"gpu": (PREFIX, 0, 0), "cpu": (0, PREFIX, 0), "disk": (0, PREFIX, PREFIX // CT)}[tier]
    got = (seq.gpu_hit_tokens, seq.lower_hit_tokens, disk_promoted(pool) - promoted)
    assert got == want, f"hit from the {tier} tier: (gpu, lower, disk chunks) = {got}, expected {want}"
    assert seq.cached_tokens == PREFIX
    return seq, [(k[:PREFIX], v[:PREFIX]) for k, v in kv_a]


def decode_all(engine: Engine, seq, first: int) -> tuple[list[int], list[torch.Tensor]]:
    toks, logits = [first], []
    for _ in range(NEW - 1):
        step = engine.decode([seq], [toks[-1]])[0]
        logits.append(step)
        toks.append(int(step.argmax()))
    return toks, logits


@pytest.mark.parametrize("kv_layout", LAYOUTS)
@pytest.mark.parametrize("tier", TIERS)
def test_hit_equals_full_recompute_bit_exact(tmp_path, tier, kv_layout):
    engine = make_engine(tmp_path, kv_layout=kv_layout)
    prompt = tokens(PREFIX, seed=1) + tokens(9, seed=3)  # same prefix, another question
    seq, kv_a = hit_from(engine, tier, prompt)
    ref = reference_generate(engine.model, prompt, NEW, prefill_tokens=CT)

    paged = PagedKV(engine.pool, seq)
    for layer in range(CONFIG.layers):  # the restored bytes are the bytes computed for the prefix
        k, v = paged.read(layer, PREFIX)
        assert torch.equal(k, kv_a[layer][0]) and torch.equal(v, kv_a[layer][1]), f"layer {layer}"
    logits = engine.prefill(seq, prompt, all_logits=True)
    assert logits.shape == (len(prompt) - PREFIX, CONFIG.vocab)
    assert torch.equal(logits, ref.prompt_logits[PREFIX:])
    for layer in range(CONFIG.layers):  # and every token's K/V equals the recompute's
        got, want = paged.read(layer, len(prompt)), ref.kv.read(layer, len(prompt))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"layer {layer}"
    engine.pool.commit(seq, prompt)
    toks, step_logits = decode_all(engine, seq, int(logits[-1].argmax()))
    engine.pool.release(seq)
    assert toks == ref.tokens
    assert torch.equal(torch.stack(step_logits), ref.decode_logits)


@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_paged_miss_equals_reference(tmp_path, kv_layout):
    engine = make_engine(tmp_path, kv_layout=kv_layout)
    prompt = tokens(PREFIX + 5, seed=4)
    seq = engine.start(prompt)
    assert seq.cached_tokens == 0
    logits = engine.prefill(seq, prompt, all_logits=True)
    ref = reference_generate(engine.model, prompt, NEW, prefill_tokens=CT)
    assert torch.equal(logits, ref.prompt_logits)
    toks, _ = decode_all(engine, seq, int(logits[-1].argmax()))
    engine.pool.release(seq)
    assert toks == ref.tokens


def test_one_step_prefill_agrees_to_rounding():
    """Without the chunk-aligned schedule the sums run in another order: equal to rounding only."""
    model = Llama(CONFIG, seed=0)
    prompt = tokens(PREFIX + 5, seed=5)
    chunked = reference_generate(model, prompt, NEW, prefill_tokens=CT)
    one_step = reference_generate(model, prompt, NEW, prefill_tokens=None)
    torch.testing.assert_close(one_step.prompt_logits, chunked.prompt_logits, rtol=1e-4, atol=1e-4)
    assert one_step.tokens == chunked.tokens


def test_generate_batch_reuses_the_prefix_and_matches_recompute(tmp_path):
    engine = make_engine(tmp_path)
    prefix = tokens(PREFIX, seed=1)
    prompts = [prefix + tokens(5 + i, seed=10 + i) for i in range(3)]
    gens = engine.generate(prompts, NEW)
    assert [g.cached_tokens for g in gens] == [0, PREFIX, PREFIX]  # each prompt commits before the next
    assert [g.gpu_hit_tokens for g in gens] == [0, PREFIX, PREFIX]
    for prompt, g in zip(prompts, gens):  # decoded as a batch of 3: same greedy tokens
        assert g.prompt == prompt and g.ttft_s > 0
        assert g.tokens == reference_generate(engine.model, prompt, NEW, prefill_tokens=CT).tokens
    st = engine.pool.stats()
    assert st["gpu_referenced_chunks"] == 0 and st["gpu_cached_chunks"] == PREFIX // CT


def test_fully_cached_prompt_still_computes_its_last_token(tmp_path):
    """A prompt whose every chunk is cached reuses all but the last one: the last token's logits
    give the first new token, and rewriting a shared page is never needed."""
    engine = make_engine(tmp_path)
    prompt = tokens(PREFIX, seed=6)  # exactly 3 chunks
    first = engine.generate([prompt], NEW)[0]
    again = engine.generate([prompt], NEW)[0]
    assert (first.cached_tokens, again.cached_tokens) == (0, PREFIX - CT)
    ref = reference_generate(engine.model, prompt, NEW, prefill_tokens=CT)
    assert again.tokens == first.tokens == ref.tokens


def test_engine_rejects_bad_arguments_and_stays_usable(tmp_path):
    engine = make_engine(tmp_path)
    pool = engine.pool
    other = PagedKVPool(
        num_layers=3,
        kv_heads=2,
        head_dim=16,
        num_pages=8,
        page_tokens=PT,
        chunk_tokens=CT,
        dtype=torch.float32,
        cpu_bytes=0,
    )
    with pytest.raises(ValueError, match="pool"):
        Engine(engine.model, other)
    with pytest.raises(ValueError, match="prefill_tokens"):
        Engine(engine.model, pool, prefill_tokens=12)
    with pytest.raises(ValueError, match="vocab"):
        engine.generate([[1, 2, CONFIG.vocab]], 2)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate([[1, 2, 3], []], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1, 2, 3]], 0)
    assert pool.stats()["pages_free"] == POOL_PAGES  # nothing leaked
    assert engine.generate([tokens(20, seed=7)], 2)[0].tokens
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig(hidden=60, heads=4)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_layout", LAYOUTS)
@pytest.mark.parametrize("tier", TIERS)
def test_gpu_hit_matches_full_recompute(tmp_path, gpu, tier, kv_layout):
    """bf16 on the GPU: restored K/V bit-identical, logits within bf16 tolerance, same tokens."""
    engine = make_engine(tmp_path, kv_layout=kv_layout, device=str(gpu), dtype=torch.bfloat16)
    prompt = tokens(PREFIX, seed=1) + tokens(9, seed=3)
    seq, kv_a = hit_from(engine, tier, prompt)
    paged = PagedKV(engine.pool, seq)
    for layer in range(CONFIG.layers):
        k, v = paged.read(layer, PREFIX)
        assert torch.equal(k, kv_a[layer][0]) and torch.equal(v, kv_a[layer][1]), f"layer {layer}"
    assert engine.pool.stats()["lower"]["pinned"]
    ref = reference_generate(engine.model, prompt, NEW, prefill_tokens=CT)
    logits = engine.prefill(seq, prompt, all_logits=True)
    torch.testing.assert_close(logits, ref.prompt_logits[PREFIX:], rtol=2e-2, atol=5e-2)
    engine.pool.commit(seq, prompt)
    toks, _ = decode_all(engine, seq, int(logits[-1].argmax()))
    engine.pool.release(seq)
    assert toks == ref.tokens


@pytest.mark.gpu
@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_gpu_offload_beside_the_next_request_stores_exact_kv(tmp_path, gpu, kv_layout):
    """The engine begins requests layerwise: pages an eviction's offload still copies are written
    by the next request's layers once the offload has copied that layer (the compute stream
    waits). What the offload stored comes back bit-identical."""
    engine = make_engine(tmp_path, kv_layout=kv_layout, device=str(gpu), dtype=torch.bfloat16)
    for rep in range(3):
        prompt_a = tokens(PREFIX, seed=10 + rep) + tokens(7, seed=2)  # new each time: offloaded on eviction
        kv_a = serve_and_keep_kv(engine, prompt_a)
        filler = tokens(POOL_PAGES * PT, seed=3000 + rep)  # every page: evicts A's chunks
        seq = engine.start(filler)
        engine.prefill(seq, filler)  # writes the pages A's offload reads, layer by layer
        engine.pool.release(seq)
        seq = engine.start(prompt_a)
        seq.wait()
        assert (seq.gpu_hit_tokens, seq.lower_hit_tokens) == (0, PREFIX)
        paged = PagedKV(engine.pool, seq)
        for layer in range(CONFIG.layers):
            k, v = paged.read(layer, PREFIX)
            assert torch.equal(k, kv_a[layer][0][:PREFIX]) and torch.equal(v, kv_a[layer][1][:PREFIX]), layer
        engine.pool.release(seq)


class _Split:
    """Recompute the first ``head`` lower chunks, load the rest (a split plan, forced)."""

    def __init__(self, head):
        self.head = head

    def plan(self, pool, gpu_hit_chunks, tiers):
        return len(tiers)

    def plan_split(self, pool, gpu_hit_chunks, tiers):
        h = min(self.head, len(tiers))
        return h, len(tiers) - h


class _ShortTier:
    """The CPU tier, except that a load gets at most ``limit`` chunks (one vanished meanwhile),
    once a limit is set."""

    def __init__(self, tier):
        self._tier, self.limit = tier, None

    def __getattr__(self, name):
        return getattr(self._tier, name)

    def load(self, keys, pages, stream):
        if self.limit is None:
            return self._tier.load(keys, pages, stream)
        return self._tier.load(keys[: 16 * self.limit], pages, stream)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("shortfall", [False, True])
def test_split_plan_head_recomputed_tail_loaded_bit_exact(tmp_path, tier, shortfall, monkeypatch):
    """The head of the cached prefix is recomputed while the tail after it loads (in the
    background); the result equals a full recompute bit for bit, including when the tail load
    gets fewer chunks than planned (the rest is computed)."""
    tiers = []
    wrap_cpu_tiers(monkeypatch, lambda t: tiers.append(_ShortTier(t)) or tiers[-1])
    engine = make_engine(tmp_path)
    pool = engine.pool
    prompt = tokens(PREFIX, seed=1) + tokens(9, seed=3)
    serve_and_keep_kv(engine, tokens(PREFIX, seed=1) + tokens(7, seed=2))
    push_out_of_gpu(pool)
    if tier == "disk":
        push_out_of_cpu(pool)
    ref = reference_generate(engine.model, prompt, NEW, prefill_tokens=CT)
    pool.planner = _Split(head=1)
    if shortfall:
        tiers[0].limit = 1
    seq = engine.start(prompt)
    assert seq.cached_tokens == 0 and seq.tail_start == CT and seq.lower_hit_tokens == 0
    logits = engine.prefill(seq, prompt, all_logits=True)
    tail = (PREFIX // CT - 1 if not shortfall else 1) * CT
    assert seq.lower_hit_tokens == tail
    assert logits.shape == (len(prompt) - tail, CONFIG.vocab)
    assert torch.equal(logits[:CT], ref.prompt_logits[:CT])  # the head
    assert torch.equal(logits[CT:], ref.prompt_logits[CT + tail :])  # after the tail
    paged = PagedKV(pool, seq)
    for layer in range(CONFIG.layers):
        got, want = paged.read(layer, len(prompt)), ref.kv.read(layer, len(prompt))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"layer {layer}"
    assert pool.commit(seq, prompt) == PREFIX // CT - tail // CT  # head (and what was computed)
    toks, _ = decode_all(engine, seq, int(logits[-1].argmax()))
    pool.release(seq)
    assert toks == ref.tokens
    pool.planner = None
    again = engine.start(prompt)  # all of it is in GPU pages now, shared
    assert again.gpu_hit_tokens == PREFIX
    pool.release(again)
