"""The packed shrink weight of a routed linear, and the decode path that reads it in one matmul.

Storage: every expert's A and, when the router's logits are a plain ``x W^T``
(``Router.logits_weight``), the router weight live in ONE tensor P [d_in, E*r + E]:
    P[:, e*r:(e+1)*r] = A_e        P[:, E*r:] = W^T
The parameters ``lora_A`` [E, d_in, r] and ``router.weight`` [E, d_in] keep their names, shapes
and values (checkpoints are unchanged) but are strided views into P, so nothing is stored twice
and ``x P`` yields every expert's rank-r values and the router logits in one pass over x.
Training updates the views in place (the optimizer, the Triton kernels and the torch op read
any strides); P is re-established after anything that replaces a parameter's tensor (loading,
``.to()``): see ``MoELoraLinear.pack_shrink``. A module whose parameters are not packed (or whose
router and A differ in dtype) simply takes the generic path.

Decode path (no autograd): h = x P; logits = h[:, E*r:] -> top-k -> gate [T, E] (zeros except the
chosen experts' weights); y = base(x) + scale * (h[:, :E*r] * gate, in rank space) B_cat, the
expand fused with the add into the base output. With fewer (token, slot) pairs than experts
(one sequence decoding) reading every expert's A and B costs more than the product itself: the
logits come first (x W^T, the router columns of P) and only the chosen experts' A and B are read
(``gathered_expand``).

Training keeps the generic op (``moe_lora_ops``) on the same storage: under autocast the experts'
operands are 16-bit while router logits must be float32, so one matmul cannot serve both without
computing every shrink in float32; and as a view of ``lora_A``, P would send the router columns'
gradient nowhere.
"""

from __future__ import annotations

import torch
from torch import nn


def pack_shrink(lora_A: nn.Parameter, router_weight: nn.Parameter | None) -> int:
    """Make ``lora_A`` (and ``router_weight`` when it can share it: same dtype and device) views
    of one [d_in, E*r (+E)] tensor, keeping their values; returns that tensor's width."""
    experts, d_in, rank = lora_A.shape
    fuse = (router_weight is not None and router_weight.dtype == lora_A.dtype
            and router_weight.device == lora_A.device
            and tuple(router_weight.shape) == (experts, d_in))
    width = experts * rank + (experts if fuse else 0)
    if packed_width(lora_A, router_weight if fuse else None, width):
        return width
    packed = torch.empty(d_in, width, dtype=lora_A.dtype, device=lora_A.device)
    a_view = packed[:, : experts * rank].view(d_in, experts, rank).permute(1, 0, 2)
    with torch.no_grad():
        if not lora_A.is_meta:
            a_view.copy_(lora_A)
        lora_A.data = a_view
        if fuse:
            w_view = packed[:, experts * rank:].t()
            if not router_weight.is_meta:
                w_view.copy_(router_weight)
            router_weight.data = w_view
    return width


def packed_width(lora_A: torch.Tensor, router_weight: torch.Tensor | None, width: int) -> bool:
    """Whether ``lora_A`` (and ``router_weight``) are still the views ``pack_shrink`` made."""
    experts, _, rank = lora_A.shape
    if lora_A.stride() != (rank, width, 1):
        return False
    if router_weight is None:
        return width == experts * rank
    if width != experts * (rank + 1) or router_weight.stride() != (1, width):
        return False
    if torch.compiler.is_compiling():
        # Strides are guarded; offsets and storages cannot be read in a graph. Only
        # pack_shrink makes these strides, and it makes them together.
        return True
    return (router_weight.storage_offset() == lora_A.storage_offset() + experts * rank
            and lora_A.untyped_storage().data_ptr() == router_weight.untyped_storage().data_ptr())


def packed_weight(lora_A: torch.Tensor, width: int) -> torch.Tensor:
    """P [d_in, width] as a view over ``lora_A``'s storage (only for packed parameters, and
    only outside autograd: as a view of ``lora_A`` it would send the router columns' gradient
    nowhere)."""
    return lora_A.as_strided((lora_A.shape[1], width), (width, 1))


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


def gathered_expand(result: torch.Tensor | None, x: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """``result`` [T, d_out] + scale * sum_j w_j (x_t A_{e_j}) B_{e_j}, reading only the chosen
    experts' A and B (k of E per token): for T * k < E, where the expert op is bound by the
    adapter bytes it reads. ``result`` None: the experts' part alone, in ``x``'s dtype."""
    tokens, top_k = indices.shape
    _, d_in, rank = lora_A.shape
    # index_select copies whole expert slices (advanced indexing is several times slower).
    chosen = indices.reshape(-1)
    chosen_A = lora_A.index_select(0, chosen).to(x.dtype).view(tokens, top_k, d_in, rank)
    chosen_B = lora_B.index_select(0, chosen).to(x.dtype)  # [T * k, r, d_out]
    shrunk = x.view(tokens, 1, 1, d_in) @ chosen_A  # [T, k, 1, r]
    gated = (shrunk * (weights * scale).to(x.dtype).view(tokens, top_k, 1, 1)).view(
        tokens, 1, top_k * rank)
    expanded = chosen_B.view(tokens, top_k * rank, -1)
    if result is None:
        return (gated @ expanded).view(tokens, -1)
    if result.dtype == x.dtype:
        return torch.baddbmm(result.view(tokens, 1, -1), gated, expanded).view(tokens, -1)
    return result + (gated @ expanded).view(tokens, -1).to(result.dtype)
