"""The papers' routers (RMoE, HyperMoE, GraphMoE) and MixLoRA block routing, on tiny real models."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_without_moe_hub, save_tiny_dense, tiny_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from moe_hub.convert import convert
from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM
from moe_hub.modeling.moe_lora_block import LoraLinear, MoELoraBlock
from moe_hub.modeling.moe_lora_layer import MoELoraLinear
from moe_hub.modeling.routing import RoutingContext

# Small widths so every router fits the 64-wide tiny models.
ROUTER_CONFIGS = {
    "topk": ("topk", {}),
    "rmoe": ("rmoe", {"hidden_size": 16}),
    "rmoe-hyper": ("rmoe", {"hidden_size": 16, "hyper": True, "embed_dim": 16}),
    "hypermoe": ("hypermoe", {"embed_dim": 16}),
    "graphmoe": ("graphmoe", {"mode": "refine", "steps": 3, "message_size": 8}),
    "graphmoe-message": ("graphmoe", {"mode": "message", "steps": 3, "message_size": 8}),
}
GRANULARITIES = ["linear", "block"]
CASES = [(r, g) for r in ROUTER_CONFIGS for g in GRANULARITIES]


def build(router: str, granularity: str = "linear", arch: str = "llama", seed: int = 0,
          **overrides) -> MoELoraForCausalLM:
    name, router_config = ROUTER_CONFIGS[router]
    settings = dict(router=name, router_config=router_config, num_experts=4,
                    num_experts_per_tok=2, lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                    routing_granularity=granularity, router_aux_loss_coef=0.01,
                    output_router_logits=True)
    settings.update(overrides)
    torch.manual_seed(seed)
    return MoELoraForCausalLM(MoELoraConfig(text_config=tiny_config(arch).to_dict(), **settings))


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give the zero-initialised output sides random values so experts change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "head_b" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def ids(batch: int = 2, seq: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


# 1. every router x granularity: conversion is a no-op, training touches only adapters, and the
# trained checkpoint reloads in a process without moe_hub.

@pytest.fixture(scope="module")
def trained_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("routers")
    dense_dir = save_tiny_dense(root / "dense", "llama")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    tokens = ids()
    with torch.no_grad():
        dense_logits = dense(tokens).logits
    results = {}
    for router, granularity in CASES:
        name, router_config = ROUTER_CONFIGS[router]
        out = convert(dense_dir, root / f"{router}-{granularity}", router=name,
                      router_config=router_config, granularity=granularity, experts=4, top_k=2,
                      rank=4, dropout=0.0, aux_loss_coef=0.01, progress=False)
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            init_err = rel_err(model(tokens).logits, dense_logits)
        adapters = set(model.adapter_parameter_names())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad_(n in adapters)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        torch.manual_seed(0)
        got_grad = set()
        for _ in range(2):
            loss = model(tokens, labels=tokens, output_router_logits=True).loss
            loss.backward()
            got_grad |= {n for n, p in model.named_parameters()
                         if p.grad is not None and p.grad.abs().sum() > 0}
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        dense_names = {n: model.dense_name(n) for n, _ in model.named_parameters()
                       if n not in adapters}
        dense_equal = all(torch.equal(p, dense_state[dense_names[n]])
                          for n, p in model.named_parameters() if n not in adapters)
        with torch.no_grad():
            trained_logits = model(tokens).logits
        saved = root / f"trained-{router}-{granularity}"
        model.save_pretrained(saved)
        torch.save({"ids": tokens, "logits": trained_logits}, saved / "expected.pt")
        results[(router, granularity)] = dict(
            init_err=init_err, adapters=adapters, changed=changed, got_grad=got_grad,
            dense_names=dense_names,
            dense_keys=set(dense_state), dense_equal=dense_equal, saved=saved,
            trained_err=rel_err(trained_logits, dense_logits),
        )
    return results


@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_converted_router_starts_as_dense_and_trains_only_adapters(
    trained_checkpoints: dict, router: str, granularity: str
) -> None:
    result = trained_checkpoints[(router, granularity)]
    # Block routing sums fp32 routing weights that add up to 1 within rounding.
    assert result["init_err"] < 1e-6
    # Every non-adapter tensor is a dense weight under its dense name, and stays bit-identical.
    assert set(result["dense_names"].values()) == result["dense_keys"]
    assert result["dense_equal"]
    assert result["got_grad"] <= result["changed"] <= result["adapters"]
    # Every kind of adapter tensor trained somewhere (an expert that no token chose in these two
    # steps may keep its A: with B = 0 at the start, A only gets gradient once B has moved).
    def kinds(names: set[str]) -> set[str]:
        return {re.sub(r"\.\d+\.", ".N.", name) for name in names}
    assert kinds(result["changed"]) == kinds(result["adapters"])
    assert result["trained_err"] > 1e-3  # training moved the model away from the base


def test_trained_checkpoints_reload_without_moe_hub(trained_checkpoints: dict,
                                                    tmp_path: Path) -> None:
    dirs = [str(r["saved"]) for r in trained_checkpoints.values()]
    printed = run_without_moe_hub(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        errors = []
        for path in {dirs!r}:
            expected = torch.load(path + "/expected.pt")
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                got = model(expected["ids"]).logits
            ref = expected["logits"]
            errors.append(((got - ref).norm() / ref.norm()).item())
        print(json.dumps(errors))
        """,
        cwd=tmp_path,
    )
    errors = json.loads(printed.strip().splitlines()[-1])
    assert len(errors) == len(dirs)
    assert max(errors) < 1e-6, dict(zip(dirs, errors))


