"""A compact Llama-style decoder whose attention reads and writes K/V through a PagedKVPool's page
tables, and a greedy engine that reuses cached prefixes across requests: the reference for
engine authors wiring kvtier into an inference loop.

One request, as :meth:`Engine.generate` serves it::

    seq = pool.begin(prompt[:-1])      # longest cached prefix: GPU pages mapped, CPU/disk loading
    pool.extend(seq, len(prompt))      # the last prompt token is always computed (its logits)
    logits = engine.prefill(seq, prompt)   # tokens [seq.cached_tokens, n); layer i first waits
                                           # for its loaded pages (the GPU stream waits, or the host)
    pool.commit(seq, prompt)           # its full chunks are shared with later requests
    ... greedy decode: pool.extend(seq, n + 1), one token a step ...
    pool.release(seq)

Where K/V live (:class:`PagedKV`): token ``t`` of a sequence is slot ``t % page_tokens`` of page
``seq.page_table[t // page_tokens]``; in the cross-layer layout its K of layer ``l`` is
``pool.kv[page, l, 0, slot]`` (V: ``1``), ``[kv_heads, head_dim]``; in the vLLM layout
``pool.kv[l][0, page, slot]``. Attention gathers a sequence's pages into contiguous
``[tokens, kv_heads, head_dim]`` K and V and calls torch SDPA; a fused paged-attention kernel
(FlashInfer, vLLM) would read the same pages in place.

Exactness: prefill runs in steps aligned to multiples of ``chunk_tokens`` (chunked prefill), so a
chunk's K/V is computed by the same kernels on the same inputs whether its request hit or missed.
A restored prefix then gives logits bit-identical (fp32, CPU) to a full recompute with the same
step schedule (:func:`reference_generate`: contiguous K/V, no cache); tests/test_paged_llama.py
checks it for hits from each tier.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from kvtier.errors import InvalidArgumentError
from kvtier.pool import PagedKVPool, Sequence
from kvtier.upload import to_device  # uploads that do not wait behind a tier load (kvtier.upload)

__all__ = [
    "ContiguousKV",
    "Engine",
    "Generation",
    "KVStore",
    "Llama",
    "LlamaConfig",
    "PagedKV",
    "ReferenceOutput",
    "Span",
    "reference_generate",
]


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral; Qwen2 less its qkv biases).

    ``head_dim = hidden // heads``; ``heads`` is a multiple of ``kv_heads`` (grouped-query attention).
    """

    vocab: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "intermediate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgumentError(f"config.{name} must be a positive int, got {v!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads or self.head_dim % 2:
            raise InvalidArgumentError(
                f"config: hidden={self.hidden} must be heads={self.heads} x an even head_dim, and heads "
                f"a multiple of kv_heads={self.kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# -- where K/V live ------------------------------------------------------------------------------
class KVStore(Protocol):
    """One sequence's K/V, per layer: what a forward pass writes and attends over."""

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep K and V ``[t, kv_heads, head_dim]`` of tokens ``[start, start + t)``."""

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens ``[0, end)``, each contiguous ``[end, kv_heads, head_dim]``."""


class PagedKV:
    """One sequence's K/V in a :class:`PagedKVPool`, addressed through its page table.

    A read of layer ``l`` first waits for layer ``l`` of the pages loaded from the CPU / disk
    tiers, so earlier layers compute while later ones land: on a GPU the compute stream waits
    (``seq.stream_wait_layer``) and the host goes on queueing the next layers' kernels, the
    caller then checking the loads with ``seq.wait()`` before it uses the result
    (:meth:`Engine.prefill` does); on the CPU the host waits (``seq.wait_layer``). Build a new
    one after ``pool.extend`` (it snapshots the page table).
    """

    def __init__(self, pool: PagedKVPool, seq: Sequence) -> None:
        self.pool, self.seq = pool, seq
        device = _pool_tensor(pool).device
        self.on_gpu = device.type == "cuda"
        self.page_table = to_device(seq.page_table, device)
        self._slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _pages(self, layer: int, k_or_v: int) -> torch.Tensor:
        """``[num_pages, page_tokens, kv_heads, head_dim]`` view of layer ``layer``'s K (0) or V (1)."""
        if self.pool.kv_layout == "cross_layer":
            return self.pool.kv[:, layer, k_or_v]  # kv: [num_pages, layers, 2, page_tokens, heads, dim]
        return self.pool.kv[layer][k_or_v]  # kv[layer]: [2, num_pages, page_tokens, heads, dim]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # Pages an eviction's offload still copies (a layerwise sequence's) are written once that
        # layer is copied: on a GPU the stream waits, the host goes on.
        if self.on_gpu:
            self.seq.stream_wait_writable(layer, torch.cuda.current_stream())
        else:
            self.seq.wait_writable(layer)
        where = self._slots.get((start, k.shape[0]))
        if where is None:  # (page, slot) of each token: the same for every layer of a step
            pos = torch.arange(start, start + k.shape[0], device=self.page_table.device)
            where = self._slots[start, k.shape[0]] = (
                self.page_table[pos // self.pool.page_tokens],
                pos % self.pool.page_tokens,
            )
        page, slot = where
        for kv, new in ((0, k), (1, v)):
            dst, src = _wide(self._pages(layer, kv)), _wide(new)
            if dst.dtype != src.dtype:  # one of them cannot be seen as words: element by element
                dst, src = self._pages(layer, kv), new
            dst[page, slot] = src

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_gpu:
            self.seq.stream_wait_layer(layer, torch.cuda.current_stream(), upto=end)
        else:
            self.seq.wait_layer(layer, upto=end)
        pages = self.page_table[: math.ceil(end / self.pool.page_tokens)]
        # One gather for K and V: [pages, 2, pt, h, d] (cross-layer) or [2, pages, pt, h, d] (vLLM).
        # Moved as 8-byte words (_wide): the index kernel copies an element a thread.
        if self.pool.kv_layout == "cross_layer":
            kv = _wide(self.pool.kv)[pages, layer].view(self.pool.kv.dtype)
            return kv[:, 0].flatten(0, 1)[:end], kv[:, 1].flatten(0, 1)[:end]  # [end, h, d] each
        kv = _wide(self.pool.kv[layer])[:, pages].view(self.pool.kv[layer].dtype).flatten(1, 2)
        return kv[0, :end], kv[1, :end]


class ContiguousKV:
    """One sequence's K/V in plain tensors, ``[max_tokens, kv_heads, head_dim]`` per layer and
    K/V: the reference, with no pool and no cache."""

    def __init__(self, config: LlamaConfig, max_tokens: int, *, dtype=torch.float32, device="cpu") -> None:
        self.kv = torch.zeros(
            config.layers, 2, max_tokens, config.kv_heads, config.head_dim, dtype=dtype, device=device
        )

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv[layer, 0, start : start + k.shape[0]] = k
        self.kv[layer, 1, start : start + v.shape[0]] = v

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer, 0, :end], self.kv[layer, 1, :end]


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, start + length)`` of one sequence, whose K/V live in ``kv``."""

    kv: KVStore
    start: int
    length: int


# -- the model -----------------------------------------------------------------------------------
def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its last dimension reinterpreted as 8-byte words, where its layout allows (the
    same bytes): gathers and scatters of K/V by index then move 8 bytes per element instead of
    2 (bf16), which is several times faster on a GPU. ``t`` itself where it does not."""
    if t.dtype == torch.int64 or t.shape[-1] * t.element_size() % 8:
        return t
    try:
        return t.view(torch.int64)
    except RuntimeError:  # a stride or offset not a multiple of the word
        return t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``[t, hidden]`` -> ``[t, hidden]``; the statistics in fp32, as Llama computes them."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def rotary(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[t, 1, head_dim]`` of rotary embeddings at ``positions`` ``[t]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[t, heads, head_dim]`` by position (the rotate-half convention of HF Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _flash_takes_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether SDPA's flash kernel can run these grouped-query shapes as they are (causal masks
    are given to it as lower-right causal biases, so the check is made without one)."""
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True)))
    except (ImportError, TypeError, RuntimeError):  # a torch without the check: repeat the heads
        return False


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of queries at positions ``[start, start + t)`` over keys ``[0, start + t)``.

    q: ``[t, heads, head_dim]``; k, v: ``[start + t, kv_heads, head_dim]`` -> ``[t, heads, head_dim]``.
    On CUDA, where cuDNN's attention runs: the new tokens are padded to a multiple of
    ``PLAN_BUCKET`` (one cuDNN plan per bucket), and after a cached prefix from
    ``SPLIT_MIN_QUERIES`` new tokens on the attention is split in two (:func:`_attend_split`).
    """
    t, end = q.shape[0], k.shape[0]
    if (
        t > 1
        and t % PLAN_BUCKET
        and q.is_cuda
        and (start == 0 or t >= SPLIT_MIN_QUERIES)
        and _cudnn_ok(*(x.transpose(0, 1)[None] for x in (q, k, v)))
    ):
        # cuDNN builds a plan per shape, slowly the first time: new tokens padded to a whole
        # bucket give a few shapes instead of one per length (_attend_padded).
        return _attend_padded(q, k, v, start, -(-t // PLAN_BUCKET) * PLAN_BUCKET)
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, tokens, head_dim]
    if t == 1:  # decode: the one query sees every key
        if q.is_cuda:  # the query heads of a K/V head as its queries: fused kernels, no copies of K/V
            heads, kv_heads = q.shape[1], k.shape[1]
            out = F.scaled_dot_product_attention(q.reshape(1, kv_heads, heads // kv_heads, -1), k, v)
            return out.reshape(1, heads, -1)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)[0].transpose(0, 1)
    gqa = True
    if q.is_cuda and k.shape[1] != q.shape[1] and not _flash_takes_gqa(q, k, v):
        # Of the fused kernels only flash takes fewer K/V heads than query heads; without it SDPA
        # would fall back to the math kernel, which materialises the [heads, t, end] scores (tens
        # of GiB for a 32k prompt): give the memory-efficient kernel as many K/V heads instead.
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif t >= SPLIT_MIN_QUERIES and _cudnn_ok(q, k, v):
        out = _attend_split(q, k, v, start)
    else:  # is_causal aligns its diagonal top-left; after a prefix, query i sees keys <= start + i
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, end), enable_gqa=gqa)
    return out[0].transpose(0, 1)


