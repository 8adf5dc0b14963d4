"""The expert computation of a MoE-LoRA site, in plain torch, and the dispatch to Triton.

For token t and slot j: e = indices[t, j], w = weights[t, j],
    delta_t = scale * sum_j w * (x_t A_e) B_e        A: [E, d_in, r], B: [E, r, d_out].

Two torch forms (the op is memory-bound: README, "Benchmarks", has the measured costs):
- masked-dense, for small E * r (the default 8 x 16 = 128): every expert's rank-r values in one
  matmul x [A_1 | ... | A_E], gated in rank space (unselected experts get weight 0), then one
  matmul back. No sorting, fixed shapes, the extra FLOPs are free because the op is memory-bound.
- grouped, for large E * r where masked-dense turns compute-bound: (token, slot) pairs sorted by
  expert once, one GEMM pair per expert over only its rows.
Both are differentiable by autograd (x, A, B and the routing weights); the Triton kernels in
``moe_lora_triton`` implement the same signature with hand-written backward.

Precision: the master adapters are fp32 (finetune makes them so); the op computes with 16-bit
operands when there is a 16-bit dtype to use (the autocast dtype, else a 16-bit x's own dtype),
casting A and B once per call, with fp32 accumulation (CPU and CUDA matmuls, the Triton kernels),
and returns the gradients of A and B in their master dtype. It keeps x for backward in that
16-bit dtype: the very tensor the base linear keeps, or one cast shared by every site that reads
the same x (``shared_cast``). Autocast does not reach into a custom op, so the casts are explicit
here and the op runs with autocast off.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .routing import without_autocast

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


HALF_DTYPES = (torch.float16, torch.bfloat16)


def expert_compute_dtype(x: torch.Tensor, master_dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of the expert op: the autocast dtype inside an autocast region (for
    fp32/16-bit x), else x's own dtype when it is 16-bit (the base computes in it), else the
    adapters' dtype."""
    device = x.device.type
    if x.dtype in (torch.float32, *HALF_DTYPES) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype if x.dtype in HALF_DTYPES else master_dtype


# Per thread, x -> {(dtype, version): cast}, keyed weakly by the tensor's identity: an entry
# lives as long as its source tensor, and the cast holds no reference back to it. A thread's
# sites share casts among themselves only, so no thread reads or mutates another's mapping.
_CASTS = threading.local()


