"""The expert computation of a MoE-LoRA site, in plain torch, and the dispatch to Triton.

For token t and slot j: e = indices[t, j], w = weights[t, j],
    delta_t = scale * sum_j w * (x_t A_e) B_e        A: [E, d_in, r], B: [E, r, d_out].

Two torch forms (see KERNELS.md in the project docs for the cost model):
- masked-dense, for small E * r (the default 8 x 16 = 128): every expert's rank-r values in one
  matmul x [A_1 | ... | A_E], gated in rank space (unselected experts get weight 0), then one
  matmul back. No sorting, fixed shapes, the extra FLOPs are free because the op is memory-bound.
- grouped, for large E * r where masked-dense turns compute-bound: (token, slot) pairs sorted by
  expert once, one GEMM pair per expert over only its rows.
Both are differentiable by autograd (x, A, B and the routing weights); the Triton kernels in
``moe_lora_triton`` implement the same signature with hand-written backward.
"""

from __future__ import annotations

import torch

# The kernel file always ships (and imports triton only if it can), so one of these succeeds.
try:  # inside a checkpoint the kernel file sits beside this one
    from .moe_lora_triton import group_by_expert, triton_moe_lora_delta, triton_supported
except ImportError:  # inside the moe_hub library it is moe_hub.kernels
    from moe_hub.kernels.moe_lora_triton import (
        group_by_expert,
        triton_moe_lora_delta,
        triton_supported,
    )


#: Above this many rank-space columns (E * r) the grouped form beats masked-dense.
MASKED_DENSE_MAX_COLUMNS = 512
#: Up to this many tokens (decoding) masked-dense multiplies by A in its stored [E, d_in, r]
#: layout; above, one copy to [d_in, E * r] per call is cheaper than E narrow matmuls (CPU,
#: d_in 576, E 8, r 16: 47 vs 64 us at T=1, 1.9 vs 1.8 ms at T=512).
BROADCAST_MAX_TOKENS = 64


def moe_lora_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    kernel: str = "auto",
    grouping: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert output [T, d_out] for tokens ``x`` [T, d_in] routed by ``indices``/``weights`` [T, k].

    ``kernel``: ``auto`` uses Triton on CUDA tensors when it is installed, ``triton`` insists on
    it, ``torch`` forces the reference path. ``grouping``: ``group_by_expert(indices, E)``, for
    callers that apply one routing decision to several sites (computed here when needed).
    """
    if kernel == "triton" or (kernel == "auto" and triton_supported(x)):
        return triton_moe_lora_delta(x, lora_A, lora_B, indices, weights, scale, grouping)
    return torch_moe_lora_delta(x, lora_A, lora_B, indices, weights, scale, grouping)


def needs_grouping(num_experts: int, rank: int) -> bool:
    """Whether the expert op sorts tokens by expert at this size (else it is masked-dense)."""
    return num_experts * rank > MASKED_DENSE_MAX_COLUMNS


def torch_moe_lora_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    grouping: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference implementation (any device, any dtype, autograd for every input)."""
    num_experts, _, rank = lora_A.shape
    if not needs_grouping(num_experts, rank):
        return masked_dense_delta(x, lora_A, lora_B, indices, weights, scale)
    if grouping is None:
        grouping = group_by_expert(indices, num_experts)
    return grouped_delta(x, lora_A, lora_B, indices, weights, scale, grouping)


def masked_dense_delta(x, lora_A, lora_B, indices, weights, scale):
    num_tokens = x.shape[0]
    num_experts, d_in, rank = lora_A.shape
    gate = weights.new_zeros(num_tokens, num_experts).scatter_(1, indices, weights * scale)
    gate = gate.to(x.dtype).unsqueeze(-1)
    if num_tokens <= BROADCAST_MAX_TOKENS:
        # x [T, d_in] @ A [E, d_in, r] as one batched matmul, reading A in place.
        gated = torch.matmul(x, lora_A).transpose(0, 1) * gate
    else:
        a_cat = lora_A.permute(1, 0, 2).reshape(d_in, num_experts * rank)
        gated = (x @ a_cat).view(num_tokens, num_experts, rank) * gate
    return gated.reshape(num_tokens, -1) @ lora_B.reshape(num_experts * rank, -1)


def grouped_delta(x, lora_A, lora_B, indices, weights, scale, grouping):
    num_tokens, top_k = indices.shape
    num_experts = lora_A.shape[0]
    order, counts = grouping[:-num_experts], grouping[-num_experts:].tolist()
    token_of_slot = order // top_k
    slot_weight = weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
    out = x.new_zeros(num_tokens, lora_B.shape[-1])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of_slot[start : start + count]
        contribution = ((x[rows] @ lora_A[expert]) * slot_weight[start : start + count]) @ lora_B[
            expert
        ]
        out = out.index_add(0, rows, contribution)
        start += count
    return out * scale
