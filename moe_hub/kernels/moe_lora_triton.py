"""Triton kernels for the MoE-LoRA expert computation, forward and backward.

Same signature and result as ``torch_moe_lora_delta`` in ``moe_lora_ops``: for token t and slot j,
e = indices[t, j], w = weights[t, j], c = scale,
    y_t = c * sum_j w * (x_t A_e) B_e                  A: [E, d_in, r], B: [E, r, d_out]
with hand-written gradients for x, A, B and the routing weights (dw = <s, u> in rank space, with
s = x A_e kept from the forward and u = c * dy B_e^T).

Two regimes, chosen by E * r (static shapes, so torch.compile sees one graph per regime):
- masked-dense (E * r <= 512): the experts are addressed as one concatenated rank space
  [d_in, E * r]; every token computes every expert's r values and the routing gate zeroes the
  unselected ones. No sort, no atomics, deterministic.
- grouped (E * r > 512): the (token, slot) pairs are sorted by expert once per routing
  decision (``group_by_expert``; the order is returned and reused by the backward); each
  program owns a block of rows of one expert and gathers its token rows by index. Outputs
  shared by the k slots of a token are accumulated with fp32 atomics.

This file is copied verbatim into checkpoints next to the modeling files: it imports only torch
and, optionally, triton.
"""

import hashlib
import os

import torch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # the module stays importable; triton_supported() then says False
    triton = None

    class _MissingTritonLanguage:
        constexpr = object  # only evaluated in the kernels' annotations

    tl = _MissingTritonLanguage()

    def _jit(fn):
        return fn


#: jit decorators read TRITON_INTERPRET when this module is imported, so that is what counts.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: Above this many rank-space columns (E * r) the grouped regime replaces masked-dense.
MASKED_DENSE_MAX_COLUMNS = 512


