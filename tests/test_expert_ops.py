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


def per_slot_reference(x, lora_A, lora_B, indices, weights, scale, slot_rows, per_slot):
    """The definition, one (token, slot) pair at a time."""
    num_tokens, top_k = indices.shape
    out = torch.zeros(num_tokens * top_k if per_slot else num_tokens, lora_B.shape[-1],
                      dtype=x.dtype)
    rows = []
    for t in range(num_tokens):
        for j in range(top_k):
            slot, e = t * top_k + j, indices[t, j]
            w = 1.0 if weights is None else weights[t, j]
            rows.append((slot if per_slot else t,
                         w * scale * (x[slot if slot_rows else t] @ lora_A[e]) @ lora_B[e]))
    for row, value in rows:
        out = out.index_add(0, torch.tensor([row]), value.unsqueeze(0))
    return out


@pytest.mark.parametrize("slot_rows,per_slot,weighted", [
    (False, True, False),  # a block's gate/up: x rows per token, one output per slot
    (True, False, True),  # a block's down: per-slot rows, weighted sum per token
    (False, False, True),  # a routed linear's grouped form
])
@pytest.mark.parametrize("num_experts,top_k,experts", [(6, 2, None), (5, 3, [0, 4, 2])])
def test_grouped_slots_match_the_definition(slot_rows, per_slot, weighted, num_experts, top_k,
                                            experts):
    generator = torch.Generator().manual_seed(top_k)
    num_tokens, d_in, d_out, rank = 11, 14, 9, 4
    pool = torch.tensor(experts if experts else range(num_experts))
    indices = torch.stack([pool[torch.randperm(len(pool), generator=generator)[:top_k]]
                           for _ in range(num_tokens)])  # experts 1 and 3 may get no slot
    rows = num_tokens * top_k if slot_rows else num_tokens
    leaves = [
        torch.randn(rows, d_in, generator=generator, dtype=torch.float64),
        torch.randn(num_experts, d_in, rank, generator=generator, dtype=torch.float64),
        torch.randn(num_experts, rank, d_out, generator=generator, dtype=torch.float64),
        torch.rand(num_tokens, top_k, generator=generator, dtype=torch.float64) + 0.1,
    ]
    grad = torch.randn(num_tokens * top_k if per_slot else num_tokens, d_out,
                       generator=generator, dtype=torch.float64)
    results = []
    for run in ("grouped", "reference"):
        inputs = [t.clone().requires_grad_() for t in leaves]
        weights = inputs[3] if weighted else None
        if run == "grouped":
            grouping = moe_lora_ops.group_by_expert(indices, num_experts)
            out = moe_lora_ops.grouped_slots_delta(
                inputs[0], inputs[1], inputs[2], grouping, weights, top_k, 0.6,
                rows="slot" if slot_rows else "token", per_slot=per_slot)
        else:
            out = per_slot_reference(inputs[0], inputs[1], inputs[2], indices, weights, 0.6,
                                     slot_rows, per_slot)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in inputs[:3 + weighted]])
    for name, got, want in zip(("out", "x", "A", "B", "weights"), *results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
