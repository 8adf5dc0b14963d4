"""The packed shrink weight of a routed linear, and the decode path that reads it in one matmul.

Storage: every expert's A and, when the router's logits are a plain ``x W^T``
(``Router.logits_weight``), the router weight live in ONE row-major tensor S [E*r + E, d_in],
laid out like an ``nn.Linear`` weight:
    S[e*r:(e+1)*r] = A_e^T        S[E*r:] = W
so ``F.linear(x, S)`` yields every expert's rank-r values and the router logits in one pass over x.
The parameters ``lora_A`` [E, d_in, r] and ``router.weight`` [E, d_in] keep their names, shapes
and values (checkpoints are unchanged) but are views into S, and each is DENSE: ``router.weight``
is a contiguous block, ``lora_A`` a transposed contiguous block (strides (r*d_in, 1, d_in)).
Density matters: fused optimizers (transformers' default ``adamw_torch_fused``) update a
parameter as one flat run of memory, which is right for any dense layout (gradients and
optimizer states take the parameter's strides) and wrong for a view with gaps, whose flat run
would cover its neighbours' elements. The torch op, autograd and the Triton kernels read any
strides. S is re-established after anything that replaces a parameter's tensor (loading,
``.to()``): see ``MoELoraLinear.pack_shrink``. A module whose parameters are not packed (or whose
router and A differ in dtype) simply takes the generic path.

Decode path (no autograd): h = x S^T; logits = h[:, E*r:] -> top-k -> gate [T, E] (zeros except
the chosen experts' weights); y = base(x) + scale * (h[:, :E*r] * gate, in rank space) B_cat, the
expand fused with the add into the base output. With fewer (token, slot) pairs than experts
(one sequence decoding) reading every expert's A and B costs more than the product itself: the
logits come first (x W^T, the router rows of S) and only the chosen experts' A and B are read
(``gathered_expand``).

Training keeps the generic op (``moe_lora_ops``) on the same storage: under autocast the experts'
operands are 16-bit while router logits must be float32, so one matmul cannot serve both without
computing every shrink in float32; and as a view of ``lora_A``, S would send the router rows'
gradient nowhere.
"""

from __future__ import annotations

import torch
from torch import nn


def pack_shrink(lora_A: nn.Parameter, router_weight: nn.Parameter | None) -> int:
    """Make ``lora_A`` (and ``router_weight`` when it can share it: same dtype and device) views
    of one [E*r (+E), d_in] tensor, keeping their values; returns that tensor's row count, 0
    when ``lora_A`` is not a whole [E, d_in, r] tensor here (a sharding wrapper such as
    DeepSpeed ZeRO-3 or FSDP holds an empty placeholder: the generic path serves it)."""
    if lora_A.dim() != 3 or lora_A.numel() == 0:
        return 0
    experts, d_in, rank = lora_A.shape
    fuse = (router_weight is not None and router_weight.dtype == lora_A.dtype
            and router_weight.device == lora_A.device
            and tuple(router_weight.shape) == (experts, d_in))
    rows = experts * rank + (experts if fuse else 0)
    if packed_rows(lora_A, router_weight if fuse else None, rows):
        return rows
    packed = torch.empty(rows, d_in, dtype=lora_A.dtype, device=lora_A.device)
    a_view = packed[: experts * rank].view(experts, rank, d_in).transpose(1, 2)
    with torch.no_grad():
        if not lora_A.is_meta:
            a_view.copy_(lora_A)
        lora_A.data = a_view
        if fuse:
            w_view = packed[experts * rank:]
            if not router_weight.is_meta:
                w_view.copy_(router_weight)
            router_weight.data = w_view
    return rows


