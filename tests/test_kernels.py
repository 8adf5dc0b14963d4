"""The Triton expert kernels against a float64 torch reference.

On a machine with CUDA the compiled kernels run on the GPU; elsewhere the Triton interpreter runs
them on the CPU. The jit decorators read TRITON_INTERPRET when the kernel module is imported, so
it is set before that import. If another test module of this pytest process imported the kernels
first in compiled mode on a CPU-only machine, this file re-runs itself in a fresh interpreter.
"""

import os

import torch

os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config
from torch.utils.checkpoint import checkpoint

from moe_hub.kernels import moe_lora_triton as kernels
from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM
from moe_hub.modeling.moe_lora_ops import torch_moe_lora_delta

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

#: Relative error bounds (Frobenius norm of the difference over that of the float64 reference)
#: per input dtype: fp32 accumulates exactly like the reference up to rounding; fp16/bf16 inputs
#: are rounded copies of the reference inputs, so only the kernel's 16-bit outputs and the
#: rank-space values rounded for the tensor cores add error (bf16 has 8 mantissa bits).
REL_BOUND = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _triton_device(monkeypatch: pytest.MonkeyPatch):
    # Per test, not at import: other test modules must keep the torch path on CPU.
    monkeypatch.setenv("MOE_HUB_TRITON_ON_CPU", "1")
    monkeypatch.setenv("MOE_HUB_TRITON_POISON", "1")  # unwritten kernel outputs become NaN
    if not ON_GPU:
        yield
        return
    torch.set_default_device(DEVICE)  # every tensor and model the tests build lands on the GPU
    try:
        yield
    finally:
        torch.set_default_device("cpu")


