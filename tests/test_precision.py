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
    config = MoELoraConfig(
        text_config=tiny_config("llama"), router=router, num_experts=4, num_experts_per_tok=2,
        lora_rank=8, lora_dropout=0.0, routing_granularity=granularity, expert_kernel="torch",
        target_modules=["q_proj", "up_proj"], output_router_logits=True, **extra,
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
    ("graphmoe", "linear", {"steps": 3}),
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
