"""vLLM's per-layer KV tensors described as a kvtier :class:`Layout` (one page per vLLM kernel
block), so that kvtier copies chunks straight into and out of them."""

from __future__ import annotations

import torch

from kvtier.errors import InvalidArgumentError
from kvtier.layout import Layout, Segment, Shard

__all__ = ["describe_kv_caches"]


def describe_kv_caches(
    kv_caches: dict[str, torch.Tensor],
    block_size: int,
    chunk_tokens: int,
    shard: Shard | None = None,
    group: str = "",
) -> tuple[Layout, dict[str, int]]:
    """A :class:`Layout` of vLLM's per-layer KV views and the layer index of each layer name.

    vLLM (>= 0.32) hands every layer's cache as a ``[B, H, N, C]`` view (B kernel blocks of N
    tokens, H KV heads, C = K and V of one head, or the latent for MLA) whose strides follow its
    ``KVCacheLayout``. When one block's ``[H, N, C]`` is one dense range (LBHNC, LBNHC, BLHNC,
    ...), a layer is one segment and a page is a kernel block; when heads are outermost (LHBNC),
    a layer is one segment per head. Layers that share one cache (KV sharing) count once.
    ``shard``: the worker's part of a model split by tensor / pipeline parallel (its heads or
    its layers), which the layout's fingerprint then names. ``group``: a hybrid model's KV cache
    group (its index and attention kind), named in the layout's kind so groups never share blobs.
    """
    tensors: list[torch.Tensor] = []
    index: dict[str, int] = {}
    seen: dict[tuple, int] = {}
    for name, t in kv_caches.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InvalidArgumentError(
                f"kv_caches[{name!r}]: expected vLLM's [blocks, heads, block_tokens, content] view, "
                f"got {type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}"
            )
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if ident not in seen:
            seen[ident] = len(tensors)
            tensors.append(t)
        index[name] = seen[ident]
    if not tensors:
        raise InvalidArgumentError("kv_caches is empty: the model has no attention layer")
    t0 = tensors[0]
    for name, i in index.items():
        t = tensors[i]
        if t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
            raise InvalidArgumentError(
                f"kv_caches[{name!r}] is {tuple(t.shape)} {t.dtype} on {t.device}, but the first "
                f"layer is {tuple(t0.shape)} {t0.dtype} on {t0.device}"
            )
    blocks, heads, page_tokens, content = (int(d) for d in t0.shape)
    if block_size % page_tokens:
        raise InvalidArgumentError(
            f"vLLM's block_size ({block_size}) is not a multiple of the kernel block ({page_tokens})"
        )
    esize = t0.element_size()
    dims = sorted((1, 2, 3), key=lambda d: (t0.stride(d), d))
    expect, dense = 1, True
    for d in dims:
        if t0.shape[d] != 1 and t0.stride(d) != expect:
            dense = False
        expect *= t0.shape[d]
    segments = []
    if dense:  # one dense page per kernel block
        order = "".join("HNC"[d - 1] for d in reversed(dims))
        page_shape = tuple(int(t0.shape[d]) for d in reversed(dims))
        for i, t in enumerate(tensors):
            segments.append(
                Segment(
                    t.data_ptr(),
                    t.stride(0) * esize,
                    heads * page_tokens * content * esize,
                    blocks,
                    f"layer{i}",
                )
            )
        per_layer = 1
    elif t0.stride(3) == 1 and t0.stride(2) == content:  # heads outermost: a page per head
        order = "H|NC"
        page_shape = (page_tokens, content)
        for i, t in enumerate(tensors):
            for h in range(heads):
                segments.append(
                    Segment(
                        t.data_ptr() + h * t.stride(1) * esize,
                        t.stride(0) * esize,
                        page_tokens * content * esize,
                        blocks,
                        f"layer{i}.head{h}",
                    )
                )
        per_layer = heads
    else:
        raise InvalidArgumentError(
            f"kv_caches: a block's bytes are scattered (shape {tuple(t0.shape)}, strides "
            f"{tuple(t0.stride())}); kvtier needs each block, or each head of a block, contiguous"
        )
    layout = Layout.from_segments(
        segments,
        page_tokens=page_tokens,
        chunk_tokens=chunk_tokens,
        dtype=str(t0.dtype).removeprefix("torch."),
        element_size=esize,
        page_shape=page_shape,
        num_layers=len(tensors),
        layer_segments=[tuple(range(i * per_layer, (i + 1) * per_layer)) for i in range(len(tensors))],
        kind=f"vllm_{order}" + (f"_{group}" if group else ""),
        device=str(t0.device),
        tensors=tensors,
        shard=shard,
    )
    return layout, index
