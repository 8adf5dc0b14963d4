"""Router losses against independent formulas, gradients across depth, half precision, site
kinds, padding masks and router options: each test fails if its behaviour breaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import save_tiny_dense, tiny_config
from test_routers import build, ids, perturb, rel_err
from typer.testing import CliRunner

from moe_hub.cli.app import app
from moe_hub.convert import convert
from moe_hub.errors import MoEHubError
from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM
from moe_hub.modeling.moe_lora_block import MoELoraBlock
from moe_hub.modeling.moe_lora_layer import MoELoraLinear
from moe_hub.modeling.routing import RouterOutput, RoutingContext, load_balancing_loss

# 1. Auxiliary losses


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balance_is_one_when_balanced_and_e_when_collapsed(top_k: int) -> None:
    experts, tokens = 4, 64
    # Balanced: uniform probabilities and every expert chosen equally often.
    uniform = torch.zeros(tokens, experts)
    spread = (torch.arange(tokens * top_k).view(tokens, top_k)) % experts
    assert load_balancing_loss(uniform, spread, experts, None).item() == pytest.approx(1.0)
    # Collapsed: every token's probability mass and choices on the same k experts.
    collapsed = torch.full((tokens, experts), -1e4)
    collapsed[:, :top_k] = 0.0
    chosen = torch.arange(top_k).expand(tokens, top_k)
    # f_e = 1/k and P_e = 1/k on k experts: E * k / k^2 = E / k (E for top-1).
    got = load_balancing_loss(collapsed, chosen, experts, None).item()
    assert got == pytest.approx(experts / top_k)
    # Padding rows (here routed elsewhere) do not count.
    mask = torch.ones(tokens + 8, dtype=torch.bool)
    mask[tokens:] = False
    padded = load_balancing_loss(torch.cat([collapsed, uniform[:8]]),
                                 torch.cat([chosen, spread[:8]]), experts, mask)
    assert padded.item() == pytest.approx(experts / top_k)


def _summary_reference(out, mask: torch.Tensor, experts: int) -> tuple[float, float]:
    """Switch load balance and z-loss over every site's unpadded rows, in float64."""
    rows = mask.reshape(-1)
    logits = torch.cat([site[rows] for site in out.router_logits]).double()
    probs = logits.softmax(-1)
    top = logits.topk(2, dim=-1).indices
    fraction = torch.zeros(experts, dtype=torch.float64)
    for e in range(experts):
        fraction[e] = (top == e).double().sum() / top.numel()
    balance = experts * (fraction * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return balance.item(), z.item()


def test_model_aux_losses_and_total_loss_match_formulas() -> None:
    model = perturb(build("topk", router_aux_loss_coef=0.02, router_z_loss_coef=0.1)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoELoraLinear):
                module.router.weight.normal_(std=0.5)  # logits far from zero: z-loss matters
    tokens = ids(3, 8)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        out = model(tokens, attention_mask=mask, labels=tokens)
        plain = model(tokens, attention_mask=mask, labels=tokens, output_router_logits=False)
    balance, z = _summary_reference(out, mask.bool(), 4)
    assert out.aux_losses["load_balance"].item() == pytest.approx(balance, rel=1e-5)
    assert out.aux_losses["z_loss"].item() == pytest.approx(z, rel=1e-5)
    assert z > 1.0
    assert (out.loss - plain.loss).item() == pytest.approx(0.02 * balance + 0.1 * z, rel=1e-4)


def test_hypermoe_cv_loss_is_summed_over_sites_without_switch_loss() -> None:
    model = perturb(build("hypermoe")).eval()  # eval: no gating noise, load = hard counts
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoELoraLinear):
                module.router.weight.normal_(std=0.3)
    tokens = ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = model(tokens, attention_mask=mask, labels=tokens)
        plain = model(tokens, attention_mask=mask, labels=tokens, output_router_logits=False)
    rows = mask.bool().reshape(-1)
    expected = 0.0
    for logits in out.router_logits:
        logits = logits[rows].double()
        top, chosen = logits.topk(2, dim=-1)
        gates = torch.zeros_like(logits).scatter(1, chosen, top.softmax(-1))
        importance, load = gates.sum(0), (gates > 0).double().sum(0)
        cv2 = [((v - v.mean()) ** 2).sum() / (v.numel() - 1) / v.mean() ** 2
               for v in (importance, load)]
        expected += 0.01 * (cv2[0] + cv2[1]).item()
    assert len(out.router_logits) == 14
    assert out.aux_losses["hypermoe_cv"].item() == pytest.approx(expected, rel=1e-5)
    # The reference trains HyperMoE with its cv loss alone: no Switch term in the loss.
    assert out.aux_losses["load_balance"].item() > 0.5
    assert (out.loss - plain.loss).item() == pytest.approx(expected, rel=1e-4)


