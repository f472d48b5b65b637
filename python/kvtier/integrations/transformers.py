"""HF transformers integration: before a forward or ``generate`` of a causal LM, restore the
longest cached prefix of the prompt into a ``DynamicCache`` so that only the rest is computed;
after it, store the prompt's new full chunks in kvtier's tiers (CPU, disk, peers).

Example::

    import torch
    from transformers import AutoModelForCausalLM
    from kvtier.integrations.transformers import KVTierHF

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B", dtype=torch.bfloat16).cuda()
    kv = KVTierHF(model, cpu_bytes=8 << 30, max_tokens=8192)
    out = kv.generate(ids, max_new_tokens=64)      # ids [1, n]: a miss computes all n tokens
    out = kv.generate(ids2, max_new_tokens=64)     # shares a prefix: only the rest is computed
    logits, cache, cached = kv.forward_with_cache(ids2)  # logits of tokens [cached, n)

How bytes move. kvtier copies KV through a :class:`kvtier.Layout`, a snapshot of pointers, but a
``DynamicCache`` reallocates as it grows. So ``KVTierHF`` keeps a staging area on the model's
device, per layer a K and a V buffer ``[1, kv_heads, max_tokens, head_dim]``, described once with
``Layout.from_hf_cache`` (a page is ``page_tokens`` tokens of one head). A hit is loaded into the
staging area and the ``DynamicCache`` is built from its first tokens; after the forward, the K/V of
the new full chunks is copied from the ``DynamicCache`` into the staging area and stored. The
store runs asynchronously; the next call that writes the staging area waits for it first.

Exactness. Restored K/V is a byte copy of what the model computed when the chunk was stored, so
the logits are bit-identical to the model's own run that keeps that prefix in a ``DynamicCache``
and feeds the rest of the prompt. A single forward over the whole prompt multiplies matrices of
other shapes and can differ from both in the last bits (fp32: about 1e-7).

A prompt whose every token is cached still computes its last token, whose logits are needed: at
most ``n - 1`` tokens are restored. The ``DynamicCache`` handed to the model keeps every token
(no sliding-window layers), because storing a chunk needs all of its K/V; a sliding-window model
(Mistral) still attends within its window, since its mask is built by position.

Limits: batch size 1 (each row of a batch has its own chunk keys; call once per row), no
padding, the whole model on one device, inference only (runs under ``torch.no_grad``).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import uuid
from typing import Any, NamedTuple

import numpy as np
import torch

from kvtier.cache import KVCache, StoreFuture
from kvtier.errors import FailedPreconditionError, InvalidArgumentError, KVTierError
from kvtier.layout import Layout, _hf_layer_pairs

try:
    from transformers import DynamicCache
except ImportError as e:  # pragma: no cover - the package is optional
    raise ImportError("kvtier.integrations.transformers needs HF transformers: pip install transformers") from e

__all__ = ["CachedForward", "KVTierHF"]

log = logging.getLogger(__name__)

# Arguments KVTierHF sets itself: a caller's value would contradict the restored cache.
_FORWARD_RESERVED = ("cache", "past_key_values", "inputs_embeds", "position_ids", "cache_position", "use_cache")
_GENERATE_RESERVED = ("cache", "past_key_values", "inputs_embeds", "use_cache", "cache_implementation")


class CachedForward(NamedTuple):
    """What :meth:`KVTierHF.forward_with_cache` returns.

    Attributes:
        logits: ``[1, n - cached_tokens, vocab]``, the logits of the tokens computed (fewer rows
            if ``logits_to_keep`` was passed).
        cache: a ``DynamicCache`` holding all ``n`` prompt tokens' K/V, ready for decoding.
        cached_tokens: leading prompt tokens restored from kvtier instead of computed.
    """

    logits: torch.Tensor
    cache: Any
    cached_tokens: int


def _text_config(model):
    config = model.config
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:  # transformers versions whose get_text_config takes no argument
        return get()


def _kv_geometry(model) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder-only model, from its config."""
    cfg = _text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not layers or not heads:
        raise InvalidArgumentError(
            f"model: its config ({type(cfg).__name__}) names no num_hidden_layers / "
            "num_attention_heads; KVTierHF needs a decoder-only causal LM (Llama, Qwen2, ...)"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(layers), int(kv_heads), int(head_dim)


def _update_aliases_input() -> bool:
    """Whether this transformers' ``DynamicCache.update`` keeps the first tensor it is handed as
    is (older versions) instead of copying it (5.x concatenates onto an empty tensor)."""
    probe = torch.zeros(1, 1, 1, 1)
    keys, _ = DynamicCache().update(probe, probe, 0)
    return keys.data_ptr() == probe.data_ptr()


class KVTierHF:
    """kvtier for one HF transformers causal LM (Llama, Qwen2, Mistral, and their kin).

    Args:
        model: a ``PreTrainedModel`` with a causal-LM head, on one device (CPU or GPU).
        cpu_bytes: capacity of kvtier's CPU tier.
        disk_dir: directory of the disk tier (None: no disk tier); needs ``disk_bytes``.
        disk_bytes: capacity of the disk tier.
        max_tokens: longest prompt served; sizes the staging area (``2 * layers * kv_heads *
            max_tokens * head_dim`` elements on the model's device). Longer prompts raise
            ValueError.
        chunk_tokens: tokens per chunk, kvtier's caching unit (a multiple of ``page_tokens``).
        page_tokens: tokens per page of the staging layout.
        model_id: scopes chunk keys. Default: the checkpoint name (``config._name_or_path``), or a
            name unique to this instance for a model built from a config, whose weights nothing
            identifies. Pass one to share chunks across processes or restarts (disk, peers).
        dtype: dtype of the model's K/V (default ``model.dtype``; set it under autocast).
        **cache_options: any other :class:`kvtier.CacheConfig` field (``method``,
            ``tenant_salt``, ``disk_admit_min_seen``, ``timeout_s``, ...).

    Attributes:
        model: the model.
        cache: the :class:`kvtier.KVCache` (``cache.stats()`` tells which tier served what).
        layout: the staging area's :class:`kvtier.Layout`.
        max_tokens: as given.

    Thread-safe: calls are serialized (the staging area is shared).
    """

    def __init__(
        self,
        model,
        *,
        cpu_bytes: int = 1 << 30,
        disk_dir: str | None = None,
        disk_bytes: int = 0,
        max_tokens: int = 4096,
        chunk_tokens: int = 256,
        page_tokens: int = 16,
        model_id: str | None = None,
        dtype: torch.dtype | None = None,
        **cache_options,
    ) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise InvalidArgumentError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidArgumentError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens <= 0:
            raise InvalidArgumentError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
        layers, kv_heads, head_dim = _kv_geometry(model)
        device = model.device
        dtype = model.dtype if dtype is None else dtype
        if model_id is None:
            name = getattr(model.config, "_name_or_path", "")
            model_id = str(name) if name else f"{type(model).__name__}-{uuid.uuid4().hex}"

        self.model = model
        self.max_tokens = max_tokens
        self._layers = layers
        # Whole chunks, so that every chunk of a max_tokens prompt has its pages.
        capacity = math.ceil(max_tokens / chunk_tokens) * chunk_tokens
        self._staging = torch.zeros(layers, 2, 1, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.layout = Layout.from_hf_cache(
            [(self._staging[i, 0], self._staging[i, 1]) for i in range(layers)],
            page_tokens=page_tokens,
            chunk_tokens=chunk_tokens,
        )
        disk = {} if disk_dir is None else {"disk_dir": disk_dir, "disk_bytes": disk_bytes}
        self.cache = KVCache(self.layout, cpu_bytes=cpu_bytes, model_id=model_id, **disk, **cache_options)
        self._page_ids = np.arange(self.layout.num_pages, dtype=np.int64)
        self._has_disk = disk_dir is not None
        params = inspect.signature(model.forward).parameters
        # transformers 5.x names the cache argument `cache`; 4.x `past_key_values` (and also
        # wants `cache_position`).
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._takes_cache_position = "cache_position" in params
        self._clone_restored = _update_aliases_input()
        self._pending: StoreFuture | None = None
        self._lock = threading.Lock()
        self._counters = {
            "requests": 0,
            "prompt_tokens": 0,
            "cached_tokens": 0,
            "load_retries": 0,
            "store_retries": 0,
            "load_errors": 0,
        }

    # -- API -----------------------------------------------------------------------------------
    def forward_with_cache(self, input_ids, **forward_kwargs) -> CachedForward:
        """One forward over a prompt: restore its longest cached prefix, compute the rest,
        store its new full chunks.

        Args:
            input_ids: ``[1, n]`` integer token ids, ``n <= max_tokens``.
            **forward_kwargs: passed to ``model(...)`` (e.g. ``logits_to_keep=1``); an
                ``attention_mask`` must be all ones (no padding).

        Returns:
            :class:`CachedForward` ``(logits, cache, cached_tokens)``: logits of tokens
            ``[cached_tokens, n)`` and a ``DynamicCache`` holding all ``n`` tokens.

        Example::

            logits, cache, cached = kv.forward_with_cache(ids)
            next_id = logits[:, -1].argmax(-1, keepdim=True)
            out = model(next_id, cache=cache, use_cache=True)   # decode on as usual
        """
        tokens = self._check_input_ids(input_ids)
        self._check_kwargs(forward_kwargs, _FORWARD_RESERVED, input_ids, "forward_with_cache")
        input_ids = input_ids.to(self._staging.device)
        n = len(tokens)
        with self._lock, torch.no_grad():
            loaded, cache, restored = self._restore(tokens)
            positions = torch.arange(restored, n, device=input_ids.device).unsqueeze(0)
            kwargs = {self._cache_kwarg: cache, "use_cache": True, "position_ids": positions}
            if self._takes_cache_position:
                kwargs["cache_position"] = positions[0]
            out = self.model(input_ids=input_ids[:, restored:], **kwargs, **forward_kwargs)
            self._store_prompt(tokens, cache, loaded)
            self._count(n, restored)
        return CachedForward(out.logits, cache, restored)

    def generate(self, input_ids, **generate_kwargs):
        """``model.generate`` with the prompt's cached prefix restored first and its new full
        chunks stored after (generated tokens are not stored).

        Args:
            input_ids: ``[1, n]`` integer token ids, ``n <= max_tokens``.
            **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``,
                ...); not ``cache`` / ``past_key_values`` (KVTierHF supplies the cache).

        Returns:
            What ``model.generate`` returns (``[1, n + new]`` token ids by default).
        """
        tokens = self._check_input_ids(input_ids)
        self._check_kwargs(generate_kwargs, _GENERATE_RESERVED, input_ids, "generate")
        with self._lock, torch.no_grad():
            loaded, cache, restored = self._restore(tokens)
            generate_kwargs[self._cache_kwarg] = cache
            # The mask spans the whole prompt, so generate feeds only the tokens past the cache.
            generate_kwargs["attention_mask"] = torch.ones_like(input_ids)
            out = self.model.generate(input_ids, **generate_kwargs)
            self._store_prompt(tokens, cache, loaded)
            self._count(len(tokens), restored)
        return out

    def lookup(self, input_ids) -> int:
        """Leading tokens of ``input_ids`` ([1, n]) cached in any tier, a multiple of
        ``chunk_tokens``; loads nothing."""
        tokens = self._check_input_ids(input_ids)
        with self._lock:
            self._wait_pending()  # a store still in flight would make this a miss
            return self.cache.lookup(tokens)

    def stats(self) -> dict:
        """Request counters and the KVCache's own (under ``"cache"``).

        ``requests``, ``prompt_tokens``; ``cached_tokens``: restored instead of computed;
        ``load_retries`` / ``store_retries``: loads and stores the CPU tier cut short for lack of
        free blocks (its victims were being written to disk), retried once after they landed;
        ``load_errors``: loads whose copy failed (a read error, a peer gone mid-transfer): the
        prompt was computed instead.
        """
        with self._lock:
            return {**self._counters, "cache": self.cache.stats()}

    def drain(self, timeout_s: float | None = None) -> None:
        """Wait until every store, and the disk writes it caused, has finished."""
        with self._lock:
            self._wait_pending(timeout_s)
            self.cache.drain(timeout_s)

    def close(self) -> None:
        """Finish pending stores and release the KVCache (its CPU pool and disk file)."""
        with self._lock:
            self._wait_pending()
            self.cache.close()

    def __enter__(self) -> KVTierHF:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _check_input_ids(self, input_ids) -> np.ndarray:
        if not isinstance(input_ids, torch.Tensor):
            raise InvalidArgumentError(
                f"input_ids must be a torch tensor [1, seq] of token ids, got {type(input_ids).__name__}"
            )
        if input_ids.dim() != 2:
            raise InvalidArgumentError(f"input_ids must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise InvalidArgumentError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        batch, n = input_ids.shape
        if batch != 1:
            raise InvalidArgumentError(
                f"input_ids has batch size {batch}, but KVTierHF serves one sequence at a time "
                "(batch 1): each row's prefix has its own chunk keys; call it once per row"
            )
        if n == 0:
            raise InvalidArgumentError("input_ids is empty: need at least one token")
        if n > self.max_tokens:
            raise InvalidArgumentError(
                f"input_ids has {n} tokens, more than max_tokens={self.max_tokens}, the staging "
                "capacity this KVTierHF was built with; build it with a larger max_tokens"
            )
        return input_ids[0].detach().to("cpu", torch.int64).numpy()

    @staticmethod
    def _check_kwargs(kwargs: dict, reserved, input_ids, what: str) -> None:
        for name in reserved:
            if name in kwargs:
                raise InvalidArgumentError(
                    f"{what}: {name} is set by KVTierHF (it restores the cache itself); leave it out"
                )
        mask = kwargs.pop("attention_mask", None)
        if mask is None:
            return
        if tuple(mask.shape) != tuple(input_ids.shape) or not bool(mask.all()):
            raise InvalidArgumentError(
                f"{what}: attention_mask must be all ones of input_ids' shape "
                f"{tuple(input_ids.shape)} (padding is not supported)"
            )

    def _wait_pending(self, timeout_s: float | None = None) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait(timeout_s)

    def _restore(self, tokens: np.ndarray):
        """Load the cached prefix into the staging area and build a DynamicCache from it.

        Returns ``(loaded, cache, restored)``: tokens now valid in the staging area (whole
        chunks), the cache, and the tokens it holds (``min(loaded, n - 1)``: the last prompt
        token is always computed, for its logits).
        """
        self._wait_pending()  # the staging area is about to be overwritten
        loaded = self._load(tokens)
        full = len(tokens) // self.layout.chunk_tokens * self.layout.chunk_tokens
        if loaded < full and self._has_disk and self.cache.lookup(tokens) > loaded:
            # The CPU tier promotes disk chunks into free blocks only. When it is full of chunks
            # admitted to disk, the load's victims stay busy until their write-back lands, and
            # the load comes back short. Once they have landed, the blocks are free: one retry.
            self.cache.drain()
            loaded = self._load(tokens)
            self._counters["load_retries"] += 1
        restored = min(loaded, len(tokens) - 1)
        cache = DynamicCache()
        for i in range(self._layers if restored else 0):
            k = self._staging[i, 0, :, :, :restored]
            v = self._staging[i, 1, :, :, :restored]
            if self._clone_restored:  # the next request overwrites the staging area
                k, v = k.clone(), v.clone()
            cache.update(k, v, i)
        return loaded, cache, restored

    def _load(self, tokens: np.ndarray) -> int:
        """Load the cached prefix into the staging area; the tokens now valid there. A load whose
        copy fails is a miss: nothing in the staging area counts as loaded, so the prompt is
        computed and the store takes every chunk from the computed K/V, none from the staging
        area's leftovers. Bad tokens raise from ``cache.load``, before any copy."""
        handle = self.cache.load(tokens, self._page_ids)
        try:
            return handle.wait()
        except KVTierError as e:
            self._counters["load_errors"] += 1
            if not handle.done():  # past its deadline: the copy may still write the staging area
                self.cache.drain()  # raises if it does not end: the staging area is not reused
            log.warning("kvtier: a load failed, computing the prompt instead: %s", e)
            return 0

    def _store_prompt(self, tokens: np.ndarray, cache, loaded: int) -> None:
        """Copy the K/V of the prompt's full chunks past ``loaded`` into the staging area and
        store them (asynchronously; waited for before the staging area is written again)."""
        ct = self.layout.chunk_tokens
        end = len(tokens) // ct * ct
        if end <= loaded:
            return  # nothing new; a store would count this request twice for disk admission
        pairs = _hf_layer_pairs(cache)
        if len(pairs) != self._layers:
            raise FailedPreconditionError(
                f"the model's cache has {len(pairs)} layers, but its config says {self._layers}"
            )
        for i, (k, v) in enumerate(pairs):
            dst = self._staging[i, :, 0, :, loaded:end]  # [2, kv_heads, tokens, head_dim]
            if (
                k.dim() != 4
                or k.shape[1:2] + k.shape[3:] != dst.shape[1:2] + dst.shape[3:]
                or k.shape[2] < end
                or k.dtype != dst.dtype
            ):
                raise FailedPreconditionError(
                    f"layer {i}: the model's K/V is {tuple(k.shape)} {k.dtype}, but KVTierHF "
                    f"expected [1, {dst.shape[1]}, >={end}, {dst.shape[3]}] {dst.dtype} (from the "
                    "model's config and dtype; pass dtype= if the K/V dtype differs)"
                )
            dst[0].copy_(k[0, :, loaded:end])
            dst[1].copy_(v[0, :, loaded:end])
        pending = self.cache.store(tokens[:end], self._page_ids)
        if pending.skipped_full:
            # No free block: the victims are still being written to disk (see _restore). Wait
            # for the write-backs, then store what was refused; cached chunks are skipped.
            pending.wait()
            self.cache.drain()
            pending = self.cache.store(tokens[:end], self._page_ids)
            self._counters["store_retries"] += 1
        self._pending = pending

    def _count(self, prompt_tokens: int, restored: int) -> None:
        self._counters["requests"] += 1
        self._counters["prompt_tokens"] += prompt_tokens
        self._counters["cached_tokens"] += restored
