"""The reference engine's attention after a cached prefix, split in two (the prefix without a mask,
the new tokens causally) and merged by log-sum-exps (paged_llama._attend_split): equal to one
lower-right causal attention over all keys. On the CPU with a float64 reference kernel for the
parts; on the GPU with cuDNN's, through ``attend`` and through a half-prefix hit of the engine."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import torch.nn.functional as F
from kvtier.examples import paged_llama
from torch.nn.attention.bias import causal_lower_right


def math_partial(q, k, v, causal):
    """Attention of q over k/v in float64 (top-left causal when asked) with its log-sum-exp."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        t, n = s.shape[-2:]
        s = s.masked_fill(torch.ones(t, n, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ v.double()).to(q.dtype), torch.logsumexp(s, -1, keepdim=True)


def lower_right_reference(q, k, v, start):
    rep = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(rep, dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 40),
    start=st.integers(1, 60),
    kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_split_equals_one_lower_right_attention(t, start, kv_heads, group, seed):
    g = torch.Generator().manual_seed(seed)
    heads, d = kv_heads * group, 8
    q = torch.randn(1, heads, t, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(1, kv_heads, start + t, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(1, kv_heads, start + t, d, generator=g, dtype=torch.float64)
    got = paged_llama._attend_split(q, k, v, start, partial=math_partial)
    torch.testing.assert_close(got, lower_right_reference(q, k, v, start), rtol=1e-9, atol=1e-9)


def test_split_weighs_each_part_by_its_share():
    """A query that scores one prefix key far above every other key returns that key's value."""
    q = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, 5, 4, dtype=torch.float64)
    v = torch.arange(20, dtype=torch.float64).reshape(1, 1, 5, 4)
    q[0, 0, :, 0], k[0, 0, 1, 0] = 10.0, 10.0  # score 50 for prefix key 1, 0 for the others
    got = paged_llama._attend_split(q, k, v, 3, partial=math_partial)
    torch.testing.assert_close(got[0, 0], v[0, 0, 1].expand(2, 4), rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(2, 40), start=st.integers(0, 40), extra=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_padding_the_new_tokens_changes_nothing_for_the_real_ones(t, start, extra, seed):
    """cuDNN calls take their new tokens padded to a bucket (one plan per bucket): the real
    tokens' outputs are those of the unpadded attention (float64 here, SDPA on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(start + t, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(start + t, 2, 8, generator=g, dtype=torch.float64)
    got = paged_llama._attend_padded(q, k, v, start, t + extra)
    assert got.shape == (t, 4, 8)
    torch.testing.assert_close(got, paged_llama.attend(q, k, v, start), rtol=1e-12, atol=1e-12)


def test_split_is_not_used_off_the_gpu():
    q, k = torch.zeros(1, 4, 2048, 8), torch.zeros(1, 2, 4096, 8)
    assert not paged_llama._cudnn_ok(q, k, k)


def _inputs(gpu, t, start, heads=32, kv_heads=8, d=128, seed=0):
    g = torch.Generator(device=gpu).manual_seed(seed)
    kw = dict(device=gpu, dtype=torch.bfloat16, generator=g)
    return (
        torch.randn(t, heads, d, **kw),
        torch.randn(start + t, kv_heads, d, **kw),
        torch.randn(start + t, kv_heads, d, **kw),
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "t,start", [(paged_llama.SPLIT_MIN_QUERIES, 3000), (2048, 2048), (4096, 512), (1500, 3000), (1500, 0), (3584, 0)]
)
def test_gpu_attend_after_prefix_matches_fp32(gpu, t, start):
    """``attend`` (after a prefix: split with cuDNN where it runs; new tokens padded to a bucket)
    within bf16 rounding of an fp32 reference, and no further from it than SDPA's own call."""
    q, k, v = _inputs(gpu, t, start)
    assert paged_llama._cudnn_ok(*(x.transpose(0, 1)[None] for x in (q, k, v))), (
        "cuDNN attention should run on the GPU machine's H100/H200"
    )
    got = paged_llama.attend(q, k, v, start).float()
    rows = slice(t - 256, t)  # the reference for the last 256 queries (they see every key but the newest)
    qr, kr, vr = (x.transpose(0, 1)[None].float() for x in (q[rows], k, v))
    kr, vr = kr.repeat_interleave(4, dim=1), vr.repeat_interleave(4, dim=1)
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=causal_lower_right(256, start + t))[0].transpose(0, 1)
    flash = F.scaled_dot_product_attention(
        *(x.transpose(0, 1)[None] for x in (q, k, v)), attn_mask=causal_lower_right(t, start + t), enable_gqa=True
    )
    flash_err = float((flash[0].transpose(0, 1)[rows].float() - ref).abs().max())
    err = float((got[rows] - ref).abs().max())
    assert err < 2e-2, f"split attention off the fp32 reference by {err}"
    assert err <= 2 * flash_err + 1e-3, f"split {err} vs lower-right flash {flash_err}"


@pytest.mark.gpu
def test_gpu_half_prefix_hit_matches_recompute(gpu):
    """An engine prompt whose first half is cached computes its second half (>= SPLIT_MIN_QUERIES
    tokens, so split) to the logits of a recompute, within bf16 tolerance, same next token."""
    from kvtier.examples.paged_llama import Engine, Llama, LlamaConfig, reference_generate
    from kvtier.pool import PagedKVPool

    cfg = LlamaConfig(vocab=512, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512)
    model = Llama(cfg, seed=0, dtype=torch.bfloat16, device=str(gpu))
    n = 2 * paged_llama.SPLIT_MIN_QUERIES
    pool = PagedKVPool(**model.kv_geometry(), num_pages=2 * n // 16, page_tokens=16, chunk_tokens=64, cpu_bytes=8 << 20)
    engine = Engine(model, pool, prefill_tokens=None)
    g = torch.Generator().manual_seed(5)
    first = torch.randint(0, cfg.vocab, (n,), generator=g).tolist()
    engine.generate([first], 1)
    prompt = first[: n // 2] + torch.randint(0, cfg.vocab, (n // 2,), generator=g).tolist()
    seq = pool.begin(prompt[:-1])
    assert seq.cached_tokens == n // 2
    pool.extend(seq, n)
    logits = engine.prefill(seq, prompt, all_logits=True)
    pool.release(seq)
    ref = reference_generate(model, prompt, 1, prefill_tokens=None)
    torch.testing.assert_close(logits, ref.prompt_logits[n // 2 :], rtol=2e-2, atol=5e-2)
    assert int(logits[-1].argmax()) == ref.tokens[0]
    pool.close()