# 2. RMoE: the gradient of a later site's logits reaches the earlier site and the shared GRU.


def test_rmoe_later_logits_train_the_earlier_router_and_the_gru() -> None:
    # B = 0 (as converted): routing weights do not change the hidden states, so layer 1's logits
    # depend on layer 0's router only through the carried GRU state.
    model = build("rmoe", "block").eval()
    routers = [m.router for m in model.modules() if isinstance(m, MoELoraBlock)]
    layer0 = routers[0]
    with torch.no_grad():  # larger than the 0.02 init, so differences stand above float32 noise
        for router in routers:
            router.input_proj.normal_(std=0.3)
            router.output_proj.normal_(std=1.0)
    gru = model.moe_shared["rmoe"]["gru"]
    tokens = ids(2, 5)

    def later_logits() -> torch.Tensor:
        return model(tokens).router_logits[1].double().square().sum()

    later_logits().backward()
    # Central differences of the same function; router math is float32, so a step of 1e-2
    # (truncation error ~1e-4 relative) stays above its rounding noise.
    step = 1e-2
    for param, index in ((layer0.input_proj, (0, 0)), (gru.weight_ih, (3, 1)),
                         (gru.weight_hh, (20, 2))):
        analytic = param.grad[index].item()
        with torch.no_grad():
            param[index] += step
            up = later_logits().item()
            param[index] -= 2 * step
            down = later_logits().item()
            param[index] += step
        numeric = (up - down) / (2 * step)
        assert abs(numeric) > 1e-3
        assert analytic == pytest.approx(numeric, rel=2e-2)


# 3. Half precision: the expert delta is really added.


def _expected_delta(layer: MoELoraLinear, x: torch.Tensor) -> torch.Tensor:
    route = layer.router(x.float(), RoutingContext(None, layer._routing.shared), layer)
    a, b = layer.lora_A.double(), layer.lora_B.double()
    delta = torch.zeros(x.shape[0], b.shape[-1], dtype=torch.float64)
    for j in range(route.indices.shape[1]):
        e = route.indices[:, j]
        rows = torch.einsum("ti,tir->tr", x.double(), a[e])
        delta += route.weights[:, j, None].double() * torch.einsum("tr,tro->to", rows, b[e])
    return layer.scale * delta


@pytest.mark.parametrize("mode", ["bf16 weights", "bf16 autocast"])
def test_half_precision_output_is_base_plus_expert_delta(mode: str) -> None:
    model = perturb(build("topk")).eval()
    if mode == "bf16 weights":
        model = model.to(torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, MoELoraLinear)
                 and m.site.kind == "self_attn.o_proj")
    dtype = torch.bfloat16
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(4))
    x = x.to(dtype) if mode == "bf16 weights" else x
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=mode == "bf16 autocast"):
        got = layer(x)
        base = layer.base_layer(x)
        expected = _expected_delta(layer, x.to(dtype))
    assert got.dtype == dtype
    delta = got.double() - base.double()
    # bf16 keeps 8 mantissa bits: y and base are each rounded once (relative 2^-8 of |y|), the
    # delta's own products and sums a few times more.
    bound = 8 * 2.0**-8 * (got.double().norm() / expected.norm()).item()
    assert expected.norm() > 0.1 * base.double().norm()
    assert rel_err(delta, expected) < bound


# 4. Sites keyed by their path inside the layer (GPT-2's attn.c_proj vs mlp.c_proj).