def random_routing(num_tokens: int, num_experts: int, top_k: int, experts=None, seed: int = 0):
    """Distinct experts per token (drawn from ``experts`` when given) and positive weights."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(num_experts), device="cpu")
    rows = [pool[torch.randperm(len(pool), generator=gen, device="cpu")[:top_k]]
            for _ in range(num_tokens)]
    weights = torch.rand(num_tokens, top_k, generator=gen, device="cpu") + 0.05
    return torch.stack(rows).to(DEVICE), weights.to(DEVICE)


def random_input_ids() -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(3)
    return torch.randint(0, 256, (2, 7), generator=generator, device="cpu").to(DEVICE)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "the kernel left unwritten (NaN) or non-finite elements"
    return ((got.double() - want).norm() / want.norm()).item()


def check_against_reference(
    num_tokens, d_in, d_out, num_experts, top_k, rank, dtype=torch.float32, experts=None,
    transposed_x=False, seed=0,
):
    torch.manual_seed(seed)
    if transposed_x:  # column-major x: stride (1, T)
        x = torch.randn(d_in, num_tokens).to(dtype).t()
    else:
        x = torch.randn(num_tokens, d_in).to(dtype)
    lora_A = (torch.randn(num_experts, d_in, rank) / d_in**0.5).to(dtype)
    lora_B = (torch.randn(num_experts, rank, d_out) / rank**0.5).to(dtype)
    indices, weights = random_routing(num_tokens, num_experts, top_k, experts, seed)
    grad_y = torch.randn(num_tokens, d_out).to(dtype)
    scale = 1.7

    ref = [t.double().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    want = torch_moe_lora_delta(ref[0], ref[1], ref[2], indices, ref[3], scale)
    want.backward(grad_y.double())

    got_inputs = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    if transposed_x:
        got_inputs[0] = x.detach().t().clone().t().requires_grad_()
        assert not got_inputs[0].is_contiguous()
    got = kernels.triton_moe_lora_delta(
        got_inputs[0], got_inputs[1], got_inputs[2], indices, got_inputs[3], scale
    )
    assert got.dtype == dtype
    got.backward(grad_y)

    bound = REL_BOUND[dtype]
    errors = {"y": relative_error(got, want.detach())}
    for name, mine, theirs in zip(("dx", "dA", "dB", "dw"), got_inputs, ref):
        assert mine.grad.dtype == mine.dtype
        errors[name] = relative_error(mine.grad, theirs.grad)
    assert all(err < bound for err in errors.values()), (errors, bound)
    return got_inputs


MASKED_DENSE_CASES = [
    # T, d_in, d_out, E, k, r
    pytest.param(1, 40, 24, 4, 1, 8, id="one-token-k1"),
    pytest.param(37, 40, 50, 4, 2, 12, id="rank12-odd-dims"),
    pytest.param(19, 33, 17, 4, 4, 8, id="k-equals-E"),
    pytest.param(21, 24, 20, 2, 1, 8, id="smallest-E-and-r"),
    pytest.param(12, 20, 18, 64, 2, 8, id="E64-at-512-columns"),
]


@pytest.mark.parametrize("num_tokens,d_in,d_out,num_experts,top_k,rank", MASKED_DENSE_CASES)
def test_masked_dense_matches_reference(num_tokens, d_in, d_out, num_experts, top_k, rank):
    assert kernels._is_masked_dense(num_experts, rank)
    check_against_reference(num_tokens, d_in, d_out, num_experts, top_k, rank)


GROUPED_CASES = [
    pytest.param(33, 40, 50, 8, 2, 80, None, id="E8-r80"),
    pytest.param(1, 24, 20, 6, 1, 96, None, id="one-token"),
    pytest.param(7, 24, 20, 6, 6, 96, None, id="k-equals-E"),
    pytest.param(25, 36, 22, 8, 2, 72, [1, 5], id="six-experts-without-tokens"),
    pytest.param(40, 20, 36, 4, 1, 160, [2], id="all-tokens-on-one-expert"),
    pytest.param(10, 24, 18, 5, 2, 128, None, id="rank128"),
]


@pytest.mark.parametrize(
    "num_tokens,d_in,d_out,num_experts,top_k,rank,experts", GROUPED_CASES
)
def test_grouped_matches_reference(num_tokens, d_in, d_out, num_experts, top_k, rank, experts):
    assert not kernels._is_masked_dense(num_experts, rank)
    check_against_reference(num_tokens, d_in, d_out, num_experts, top_k, rank, experts=experts)


@pytest.mark.parametrize("num_tokens,d_in,d_out,num_experts,top_k,rank", [
    pytest.param(70, 130, 75, 8, 2, 16, id="masked-dense-E8-r16"),
    pytest.param(33, 70, 66, 4, 4, 40, id="masked-dense-160-columns"),
    pytest.param(90, 72, 130, 6, 2, 96, id="grouped-E6-r96"),
])
def test_gpu_block_sizes_match_reference(monkeypatch, num_tokens, d_in, d_out, num_experts,
                                         top_k, rank):
    """The other tests run the interpreter's small tiles; the GPU's 64-row tiles and 128-wide
    rank blocks take other masking paths (partial tiles, several K steps, one rank block)."""
    monkeypatch.setattr(kernels, "_blocks", lambda on_gpu: kernels._GPU_BLOCKS)
    check_against_reference(num_tokens, d_in, d_out, num_experts, top_k, rank)


def test_masked_dense_with_empty_and_full_experts():
    # every token on expert 3 (k=1), the other seven experts get nothing
    inputs = check_against_reference(30, 40, 36, 8, 1, 16, experts=[3])
    assert inputs[1].grad[[0, 1, 2, 4, 5, 6, 7]].abs().max() == 0
    assert inputs[2].grad[3].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("num_experts,rank", [(4, 12), (8, 80)], ids=["masked-dense", "grouped"])
def test_half_precision_inputs(dtype, num_experts, rank):
    check_against_reference(29, 40, 34, num_experts, 2, rank, dtype=dtype)


@pytest.mark.parametrize("num_experts,rank", [(4, 12), (8, 80)], ids=["masked-dense", "grouped"])
def test_fp16_autocast_with_fp32_masters(num_experts, rank):
    """The training layout: fp32 master adapters, fp16 autocast. The op computes with fp16
    operands (the interpreter casts tiles to fp32 itself: its bf16 is wrong, so fp16 here),
    returns fp16, and gives A and B fp32 gradients, all within fp16 bounds of float64."""
    from moe_hub.modeling.moe_lora_ops import moe_lora_delta

    torch.manual_seed(6)
    num_tokens, d_in, d_out = 29, 40, 34
    x = torch.randn(num_tokens, d_in)
    lora_A = torch.randn(num_experts, d_in, rank) / d_in**0.5
    lora_B = torch.randn(num_experts, rank, d_out) / rank**0.5  # not 0: the delta must count
    indices, weights = random_routing(num_tokens, num_experts, 2)
    grad = torch.randn(num_tokens, d_out)
    leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = moe_lora_delta(*leaves[:3], indices, leaves[3], 1.7, kernel="triton")
    y.backward(grad)
    ref = [t.double().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    want = torch_moe_lora_delta(ref[0], ref[1], ref[2], indices, ref[3], 1.7)
    want.backward(grad.double())
    assert y.dtype == torch.float16
    assert leaves[1].grad.dtype == leaves[2].grad.dtype == torch.float32
    # x, A, B, dy and the outputs each rounded once to fp16 (unit roundoff eps/2), fp32
    # accumulation over at most 40 terms.
    bound = 3 * torch.finfo(torch.float16).eps + 40 * torch.finfo(torch.float32).eps
    errors = {"y": relative_error(y, want.detach())}
    for name, mine, theirs in zip(("dx", "dA", "dB", "dw"), leaves, ref):
        errors[name] = relative_error(mine.grad, theirs.grad)
    assert all(err < bound for err in errors.values()), (errors, bound)


@pytest.mark.parametrize("x_per_slot,y_per_slot", [(False, True), (True, False)],
                         ids=["token-rows-slot-outputs", "slot-rows-token-outputs"])
@pytest.mark.parametrize("num_experts,rank,dtype", [
    (4, 8, torch.float32), (6, 96, torch.float32), (4, 8, torch.float16)],
    ids=["small-E*r-fp32", "large-E*r-fp32", "small-E*r-fp16-fp32-masters"])
def test_per_slot_rows_and_outputs(x_per_slot, y_per_slot, num_experts, rank, dtype):
    """A routed block's forms (gate/up: x per token, one output per slot; down: x per slot,
    summed per token) through the grouped kernels, against the float64 torch grouped form."""
    from moe_hub.modeling.moe_lora_ops import grouped_slots_delta

    torch.manual_seed(7)
    num_tokens, top_k, d_in, d_out = 21, 2, 36, 28
    indices, weights = random_routing(num_tokens, num_experts, top_k, seed=7)
    x = torch.randn(num_tokens * top_k if x_per_slot else num_tokens, d_in)
    lora_A = torch.randn(num_experts, d_in, rank) / d_in**0.5
    lora_B = torch.randn(num_experts, rank, d_out) / rank**0.5
    grad = torch.randn(num_tokens * top_k if y_per_slot else num_tokens, d_out)
    grouping = kernels.group_by_expert(indices, num_experts)
    ref = [t.double().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    want = grouped_slots_delta(ref[0], ref[1], ref[2], grouping, ref[3], top_k, 1.3,
                               rows="slot" if x_per_slot else "token", per_slot=y_per_slot)
    want.backward(grad.double())
    leaves = [x.to(dtype), lora_A, lora_B, weights]  # fp32 masters, x in the compute dtype
    leaves = [t.clone().requires_grad_() for t in leaves]
    got = kernels.triton_moe_lora_delta(*leaves[:3], indices, leaves[3], 1.3, grouping,
                                        x_per_slot=x_per_slot, y_per_slot=y_per_slot)
    got.backward(grad.to(dtype))
    assert got.dtype == dtype and leaves[1].grad.dtype == torch.float32
    bound = REL_BOUND[torch.float32] if dtype == torch.float32 else \
        3 * torch.finfo(dtype).eps + d_in * torch.finfo(torch.float32).eps
    errors = {"y": relative_error(got, want.detach())}
    for name, mine, theirs in zip(("dx", "dA", "dB", "dw"), leaves, ref):
        errors[name] = relative_error(mine.grad, theirs.grad)
    assert all(err < bound for err in errors.values()), (errors, bound)


@pytest.mark.parametrize("num_experts,rank", [(4, 16), (8, 80)], ids=["masked-dense", "grouped"])
def test_non_contiguous_x(num_experts, rank):
    check_against_reference(23, 36, 28, num_experts, 2, rank, transposed_x=True)


def test_non_contiguous_adapters_and_grad_output():
    torch.manual_seed(1)
    x = torch.randn(17, 30)
    lora_A = torch.randn(4, 16, 30).transpose(1, 2) / 5  # [E, d_in, r], strides permuted
    lora_B = torch.randn(4, 40, 16)[:, ::2].transpose(1, 2) / 4  # [E, r, 20], strided
    indices, weights = random_routing(17, 4, 2)
    want = torch_moe_lora_delta(x.double(), lora_A.double(), lora_B.double(), indices,
                                weights.double(), 0.5)
    got = kernels.triton_moe_lora_delta(x, lora_A, lora_B, indices, weights, 0.5)
    assert relative_error(got, want) < REL_BOUND[torch.float32]


@pytest.mark.parametrize("num_experts,rank", [(4, 8), (8, 80)], ids=["masked-dense", "grouped"])
def test_checkpointing_and_compile_give_the_same_gradients(num_experts, rank):
    torch.manual_seed(2)
    leaves = [torch.randn(9, 32), torch.randn(num_experts, 32, rank) / 6,
              torch.randn(num_experts, rank, 24) / 6]
    indices, weights = random_routing(9, num_experts, 2)
    leaves = [t.requires_grad_() for t in (*leaves, weights)]

    def loss(x, a, b, w):
        return kernels.triton_moe_lora_delta(x, a, b, indices, w, 0.5).square().sum()

    plain = torch.autograd.grad(loss(*leaves), leaves)
    checkpointed = torch.autograd.grad(checkpoint(loss, *leaves, use_reentrant=False), leaves)
    # aot_eager traces the fake impls and the registered autograd formula without a C compiler
    compiled = torch.autograd.grad(
        torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves), leaves
    )
    for want, *others in zip(plain, checkpointed, compiled):
        for other in others:
            torch.testing.assert_close(other, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("router", ["topk", "rmoe", "graphmoe", "hypermoe"])
@pytest.mark.parametrize("num_experts,rank", [(4, 8), (8, 80)], ids=["masked-dense", "grouped"])
def test_a_whole_layer_compiles_without_graph_breaks(router, num_experts, rank):
    """Router, routing and the expert op of one site trace as a single graph (fullgraph=True
    raises on any break) and train to the same gradients as eager. HyperMoE generates one
    module per distinct unselected set present (torch.unique, a data-dependent shape): it is
    compiled with breaks there, and must still match."""
    from torch import nn

    from moe_hub.modeling.moe_lora_layer import MoELoraLinear, RoutingHolder
    from moe_hub.modeling.routing import ROUTERS, RoutingSite

    torch.manual_seed(4)
    config = MoELoraConfig(text_config=tiny_config("llama"), router=router,
                           num_experts=num_experts, num_experts_per_tok=2, lora_rank=rank,
                           lora_dropout=0.0, expert_kernel="triton")
    site = RoutingSite(0, 0, "q_proj", "q_proj", 32, 24)
    holder = RoutingHolder(nn.ModuleDict())
    shared = ROUTERS[router].shared_modules(config, [site])
    if shared is not None:
        holder.shared[router] = shared
    layer = MoELoraLinear(nn.Linear(32, 24), site, config, holder)
    layer.router.connect([site])
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    x = torch.randn(2, 5, 32)
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=router != "hypermoe")
    for run in (layer, compiled):
        torch.manual_seed(0)  # HyperMoE's noisy gating draws the same noise in both
        loss = run(x).square().sum()
        results.append([loss.detach(), *torch.autograd.grad(loss, params)])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_tokens():
    lora_A = torch.randn(2, 8, 16, requires_grad=True)
    lora_B = torch.randn(2, 16, 6, requires_grad=True)
    weights = torch.rand(0, 1, requires_grad=True)
    y = kernels.triton_moe_lora_delta(torch.randn(0, 8), lora_A, lora_B,
                                      torch.zeros(0, 1, dtype=torch.long), weights, 1.0)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert lora_A.grad.abs().max() == 0 and lora_B.grad.abs().max() == 0


def test_bad_inputs_raise_clear_errors():
    x, lora_A, lora_B = torch.randn(3, 8), torch.randn(2, 8, 16), torch.randn(2, 16, 8)
    indices, weights = random_routing(3, 2, 1)
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.triton_moe_lora_delta(x.double(), lora_A, lora_B, indices, weights, 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.triton_moe_lora_delta(x, lora_A.half(), lora_B, indices, weights, 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        kernels.triton_moe_lora_delta(torch.randn(3, 9), lora_A, lora_B, indices, weights, 1.0)
    with pytest.raises(ValueError, match="int64"):
        kernels.triton_moe_lora_delta(x, lora_A, lora_B, indices.int(), weights, 1.0)


def test_supported_only_where_it_can_run(monkeypatch: pytest.MonkeyPatch):
    x = torch.randn(2, 4, device="cpu")
    # CPU tensors: only through the interpreter, and only when asked for.
    assert kernels.triton_supported(x) == (not ON_GPU)
    if ON_GPU:
        assert kernels.triton_supported(x.to(DEVICE))
    monkeypatch.delenv("MOE_HUB_TRITON_ON_CPU")
    assert not kernels.triton_supported(x)
    indices, weights = random_routing(2, 2, 1)
    with pytest.raises(RuntimeError, match="expert_kernel='torch'"):
        kernels.triton_moe_lora_delta(x, torch.randn(2, 4, 8, device="cpu"),
                                      torch.randn(2, 8, 4, device="cpu"), indices.cpu(),
                                      weights.cpu(), 1.0)


def tiny_moe_model(kernel: str, num_experts: int, rank: int,
                   granularity: str = "linear") -> MoELoraForCausalLM:
    torch.manual_seed(0)
    config = MoELoraConfig(
        text_config=tiny_config("llama"), num_experts=num_experts, num_experts_per_tok=2,
        lora_rank=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, expert_kernel=kernel,
        output_router_logits=True, router_aux_loss_coef=0.01, routing_granularity=granularity,
        target_modules=["q_proj", "down_proj"],  # an attention and an MLP linear keep it quick
    )
    model = MoELoraForCausalLM(config)
    with torch.no_grad():  # B starts at zero; non-zero B makes every gradient path non-trivial
        for name, param in model.named_parameters():
            if ".lora_B" in name:  # also the block's lora_B.<linear>
                param.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize(
    "num_experts,rank,checkpointed,granularity",
    # the interpreter is slow: checkpoint one of them
    [(4, 8, True, "linear"), (4, 160, False, "linear"), (4, 160, False, "block")],
    ids=["masked-dense-checkpointed", "grouped", "grouped-block-shared-grouping"],
)
def test_model_triton_path_matches_torch_path(num_experts, rank, checkpointed, granularity):
    """Same loss and parameter gradients from the Triton path as from the torch path."""
    input_ids = random_input_ids()
    results = {}
    for kernel in ("torch", "triton"):
        model = tiny_moe_model(kernel, num_experts, rank, granularity)
        model.train()
        if kernel == "triton" and checkpointed:
            model.gradient_checkpointing_enable()
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[kernel] = (out.loss.detach(), grads)
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=0)
    assert grads_k.keys() == grads_t.keys()
    assert any(".router." in n for n in grads_t) and any("lora_A" in n for n in grads_t)
    for name, want in grads_t.items():
        assert want.abs().max() > 0, name
        assert relative_error(grads_k[name], want.double()) < 1e-4, name


def test_precomputed_grouping_gives_the_same_result():
    torch.manual_seed(5)
    x, lora_A, lora_B = torch.randn(23, 20), torch.randn(6, 20, 96), torch.randn(6, 96, 14)
    indices, weights = random_routing(23, 6, 2, seed=5)
    runs = []
    for grouping in (None, kernels.group_by_expert(indices, 6)):
        inputs = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, weights)]
        y = kernels.triton_moe_lora_delta(*inputs[:3], indices, inputs[3], 0.5, grouping)
        y.backward(torch.ones_like(y))
        runs.append([y.detach(), *(t.grad for t in inputs)])
    for computed, given in zip(*runs):
        assert torch.equal(computed, given)
    # A routed block computes the grouping in its own (compiled) code: no graph break there.
    compiled = torch.compile(kernels.group_by_expert, fullgraph=True, backend="eager")
    assert torch.equal(compiled(indices, 6), kernels.group_by_expert(indices, 6))
    with pytest.raises(ValueError, match="group_by_expert"):
        kernels.triton_moe_lora_delta(x, lora_A, lora_B, indices, weights, 0.5,
                                      kernels.group_by_expert(indices[:5], 6))


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_a_routed_block_sorts_its_tokens_once(kernel):
    """gate_proj, up_proj and down_proj share one routing decision, so one sort per block in
    training; decoding-sized inputs without autograd take the masked-dense slot form, no sort
    (the Triton kernels always sort)."""
    model = tiny_moe_model(kernel, 4, 160, granularity="block")
    input_ids = random_input_ids()

    def sorts(grad: bool) -> int:
        with torch.set_grad_enabled(grad), torch.profiler.profile() as prof:
            model(input_ids=input_ids)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::sort")  # argsort too

    assert sorts(grad=True) == len(model.routing_sites) > 0
    assert sorts(grad=False) == (len(model.routing_sites) if kernel == "triton" else 0)


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import moe_hub.kernels.moe_lora_triton as K
assert not K.INTERPRETED
gpu = K._blocks(on_gpu=True)
blocks = dict(TOP_K=2, BLOCK_M=gpu["M"], BLOCK_N=gpu["N"], BLOCK_K=gpu["K"], BLOCK_R=64,
              BLOCK_T=gpu["T"], BLOCK_E=16, BLOCK_RANK=16)
kernels = [  # (kernel, output pointer type, flags); activations/adapters take the input dtype
    (K._dense_shrink_kernel, "*fp32", {}),
    (K._dense_expand_kernel, "*{dt}", {}),
    (K._dense_weight_grad_kernel, "*fp32", {}),
    (K._dense_gate_grad_kernel, "*fp32", {}),
    (K._grouped_shrink_kernel, "*fp32", {"GATE_GRAD": True}),
    (K._grouped_expand_kernel, "*fp32", {"APPLY_WEIGHT": True}),
    # dA/dB are written in the masters' dtype: fp32 (16-bit adapters are the {dt} variant)
    (K._grouped_weight_grad_kernel, "*fp32", {"APPLY_WEIGHT": True}),
]
for dt, upcast in (("bf16", False), ("fp16", False), ("fp32", True)):
    types = {"a_ptr": f"*{dt}", "m_ptr": f"*{dt}", "p_ptr": f"*{dt}", "r_ptr": "*fp32",
             "u_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32", "plan_ptr": "*i64",
             "s_ptr": "*fp32", "dw_ptr": "*fp32", "alpha": "fp32"}
    for fn, out, flags in kernels:
        consts = {k: v for k, v in {**blocks, **flags, "UPCAST": upcast}.items()
                  if k in fn.arg_names}
        sig = {n: "constexpr" if n in consts else
               {**types, "out_ptr": out.format(dt=dt)}.get(n, "i32") for n in fn.arg_names}
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


def test_kernels_compile_for_an_h100_without_one(tmp_path: Path):
    """The interpreter accepts code the compiler rejects: build every kernel, bf16/fp16/fp32, with
    the GPU block sizes (16-bit tensor-core dots, scalar plan lookups, loops with loaded bounds,
    atomics) down to an sm_90 cubin with triton's bundled ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold compile every time, not a cache hit
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


if not kernels.INTERPRETED and not ON_GPU:
    # The kernel module was imported in compiled mode before this file set TRITON_INTERPRET:
    # replace every test above by one that runs this file in a fresh interpreter.
    for _name in [n for n in globals() if n.startswith("test_")]:
        del globals()[_name]

    def test_kernels_in_fresh_interpreter():
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", str(Path(__file__)), "-x", "-q", "-p",
             "no:cacheprovider"], cwd=repo, env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

