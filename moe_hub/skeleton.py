"""A model's module tree without storage: names, shapes and dtypes for planning, no weights."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from .modeling import MoELoraConfig, MoELoraForCausalLM


def _no_init() -> AbstractContextManager:
    # Initialising meta tensors computes nothing but still dispatches every init op through
    # torch's reference decompositions: ~1 ms per tensor, a third of a small model's conversion.
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: correct, only slower
        return nullcontext()
    return no_init_weights()


def model_skeleton(config: MoELoraConfig) -> MoELoraForCausalLM:
    """``MoELoraForCausalLM(config)`` on the meta device, its initialisers skipped."""
    with torch.device("meta"), _no_init():
        return MoELoraForCausalLM(config)