# 2. RMoE

def _site_inputs(model: nn.Module) -> tuple[dict[int, torch.Tensor], list]:
    """Every site's input by site index, and under "ctx" the routing context the sites used."""
    captured, handles = {}, []
    for module in model.modules():
        if isinstance(module, MoELoraLinear | MoELoraBlock):
            def hook(mod, args, store=captured):
                store[mod.site.index] = args[0].reshape(-1, mod.site.in_features).detach()
                store["ctx"] = mod._routing.current()
            handles.append(module.register_forward_pre_hook(hook))
    return captured, handles


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_rmoe_recurrence_runs_over_depth_per_kind_float64(granularity: str) -> None:
    model = perturb(build("rmoe", granularity)).eval()
    captured, handles = _site_inputs(model)
    with torch.no_grad():
        model(ids())
    for h in handles:
        h.remove()
    ctx = captured["ctx"]
    shared_gru = [n for n, _ in model.named_parameters() if "gru" in n]
    assert shared_gru == [f"moe_shared.rmoe.gru.{p}"
                          for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    reference_cell = nn.GRUCell(16, 16).double()
    reference_cell.load_state_dict(model.moe_shared["rmoe"]["gru"].state_dict())
    routers = {m.site.index: m.router for m in model.modules()
               if isinstance(m, MoELoraLinear | MoELoraBlock)}
    kinds = {site.kind for site in model.routing_sites}
    assert kinds == ({"mlp"} if granularity == "block" else
                     {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
    for kind in kinds:
        chain = [s for s in model.routing_sites if s.kind == kind]
        assert [s.layer for s in chain] == [0, 1]
        state = torch.zeros(captured[0].shape[0], 16, dtype=torch.float64)
        for site in chain:
            router = routers[site.index]
            projected = captured[site.index].double() @ router.input_proj.double().T
            state = reference_cell(projected, state)
            assert rel_err(ctx.state[("rmoe", kind, site.index)], state) < 1e-5


@pytest.mark.parametrize("recurrent", [True, False])
def test_rmoe_state_dependence_and_recurrence_off(recurrent: bool) -> None:
    model = build("rmoe", "block", router_config={"hidden_size": 16, "recurrent": recurrent})
    model.eval()
    layer0, layer1 = (m.router for m in model.modules() if isinstance(m, MoELoraBlock))
    x0, x1 = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5))
    ctx = RoutingContext(None, model.moe_shared)
    with torch.no_grad():
        layer0(x0, ctx, None)
        before = layer1(x1, ctx, None).logits
        layer0.input_proj.add_(torch.randn_like(layer0.input_proj))
        ctx = RoutingContext(None, model.moe_shared)
        layer0(x0, ctx, None)
        after = layer1(x1, ctx, None).logits
        alone = layer1(x1, RoutingContext(None, model.moe_shared), None).logits
    assert (rel_err(after, before) > 1e-3) == recurrent
    # Without recurrence every site starts from h = 0, as the first site of a chain does.
    assert (rel_err(before, alone) < 1e-7) == (not recurrent)


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
def test_state_resets_every_forward_and_kv_cache_generation_matches(router: str) -> None:
    for granularity in GRANULARITIES:
        model = perturb(build(router, granularity)).eval()
        first, second = ids(1, 7, seed=10), ids(1, 7, seed=11)
        with torch.no_grad():
            alone = model(second).logits
            model(first)
            assert torch.equal(model(second).logits, alone)  # nothing carried over from `first`
            cached = model.generate(first, max_new_tokens=4, do_sample=False, use_cache=True)
            uncached = model.generate(first, max_new_tokens=4, do_sample=False, use_cache=False)
        assert cached.tolist() == uncached.tolist()


# 3. HyperMoE

def _hyper_reference(router, shared, x, indices) -> torch.Tensor:
    """Per-token float64 HyperMoE module: unselected-sum -> MLP -> hypernetwork -> x A B."""
    sup, site = router.hyper, router.site
    d = {n: p.detach().double() for n, p in sup.named_parameters()}
    h = {n: p.detach().double() for n, p in shared.named_parameters()}
    key = f"{site.in_features}x{site.out_features}"
    rank = shared.rank
    outputs = []
    for t in range(x.shape[0]):
        unselected = [e for e in range(d["expert_embedding"].shape[0]) if e not in indices[t]]
        s = d["expert_embedding"][unselected].sum(0)
        s = torch.relu(s @ d["mlp_in_weight"].T + d["mlp_in_bias"]) @ d["mlp_out_weight"].T \
            + d["mlp_out_bias"]
        site_vec = h["layer_embedding"][site.layer] + \
            h["kind_embedding"][shared.kinds.index(site.kind)]
        z = torch.relu(torch.cat([s, site_vec]) @ h["trunk_weight"].T + h["trunk_bias"])
        a = (z @ h[f"head_a_weight.{key}"].T + h[f"head_a_bias.{key}"]).view(-1, rank)
        b = (z @ h[f"head_b_weight.{key}"].T + h[f"head_b_bias.{key}"]).view(rank, -1)
        outputs.append(sup.scale * (x[t].double() @ a @ b))
    return torch.stack(outputs)


def test_hypermoe_module_depends_on_the_unselected_set_float64() -> None:
    model = perturb(build("hypermoe", "linear"))
    layer = next(m for m in model.modules() if isinstance(m, MoELoraLinear)
                 and m.site.kind == "self_attn.o_proj" and m.site.layer == 1)
    shared = model.moe_shared["hypermoe"]
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    x[1] = x[0]
    x[2] = x[0]
    indices = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 1], [0, 2], [0, 1]])
    with torch.no_grad():
        got = layer.router.hyper(x, indices, shared)
    assert rel_err(got, _hyper_reference(layer.router, shared, x, indices)) < 1e-5
    assert torch.equal(got[0], got[1])  # same set {0, 1}, other order: the same module
    assert rel_err(got[2], got[0]) > 1e-2  # same token, other set: another module


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_hypermoe_never_builds_a_module_per_token() -> None:
    tokens, width, rank = 2048, 256, 4
    config = MoELoraConfig(
        text_config=tiny_config("llama").to_dict(), router="hypermoe", num_experts=8,
        num_experts_per_tok=2, lora_rank=4, router_config={"embed_dim": 16, "hyper_rank": rank},
    )
    from moe_hub.modeling.router_hypermoe import HyperMoERouter, HyperNetwork
    from moe_hub.modeling.routing import RoutingSite

    site = RoutingSite(0, 0, "o_proj", "o_proj", width, width)
    router = HyperMoERouter(site, config).train()
    shared = nn.ModuleDict({"hypermoe": HyperNetwork([site], router.options)})
    x = torch.randn(tokens, width, requires_grad=True)
    with _LargestTensor() as probe:
        out = router(x, RoutingContext(None, shared), None)
        out.residual.sum().backward()
    # A per-token generated matrix would hold tokens * width * rank values; the largest tensor
    # the router builds is the size of its input.
    assert probe.largest <= tokens * width < tokens * width * rank
    assert out.residual.shape == (tokens, width)
    assert rel_err(out.losses["hypermoe_cv"], _noisy_cv_loss(router, x.detach(), out)) < 1e-5


