"""The decode path of a routed linear, and the packed shrink weight it reads.

The parameters are ordinary: ``lora_A`` [E, d_in, r], ``lora_B`` [E, r, d_out] and the router's
weights are contiguous tensors of their own, so ``state_dict()``, optimizers (fused AdamW steps a
parameter as one flat run of memory), sharding (FSDP2 takes contiguous parameters only), copies
and compilers see nothing unusual. The decode path reads a DERIVED tensor, never a parameter:
    S [E*r, d_in]:    S[e*r:(e+1)*r] = A_e^T
laid out like an ``nn.Linear`` weight, so ``F.linear(x, S)`` yields every expert's rank-r values
in one GEMM instead of E narrow ones. ``PackedShrink`` builds S from ``lora_A`` when first needed
and rebuilds it when A changes: it records A's storage (weakly), data pointer, layout and version
counter, which every in-place torch op on A or a view of it (``load_state_dict``,
``state_dict()[name].copy_``, most optimizers) and every replacement (``param.data = ...``,
``.to()``) changes, and the count of ``torch.optim`` steps taken in the process: fused AdamW
(transformers' default) and optimizers with their own kernels (bitsandbytes) write parameters
without bumping their version counters. Writes through ``param.data`` bypass the version counter,
as they bypass autograd; ``train()``, ``eval()`` and ``.to()`` drop S anyway. S is never saved,
copied (``copy.deepcopy``, pickling) or traced: a compiled graph cannot check that S is current,
so compiled code reads A itself (``batched_shrink``), as does the path for tensors S cannot track
(inference tensors, meta or sharded placeholders, tensor subclasses).

The router keeps computing its own logits, in its own call (hooks see every decision, an
offloaded router weight exists only there, and the decision is the generic path's, bit for bit).
Folding its weight into S would save one narrow GEMM per site, which measures as noise next to
the base linear (CPU, d_in 576, E 8, r 16, T 16: 40 vs 47 us, against milliseconds per layer).

Decode path (no autograd): h = x S^T; the router's call -> gate [T, E] (zeros except the chosen
experts' weights); y = base(x) + scale * (h * gate, in rank space) B_cat, the expand fused with
the add into the base output. With fewer (token, slot) pairs than experts (one sequence
decoding) reading every expert's A and B costs more than the product itself: the router decides
first and only the chosen experts' A and B are read (``gathered_expand``), straight from the
parameters.

Training keeps the generic op (``moe_lora_ops``), which also takes the 16-bit operands autocast
asks for; this path runs without autocast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    # Any change of the value invalidates: an increment lost to a race changes it all the same.
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _source_key(tensor: torch.Tensor) -> tuple | None:
    """What identifies ``tensor``'s values for as long as its storage lives, or None when they
    cannot be tracked."""
    if (type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided
            or tensor.is_meta or tensor.is_inference() or tensor.numel() == 0):
        return None
    return (tensor.untyped_storage()._cdata, tensor.data_ptr(), tensor._version, tensor.dtype,
            tensor.device, tuple(tensor.shape), tensor.stride())


class PackedShrink:
    """A routed linear's S (see the module docstring), rebuilt whenever A changes."""

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        # (key, weak reference to A's storage, S): replaced whole, so a thread reads one entry.
        self._entry: tuple[tuple, StorageWeakRef, torch.Tensor] | None = None

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo: dict) -> PackedShrink:
        return PackedShrink()  # the copy's A is another tensor: it builds its own S

    def __reduce__(self) -> tuple[Any, ...]:
        return (PackedShrink, ())

    def get(self, lora_A: torch.Tensor) -> torch.Tensor | None:
        """S for ``lora_A`` [E, d_in, r]; None when A cannot be tracked or inside a compiled
        graph."""
        if torch.compiler.is_compiling() or lora_A.dim() != 3:
            return None
        key = _source_key(lora_A)
        if key is None:
            return None
        key = (_optimizer_steps, key)
        entry = self._entry
        # A live weak reference pins the storage object's address: an equal address is then
        # the same storage, not a new one allocated where a freed one was.
        if entry is not None and entry[0] == key and not entry[1].expired():
            return entry[2]
        experts, d_in, rank = lora_A.shape
        with torch.no_grad():
            packed = lora_A.detach().transpose(1, 2).reshape(experts * rank, d_in).contiguous()
        self._entry = (key, StorageWeakRef(lora_A.untyped_storage()), packed)
        return packed


def batched_shrink(x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """Every expert's rank-r values [T, E*r] read from ``lora_A`` [E, d_in, r] in place (E
    narrow matmuls): what ``x S^T`` computes without S."""
    experts, _, rank = lora_A.shape
    return torch.matmul(x, lora_A).transpose(0, 1).reshape(x.shape[0], experts * rank)


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
    experts' A [E, d_in, r] and B (k of E per token): for T * k < E, where the expert op is bound
    by the adapter bytes it reads. ``result`` None: the experts' part alone, in ``x``'s dtype."""
    tokens, top_k = indices.shape
    _, d_in, rank = lora_A.shape
    # index_select copies whole expert slices (advanced indexing is several times slower).
    chosen = indices.reshape(-1)
    chosen_A = lora_A.index_select(0, chosen).to(x.dtype).view(tokens, top_k, d_in, rank)
    chosen_B = lora_B.index_select(0, chosen).to(x.dtype)  # [T * k, r, d_out]
    shrunk = x.view(tokens, 1, 1, d_in) @ chosen_A  # [T, k, 1, r]
    gates = (weights * scale).to(x.dtype).view(tokens, top_k, 1, 1)
    gated = (shrunk * gates).view(tokens, 1, top_k * rank)
    expanded = chosen_B.view(tokens, top_k * rank, -1)
    if result is None:
        return (gated @ expanded).view(tokens, -1)
    if result.dtype == x.dtype:
        return torch.baddbmm(result.view(tokens, 1, -1), gated, expanded).view(tokens, -1)
    return result + (gated @ expanded).view(tokens, -1).to(result.dtype)
