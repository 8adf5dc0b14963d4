"""Precision policy: routers compute in fp32 under autocast; the expert op computes with 16-bit
operands and fp32 accumulation while the master adapters stay fp32."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from torch import nn

from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM
from moe_hub.modeling.moe_lora_block import MoELoraBlock
from moe_hub.modeling.moe_lora_layer import MoELoraLinear
from moe_hub.modeling.routing import RoutingContext

FP32_EPS = torch.finfo(torch.float32).eps
BF16_EPS = torch.finfo(torch.bfloat16).eps


def site_modules(model: nn.Module) -> list[nn.Module]:
    sites = [m for m in model.modules() if isinstance(m, MoELoraLinear | MoELoraBlock)]
    return sorted(sites, key=lambda m: m.site.index)


def random_model(router: str, granularity: str = "linear", **extra) -> MoELoraForCausalLM:
    torch.manual_seed(0)
    extra.setdefault("target_modules", ["q_proj", "up_proj"])
    config = MoELoraConfig(
        text_config=tiny_config("llama"), router=router, num_experts=4, num_experts_per_tok=2,
        lora_rank=8, lora_dropout=0.0, routing_granularity=granularity, expert_kernel="torch",
        output_router_logits=True, **extra,
    )
    model = MoELoraForCausalLM(config)
    with torch.no_grad():  # HyperMoE's gate and every B start at zero: make them matter
        for name, param in model.named_parameters():
            if ".router." in name or ".lora_B" in name or name.startswith("moe_shared"):
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("router,granularity,options", [
    ("topk", "linear", {}),
    ("rmoe", "linear", {}),  # q_proj of layer 0 -> q_proj of layer 1: GRU state across depth
    ("rmoe", "block", {"hyper": True}),
    ("hypermoe", "linear", {}),
    ("graphmoe", "linear", {"mode": "message", "steps": 3}),  # refine needs the site's step
])
def test_router_logits_stay_fp32_under_autocast(router, granularity, options):
    """Under CPU autocast bf16, every site's logits equal a float64 run of the same routers on
    the same inputs within fp32 rounding (bf16 rounding would be ~2^-8 relative)."""
    model = random_model(router, granularity, router_config=options).eval()
    sites = site_modules(model)
    seen = []
    hooks = [
        site.router.register_forward_hook(
            lambda module, args, out: seen.append((args[0].detach(), out.logits.detach())))
        for site in sites
    ]
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(sites) > 1

    # Reference: float64 copies of the routers, chained in site order through one context.
    shared = copy.deepcopy(sites[0]._routing.shared).double()
    ctx = RoutingContext(None, shared)
    for site, (x, logits) in zip(sites, seen):
        router = copy.deepcopy(site.router).double()
        lora_A = (site.input_lora_A() if isinstance(site, MoELoraBlock) else site.lora_A)
        experts = SimpleNamespace(lora_A=lora_A.detach().double())  # what graphmoe reads
        want = router(x.double(), ctx, experts).logits
        assert logits.dtype == torch.float32
        error = ((logits.double() - want).norm() / want.norm()).item()
        # fp32 dot products of length d_in <= 128 plus a few fp32 ops per chained step
        assert error < 64 * FP32_EPS * (site.site.index + 1), (site.site.name, error)
        assert want.abs().max() > 0
    # The chained routers really carried state: their logits depend on the earlier sites.
    if router == "rmoe":
        assert any(key[-1] > 0 for key in ctx.state)


@pytest.mark.parametrize("num_experts", [4, 16])
def test_block_expert_flops_scale_with_k_not_e(num_experts):
    """A routed MLP block multiplies exactly: the frozen MLP once per token, and per (token,
    chosen expert) one LoRA shrink and expand per MLP linear, whatever the number of experts."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    top_k, rank = 2, 8
    config = MoELoraConfig(
        text_config=tiny_config("llama"), num_experts=num_experts, num_experts_per_tok=top_k,
        lora_rank=rank, lora_dropout=0.0, routing_granularity="block", expert_kernel="torch",
    )
    model = MoELoraForCausalLM(config).train()
    block = site_modules(model)[0]
    d, inner = 64, 128  # tiny_config's hidden and intermediate sizes
    x = torch.randn(3, 7, d, requires_grad=True)
    tokens = 21
    with FlopCounterMode(display=False) as counter:
        block(x)
    with FlopCounterMode(display=False) as router_counter:
        block.router(x.reshape(-1, d), RoutingContext(None, block._routing.shared), block)
    base = 3 * 2 * tokens * d * inner
    lora = 2 * tokens * top_k * rank * ((d + inner) * 2 + (inner + d))
    assert counter.get_total_flops() - router_counter.get_total_flops() == base + lora