def packed_rows(lora_A: torch.Tensor, router_weight: torch.Tensor | None, rows: int) -> bool:
    """Whether ``lora_A`` (and ``router_weight``) are still the views ``pack_shrink`` made."""
    if rows == 0 or lora_A.dim() != 3:
        return False
    experts, d_in, rank = lora_A.shape
    if lora_A.stride() != (rank * d_in, 1, d_in):
        return False
    if router_weight is None:
        return rows == experts * rank
    if rows != experts * (rank + 1) or router_weight.stride() != (d_in, 1):
        return False
    if torch.compiler.is_compiling():
        # Strides are guarded; offsets and storages cannot be read in a graph. Only
        # pack_shrink makes these strides, and it makes them together.
        return True
    return (router_weight.storage_offset() == lora_A.storage_offset() + experts * rank * d_in
            and lora_A.untyped_storage().data_ptr() == router_weight.untyped_storage().data_ptr())


def packed_weight(lora_A: torch.Tensor, rows: int) -> torch.Tensor:
    """S [rows, d_in] as a view over ``lora_A``'s storage (only for packed parameters, and
    only outside autograd: as a view of ``lora_A`` it would send the router rows' gradient
    nowhere)."""
    d_in = lora_A.shape[1]
    return lora_A.as_strided((rows, d_in), (d_in, 1))


def gated_expand(result: torch.Tensor | None, shrunk: torch.Tensor, lora_B: torch.Tensor,
                 indices: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """``result`` [T, d_out] + scale * sum_j w_j (x A_{e_j}) B_{e_j}, with every expert's rank-r
    values ``shrunk`` [T, E*r] given: gated in rank space, then one matmul, fused with the add
    when the dtypes allow. ``result`` None: the experts' part alone, in ``lora_B``'s dtype."""
    tokens = shrunk.shape[0]
    experts, rank, d_out = lora_B.shape
    gate = shrunk.new_zeros(tokens, experts).scatter_(1, indices, weights.to(shrunk.dtype))
    gated = (shrunk.view(tokens, experts, rank) * gate.unsqueeze(-1)).view(tokens, -1)
    b_cat = lora_B.reshape(experts * rank, d_out)
    if result is None:
        return (gated.to(b_cat.dtype) @ b_cat) * scale
    if gated.dtype == b_cat.dtype == result.dtype:
        return torch.addmm(result, gated, b_cat, alpha=scale)
    return result + ((gated.to(b_cat.dtype) @ b_cat) * scale).to(result.dtype)


def gathered_expand(result: torch.Tensor | None, x: torch.Tensor, a_rows: torch.Tensor,
                    lora_B: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """``result`` [T, d_out] + scale * sum_j w_j (x_t A_{e_j}) B_{e_j}, reading only the chosen
    experts' A and B (k of E per token): for T * k < E, where the expert op is bound by the
    adapter bytes it reads. ``a_rows`` [E, r, d_in] is A transposed (S's first E*r rows).
    ``result`` None: the experts' part alone, in ``x``'s dtype."""
    tokens, top_k = indices.shape
    _, rank, d_in = a_rows.shape
    # index_select copies whole expert slices (advanced indexing is several times slower).
    chosen = indices.reshape(-1)
    chosen_A = a_rows.index_select(0, chosen).to(x.dtype).view(tokens, top_k * rank, d_in)
    chosen_B = lora_B.index_select(0, chosen).to(x.dtype)  # [T * k, r, d_out]
    shrunk = x.view(tokens, 1, d_in) @ chosen_A.transpose(1, 2)  # [T, 1, k * r]
    gates = (weights * scale).to(x.dtype).repeat_interleave(rank, dim=1)  # [T, k * r]
    gated = shrunk * gates.view(tokens, 1, top_k * rank)
    expanded = chosen_B.view(tokens, top_k * rank, -1)
    if result is None:
        return (gated @ expanded).view(tokens, -1)
    if result.dtype == x.dtype:
        return torch.baddbmm(result.view(tokens, 1, -1), gated, expanded).view(tokens, -1)
    return result + (gated @ expanded).view(tokens, -1).to(result.dtype)