def _cv2(values: torch.Tensor) -> torch.Tensor:
    mean = values.mean()
    return ((values - mean) ** 2).sum() / (values.numel() - 1) / mean**2


def _noisy_cv_loss(router, x: torch.Tensor, out) -> torch.Tensor:
    """0.01 * (cv^2(importance) + cv^2(load)) in float64, load as Shazeer's smooth estimate: the
    probability that expert e beats the k-th largest noisy logit of the OTHER experts when only
    its own noise is redrawn."""
    x = x.double()
    clean = x @ router.weight.detach().double().T
    std = torch.nn.functional.softplus(x @ router.noise_weight.detach().double().T) + 0.01
    noisy = out.logits.detach().double()
    experts, k = noisy.shape[1], out.indices.shape[1]
    load = torch.zeros(experts, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    for e in range(experts):
        others = torch.cat([noisy[:, :e], noisy[:, e + 1:]], dim=1)
        threshold = others.topk(k, dim=1).values[:, -1]
        load[e] = normal.cdf((clean[:, e] - threshold) / std[:, e]).sum()
    gates = torch.zeros_like(noisy).scatter(1, out.indices, out.weights.detach().double())
    return 0.01 * (_cv2(gates.sum(0)) + _cv2(load))


def test_hypermoe_noisy_gating_only_in_training() -> None:
    model = build("hypermoe", "linear")
    router = next(m.router for m in model.modules() if isinstance(m, MoELoraLinear))
    x = torch.randn(16, 64)
    ctx = RoutingContext(None, model.moe_shared)
    router.eval()
    clean = router(x, ctx, None).logits
    assert torch.equal(clean, torch.zeros_like(clean))  # zero-initialised W_g
    router.train()
    noisy = router(x, ctx, None).logits
    std = noisy.std().item()  # softplus(0) + 0.01 with a zero W_noise
    assert 0.5 < std < 0.9 and not torch.equal(noisy, router(x, ctx, None).logits)


# 4. GraphMoE

@pytest.mark.parametrize("mode", ["refine", "message"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_graphmoe_one_step_is_exactly_topk(granularity: str, mode: str) -> None:
    topk = perturb(build("topk", granularity, seed=4)).train()
    graph = build("graphmoe", granularity, seed=9,
                  router_config={"mode": mode, "steps": 1}).train()
    graph.load_state_dict(topk.state_dict(), strict=True)
    tokens = ids()
    out_topk = topk(tokens, labels=tokens)
    out_graph = graph(tokens, labels=tokens)
    assert torch.equal(out_topk.logits, out_graph.logits)
    assert torch.equal(out_topk.loss, out_graph.loss)
    assert torch.equal(out_topk.expert_counts, out_graph.expert_counts)


def _graph_site(steps: int) -> MoELoraLinear:
    model = perturb(build("graphmoe", "linear", router_config={"mode": "message", "steps": steps,
                                                               "message_size": 8}))
    return model, next(m for m in model.modules() if isinstance(m, MoELoraLinear))


def test_graphmoe_each_step_depends_on_the_previous_float64() -> None:
    model, layer = _graph_site(3)
    router, cell = layer.router, model.moe_shared["graphmoe"]
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(6))
    out = router(x, RoutingContext(None, model.moe_shared), layer)
    assert out.logits.shape == (30, 4) and out.logit_indices.shape == (30, 2)
    ref_cell = nn.GRUCell(4, 8).double()
    ref_cell.load_state_dict(cell.state_dict())
    xd = x.double()
    base = xd @ router.weight.double().T
    activations = torch.einsum("td,edr->ter", xd, layer.lora_A.double())
    message = torch.zeros(10, 8, dtype=torch.float64)
    for step in range(3):
        logits = base if step == 0 else base + message @ router.message_weight.double().T
        assert rel_err(out.logits[10 * step:10 * (step + 1)], logits) < 1e-5
        weights, chosen = logits.softmax(-1).topk(2, dim=-1)
        assert torch.equal(out.logit_indices[10 * step:10 * (step + 1)], chosen)
        weights = weights / weights.sum(-1, keepdim=True)
        gates = torch.zeros_like(logits).scatter(1, chosen, weights)
        message = ref_cell(torch.einsum("te,ter->tr", gates, activations), message)
    assert torch.equal(out.indices, out.logit_indices[20:])
    # Round t reads round t-1: changing what the experts compute moves steps 2..T, not step 1.
    with torch.no_grad():
        layer.lora_A.mul_(3.0)
    moved = router(x, RoutingContext(None, model.moe_shared), layer).logits
    assert torch.equal(moved[:10], out.logits[:10])
    assert rel_err(moved[10:], out.logits[10:]) > 1e-3


def test_graphmoe_cost_grows_linearly_with_steps() -> None:
    flops = {}
    x = torch.randn(32, 64)
    for steps in (2, 3, 4, 6):
        model, layer = _graph_site(steps)
        with FlopCounterMode(display=False) as counter:
            layer.router(x, RoutingContext(None, model.moe_shared), layer)
        flops[steps] = counter.get_total_flops()
    per_step = flops[3] - flops[2]
    assert per_step > 0
    assert flops[4] - flops[3] == per_step and flops[6] - flops[4] == 2 * per_step
    # Parameters barely grow: the message path is E x m per site plus one shared GRU cell.
    assert per_step < flops[2]


def test_graphmoe_task_loss_reaches_the_message_path() -> None:
    model = perturb(build("graphmoe-message", "linear", output_router_logits=False)).train()
    tokens = ids()
    model(tokens, labels=tokens).loss.backward()
    cell = model.moe_shared["graphmoe"]
    assert cell.weight_ih.grad.abs().sum() > 0
    layer = next(m for m in model.modules() if isinstance(m, MoELoraLinear))
    assert layer.router.message_weight.grad.abs().sum() > 0


def _refine_reference(site: nn.Module, cell: nn.GRUCell, x: torch.Tensor, steps: int,
                      top_k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reading A written out per token and per expert in float64, from the site's parameters:
    u_0 = x; logits_t = u_{t-1} W_g + m_{t-1} U_g; u_t = u_{t-1} + E_t(u_{t-1});
    m_t = GRU(sum_j g_j u_{t-1} A_j, m_{t-1}); output f(x) + u_T - x."""
    router, scale = site.router, site.scale
    block = isinstance(site, MoELoraBlock)

    def linear(name: str, expert: int | None, u: torch.Tensor) -> torch.Tensor:
        frozen = site.base_layer.get_submodule(name) if block else site.base_layer
        y = u @ frozen.weight.T + (frozen.bias if frozen.bias is not None else 0)
        if expert is None:
            return y
        a = site.lora_A[name] if block else site.lora_A
        b = site.lora_B[name] if block else site.lora_B
        return y + scale * (u @ a[expert]) @ b[expert]

    def mlp(expert: int | None, u: torch.Tensor) -> torch.Tensor:
        act = site.base_layer.act_fn
        hidden = act(linear("gate_proj", expert, u)) * linear("up_proj", expert, u)
        return linear("down_proj", expert, hidden)

    def frozen(u):
        return mlp(None, u) if block else linear("", None, u)

    def routed(expert, u):
        return mlp(expert, u) if block else linear("", expert, u)

    input_a = site.lora_A["up_proj"] if block else site.lora_A
    u, state, all_logits = x, torch.zeros(x.shape[0], cell.hidden_size, dtype=x.dtype), []
    for step in range(steps):
        logits = u @ router.weight.T
        if step:
            logits = logits + state @ router.message_weight.T
        all_logits.append(logits)
        probs, chosen = logits.softmax(-1).topk(top_k, dim=-1)
        gates = probs / probs.sum(-1, keepdim=True)
        change = torch.zeros_like(u)
        message = torch.zeros(x.shape[0], input_a.shape[-1], dtype=x.dtype)
        for t in range(x.shape[0]):
            for j in range(top_k):
                e = int(chosen[t, j])
                change[t] = change[t] + gates[t, j] * (routed(e, u[t:t + 1])[0]
                                                      - frozen(u[t:t + 1])[0])
                message[t] = message[t] + gates[t, j] * (u[t] @ input_a[e])
        state = cell(message, state)
        u = u + change
    return frozen(x) + u - x, all_logits


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_graphmoe_refine_matches_a_float64_reference_with_gradients(granularity: str) -> None:
    steps = 3
    model = perturb(build("graphmoe", granularity)).double().train()
    site = next(m for m in model.modules() if isinstance(m, MoELoraLinear | MoELoraBlock)
                and m.site.kind in ("self_attn.o_proj", "mlp") and m.site.layer == 1)
    cell = model.moe_shared["graphmoe"]
    ref_cell = nn.GRUCell(cell.input_size, cell.hidden_size).double()
    ref_cell.load_state_dict(cell.state_dict())
    x = torch.randn(7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    out = site(x)
    expected, logits = _refine_reference(site, ref_cell, x, steps, 2)
    # Router math runs in float32: the float64 model agrees to float32 rounding of the gates.
    assert rel_err(out, expected) < 1e-5
    # Every step's gate, the shared cell, U_g and the experts get the reference's gradient:
    # nothing on the way (state, refined input) is detached.
    probe = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = ["router.weight", "router.message_weight", "lora_A", "lora_B"]
    params = dict(site.named_parameters())
    tensors = [p for n, p in params.items() if any(n.startswith(k) for k in names)]
    tensors += list(cell.parameters())
    got = torch.autograd.grad((out * probe).sum(), tensors)
    want = torch.autograd.grad((expected * probe).sum(),
                               tensors[:-4] + list(ref_cell.parameters()))
    for g, w in zip(got, want, strict=True):
        assert w.abs().sum() > 0
        assert rel_err(g, w) < 1e-4
    assert len(logits) == steps


def _dense_twin(model: MoELoraForCausalLM) -> nn.Module:
    """The dense causal LM with ``model``'s base weights."""
    dense = AutoModelForCausalLM.from_config(model.config.get_text_config())
    state, names = model.state_dict(), model.checkpoint_names_by_dense_name()
    wanted = dense.state_dict()
    dense.load_state_dict({k: state[names[k]] for k in wanted}, strict=True)
    return dense


@pytest.mark.parametrize(("arch", "steps"), [("llama", 2), ("llama", 3), ("gpt2", 3),
                                           ("phi3", 3)])
def test_graphmoe_refine_block_fresh_equals_the_base_under_autocast(arch: str, steps: int
                                                                     ) -> None:
    """A fresh conversion (B = 0): every expert change E_t is exactly zero, so under bf16
    autocast the refined block computes step 1's mixture, topk block's output bit for bit, and
    is as close to the dense base as topk block is (bf16 rounding of the mixture only)."""
    topk = build("topk", "block", arch, seed=4).eval()
    graph = build("graphmoe", "block", arch, seed=9,
                  router_config={"mode": "refine", "steps": steps, "message_size": 8}).eval()
    missing, unexpected = graph.load_state_dict(topk.state_dict(), strict=False)
    assert not unexpected and all("message_weight" in k or k.startswith("moe_shared.")
                                  for k in missing)
    dense = _dense_twin(topk).eval()
    tokens = ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = dense(tokens).logits.float()
        via_topk = topk(tokens).logits.float()
        via_graph = graph(tokens).logits.float()
    assert (via_graph - base).abs().max() <= (via_topk - base).abs().max()
    assert torch.equal(via_graph, via_topk)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_block_expert_change_is_the_mixture_minus_the_frozen_mlp(arch: str, normalize: bool
                                                                  ) -> None:
    """In float64 the change computed from the experts' terms is sum_j g_j MLP_j(x) - f(x), with
    a biased down projection (GPT-2) and with weights that do not sum to 1."""
    model = perturb(build("topk", "block", arch, normalize_expert_weights=normalize))
    model = model.double().eval()  # eval: GPT-2's MLP has its own dropout
    block = next(m for m in model.modules() if isinstance(m, MoELoraBlock))
    x = torch.randn(7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    route = block.router(x, RoutingContext(None, model.moe_shared), block)
    mixture, change = block.expert_change(x, route, with_mixture=True)
    assert torch.equal(mixture, block.mixture(x, route))
    frozen = block.base_layer(x)
    # Renormalised float32 weights sum to 1 up to rounding: that remainder times f is the
    # mixture's, not the experts' (float64 rounding is all that is left).
    surplus = route.weights.double().sum(-1, keepdim=True) - 1
    expected = mixture - frozen - (surplus * frozen if normalize else 0)
    assert rel_err(change, expected) < 1e-12
    assert change.abs().max() > 1e-3  # the experts (B perturbed) do change the block
    assert block.expert_change(x, route)[0] is None


def test_graphmoe_refine_records_every_step_and_refines_only_square_sites() -> None:
    model = perturb(build("graphmoe", "linear")).eval()
    tokens = ids()
    with torch.no_grad():
        out = model(tokens, output_router_logits=True)
    routers = {m.site.kind: m.router for m in model.modules() if isinstance(m, MoELoraLinear)}
    refining = {kind for kind, r in routers.items() if r.refines}
    # 64 -> 64; k/v (GQA), gate/up, down are not square
    assert refining == {"self_attn.q_proj", "self_attn.o_proj"}
    assert all((r.message_weight is None) == (kind not in refining) for kind, r in routers.items())
    steps = [logits.shape[0] // tokens.numel() for logits in out.router_logits]
    kinds = [site.kind for site in model.routing_sites]
    assert steps == [3 if kind in refining else 1 for kind in kinds]


def test_graphmoe_refine_cost_grows_linearly_with_steps_at_square_sites_only() -> None:
    flops: dict[tuple[str, int], int] = {}
    x = torch.randn(1, 16, 64)
    for steps in (1, 2, 3, 5):
        model = perturb(build("graphmoe", "block",
                              router_config={"mode": "refine", "steps": steps}))
        layers = {"mlp": next(m for m in model.modules() if isinstance(m, MoELoraBlock))}
        model = perturb(build("graphmoe", "linear",
                              router_config={"mode": "refine", "steps": steps}))
        for m in model.modules():
            kind = m.site.kind.rsplit(".", 1)[-1] if isinstance(m, MoELoraLinear) else None
            if kind in ("o_proj", "k_proj"):
                layers.setdefault(kind, m)
        for kind, layer in layers.items():
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                layer(x)
            flops[kind, steps] = counter.get_total_flops()
    for kind in ("mlp", "o_proj"):
        per_step = flops[kind, 3] - flops[kind, 2]
        assert per_step > 0 and flops[kind, 5] - flops[kind, 3] == 2 * per_step
        assert flops[kind, 2] - flops[kind, 1] >= per_step  # step 2 also starts the GRU state
    assert flops["k_proj", 1] == flops["k_proj", 5]  # 64 -> 32: one step whatever steps says


def test_graphmoe_config_without_mode_stays_reading_b(tmp_path: Path) -> None:
    """A checkpoint written before ``mode`` existed (no ``mode`` in router_config) loads into the
    message reading with every parameter it has, and computes what mode=message computes."""
    dense = save_tiny_dense(tmp_path / "dense")
    fresh = convert(dense, tmp_path / "new", router="graphmoe",
                    router_config={"steps": 3, "message_size": 8}, experts=4, top_k=2, rank=4,
                    dropout=0.0, progress=False)
    assert json.loads((fresh / "config.json").read_text())["router_config"]["mode"] == "refine"
    # Today's format: what convert wrote before this change, router_config without ``mode``.
    convert(dense, tmp_path / "old", router="graphmoe",
            router_config={"mode": "message", "steps": 3, "message_size": 8}, experts=4,
            top_k=2, rank=4, dropout=0.0, progress=False)
    trained = perturb(AutoModelForCausalLM.from_pretrained(tmp_path / "old",
                                                           trust_remote_code=True))
    trained.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["router_config"]["mode"]
    config_file.write_text(json.dumps(saved))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "old", trust_remote_code=True).eval()
    assert loaded.config.router_config["mode"] == "message"  # recorded from now on
    state = trained.state_dict()
    explicit = build("graphmoe", "linear",
                     router_config={"mode": "message", "steps": 3, "message_size": 8},
                     lora_dropout=0.05, lora_alpha=8.0).eval()
    explicit.load_state_dict(state, strict=True)
    refine = build("graphmoe", "linear").eval()
    with pytest.raises(RuntimeError, match="Unexpected key"):  # fewer message weights
        refine.load_state_dict(state, strict=True)
    tokens = ids()
    with torch.no_grad():
        want = explicit(tokens).logits
        assert torch.equal(loaded(tokens).logits, want)
        assert rel_err(want, AutoModelForCausalLM.from_pretrained(
            dense).eval()(tokens).logits) > 1e-3  # the experts (B perturbed) change the output
    assert {m.router.mode for m in loaded.modules() if hasattr(m, "router")} == {"message"}


def test_graphmoe_means_refine_whichever_way_it_is_built(tmp_path: Path) -> None:
    """``moe-hub convert --router graphmoe`` and ``MoELoraConfig(router="graphmoe")`` build the
    same model, refine, and say so in the config they save; a config saved before ``mode``
    existed (code-built or converted then: neither wrote it) still reads as message."""
    from typer.testing import CliRunner

    from moe_hub.cli.app import app

    dense = save_tiny_dense(tmp_path / "dense")
    result = CliRunner().invoke(app, ["convert", str(dense), str(tmp_path / "cli"), "--router",
                                      "graphmoe", "--experts", "4", "--rank", "4",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    from_cli = json.loads((tmp_path / "cli" / "config.json").read_text())["router_config"]
    in_code = MoELoraConfig(text_config=tiny_config("llama").to_dict(), router="graphmoe",
                            num_experts=4, lora_rank=4)
    assert from_cli == in_code.router_config == {"mode": "refine"}
    modes = {m.router.mode for m in MoELoraForCausalLM(in_code).modules()
             if isinstance(m, MoELoraLinear)}
    assert modes == {"refine"}
    in_code.save_pretrained(tmp_path / "code")
    assert MoELoraConfig.from_pretrained(tmp_path / "code").router_config["mode"] == "refine"
    saved = json.loads((tmp_path / "code" / "config.json").read_text())
    saved["router_config"] = {}
    (tmp_path / "code" / "config.json").write_text(json.dumps(saved))
    old = MoELoraConfig.from_pretrained(tmp_path / "code")
    assert old.router_config == {"mode": "message"}
    assert {m.router.mode for m in MoELoraForCausalLM(old).modules()
            if isinstance(m, MoELoraLinear)} == {"message"}


def test_graphmoe_info_names_the_sites_that_refine(tmp_path: Path) -> None:
    from moe_hub.info import checkpoint_info

    dense = save_tiny_dense(tmp_path / "dense")
    steps = {}
    for name, granularity, options in (("linear", "linear", {}), ("block", "block", {}),
                                       ("message", "linear", {"mode": "message"})):
        out = convert(dense, tmp_path / name, router="graphmoe",
                      router_config={"steps": 3, **options}, granularity=granularity,
                      experts=4, rank=4, progress=False)
        steps[name] = checkpoint_info(out)["router_steps"]
    assert steps["linear"] == ("refine: 3 steps at self_attn.o_proj, self_attn.q_proj (4 "
                               "sites); 1 step at mlp.down_proj, mlp.gate_proj, mlp.up_proj, "
                               "self_attn.k_proj, self_attn.v_proj (input width != output width)")
    assert steps["block"] == "refine: 3 steps at mlp (2 sites)"
    assert steps["message"] == "message: 3 routing steps at every site, experts run once"
    topk = convert(dense, tmp_path / "topk", experts=4, rank=4, progress=False)
    assert checkpoint_info(topk)["router_steps"] is None


def test_graphmoe_refine_router_alone_says_how_to_call_it() -> None:
    model = build("graphmoe", "linear")
    layer = next(m for m in model.modules() if isinstance(m, MoELoraLinear)
                 and m.site.kind == "self_attn.o_proj")
    with pytest.raises(RuntimeError, match="call the site module"):
        layer.router(torch.randn(3, 64), RoutingContext(None, model.moe_shared), layer)


# 5. gradient checkpointing, padding, dtypes, block numerics

def _loss_and_grads(model: nn.Module, tokens: torch.Tensor) -> tuple:
    model.zero_grad()
    torch.manual_seed(0)
    out = model(tokens, labels=tokens)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_gradient_checkpointing_gives_the_same_loss_and_grads(router: str,
                                                              granularity: str) -> None:
    model = perturb(build(router, granularity)).train()
    tokens = ids()
    plain, plain_grads = _loss_and_grads(model, tokens)
    calls = []
    for module in model.modules():
        if hasattr(module, "router") and hasattr(module, "site"):
            # A pre-hook: non-reentrant recomputation stops as soon as every saved tensor is
            # back, which can be inside the last router of a layer (GraphMoE refine, block).
            module.router.register_forward_pre_hook(lambda *args: calls.append(1))
    model.gradient_checkpointing_enable()
    ckpt, ckpt_grads = _loss_and_grads(model, tokens)
    sites = len(model.routing_sites)
    assert len(calls) == 2 * sites  # each router ran again when its layer was recomputed
    assert rel_err(ckpt.loss, plain.loss) < 1e-6
    assert ckpt.aux_losses.keys() == plain.aux_losses.keys()
    for name in plain.aux_losses:
        assert rel_err(ckpt.aux_losses[name], plain.aux_losses[name]) < 1e-6, name
    assert ckpt_grads.keys() == plain_grads.keys()
    routed = [n for n in plain_grads if ".router." in n or n.startswith("moe_shared.")]
    assert routed and all(plain_grads[n].abs().sum() > 0 for n in routed
                          if "noise_weight" not in n)
    for name, grad in plain_grads.items():
        if grad.abs().sum() > 0:
            assert rel_err(ckpt_grads[name], grad) < 1e-5, name
    with pytest.raises(ValueError, match="non-reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
def test_padding_is_excluded_from_routing_statistics(router: str) -> None:
    for granularity in GRANULARITIES:
        model = perturb(build(router, granularity)).train()
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        results = []
        for junk in (5, 200):
            tokens = ids()
            tokens[1, 6:] = junk
            torch.manual_seed(0)
            results.append(model(tokens, attention_mask=mask))
        first, second = results
        assert torch.equal(first.expert_counts, second.expert_counts)
        assert first.expert_counts.sum() == len(model.routing_sites) * 15 * 2
        for name in first.aux_losses:
            assert rel_err(first.aux_losses[name], second.aux_losses[name]) < 1e-6, name
        assert rel_err(first.logits[:, :6], second.logits[:, :6]) < 1e-6


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
def test_half_precision_forward_and_backward(router: str) -> None:
    for granularity, dtype in (("block", torch.bfloat16), ("linear", torch.float16)):
        model = perturb(build(router, granularity)).eval()
        tokens = ids()
        with torch.no_grad():
            reference = model(tokens, labels=tokens).loss
        half = copy.deepcopy(model).to(dtype)
        out = half(tokens, labels=tokens)
        out.loss.backward()
        assert out.logits.dtype == dtype
        # Half-precision activations may flip near-tied routing choices: compare the loss.
        assert rel_err(out.loss.float(), reference) < 2e-2
        lora = next(p for n, p in half.named_parameters() if "lora_B" in n)
        assert lora.grad is not None and torch.isfinite(lora.grad.float()).all()


def _merged_expert_mlp(mlp: nn.Module, block: MoELoraBlock, expert: int) -> nn.Module:
    merged = copy.deepcopy(mlp)
    for name in block.lora_A:
        delta = block.scale * block.lora_A[name][expert] @ block.lora_B[name][expert]
        linear = merged.get_submodule(name)
        with torch.no_grad():
            # nn.Linear stores [out, in], GPT-2's Conv1D [in, out].
            linear.weight += delta.T if isinstance(linear, nn.Linear) else delta
    return merged


@pytest.mark.parametrize(("arch", "normalize"),
                         [("llama", True), ("phi3", True), ("gpt2", True), ("gpt2", False)])
def test_block_experts_equal_whole_mlps_with_merged_lora_float64(arch: str,
                                                                 normalize: bool) -> None:
    model = perturb(build("topk", "block", arch=arch, normalize_expert_weights=normalize))
    model = model.double().eval()
    block = next(m for m in model.modules() if isinstance(m, MoELoraBlock))
    with torch.no_grad():
        for bias in (p for n, p in block.base_layer.named_parameters() if "bias" in n):
            bias.normal_()
    x = torch.randn(3, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = block(x)
        route = block.router(x.reshape(-1, 64), RoutingContext(None, model.moe_shared), block)
        flat = x.reshape(-1, 64)
        expected = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for j in range(route.indices.shape[1]):
                expert = _merged_expert_mlp(block.base_layer, block, int(route.indices[t, j]))
                expected[t] += float(route.weights[t, j]) * expert(flat[t:t + 1])[0]
    assert rel_err(got.reshape(-1, 64), expected) < 1e-12
    plain = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert plain and not any(isinstance(m, MoELoraLinear) for m in model.modules())
    layer = plain[0]
    with torch.no_grad():
        reference = layer.base_layer(flat) + layer.scale * flat @ layer.lora_A @ layer.lora_B
        assert rel_err(layer(flat), reference) < 1e-12


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "gemma"])
def test_block_mode_keys_are_dense_keys_with_base_layer_inserted(arch: str) -> None:
    torch.manual_seed(0)
    dense_keys = set(AutoModelForCausalLM.from_config(tiny_config(arch)).state_dict())
    model = build("topk", "block", arch=arch)
    adapters = set(model.adapter_parameter_names())
    base_keys = [k for k in model.state_dict() if k not in adapters]
    assert all(".base_layer." in k for k in base_keys if ".mlp." in k)
    assert {model.dense_name(k) for k in base_keys} == dense_keys
    assert any(".mlp.lora_A." in k for k in adapters) and any(".mlp.router." in k for k in adapters)


def test_block_mode_rejects_unknown_mlp_shapes() -> None:
    from transformers import PhiConfig

    phi = PhiConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4)
    with pytest.raises(ValueError, match="--granularity linear"):
        MoELoraForCausalLM(MoELoraConfig(text_config=phi.to_dict(), routing_granularity="block",
                                         num_experts=4, lora_rank=4))


def test_router_options_are_validated() -> None:
    with pytest.raises(ValueError, match="steps >= 1"):
        build("graphmoe", router_config={"steps": 0})
    with pytest.raises(ValueError, match="mode=refine or mode=message"):
        build("graphmoe", router_config={"mode": "graph"})
    with pytest.raises(ValueError, match="unknown router"):
        MoELoraForCausalLM(MoELoraConfig(text_config=tiny_config("llama").to_dict(),
                                         router="nope"))
