"""Reference inference code built on kvtier (needs torch): ``paged_llama`` is a compact
Llama-style decoder and engine whose attention reads and writes K/V through a PagedKVPool."""

from __future__ import annotations

from kvtier.examples.paged_llama import (
    ContiguousKV,
    Engine,
    Generation,
    Llama,
    LlamaConfig,
    PagedKV,
    Span,
    reference_generate,
)

__all__ = [
    "ContiguousKV",
    "Engine",
    "Generation",
    "Llama",
    "LlamaConfig",
    "PagedKV",
    "Span",
    "reference_generate",
]