def triton_supported(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``x``'s device.

    CUDA (and ROCm) tensors need triton installed. CPU tensors run only through the Triton
    interpreter, and only when asked for with MOE_HUB_TRITON_ON_CPU=1 (tests drive whole models
    through this path; it is far too slow for real work).
    """
    if triton is None:
        return False
    if x.is_cuda:
        return not INTERPRETED or os.environ.get("MOE_HUB_TRITON_ON_CPU") == "1"
    return (
        x.device.type == "cpu"
        and INTERPRETED
        and os.environ.get("MOE_HUB_TRITON_ON_CPU") == "1"
    )


# --------------------------------------------------------------------------------------------
# Device helpers


@_jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc += a @ b with fp32 accumulation.

    UPCAST (fp32 inputs, or the interpreter, whose bf16 arithmetic is wrong) computes in fp32;
    otherwise an fp32 rank-space tile is rounded to the 16-bit dtype of the other operand so
    that the tensor cores do the product.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        a = a.to(b.dtype)
    if b.dtype == tl.float32:
        b = b.to(a.dtype)
    return tl.dot(a, b, acc)


@_jit
def _gate(idx_ptr, w_ptr, toks, experts, T, TOP_K: tl.constexpr):
    """Routing weight of token ``toks`` for expert ``experts`` (0 when not selected); the two
    index tensors broadcast against each other ([BT, 1] and [1, BC] or the reverse)."""
    gate = tl.zeros_like(toks + experts).to(tl.float32)
    live = toks < T
    for j in range(TOP_K):
        chosen = tl.load(idx_ptr + toks * TOP_K + j, mask=live, other=-1)
        weight = tl.load(w_ptr + toks * TOP_K + j, mask=live, other=0.0)
        gate += tl.where(chosen == experts, weight, 0.0)
    return gate


@_jit
def _expert_rows(pid, plan_ptr, num_slots, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """The expert and the sorted slot ids of the rows that program ``pid`` owns.

    plan = [order (num_slots) | starts (E) | ends (E) | block_ends (E)]; block_ends is the
    running count of BLOCK_M-row blocks per expert, so the expert of block ``pid`` is the number
    of experts whose blocks all come before it. Programs past the last block own no row.
    """
    es = tl.arange(0, BLOCK_E)
    block_ends = tl.load(plan_ptr + num_slots + 2 * E + es, mask=es < E, other=0)
    block_ends = tl.where(es < E, block_ends, pid + 1)
    expert = tl.sum((block_ends <= pid).to(tl.int32), axis=0)
    spare = expert >= E
    expert = tl.minimum(expert, E - 1)
    first_block = tl.load(plan_ptr + num_slots + 2 * E + tl.maximum(expert - 1, 0))
    first_block = tl.where(expert > 0, first_block, 0)
    start = tl.load(plan_ptr + num_slots + expert)
    end = tl.load(plan_ptr + num_slots + E + expert)
    end = tl.where(spare, start, end)  # a spare program's row range is empty
    rows = start + (pid - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    slots = tl.load(plan_ptr + rows, mask=row_mask, other=0)
    return expert, slots, row_mask


# --------------------------------------------------------------------------------------------
# Masked-dense regime: the rank space is E * r columns, column n = (expert n // r, rank n % r).


@_jit
def _dense_shrink_kernel(
    a_ptr, m_ptr, out_ptr, T, K, ER, rank,
    s_at, s_ak, s_me, s_mk, s_mc, alpha,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[T, ER] (fp32) = alpha * a[T, K] @ M_cat[K, ER]; M_cat[k, (e, c)] = m[e*s_me + k*s_mk +
    c*s_mc] (A for s = x A, B^T for u = c dy B^T)."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok_mask = toks < T
    col_mask = cols < ER
    m_cols = (cols // rank) * s_me + (cols % rank) * s_mc
    a_rows = toks.to(tl.int64) * s_at
    acc = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + a_rows[:, None] + ks[None, :] * s_ak,
                    mask=tok_mask[:, None] & k_mask[None, :], other=0.0)
        m = tl.load(m_ptr + ks[:, None] * s_mk + m_cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _mma(a, m, acc, UPCAST)
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * ER + cols[None, :], acc * alpha,
             mask=tok_mask[:, None] & col_mask[None, :])


@_jit
def _dense_expand_kernel(
    r_ptr, m_ptr, idx_ptr, w_ptr, out_ptr, T, N, ER, rank,
    s_me, s_mc, s_mn, s_ot, s_on, alpha,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[T, N] = alpha * gate(R)[T, ER] @ M_cat[ER, N], R fp32 rank values, gated per token by
    its routing weight for the column's expert (y from s and B, dx from u and A^T)."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_mask = toks < T
    n_mask = ns < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    for c0 in range(0, ER, BLOCK_R):
        cols = c0 + tl.arange(0, BLOCK_R)
        col_mask = cols < ER
        r = tl.load(r_ptr + toks.to(tl.int64)[:, None] * ER + cols[None, :],
                    mask=tok_mask[:, None] & col_mask[None, :], other=0.0)
        r = r * _gate(idx_ptr, w_ptr, toks[:, None], (cols // rank)[None, :], T, TOP_K)
        m_rows = (cols // rank) * s_me + (cols % rank) * s_mc
        m = tl.load(m_ptr + m_rows[:, None] + ns[None, :] * s_mn,
                    mask=col_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(r, m, acc, UPCAST)
    out = out_ptr + toks.to(tl.int64)[:, None] * s_ot + ns[None, :] * s_on
    tl.store(out, (acc * alpha).to(out_ptr.dtype.element_ty),
             mask=tok_mask[:, None] & n_mask[None, :])


@_jit
def _dense_weight_grad_kernel(
    p_ptr, r_ptr, idx_ptr, w_ptr, out_ptr, T, N, ER, rank,
    s_pt, s_pn, tokens_per_split, alpha,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[split, N, ER] (fp32) = alpha * p[T_split, N]^T @ gate(R)[T_split, ER]: one partial sum
    per token split (summed by the caller), so the reduction over tokens needs no atomics
    (dA_cat from x and u, dB_cat^T from dy and s)."""
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    n_mask = ns < N
    col_mask = cols < ER
    experts = (cols // rank)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_R), tl.float32)
    first = split * tokens_per_split
    for t0 in range(first, first + tokens_per_split, BLOCK_T):
        toks = t0 + tl.arange(0, BLOCK_T)
        tok_mask = toks < T
        p = tl.load(p_ptr + toks.to(tl.int64)[:, None] * s_pt + ns[None, :] * s_pn,
                    mask=tok_mask[:, None] & n_mask[None, :], other=0.0)
        r = tl.load(r_ptr + toks.to(tl.int64)[:, None] * ER + cols[None, :],
                    mask=tok_mask[:, None] & col_mask[None, :], other=0.0)
        r = r * _gate(idx_ptr, w_ptr, toks[:, None], experts, T, TOP_K)
        acc = _mma(tl.trans(p), r, acc, UPCAST)
    out = out_ptr + split.to(tl.int64) * N * ER + ns[:, None] * ER + cols[None, :]
    tl.store(out, acc * alpha, mask=n_mask[:, None] & col_mask[None, :])


@_jit
def _dense_gate_grad_kernel(
    s_ptr, u_ptr, idx_ptr, dw_ptr, T, ER, rank,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    """dw[t, j] = <s[t, e_j], u[t, e_j]> over the r values of the chosen expert."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = toks < T
    cs = tl.arange(0, BLOCK_RANK)
    mask = tok_mask[:, None] & (cs < rank)[None, :]
    for j in range(TOP_K):
        expert = tl.load(idx_ptr + toks * TOP_K + j, mask=tok_mask, other=0)
        offs = toks.to(tl.int64)[:, None] * ER + expert[:, None] * rank + cs[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0)
        tl.store(dw_ptr + toks * TOP_K + j, tl.sum(s * u, axis=1), mask=tok_mask)


# --------------------------------------------------------------------------------------------
# Grouped regime: rank values live per slot ([T * k, r], slot = t * k + j); rows sorted by expert.


@_jit
def _grouped_shrink_kernel(
    a_ptr, m_ptr, plan_ptr, out_ptr, s_ptr, w_ptr, dw_ptr, num_slots, K, E, rank,
    s_at, s_ak, s_me, s_mk, s_mc, alpha,
    TOP_K: tl.constexpr, GATE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[slot] = alpha * a[token(slot)] @ M_e for the rows of one expert (s = x A_e, or
    u = c dy B_e^T). With GATE_GRAD it also writes dw[slot] = <s, u> and stores w * u."""
    expert, slots, row_mask = _expert_rows(tl.program_id(0), plan_ptr, num_slots, E, BLOCK_M,
                                           BLOCK_E)
    a_rows = (slots // TOP_K) * s_at
    cs = tl.arange(0, BLOCK_R)
    c_mask = cs < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + a_rows[:, None] + ks[None, :] * s_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        m = tl.load(m_ptr + expert * s_me + ks[:, None] * s_mk + cs[None, :] * s_mc,
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _mma(a, m, acc, UPCAST)
    acc = acc * alpha
    offs = slots[:, None] * rank + cs[None, :]
    mask = row_mask[:, None] & c_mask[None, :]
    if GATE_GRAD:
        s = tl.load(s_ptr + offs, mask=mask, other=0.0)
        tl.store(dw_ptr + slots, tl.sum(s * acc, axis=1), mask=row_mask)
        acc = acc * tl.load(w_ptr + slots, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + offs, acc, mask=mask)


@_jit
def _grouped_expand_kernel(
    r_ptr, m_ptr, plan_ptr, w_ptr, out_ptr, num_slots, N, E, rank,
    s_me, s_mc, s_mn, alpha,
    TOP_K: tl.constexpr, APPLY_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[token(slot)] += alpha * (w *) r[slot] @ M_e, fp32 atomics because the k slots of a
    token belong to programs of different experts (y from s and B, dx from w*u and A^T)."""
    expert, slots, row_mask = _expert_rows(tl.program_id(0), plan_ptr, num_slots, E, BLOCK_M,
                                           BLOCK_E)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < N
    cs = tl.arange(0, BLOCK_R)
    c_mask = cs < rank
    r = tl.load(r_ptr + slots[:, None] * rank + cs[None, :],
                mask=row_mask[:, None] & c_mask[None, :], other=0.0)
    if APPLY_WEIGHT:
        r = r * tl.load(w_ptr + slots, mask=row_mask, other=0.0)[:, None]
    m = tl.load(m_ptr + expert * s_me + cs[:, None] * s_mc + ns[None, :] * s_mn,
                mask=c_mask[:, None] & n_mask[None, :], other=0.0)
    acc = _mma(r, m, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST)
    out = out_ptr + (slots // TOP_K)[:, None] * N + ns[None, :]
    tl.atomic_add(out, acc * alpha, mask=row_mask[:, None] & n_mask[None, :])


@_jit
def _grouped_weight_grad_kernel(
    p_ptr, r_ptr, plan_ptr, w_ptr, out_ptr, num_slots, N, E, rank,
    s_pt, s_pn, s_oe, s_on, s_oc, alpha,
    TOP_K: tl.constexpr, APPLY_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    """out_e[N, r] = alpha * p[tokens of e]^T @ (w *) r[slots of e], one program per (expert,
    column block) looping over the expert's rows (dA_e from x and w*u, dB_e^T from dy and s)."""
    expert = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < N
    cs = tl.arange(0, BLOCK_R)
    c_mask = cs < rank
    start = tl.load(plan_ptr + num_slots + expert)
    end = tl.load(plan_ptr + num_slots + E + expert)
    acc = tl.zeros((BLOCK_N, BLOCK_R), tl.float32)
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        slots = tl.load(plan_ptr + rows, mask=row_mask, other=0)
        p = tl.load(p_ptr + (slots // TOP_K)[:, None] * s_pt + ns[None, :] * s_pn,
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        r = tl.load(r_ptr + slots[:, None] * rank + cs[None, :],
                    mask=row_mask[:, None] & c_mask[None, :], other=0.0)
        if APPLY_WEIGHT:
            r = r * tl.load(w_ptr + slots, mask=row_mask, other=0.0)[:, None]
        acc = _mma(tl.trans(p), r, acc, UPCAST)
    out = out_ptr + expert * s_oe + ns[:, None] * s_on + cs[None, :] * s_oc
    tl.store(out, (acc * alpha).to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & c_mask[None, :])


# --------------------------------------------------------------------------------------------
# Host side


def _pow2_at_least(n: int, floor: int = 16) -> int:
    # tl.dot needs every block dimension >= 16 (also under the interpreter)
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


_INTERPRETER_BLOCKS = {"T": 16, "T_SHRINK": 16, "K": 32, "N": 32, "M": 16, "R_MAX": 64, "warps": 1}
_GPU_BLOCKS = {"T": 64, "T_SHRINK": 32, "K": 64, "N": 64, "M": 64, "R_MAX": 128, "warps": 4}


def _blocks(on_gpu: bool) -> dict[str, int]:
    """One fixed configuration per machine kind: tiny blocks keep the interpreter fast; on a GPU
    64-row tiles keep the tensor cores busy while the op stays memory-bound."""
    return _GPU_BLOCKS if on_gpu else _INTERPRETER_BLOCKS


_SM_COUNT: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _is_masked_dense(num_experts: int, rank: int) -> bool:
    return num_experts * rank <= MASKED_DENSE_MAX_COLUMNS


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN-filled with MOE_HUB_TRITON_POISON=1 (tests: any element a kernel
    forgets to write shows up as NaN)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("MOE_HUB_TRITON_POISON") == "1":
        out.fill_(float("nan") if dtype.is_floating_point else -(2**31))
    return out


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRETED or dtype == torch.float32


def group_by_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[order | counts] (int64, T*k + E): the (token, slot) pairs sorted by expert (stable) and
    each expert's number of pairs. One sort per routing decision, on the device, no host sync;
    sites that share a decision (the linears of a routed MLP block) pass it to every call."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: a static [E] shape keeps torch.compile from breaking the graph.
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
    return torch.cat([order, counts])


def _routing_plan(grouping: torch.Tensor, num_experts: int, block_m: int) -> torch.Tensor:
    """[order | starts | ends | block_ends] (int64), what the grouped kernels read, from a
    ``group_by_expert`` result."""
    order, counts = grouping[:-num_experts], grouping[-num_experts:]
    ends = counts.cumsum(0)
    block_ends = ((counts + block_m - 1) // block_m).cumsum(0)
    return torch.cat([order, ends - counts, ends, block_ends])


def _grouped_grid_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    # sum_e ceil(count_e / M) <= ceil(num_slots / M) + E - 1; spare programs own no row
    return triton.cdiv(num_slots, block_m) + num_experts


def _forward_impl(x, lora_A, lora_B, indices, weights, scale, grouping, x_per_slot=False,
                  y_per_slot=False):
    num_tokens, d_in = indices.shape[0], x.shape[1]
    num_experts, _, rank = lora_A.shape
    d_out = lora_B.shape[2]
    top_k = indices.shape[1]
    dev = x.device
    cfg = _blocks(x.is_cuda and not INTERPRETED)
    # fp32 masters with 16-bit x: one cast per call, so the tensor cores get 16-bit tiles.
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    upcast = _upcast(x.dtype)
    idx = indices.contiguous()
    w = weights.float().contiguous()
    if _is_masked_dense(num_experts, rank) and not (x_per_slot or y_per_slot):
        columns = num_experts * rank
        block_r = min(_pow2_at_least(columns), cfg["R_MAX"])
        shrunk = _empty((num_tokens, columns), torch.float32, dev)
        y = _empty((num_tokens, d_out), x.dtype, dev)
        shrink_grid = (triton.cdiv(num_tokens, cfg["T_SHRINK"]), triton.cdiv(columns, block_r))
        _dense_shrink_kernel[shrink_grid](
            x, lora_A, shrunk, num_tokens, d_in, columns, rank,
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), 1.0,
            BLOCK_T=cfg["T_SHRINK"], BLOCK_K=cfg["K"], BLOCK_R=block_r, UPCAST=upcast,
            num_warps=cfg["warps"],
        )
        _dense_expand_kernel[(triton.cdiv(num_tokens, cfg["T"]), triton.cdiv(d_out, cfg["N"]))](
            shrunk, lora_B, idx, w, y, num_tokens, d_out, columns, rank,
            lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), y.stride(0), y.stride(1),
            float(scale),
            TOP_K=top_k, BLOCK_T=cfg["T"], BLOCK_N=cfg["N"], BLOCK_R=block_r, UPCAST=upcast,
            num_warps=cfg["warps"],
        )
        return y, shrunk, idx.new_empty(0)

    num_slots = num_tokens * top_k
    # The grouped kernels address a slot's row as slot // TOP_K: top_k for per-token rows, 1 for
    # per-slot rows (a routed block's per-slot inputs and outputs).
    x_div, y_div = (1 if x_per_slot else top_k), (1 if y_per_slot else top_k)
    block_r = _pow2_at_least(rank)
    if grouping is None:
        grouping = group_by_expert(idx, num_experts)
    plan = _routing_plan(grouping, num_experts, cfg["M"])
    rows = _grouped_grid_rows(num_slots, num_experts, cfg["M"])
    shrunk = _empty((num_slots, rank), torch.float32, dev)
    _grouped_shrink_kernel[(rows,)](
        x, lora_A, plan, shrunk, shrunk, w, w, num_slots, d_in, num_experts, rank,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), 1.0,
        TOP_K=x_div, GATE_GRAD=False, BLOCK_M=cfg["M"], BLOCK_K=cfg["K"], BLOCK_R=block_r,
        BLOCK_E=_pow2_at_least(num_experts, 2), UPCAST=upcast, num_warps=cfg["warps"],
    )
    y32 = torch.zeros((num_slots if y_per_slot else num_tokens, d_out), dtype=torch.float32,
                      device=dev)
    _grouped_expand_kernel[(rows, triton.cdiv(d_out, cfg["N"]))](
        shrunk, lora_B, plan, w, y32, num_slots, d_out, num_experts, rank,
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), float(scale),
        TOP_K=y_div, APPLY_WEIGHT=True, BLOCK_M=cfg["M"], BLOCK_N=cfg["N"], BLOCK_R=block_r,
        BLOCK_E=_pow2_at_least(num_experts, 2), UPCAST=upcast, num_warps=cfg["warps"],
    )
    return y32.to(x.dtype), shrunk, plan


def _backward_impl(grad_y, x, lora_A, lora_B, indices, weights, shrunk, plan, scale,
                   x_per_slot=False, y_per_slot=False):
    num_tokens, d_in = indices.shape[0], x.shape[1]
    num_experts, _, rank = lora_A.shape
    d_out = lora_B.shape[2]
    top_k = indices.shape[1]
    dev = x.device
    cfg = _blocks(x.is_cuda and not INTERPRETED)
    upcast = _upcast(x.dtype)
    idx = indices.contiguous()
    w = weights.float().contiguous()
    # 16-bit operands as in the forward; the weight gradients accumulate in fp32 and are written
    # in the masters' dtype.
    A, B, dy = lora_A.to(x.dtype), lora_B.to(x.dtype), grad_y.to(x.dtype)
    if _is_masked_dense(num_experts, rank) and not (x_per_slot or y_per_slot):
        columns = num_experts * rank
        block_r = min(_pow2_at_least(columns), cfg["R_MAX"])
        t_blocks = triton.cdiv(num_tokens, cfg["T"])
        # u = c * dy B_cat^T: B_cat^T[o, (e, c)] = B[e, c, o]
        u = _empty((num_tokens, columns), torch.float32, dev)
        shrink_grid = (triton.cdiv(num_tokens, cfg["T_SHRINK"]), triton.cdiv(columns, block_r))
        _dense_shrink_kernel[shrink_grid](
            dy, B, u, num_tokens, d_out, columns, rank,
            dy.stride(0), dy.stride(1), B.stride(0), B.stride(2), B.stride(1), float(scale),
            BLOCK_T=cfg["T_SHRINK"], BLOCK_K=cfg["K"], BLOCK_R=block_r, UPCAST=upcast,
            num_warps=cfg["warps"],
        )
        grad_w = _empty((num_tokens, top_k), torch.float32, dev)
        _dense_gate_grad_kernel[(t_blocks,)](
            shrunk, u, idx, grad_w, num_tokens, columns, rank,
            TOP_K=top_k, BLOCK_T=cfg["T"], BLOCK_RANK=_pow2_at_least(rank),
            num_warps=cfg["warps"],
        )
        # dx = gate(u) A_cat^T: A_cat^T[(e, c), i] = A[e, i, c]
        grad_x = _empty((num_tokens, d_in), x.dtype, dev)
        _dense_expand_kernel[(t_blocks, triton.cdiv(d_in, cfg["N"]))](
            u, A, idx, w, grad_x, num_tokens, d_in, columns, rank,
            A.stride(0), A.stride(2), A.stride(1), grad_x.stride(0), grad_x.stride(1), 1.0,
            TOP_K=top_k, BLOCK_T=cfg["T"], BLOCK_N=cfg["N"], BLOCK_R=block_r, UPCAST=upcast,
            num_warps=cfg["warps"],
        )
        def weight_grad(p, rank_values, n, alpha):
            # Token splits give the reduction over T a few programs per SM without atomics.
            tiles = triton.cdiv(n, cfg["N"]) * triton.cdiv(columns, block_r)
            wanted = triton.cdiv(4 * _multiprocessors(dev), tiles) if x.is_cuda else 2
            per_split = cfg["T"] * triton.cdiv(t_blocks, max(1, min(wanted, t_blocks)))
            splits = triton.cdiv(num_tokens, per_split)
            partial = _empty((splits, n, columns), torch.float32, dev)
            grid = (triton.cdiv(n, cfg["N"]), triton.cdiv(columns, block_r), splits)
            _dense_weight_grad_kernel[grid](
                p, rank_values, idx, w, partial, num_tokens, n, columns, rank,
                p.stride(0), p.stride(1), per_split, alpha,
                TOP_K=top_k, BLOCK_T=cfg["T"], BLOCK_N=cfg["N"], BLOCK_R=block_r,
                UPCAST=upcast, num_warps=cfg["warps"],
            )
            return partial.sum(0).view(n, num_experts, rank)

        grad_A = weight_grad(x, u, d_in, 1.0).permute(1, 0, 2).to(lora_A.dtype).contiguous()
        grad_B = weight_grad(dy, shrunk, d_out, float(scale)).permute(1, 2, 0)
        return grad_x, grad_A, grad_B.to(lora_B.dtype).contiguous(), grad_w.to(weights.dtype)

    num_slots = num_tokens * top_k
    x_div, y_div = (1 if x_per_slot else top_k), (1 if y_per_slot else top_k)
    block_r = _pow2_at_least(rank)
    block_e = _pow2_at_least(num_experts, 2)
    rows = _grouped_grid_rows(num_slots, num_experts, cfg["M"])
    # ds = w * (c dy B_e^T) per slot, and dw = <s, c dy B_e^T> in the same pass over dy
    weighted_u = _empty((num_slots, rank), torch.float32, dev)
    grad_w = _empty((num_slots,), torch.float32, dev)
    _grouped_shrink_kernel[(rows,)](
        dy, B, plan, weighted_u, shrunk, w, grad_w, num_slots, d_out, num_experts, rank,
        dy.stride(0), dy.stride(1), B.stride(0), B.stride(2), B.stride(1), float(scale),
        TOP_K=y_div, GATE_GRAD=True, BLOCK_M=cfg["M"], BLOCK_K=cfg["K"], BLOCK_R=block_r,
        BLOCK_E=block_e, UPCAST=upcast, num_warps=cfg["warps"],
    )
    grad_x32 = torch.zeros(tuple(x.shape), dtype=torch.float32, device=dev)
    _grouped_expand_kernel[(rows, triton.cdiv(d_in, cfg["N"]))](
        weighted_u, A, plan, w, grad_x32, num_slots, d_in, num_experts, rank,
        A.stride(0), A.stride(2), A.stride(1), 1.0,
        TOP_K=x_div, APPLY_WEIGHT=False, BLOCK_M=cfg["M"], BLOCK_N=cfg["N"], BLOCK_R=block_r,
        BLOCK_E=block_e, UPCAST=upcast, num_warps=cfg["warps"],
    )
    grad_A = _empty(tuple(A.shape), lora_A.dtype, dev)
    _grouped_weight_grad_kernel[(num_experts, triton.cdiv(d_in, cfg["N"]))](
        x, weighted_u, plan, w, grad_A, num_slots, d_in, num_experts, rank,
        x.stride(0), x.stride(1), grad_A.stride(0), grad_A.stride(1), grad_A.stride(2), 1.0,
        TOP_K=x_div, APPLY_WEIGHT=False, BLOCK_M=cfg["M"], BLOCK_N=cfg["N"], BLOCK_R=block_r,
        UPCAST=upcast, num_warps=cfg["warps"],
    )
    # dB_e^T[o, c] = c * sum over the expert's slots of dy[t, o] * w * s[slot, c]
    grad_B = _empty(tuple(B.shape), lora_B.dtype, dev)
    _grouped_weight_grad_kernel[(num_experts, triton.cdiv(d_out, cfg["N"]))](
        dy, shrunk, plan, w, grad_B, num_slots, d_out, num_experts, rank,
        dy.stride(0), dy.stride(1), grad_B.stride(0), grad_B.stride(2), grad_B.stride(1),
        float(scale),
        TOP_K=y_div, APPLY_WEIGHT=True, BLOCK_M=cfg["M"], BLOCK_N=cfg["N"], BLOCK_R=block_r,
        UPCAST=upcast, num_warps=cfg["warps"],
    )
    grad_w = grad_w.view(num_tokens, top_k).to(weights.dtype)
    return grad_x32.to(x.dtype), grad_A, grad_B, grad_w


# --------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (fake impls give the shapes), autograd attached.
# The namespace is derived from the module name: the library copy and a checkpoint's copy of this
# file can both be imported in one process without registering the same op twice.

_NAMESPACE = "moe_lora_" + hashlib.sha1(__name__.encode()).hexdigest()[:12]


@torch.library.custom_op(f"{_NAMESPACE}::forward", mutates_args=())
def _forward_op(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, indices: torch.Tensor,
    weights: torch.Tensor, scale: float, grouping: torch.Tensor | None, x_per_slot: bool,
    y_per_slot: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(x, lora_A, lora_B, indices, weights, scale, grouping, x_per_slot,
                         y_per_slot)


@_forward_op.register_fake
def _forward_fake(x, lora_A, lora_B, indices, weights, scale, grouping, x_per_slot,
                  y_per_slot):
    num_tokens, top_k = indices.shape
    num_experts, _, rank = lora_A.shape
    y = x.new_empty((num_tokens * top_k if y_per_slot else num_tokens, lora_B.shape[2]))
    if _is_masked_dense(num_experts, rank) and not (x_per_slot or y_per_slot):
        return y, x.new_empty((num_tokens, num_experts * rank), dtype=torch.float32), \
            indices.new_empty(0)
    slots = num_tokens * top_k
    return y, x.new_empty((slots, rank), dtype=torch.float32), \
        indices.new_empty(slots + 3 * num_experts)


@torch.library.custom_op(f"{_NAMESPACE}::backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    indices: torch.Tensor, weights: torch.Tensor, shrunk: torch.Tensor, plan: torch.Tensor,
    scale: float, x_per_slot: bool, y_per_slot: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_y, x, lora_A, lora_B, indices, weights, shrunk, plan, scale,
                          x_per_slot, y_per_slot)


@_backward_op.register_fake
def _backward_fake(grad_y, x, lora_A, lora_B, indices, weights, shrunk, plan, scale,
                   x_per_slot, y_per_slot):
    return (torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B),
            torch.empty_like(weights))


def _setup_context(ctx, inputs, output):
    x, lora_A, lora_B, indices, weights, scale, _, x_per_slot, y_per_slot = inputs
    _, shrunk, plan = output
    ctx.save_for_backward(x, lora_A, lora_B, indices, weights, shrunk, plan)
    ctx.setup = (scale, x_per_slot, y_per_slot)


def _autograd_backward(ctx, grad_y, _grad_shrunk, _grad_plan):
    x, lora_A, lora_B, indices, weights, shrunk, plan = ctx.saved_tensors
    grad_x, grad_A, grad_B, grad_w = _backward_op(
        grad_y, x, lora_A, lora_B, indices, weights, shrunk, plan, *ctx.setup
    )
    return grad_x, grad_A, grad_B, None, grad_w, None, None, None, None


torch.library.register_autograd(
    f"{_NAMESPACE}::forward", _autograd_backward, setup_context=_setup_context
)


def _check_inputs(x, lora_A, lora_B, indices, weights, x_per_slot=False) -> None:
    if triton is None:
        raise RuntimeError(
            "the Triton expert kernel needs the triton package: pip install triton, or set "
            "config.expert_kernel='torch'"
        )
    if not triton_supported(x):
        raise RuntimeError(
            f"the Triton expert kernel cannot run on {x.device} tensors: use a CUDA device, or set "
            "config.expert_kernel='torch' (CPU runs need TRITON_INTERPRET=1 and "
            "MOE_HUB_TRITON_ON_CPU=1, for tests only)"
        )
    if x.dim() != 2 or lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError("expected x [T, d_in], lora_A [E, d_in, r], lora_B [E, r, d_out]")
    num_experts, d_in, rank = lora_A.shape
    if x.shape[1] != d_in or lora_B.shape[:2] != (num_experts, rank):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)}, "
            f"lora_B {tuple(lora_B.shape)}"
        )
    rows = indices.numel() if x_per_slot else indices.shape[0]
    if indices.dim() != 2 or indices.shape != weights.shape or rows != x.shape[0]:
        what = "T*k rows of x" if x_per_slot else f"T={x.shape[0]}"
        raise ValueError(
            f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be "
            f"[T, k] ({what})"
        )
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64 (got {indices.dtype})")
    masters_fp32 = lora_A.dtype == lora_B.dtype == torch.float32
    if not (lora_A.dtype == lora_B.dtype == x.dtype
            or (masters_fp32 and x.dtype in (torch.float16, torch.bfloat16))):
        raise ValueError(
            f"x, lora_A and lora_B must share a dtype, or x be 16-bit with fp32 adapters (got "
            f"{x.dtype}, {lora_A.dtype}, {lora_B.dtype}): cast x to the compute dtype first"
        )


def triton_moe_lora_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    grouping: torch.Tensor | None = None,
    x_per_slot: bool = False,
    y_per_slot: bool = False,
) -> torch.Tensor:
    """Expert output [T, d_out] = scale * sum_j weights[:, j] * (x A_e) B_e, e = indices[:, j].

    Differentiable in x, lora_A, lora_B and weights (not indices). Accumulates in fp32 for
    fp32/fp16/bf16 inputs; any strides. The operands take x's dtype: with a 16-bit x and fp32
    master adapters, A and B are cast once per call (tensor-core tiles on a GPU) and their
    gradients come back in fp32. Autocast does not reach into the op: callers pick x's dtype
    (``moe_lora_ops.moe_lora_delta`` does). ``grouping`` (``group_by_expert(indices, E)``) saves the
    grouped regime its sort when several calls share ``indices``; masked-dense ignores it.

    ``x_per_slot``: x is [T * k, d_in], one row per (token, slot) (slot = t * k + j) instead of
    one per token; ``y_per_slot``: the result is [T * k, d_out], one row per slot, unsummed.
    Either takes the grouped regime whatever E * r (a routed MLP block's per-slot linears).
    """
    _check_inputs(x, lora_A, lora_B, indices, weights, x_per_slot)
    if grouping is not None and grouping.shape != (indices.numel() + lora_A.shape[0],):
        raise ValueError(f"grouping must be group_by_expert(indices, E): [T*k + E] (got "
                         f"{tuple(grouping.shape)})")
    if x.shape[0] == 0:  # no launch with an empty grid; keep every input in the graph
        empty = x.new_zeros((0, lora_B.shape[2]))
        return empty + 0 * (x.sum() + lora_A.sum() + lora_B.sum() + weights.sum()).to(x.dtype)
    y, _, _ = _forward_op(x, lora_A, lora_B, indices, weights, float(scale), grouping,
                          bool(x_per_slot), bool(y_per_slot))
    return y