# Queries after a cached prefix from which attention is split in two (below, one lower-right
# flash call costs less than two calls and a merge).
SPLIT_MIN_QUERIES = 1024
# New tokens of a cuDNN attention call are padded to a multiple of this (one plan per bucket).
PLAN_BUCKET = 1024
_split_checked: dict = {}


def _attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, padded: int) -> torch.Tensor:
    """``attend`` with the ``t`` new tokens padded with zeros to ``padded``: exact for the real
    ones. Causally, query ``i`` sees keys up to ``start + i`` only, never the padding after the
    last real token, and the padded queries' rows are dropped. ``[t, heads|kv_heads, head_dim]``."""
    t = q.shape[0]

    def pad(x: torch.Tensor, n: int) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, n - x.shape[0]))

    return attend(pad(q, padded), pad(k, start + padded), pad(v, start + padded), start)[:t]


def _cudnn_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """cuDNN's fused attention with its log-sum-exp (``[1, heads, t, 1]``, fp32)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[:2]
    return out, lse.reshape(*out.shape[:3], 1)


def _attend_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, partial=None) -> torch.Tensor:
    """Attention after a cached prefix as two cuDNN calls merged by their log-sum-exps.

    Every query sees the whole prefix (no mask) and the new keys causally with the diagonal
    top-left (``is_causal`` on a square). SDPA sends a lower-right causal mask to the flash
    kernel, which runs at about half cuDNN's rate on an H100 (docs/architecture.md,
    "Measurements behind the design"); the split runs both parts at cuDNN's. Inputs
    ``[1, heads|kv_heads, tokens, head_dim]``, K/V heads repeated when they are fewer than the
    query heads. ``partial(q, k, v, causal) -> (out, lse)`` is the
    kernel (cuDNN's by default; the tests give a reference one on the CPU).
    """
    partial = partial or _cudnn_lse
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o_prefix, l_prefix = partial(q, k[:, :, :start], v[:, :, :start], False)
    o_new, l_new = partial(q, k[:, :, start:], v[:, :, start:], True)
    # softmax over both key sets = the two partial outputs weighted by their shares of the total
    # exp-sum: the new keys' share is sigmoid(lse_new - lse_prefix).
    return torch.lerp(o_prefix, o_new, torch.sigmoid(l_new - l_prefix).to(o_new.dtype))


def _cudnn_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether cuDNN's attention runs these shapes (checked once per dtype and head shape)."""
    if not q.is_cuda:
        return False
    key = (q.device, q.dtype, q.shape[1], q.shape[-1])
    if key not in _split_checked:
        try:
            from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

            qq = q[:, :, :64]
            kk = k[:, :, :64].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            _split_checked[key] = bool(can_use_cudnn_attention(SDPAParams(qq, kk, kk, None, 0.0, False, False)))
        except (ImportError, TypeError, RuntimeError, AttributeError):  # a torch without the check or the op
            _split_checked[key] = False
    return _split_checked[key]


class Block(nn.Module):
    """One decoder layer: RMSNorm -> grouped-query attention -> RMSNorm -> SwiGLU MLP, residuals."""

    def __init__(self, c: LlamaConfig, draw, gain) -> None:
        super().__init__()
        d = c.head_dim
        self.attn_norm = gain(c.hidden)
        wq = draw(c.heads * d, c.hidden)
        wk = draw(c.kv_heads * d, c.hidden)
        wv = draw(c.kv_heads * d, c.hidden)
        # Q, K and V (and the MLP's gate and up) as one weight each: one GEMM instead of three (two).
        self.wqkv = nn.Parameter(torch.cat([wq, wk, wv]), requires_grad=False)
        del wq, wk, wv
        self.wo = draw(c.hidden, c.heads * d)
        self.mlp_norm = gain(c.hidden)
        w_gate = draw(c.intermediate, c.hidden)
        w_up = draw(c.intermediate, c.hidden)
        self.w_gate_up = nn.Parameter(torch.cat([w_gate, w_up]), requires_grad=False)
        del w_gate, w_up
        self.w_down = draw(c.hidden, c.intermediate)


class Llama(nn.Module):
    """A Llama-style decoder with random weights, attending over one KVStore per sequence.

    Args:
        config: the shape. seed: weights come from ``torch.Generator().manual_seed(seed)`` on the
            CPU, so one seed gives the same model on every device.
        dtype, device: of weights, activations and K/V.

    Example::

        model = Llama(LlamaConfig(layers=2), seed=0)
        pool = PagedKVPool(**model.kv_geometry(), num_pages=256, page_tokens=16, chunk_tokens=64,
                           cpu_bytes=64 << 20)
        engine = Engine(model, pool)
        out = engine.generate([prompt_a, prompt_b], max_new_tokens=8)   # b reuses a's prefix
    """

    def __init__(
        self, config: LlamaConfig, *, seed: int = 0, dtype=torch.float32, device="cpu", init_on_device: bool = False
    ) -> None:
        """``init_on_device`` draws the weights with a generator on ``device`` (fast for billions
        of parameters, but the weights then differ between devices); by default they are drawn on
        the CPU, so one seed gives the same model everywhere."""
        super().__init__()
        self.config = config
        where = torch.device(device) if init_on_device else torch.device("cpu")
        gen = torch.Generator(device=where).manual_seed(seed)

        def draw(*shape: int, std: float | None = None) -> nn.Parameter:
            # N(0, 1/fan_in) by default: activations keep their scale, logits are far from uniform.
            std = 1.0 / math.sqrt(shape[-1]) if std is None else std
            w = torch.randn(*shape, generator=gen, device=where) * std
            return nn.Parameter(w.to(dtype=dtype, device=device), requires_grad=False)

        def gain(n: int) -> nn.Parameter:  # RMSNorm weights near 1
            w = 1.0 + 0.1 * torch.randn(n, generator=gen, device=where)
            return nn.Parameter(w.to(dtype=dtype, device=device), requires_grad=False)

        self.embed = draw(config.vocab, config.hidden, std=1.0)
        self.blocks = nn.ModuleList(Block(config, draw, gain) for _ in range(config.layers))
        self.norm = gain(config.hidden)
        self.lm_head = draw(config.vocab, config.hidden)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def kv_geometry(self) -> dict:
        """PagedKVPool arguments for this model's K/V: num_layers, kv_heads, head_dim, dtype, device."""
        c = self.config
        return {
            "num_layers": c.layers,
            "kv_heads": c.kv_heads,
            "head_dim": c.head_dim,
            "dtype": self.dtype,
            "device": str(self.device),
        }

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, spans: list[Span], *, all_logits: bool = False) -> torch.Tensor:
        """Run ``tokens`` through the model: write their K/V and attend, per sequence.

        Args:
            tokens: ``[T]`` int64, the spans' tokens one after another. A prefill step is one
                span; a batched decode step is one span of length 1 per sequence.
            spans: where each run of tokens sits in its sequence and where its K/V live.
            all_logits: logits of every token instead of each span's last.
        Returns:
            float32 logits, ``[T, vocab]`` if ``all_logits`` else ``[len(spans), vocab]``.
        """
        c = self.config
        t, d = tokens.shape[0], c.head_dim
        if t != sum(s.length for s in spans):
            raise InvalidArgumentError(f"tokens has {t} ids, the spans cover {sum(s.length for s in spans)}")
        positions = torch.cat([torch.arange(s.start, s.start + s.length, device=self.device) for s in spans])
        cos, sin = rotary(positions, d, c.rope_theta, self.dtype)
        x = self.embed[tokens]  # [T, hidden]
        for i, b in enumerate(self.blocks):
            h = rms_norm(x, b.attn_norm, c.norm_eps)
            qkv = F.linear(h, b.wqkv).view(t, c.heads + 2 * c.kv_heads, d)
            qk = apply_rotary(qkv[:, : c.heads + c.kv_heads], cos, sin)  # Q's and K's heads at once
            q, k, v = qk[:, : c.heads], qk[:, c.heads :], qkv[:, c.heads + c.kv_heads :]
            if len(spans) == 1:  # one sequence (prefill): no per-sequence slices
                s = spans[0]
                s.kv.write(i, s.start, k, v)
                out = attend(q, *s.kv.read(i, s.start + s.length), s.start)
            else:
                out = torch.empty_like(q)
                row = 0
                for s in spans:  # attention is per sequence; projections and MLP run batched
                    rows = slice(row, row + s.length)
                    s.kv.write(i, s.start, k[rows], v[rows])
                    k_all, v_all = s.kv.read(i, s.start + s.length)
                    out[rows] = attend(q[rows], k_all, v_all, s.start)
                    row += s.length
            x = x + F.linear(out.reshape(t, c.hidden), b.wo)
            h = rms_norm(x, b.mlp_norm, c.norm_eps)
            gate, up = F.linear(h, b.w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, b.w_down)
        if not all_logits:
            x = x[-1:] if len(spans) == 1 else x[to_device([s.length for s in spans], self.device).cumsum(0) - 1]
        return F.linear(rms_norm(x, self.norm, c.norm_eps), self.lm_head).float()