def saved_storages(model: nn.Module, run) -> list[torch.Tensor]:
    """One tensor per distinct non-parameter storage autograd saves while ``run`` executes."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return list(seen.values())


def hidden_sized(tensors: list[torch.Tensor], numel: int, dtype: torch.dtype) -> int:
    return sum(1 for t in tensors if t.dtype == dtype and t.untyped_storage().nbytes()
               == numel * t.element_size())


@pytest.mark.parametrize("autocast", [False, True])
def test_sites_keep_no_extra_copy_of_x_on_a_bf16_base(autocast):
    """bf16 base, fp32 adapters (finetune's layout): the expert ops and routers keep the bf16
    hidden states themselves, at most one per distinct site input (attention input shared by
    q/k/v, o_proj's input, the MLP input shared by gate/up; down_proj's is wider), never an fp32
    copy per site."""
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    counts = {}
    for variant in ("dense", "moe"):
        torch.manual_seed(0)
        if variant == "dense":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(tiny_config("llama"))
        else:
            model = random_model("topk", target_modules=None)
        model = model.to(torch.bfloat16)
        model.requires_grad_(False)
        for name, param in model.named_parameters():
            if ".lora_" in name or ".router." in name:
                param.data = param.data.float()
                param.requires_grad_(True)
        model.enable_input_require_grads()
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with amp:
            saved = saved_storages(model, lambda m=model: m(input_ids=ids))
        counts[variant] = {dtype: hidden_sized(saved, 18 * 64, dtype)
                           for dtype in (torch.bfloat16, torch.float32)}
    assert counts["moe"][torch.float32] == counts["dense"][torch.float32], counts
    layers = 2
    assert counts["moe"][torch.bfloat16] <= counts["dense"][torch.bfloat16] + 3 * layers, counts


def test_sites_reading_one_fp32_x_share_one_16bit_copy():
    """fp32 base under autocast: q/k/v read one x and keep one bf16 copy of it between them for
    the expert ops, not one each (the frozen linears' own autocast copies are the same with or
    without experts)."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    counts = {}
    for variant in ("dense", "moe"):
        torch.manual_seed(0)
        model = (AutoModelForCausalLM.from_config(tiny_config("llama")) if variant == "dense"
                 else random_model("topk", target_modules=["q_proj", "k_proj", "v_proj"]))
        model.train().requires_grad_(False)
        model.enable_input_require_grads()
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name or ".router." in name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved = saved_storages(model, lambda m=model: m(input_ids=ids))
        counts[variant] = hidden_sized(saved, 18 * 64, torch.bfloat16)
    assert counts["moe"] == counts["dense"] + 2  # one per layer


def half_bound(dtype: torch.dtype, reduction: int) -> float:
    """Normwise relative error of the expert op with 16-bit operands and fp32 accumulation:
    each of x, A, B, the rank-space values and the output is rounded once to ``dtype`` (unit
    roundoff eps/2, ~6 roundings, first order), plus fp32 accumulation over ``reduction`` terms."""
    return 3 * torch.finfo(dtype).eps + reduction * FP32_EPS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("num_experts,rank", [(4, 8), (8, 80)], ids=["masked-dense", "grouped"])
def test_torch_expert_op_under_autocast_matches_float64(dtype, num_experts, rank):
    from moe_hub.modeling.moe_lora_ops import moe_lora_delta

    generator = torch.Generator().manual_seed(rank)
    num_tokens, d_in, d_out, top_k = 40, 48, 36, 2
    x = torch.randn(num_tokens, d_in, generator=generator)
    lora_A = torch.randn(num_experts, d_in, rank, generator=generator) / d_in**0.5
    lora_B = torch.randn(num_experts, rank, d_out, generator=generator) / rank**0.5  # not 0
    indices = torch.rand(num_tokens, num_experts, generator=generator).topk(top_k).indices
    weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    grad = torch.randn(num_tokens, d_out, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    with torch.autocast("cpu", dtype=dtype):
        y = moe_lora_delta(leaves[0], leaves[1], leaves[2], indices, leaves[3], 1.5,
                           kernel="torch")
    y.backward(grad)
    ref = [t.double().requires_grad_() for t in (x, lora_A, lora_B, weights)]
    want = moe_lora_delta(ref[0], ref[1], ref[2], indices, ref[3], 1.5, kernel="torch")
    want.backward(grad.double())

    assert y.dtype == dtype  # 16-bit operands and result
    assert leaves[1].grad.dtype == leaves[2].grad.dtype == torch.float32  # the masters' dtype
    bound = half_bound(dtype, max(d_in, d_out, num_tokens))
    for name, got, expected in [("y", y, want), *[
            (n, a.grad, b.grad) for n, a, b in zip(("dx", "dA", "dB", "dw"), leaves, ref)]]:
        error = ((got.double() - expected).norm() / expected.norm()).item()
        assert error < bound, (name, error, bound)


def test_layer_under_autocast_matches_float64_and_keeps_the_expert_delta():
    """A whole MoELoraLinear under bf16 autocast: base + experts within bf16 bounds of a
    float64 run with the same routing; the experts' share is far above that bound, so a
    dropped delta fails."""
    model = random_model("topk").train()
    layer = site_modules(model)[0]
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 1.0)
    routes = []
    layer.router.register_forward_hook(lambda module, args, out: routes.append(out))
    x = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    route = routes[0]
    flat = x.reshape(-1, 64).double()
    base = flat @ layer.base_layer.weight.double().t()
    delta = torch.zeros_like(base)
    for t in range(flat.shape[0]):
        for j in range(route.indices.shape[1]):
            e = int(route.indices[t, j])
            delta[t] += float(route.weights[t, j].detach()) * layer.scale * (
                flat[t] @ layer.lora_A[e].double() @ layer.lora_B[e].double())
    want = base + delta
    error = ((got.reshape(-1, want.shape[-1]).double() - want).norm() / want.norm()).item()
    share = (delta.norm() / want.norm()).item()
    bound = half_bound(torch.bfloat16, 64)
    assert error < bound < share, (error, bound, share)