def shared_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, one copy per input tensor where autograd keeps it: q/k/v (and gate/up)
    read the same hidden states, and each site's op keeps its operand for backward, so per-site
    casts would keep three copies of x."""
    if x.dtype == dtype:
        return x
    # Without autograd nothing is kept, so sharing would save only a cast, and inference
    # tensors (``torch.inference_mode``) have no version counter to key a cast on. The compiler
    # dedupes the casts itself.
    if not torch.is_grad_enabled() or x.is_inference() or torch.compiler.is_compiling():
        return x.to(dtype)
    casts = getattr(_CASTS, "by_tensor", None)
    if casts is None:
        casts = _CASTS.by_tensor = WeakIdKeyDictionary()
    key = (dtype, x._version)
    entry = casts.get(x)
    if entry is None or key not in entry:
        entry = {key: x.to(dtype)}  # older versions of x are stale: drop them
        casts[x] = entry
    return entry[key]


def moe_lora_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    kernel: str = "auto",
) -> torch.Tensor:
    """Expert output [T, d_out] for tokens ``x`` [T, d_in] routed by ``indices``/``weights`` [T, k].

    ``kernel``: ``auto`` uses Triton on CUDA tensors when it is installed, ``triton`` insists on
    it, ``torch`` forces the reference path.
    The result is in the compute dtype (``expert_compute_dtype``); gradients of ``lora_A`` /
    ``lora_B`` come back in their own (master) dtype.
    """
    dtype = expert_compute_dtype(x, lora_A.dtype)
    x = shared_cast(x, dtype)
    with without_autocast(x.device):
        if kernel == "triton" or (kernel == "auto" and triton_supported(x)):
            # The op casts the masters once per call and returns their gradients in fp32.
            return triton_moe_lora_delta(x, lora_A, lora_B, indices, weights, scale)
        return torch_moe_lora_delta(x, lora_A.to(dtype), lora_B.to(dtype), indices, weights,
                                    scale)


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
) -> torch.Tensor:
    """The reference implementation (any device, any dtype, autograd for every input)."""
    num_experts, _, rank = lora_A.shape
    if not needs_grouping(num_experts, rank):
        return masked_dense_delta(x, lora_A, lora_B, indices, weights, scale)
    return grouped_slots_delta(x, lora_A, lora_B, group_by_expert(indices, num_experts), weights,
                               indices.shape[1], scale)


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


def decoding_regime(tokens: int, kernel: str) -> bool:
    """Whether a block's expert op takes the masked-dense slot form: no autograd (generate,
    ``torch.no_grad()``) and decoding-sized inputs, or anything torch.compile traces (the
    grouped form's per-expert row counts are data-dependent shapes, which fullgraph and CUDA
    graphs cannot take). Training keeps the grouped form and its exact FLOP count."""
    if kernel == "triton" or torch.is_grad_enabled():
        return False
    return tokens <= BROADCAST_MAX_TOKENS or torch.compiler.is_compiling()


def masked_dense_slots_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor | None,
    scale: float,
    rows: str = "token",
    per_slot: bool = False,
) -> torch.Tensor:
    """``grouped_slots_delta``'s result (same arguments, no grouping) in fixed shapes: every
    expert's rank-r values for every row in one batched matmul reading A in place, the chosen
    expert's slice kept per slot by a one-hot gate, one expand. E / k times the grouped FLOPs,
    which decoding-sized inputs do not notice; no sorting, no host sync."""
    tokens, top_k = indices.shape
    num_experts, _, rank = lora_A.shape
    shrunk = torch.matmul(x, lora_A.to(x.dtype))  # [E, rows, r]
    if rows == "slot":
        per_expert = shrunk.view(num_experts, tokens, top_k, rank).permute(1, 2, 0, 3)
    else:
        per_expert = shrunk.transpose(0, 1).unsqueeze(1)  # [T, 1, E, r]
    gate = torch.nn.functional.one_hot(indices, num_experts).to(x.dtype)  # [T, k, E]
    if weights is not None:
        gate = gate * weights.to(x.dtype).unsqueeze(-1)
    gated = per_expert * (gate * scale).unsqueeze(-1)  # [T, k, E, r]
    if not per_slot:
        gated = gated.sum(dim=1)
    return gated.reshape(-1, num_experts * rank) @ lora_B.to(x.dtype).reshape(
        num_experts * rank, -1)


def moe_lora_slots_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor | None,
    scale: float,
    grouping: torch.Tensor | None,
    rows: str = "token",
    per_slot: bool = False,
    kernel: str = "auto",
) -> torch.Tensor:
    """``grouped_slots_delta`` (see there) on the Triton kernels where ``kernel`` picks them,
    else in torch; ``masked_dense_slots_delta`` when ``grouping`` is None (the decoding regime).
    ``x`` is already in the compute dtype; ``indices`` [T, k]."""
    with without_autocast(x.device):
        if grouping is None:
            return masked_dense_slots_delta(x, lora_A, lora_B, indices, weights, scale,
                                            rows=rows, per_slot=per_slot)
        if kernel == "triton" or (kernel == "auto" and triton_supported(x)):
            if weights is None:
                weights = torch.ones(indices.shape, dtype=torch.float32, device=x.device)
            return triton_moe_lora_delta(x, lora_A, lora_B, indices, weights, scale, grouping,
                                         x_per_slot=rows == "slot", y_per_slot=per_slot)
        return grouped_slots_delta(x, lora_A, lora_B, grouping, weights, indices.shape[1], scale,
                                   rows=rows, per_slot=per_slot)


def grouped_slots_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    grouping: torch.Tensor,
    weights: torch.Tensor | None,
    top_k: int,
    scale: float,
    rows: str = "token",
    per_slot: bool = False,
) -> torch.Tensor:
    """The grouped form over (token, slot) pairs, each expert's LoRA only on its own pairs.

    ``grouping`` = ``group_by_expert(indices, E)`` for indices [T, k]; slot = t * k + j.
    ``rows``: ``token`` reads x [T, d_in] at row t for every slot of t (the shrink x A_e runs
    once per (token, chosen expert), no k copies of x), ``slot`` reads x [T * k, d_in] per slot.
    ``per_slot``: the output is [T * k, d_out] per slot instead of [T, d_out] summed over the k
    slots. ``weights`` [T, k] or None (weight 1). Keeps only x, the small rank-space values s
    and the order for backward (gathered rows are re-gathered there, never saved); the weight
    gradients accumulate in fp32 and come back in the adapters' dtype.
    """
    num_experts = lora_A.shape[0]
    return _GroupedSlots.apply(
        x, lora_A, lora_B, weights, grouping[:-num_experts], grouping[-num_experts:].tolist(),
        top_k, float(scale), rows == "slot", per_slot,
    )


class _GroupedSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, weights, order, counts, top_k, scale, slot_rows,
                per_slot):
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        num_slots = order.numel()
        w = None if weights is None else weights.reshape(-1).to(x.dtype)
        shrunk = x.new_empty(num_slots, A.shape[-1])
        out = x.new_zeros(num_slots if per_slot else num_slots // top_k, B.shape[-1])
        for expert, slots in _expert_segments(order, counts):
            values = x[slots if slot_rows else slots // top_k] @ A[expert]
            shrunk[slots] = values
            if w is not None:
                values = values * w[slots, None]
            out.index_add_(0, slots if per_slot else slots // top_k, values @ B[expert])
        ctx.save_for_backward(x, lora_A, lora_B, weights, order, shrunk)
        ctx.setup = (counts, top_k, scale, slot_rows, per_slot)
        return out * scale

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, weights, order, shrunk = ctx.saved_tensors
        counts, top_k, scale, slot_rows, per_slot = ctx.setup
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        grad_out = grad_out.to(x.dtype)
        w = None if weights is None else weights.reshape(-1).to(x.dtype)
        acc = torch.float32 if x.dtype in HALF_DTYPES else x.dtype  # fp32 accumulators
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
        grad_A = torch.zeros(lora_A.shape, dtype=acc, device=x.device)
        grad_B = torch.zeros(lora_B.shape, dtype=acc, device=x.device)
        grad_w = None if w is None else torch.zeros(order.numel(), dtype=acc, device=x.device)
        for expert, slots in _expert_segments(order, counts):
            rows = slots if slot_rows else slots // top_k
            dy = grad_out[slots if per_slot else slots // top_k]
            u = (dy @ B[expert].t()) * scale  # c dy B_e^T, rank space
            values = shrunk[slots]
            if w is not None:
                grad_w[slots] = (u.to(acc) * values.to(acc)).sum(-1)
                u = u * w[slots, None]
                values = values * w[slots, None]
            grad_x.index_add_(0, rows, (u @ A[expert].t()).to(acc))
            grad_A[expert] = (x[rows].t() @ u).to(acc)
            grad_B[expert] = (values.t() @ dy).to(acc) * scale
        if grad_w is not None:
            grad_w = grad_w.view(weights.shape).to(weights.dtype)
        return (grad_x.to(x.dtype), grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype), grad_w,
                None, None, None, None, None, None)


def _expert_segments(order: torch.Tensor, counts: list[int]):
    """(expert, its slot ids) for every expert with at least one slot."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, order[start:start + count]
        start += count