def test_gpt2_c_proj_sites_are_two_kinds() -> None:
    model = build("rmoe", arch="gpt2")
    kinds = [(s.layer, s.kind) for s in model.routing_sites]
    assert kinds[:4] == [(0, "attn.c_attn"), (0, "attn.c_proj"), (0, "mlp.c_fc"),
                         (0, "mlp.c_proj")]
    routers = {m.site.index: m.router for m in model.modules() if isinstance(m, MoELoraLinear)}
    for site in model.routing_sites:
        previous = routers[site.index].previous_site
        if site.layer == 0:
            assert previous is None, site  # each chain starts at layer 0, never inside a layer
        else:
            assert model.routing_sites[previous].kind == site.kind
            assert model.routing_sites[previous].layer == site.layer - 1
    hyper = build("hypermoe", arch="gpt2").moe_shared["hypermoe"]
    assert hyper.kinds == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert hyper.kind_embedding.shape[0] == 4


def _strip_site_keys(path: Path) -> None:
    """Make a checkpoint look like one saved before ``site_keys`` existed."""
    config = json.loads((path / "config.json").read_text())
    config.pop("site_keys")
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("arch", "kinds"), [("llama", 7), ("gpt2", 3)])
def test_checkpoints_saved_before_path_kinds_load_strictly(tmp_path: Path, arch: str,
                                                           kinds: int) -> None:
    model = perturb(build("hypermoe", arch=arch, site_keys="name")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "kind_embedding" in name or ".router.weight" in name:
                param.normal_()
    model.save_pretrained(tmp_path)
    _strip_site_keys(tmp_path)
    tokens = ids()
    with torch.no_grad():
        expected = model(tokens).logits
    loaded, info = MoELoraForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert loaded.config.site_keys == "name"
    assert loaded.moe_shared["hypermoe"].kind_embedding.shape[0] == kinds
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens).logits, expected)
    if arch == "llama":  # the same model keyed by path: same kinds, same order, same outputs
        path_model = MoELoraForCausalLM.from_pretrained(tmp_path, site_keys="path").eval()
        with torch.no_grad():
            assert torch.equal(path_model(tokens).logits, expected)


def test_new_checkpoints_record_path_kinds(tmp_path: Path) -> None:
    out = convert(save_tiny_dense(tmp_path / "dense", "gpt2"), tmp_path / "moe",
                  router="hypermoe", experts=4, top_k=2, rank=4, progress=False)
    assert json.loads((out / "config.json").read_text())["site_keys"] == "path"
    model = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.moe_shared["hypermoe"].kind_embedding.shape[0] == 4


# 5. The padding mask follows the tokens each site sees.


def _cross_attention_model() -> MoELoraForCausalLM:
    bert = tf.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, is_decoder=True,
                         add_cross_attention=True)
    torch.manual_seed(0)
    config = MoELoraConfig(text_config=bert.to_dict(), router="hypermoe", num_experts=4,
                           num_experts_per_tok=2, lora_rank=4, output_router_logits=True)
    return perturb(MoELoraForCausalLM(config)).eval()


