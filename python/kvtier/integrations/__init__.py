"""Integrations of kvtier with inference frameworks; each module imports its framework lazily
(``kvtier.integrations.transformers`` needs HF transformers)."""
