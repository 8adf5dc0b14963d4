"""The torch expert forms (masked-dense, both layouts, and grouped) against a per-slot loop.

The Triton tests use ``torch_moe_lora_delta`` in float64 as their reference, so it is itself
checked here against the definition, written as plainly as possible.
"""

from __future__ import annotations

import pytest
import torch

from moe_hub.modeling import moe_lora_ops
from moe_hub.modeling.moe_lora_ops import torch_moe_lora_delta


def per_slot_loop(x, lora_A, lora_B, indices, weights, scale):
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros(lora_B.shape[-1], dtype=x.dtype)
        for j in range(indices.shape[1]):
            e = indices[t, j]
            row = row + weights[t, j] * ((x[t] @ lora_A[e]) @ lora_B[e])
        rows.append(row * scale)
    return torch.stack(rows)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,rank,form", [
    (1, 8, 2, 16, "masked-dense, A read in place"),
    (moe_lora_ops.BROADCAST_MAX_TOKENS, 4, 4, 8, "masked-dense, A read in place"),
    (moe_lora_ops.BROADCAST_MAX_TOKENS + 1, 8, 2, 12, "masked-dense, A concatenated"),
    (70, 6, 2, 96, "grouped"),
])
def test_forms_match_the_definition(num_tokens, num_experts, top_k, rank, form):
    generator = torch.Generator().manual_seed(num_tokens)
    d_in, d_out = 20, 13
    x = torch.randn(num_tokens, d_in, generator=generator, dtype=torch.float64)
    lora_A = torch.randn(num_experts, d_in, rank, generator=generator, dtype=torch.float64)
    lora_B = torch.randn(num_experts, rank, d_out, generator=generator, dtype=torch.float64)
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    indices = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, generator=generator, dtype=torch.float64) + 0.1
    grad = torch.randn(num_tokens, d_out, generator=generator, dtype=torch.float64)

    inputs = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    got = torch_moe_lora_delta(inputs[0], inputs[1], inputs[2], indices, inputs[3], 0.7)
    got.backward(grad)
    ref = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    want = per_slot_loop(ref[0], ref[1], ref[2], indices, ref[3], 0.7)
    want.backward(grad)

    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), form
    for name, mine, theirs in zip(("x", "A", "B", "weights"), inputs, ref):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-10, atol=1e-10), (form, name)