# -- serving -------------------------------------------------------------------------------------
@dataclass
class Generation:
    """One served request.

    Attributes:
        prompt, tokens: the prompt's token ids and the greedy new ones.
        cached_tokens: prompt tokens whose K/V was reused (gpu_hit_tokens from GPU pages,
            lower_hit_tokens loaded from the CPU or disk tier); the rest was computed.
        ttft_s: time to first token, from ``pool.begin`` to the first new token on the host.
    """

    prompt: list[int]
    tokens: list[int]
    cached_tokens: int
    gpu_hit_tokens: int
    lower_hit_tokens: int
    ttft_s: float


def _pool_tensor(pool: PagedKVPool) -> torch.Tensor:
    return pool.kv if pool.kv_layout == "cross_layer" else pool.kv[0]


class Engine:
    """Greedy generation over a :class:`PagedKVPool`, reusing cached prefixes across requests.

    Args:
        model: a :class:`Llama`.
        pool: a PagedKVPool of the model's K/V geometry, dtype and device
            (``PagedKVPool(**model.kv_geometry(), num_pages=..., cpu_bytes=..., disk_dir=...)``).
        prefill_tokens: tokens per prefill step, a divisor of the pool's ``chunk_tokens``
            ("chunk", the default: ``chunk_tokens``). Steps are aligned to its multiples, so they
            start where a hit ends and a hit is bit-exact. ``None``: the rest of the prompt in one
            step (fewer kernel launches; a hit then equals a recompute only up to rounding).
    """

    def __init__(self, model: Llama, pool: PagedKVPool, *, prefill_tokens: int | str | None = "chunk") -> None:
        c, kv = model.config, _pool_tensor(pool)
        if (pool.num_layers, kv.shape[-2], kv.shape[-1]) != (c.layers, c.kv_heads, c.head_dim):
            raise InvalidArgumentError(
                f"pool: {pool.num_layers} layers x {kv.shape[-2]} kv_heads x {kv.shape[-1]} head_dim, "
                f"the model: {c.layers} x {c.kv_heads} x {c.head_dim}"
            )
        if kv.dtype != model.dtype or kv.device != model.device:
            raise InvalidArgumentError(
                f"pool: K/V are {kv.dtype} on {kv.device}, the model is {model.dtype} on {model.device}"
            )
        if prefill_tokens == "chunk":
            prefill_tokens = pool.chunk_tokens
        if prefill_tokens is not None and (
            isinstance(prefill_tokens, bool)
            or not isinstance(prefill_tokens, int)
            or prefill_tokens <= 0
            or pool.chunk_tokens % prefill_tokens
        ):
            raise InvalidArgumentError(
                f"prefill_tokens must be None or a positive divisor of chunk_tokens={pool.chunk_tokens}, "
                f"got {prefill_tokens!r}"
            )
        self.model, self.pool, self.prefill_tokens = model, pool, prefill_tokens

    def _ids(self, tokens, what: str) -> torch.Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise InvalidArgumentError(
                f"{what} must be a non-empty 1-D list of token ids, got shape {tuple(ids.shape)}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.model.config.vocab:
            raise InvalidArgumentError(f"{what} has token ids outside [0, vocab={self.model.config.vocab})")
        return to_device(ids, self.model.device)

    def start(self, prompt: list[int]) -> Sequence:
        """``pool.begin`` a request: its longest cached prefix is mapped (GPU pages) or loading
        (CPU / disk tiers). The last prompt token is always computed, even on a full hit: its
        logits give the first new token (vLLM does the same)."""
        seq = self.pool.begin(prompt[:-1], layerwise=True)  # PagedKV.write waits layer by layer
        try:
            self.pool.extend(seq, len(prompt))
        except BaseException:
            self.pool.release(seq)
            raise
        return seq

    def prefill(self, seq: Sequence, prompt: list[int], *, all_logits: bool = False) -> torch.Tensor:
        """Compute the K/V of ``prompt[seq.cached_tokens:]`` into the sequence's pages.

        Returns float32 logits: ``[vocab]`` of the last prompt token, or with ``all_logits``
        one row per computed token (``[len(prompt) - seq.cached_tokens, vocab]`` unless a split
        plan loaded a tail: its tokens are skipped).
        """
        ids = self._ids(prompt, "prompt")
        n, step = len(prompt), self.prefill_tokens
        if seq.cached_tokens >= n:
            raise InvalidArgumentError(
                f"prompt: all {n} tokens are cached, none left to compute (start requests with Engine.start)"
            )
        kv = PagedKV(self.pool, seq)
        out, start = [], seq.cached_tokens
        tail = seq.tail_start  # a split plan: the head computes while the tail from here loads
        while start < n:
            if tail is not None and start == tail:
                start += self.pool.finish_tail(seq)  # the tokens it holds are in place
                tail = None
                continue
            end = n if step is None else min(n, (start // step + 1) * step)
            if tail is not None:
                end = min(end, tail)
            out.append(self.model(ids[start:end], [Span(kv, start, end - start)], all_logits=all_logits))
            start = end
        seq.wait()  # the loads' errors (GPU layer waits only ordered the stream)
        return torch.cat(out) if all_logits else out[-1][0]

    def decode(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """One decode step for a batch: append ``tokens[b]`` to ``seqs[b]`` -> logits ``[B, vocab]``."""
        spans = []
        for seq in seqs:
            pos = seq.num_tokens
            self.pool.extend(seq, pos + 1)
            spans.append(Span(PagedKV(self.pool, seq), pos, 1))
        return self.model(self._ids(tokens, "tokens"), spans)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        """Serve ``prompts`` (lists of token ids) with greedy decoding.

        Prompts are prefilled one after another, each reusing the prefix cached by any earlier
        request (this batch's included, since each commits its prompt before the next starts),
        then decoded together, one token of every sequence a step. Every sequence is released at
        the end, its full prompt chunks staying cached. The pool must hold all of them at once.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise InvalidArgumentError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        seqs: list[Sequence] = []
        gens: list[Generation] = []
        try:
            for i, prompt in enumerate(prompts):
                prompt = [int(t) for t in prompt]
                self._ids(prompt, f"prompts[{i}]")
                t0 = time.perf_counter()
                seq = self.start(prompt)
                seqs.append(seq)
                first = int(self.prefill(seq, prompt).argmax())  # int() waits for the GPU
                ttft = time.perf_counter() - t0
                self.pool.commit(seq, prompt)
                gens.append(
                    Generation(prompt, [first], seq.cached_tokens, seq.gpu_hit_tokens, seq.lower_hit_tokens, ttft)
                )
            for _ in range(max_new_tokens - 1):
                nxt = self.decode(seqs, [g.tokens[-1] for g in gens]).argmax(-1).tolist()
                for g, tok in zip(gens, nxt):
                    g.tokens.append(tok)
        finally:
            for seq in seqs:
                self.pool.release(seq)
        return gens


# -- the reference: full recompute, no cache -----------------------------------------------------
class ReferenceOutput(NamedTuple):
    """What :func:`reference_generate` computed.

    prompt_logits ``[n, vocab]``; tokens: greedy new tokens; decode_logits
    ``[max_new_tokens - 1, vocab]`` (logits of each decode step); kv: every token's K/V.
    """

    prompt_logits: torch.Tensor
    tokens: list[int]
    decode_logits: torch.Tensor
    kv: ContiguousKV


def reference_generate(
    model: Llama, prompt: list[int], max_new_tokens: int, *, prefill_tokens: int | None = None
) -> ReferenceOutput:
    """Greedy generation with no cache: every token computed from scratch into contiguous K/V.

    ``prefill_tokens``: prefill step (aligned to its multiples, as :class:`Engine` steps); pass
    the engine's to run exactly the kernels a cache hit runs. ``None``: the prompt in one step.
    """
    n = len(prompt)
    ids = torch.as_tensor(prompt, dtype=torch.long, device=model.device)
    kv = ContiguousKV(model.config, n + max_new_tokens, dtype=model.dtype, device=model.device)
    logits, start = [], 0
    while start < n:
        end = n if prefill_tokens is None else min(n, (start // prefill_tokens + 1) * prefill_tokens)
        logits.append(model(ids[start:end], [Span(kv, start, end - start)], all_logits=True))
        start = end
    prompt_logits = torch.cat(logits)
    tokens, decode_logits = [int(prompt_logits[-1].argmax())], []
    for pos in range(n, n + max_new_tokens - 1):
        step = model(torch.tensor([tokens[-1]], device=model.device), [Span(kv, pos, 1)])
        decode_logits.append(step[0])
        tokens.append(int(step[0].argmax()))
    empty = torch.empty(0, model.config.vocab, device=model.device)
    return ReferenceOutput(prompt_logits, tokens, torch.stack(decode_logits) if decode_logits else empty, kv)