@pytest.mark.parametrize("encoder_tokens", [5, 9])
def test_sites_that_see_other_tokens_keep_the_others_masked(encoder_tokens: int) -> None:
    model = _cross_attention_model()
    tokens = ids(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    encoder = torch.randn(2, encoder_tokens, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(tokens, attention_mask=mask, encoder_hidden_states=encoder)
    counts = out.expert_counts.sum(1).tolist()
    for site, count in zip(model.routing_sites, counts, strict=True):
        # Cross-attention keys/values see the encoder's tokens, which this mask doesn't describe.
        sees_encoder = site.kind in ("crossattention.self.key", "crossattention.self.value")
        assert count == (2 * encoder_tokens * 2 if sees_encoder else 11 * 2), site.kind
    assert sum(".crossattention.self.key" in s.name for s in model.routing_sites) == 2


def test_one_undescribed_site_does_not_unmask_the_others() -> None:
    # 7 rows with a [2, 5] mask: not a multiple of the batch. Such a site's rows all count; the
    # other sites keep their padding excluded (the mask used to be dropped for every site).
    model = build("topk")
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    ctx = RoutingContext(mask, model.moe_shared)
    generator = torch.Generator().manual_seed(3)
    rows = {0: 10, 1: 7, 2: 10}
    for site in model.routing_sites[:3]:
        logits = torch.randn(rows[site.index], 4, generator=generator)
        top, chosen = logits.topk(2, dim=-1)
        ctx.record(site, RouterOutput(chosen, top.softmax(-1), logits))
    losses, counts, _ = model._router_summary(ctx, torch.device("cpu"))
    assert counts.sum(1).tolist() == [8 * 2, 7 * 2, 8 * 2]
    keep = torch.cat([mask.reshape(-1), torch.ones(7, dtype=torch.bool), mask.reshape(-1)])
    logits = torch.cat([ctx.outputs[i].logits for i in range(3)])
    chosen = torch.cat([ctx.outputs[i].indices for i in range(3)])
    expected = load_balancing_loss(logits[keep], chosen[keep], 4, None)
    assert losses["load_balance"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_mask_with_a_kv_cache_covers_the_new_tokens() -> None:
    model = perturb(build("hypermoe")).eval()
    seen = []
    site = next(m for m in model.modules() if isinstance(m, MoELoraLinear))
    site.register_forward_pre_hook(lambda mod, args: seen.append(
        mod._routing.current().flat_mask(args[0].shape[0] * args[0].shape[1])))
    first = ids(2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        past = model(first, attention_mask=mask, use_cache=True).past_key_values
        new = ids(2, 3, seed=9)
        # Row 1's last new token is padding (right padding of a second chunk).
        mask2 = torch.cat([mask, torch.tensor([[1, 1, 1], [1, 1, 0]])], dim=1)
        out = model(new, attention_mask=mask2, past_key_values=past, use_cache=True)
    assert out.expert_counts.sum(1).tolist() == [5 * 2] * len(model.routing_sites)
    assert seen[0].tolist() == mask.bool().reshape(-1).tolist()
    assert seen[1].tolist() == [True] * 3 + [True, True, False]


# 6. Router options: one clear error, Python API and CLI.


@pytest.mark.parametrize(("router", "options", "message"), [
    ("rmoe", {"hiden_size": 16}, "router 'rmoe' has no option 'hiden_size'; its options are "
                                 "embed_dim, hidden_size, hyper"),
    ("hypermoe", {"hidden_size": 16}, "router 'hypermoe' has no option 'hidden_size'"),
    ("topk", {"steps": 2}, "its options are init_std"),
    ("rmoe", {"hidden_size": "abc"}, "option 'hidden_size' of 'rmoe' takes an integer, got 'abc'"),
    ("rmoe", {"recurrent": 1}, "takes true or false"),
    ("rmoe", {"embed_dim": 16}, "applies only with hyper=true"),
    ("graphmoe", {"steps": 2.5}, "takes an integer"),
])
def test_router_options_are_checked(tmp_path: Path, router: str, options: dict,
                                    message: str) -> None:
    config = MoELoraConfig(text_config=tiny_config("llama").to_dict(), router=router,
                           router_config=options, num_experts=4, lora_rank=4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        MoELoraForCausalLM(config)
    assert "\n" not in str(err.value)
    with pytest.raises(MoEHubError, match="--router-opt"):
        convert(tmp_path / "never-read", tmp_path / "out", router=router, router_config=options,
                progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_router_option_errors_are_one_line(tmp_path: Path, tiny_dense: Path) -> None:
    runner = CliRunner()
    for option, needle in (("hiden_size=16", "has no option 'hiden_size'"),
                           ("hidden_size=abc", "'hidden_size' of 'rmoe' takes an integer")):
        result = runner.invoke(app, ["convert", str(tiny_dense), str(tmp_path / "out"),
                                     "--router", "rmoe", "--router-opt", option, "--no-progress"])
        assert result.exit_code == 1
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], result.output
        assert not (tmp_path / "out").exists()
    ok = runner.invoke(app, ["convert", str(tiny_dense), str(tmp_path / "out"), "--router",
                             "rmoe", "--router-opt", "hidden_size=16", "--router-opt",
                             "init_std=1e-3", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["router_config"]
    assert stored == {"hidden_size": 16, "init_std": 0.001}
