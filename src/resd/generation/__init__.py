"""Sampling continuations: the transformers backend, the optional vLLM engine, and JSON-schema
constrained replies (structured output). `base.Sampler` is the interface both backends
implement."""

from resd.generation.base import Generation, Sampler, cut_at_eos, cut_at_stop

__all__ = ["Generation", "Sampler", "cut_at_eos", "cut_at_stop"]
