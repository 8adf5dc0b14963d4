"""Experts from real PEFT LoRA adapters (issue 15): adapters trained here with PEFT on tiny random
models, converted with ``from_adapters``, compared with PEFT's own forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_without_moe_hub, save_tiny_dense
from helpers_finetune import char_tokenizer
from safetensors.torch import load_file

from moe_hub.convert import convert
from moe_hub.errors import MoEHubError
from moe_hub.modeling.routing import Router, RouterOutput

INPUT = torch.tensor([[3, 17, 101, 44, 9, 250, 61, 7, 88, 140, 2, 31]])


def train_adapter(dense: Path, out: Path, seed: int, steps: int = 4, **lora: object) -> Path:
    """A real PEFT LoRA adapter: a few AdamW steps on random tokens, saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(dense), LoraConfig(**lora))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 16))
        model(input_ids=tokens, labels=tokens).loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(out)
    return out


def peft_logits(dense: Path, adapter: Path | None, bf16: bool = False) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.eval()(input_ids=INPUT).logits.float()


def force_expert(model: torch.nn.Module, expert: int) -> None:
    """Every router sends every token to ``expert`` alone, with weight 1."""
    def fixed(x: torch.Tensor, ctx: object, experts: object, expert_step: object = None
              ) -> tuple[RouterOutput, torch.Tensor]:
        tokens = x.shape[0]
        route = RouterOutput(indices=torch.full((tokens, 1), expert, dtype=torch.long),
                             weights=torch.ones(tokens, 1),
                             logits=torch.zeros(tokens, model.config.num_experts))
        return route, expert_step(x, route)

    # run() is what a site calls: one decision, the experts once (also for GraphMoE's refine).
    for module in model.modules():
        if isinstance(module, Router):
            module.run = fixed


def moe_logits(checkpoint: Path, expert: int, bf16: bool = False) -> torch.Tensor:
    from moe_hub.modeling import MoELoraForCausalLM

    model = MoELoraForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    force_expert(model, expert)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=INPUT).logits.float()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and three adapters: different ranks, alphas, targets, rsLoRA, patterns."""
    root = tmp_path_factory.mktemp("llama-adapters")
    dense = save_tiny_dense(root / "dense")
    return {
        "dense": dense,
        "attn": train_adapter(dense, root / "attn", 1, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj"]),
        "mlp": train_adapter(dense, root / "mlp", 2, r=8, lora_alpha=4, use_rslora=True,
                             target_modules=["gate_proj", "up_proj", "o_proj"]),
        "patterns": train_adapter(dense, root / "patterns", 3, r=2, lora_alpha=6,
                                  target_modules=["k_proj", "down_proj"], layers_to_transform=[1],
                                  rank_pattern={"down_proj": 6}, alpha_pattern={"k_proj": 1}),
    }


@pytest.mark.parametrize("router", ["topk", "rmoe", "hypermoe", "graphmoe"])
def test_forced_expert_equals_peft_adapter(tmp_path: Path, llama: dict[str, Path],
                                           router: str) -> None:
    names = ["attn", "mlp", "patterns"]
    out = convert(llama["dense"], tmp_path / "moe", router=router, experts=4,
                  from_adapters=[str(llama[n]) for n in names], progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["lora_rank"] == 8  # the largest adapter rank
    assert [a["name"] for a in config["source_adapters"]] == names
    base = peft_logits(llama["dense"], None)
    for expert, name in enumerate(names):
        reference = peft_logits(llama["dense"], llama[name])
        assert (reference - base).abs().max() > 1e-3  # the adapter changes the output
        assert (moe_logits(out, expert) - reference).abs().max() <= 1e-5
    # The fourth expert was not built from an adapter: B = 0, the base model.
    assert (moe_logits(out, 3) - base).abs().max() <= 1e-5


def test_block_granularity_maps_each_mlp_linear(tmp_path: Path, llama: dict[str, Path]) -> None:
    root = tmp_path
    mlp_only = [
        train_adapter(llama["dense"], root / "gated", 4, r=4, lora_alpha=8,
                      target_modules=["gate_proj", "up_proj", "down_proj"]),
        train_adapter(llama["dense"], root / "down", 5, r=2, lora_alpha=2,
                      target_modules=["down_proj"]),
    ]
    out = convert(llama["dense"], root / "moe", granularity="block",
                  from_adapters=[str(a) for a in mlp_only], progress=False)
    for expert, adapter in enumerate(mlp_only):
        reference = peft_logits(llama["dense"], adapter)
        assert (moe_logits(out, expert) - reference).abs().max() <= 1e-5
    # Attention LoRA at block granularity is one LoRA shared by all experts: fine for a single
    # adapter, refused for several.
    single = convert(llama["dense"], root / "single", granularity="block", top_k=1,
                     from_adapters=[str(llama["attn"])], progress=False)
    reference = peft_logits(llama["dense"], llama["attn"])
    assert (moe_logits(single, 0) - reference).abs().max() <= 1e-5
    with pytest.raises(MoEHubError, match="one LoRA shared by all experts"):
        convert(llama["dense"], root / "refused", granularity="block",
                from_adapters=[str(llama["attn"]), str(mlp_only[0])], progress=False)
    assert not (root / "refused").exists()


def test_gpt2_conv1d_adapters(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "gpt2", arch="gpt2")
    adapters = [
        train_adapter(dense, tmp_path / "c-attn", 6, r=4, lora_alpha=8, fan_in_fan_out=True,
                      target_modules=["c_attn"]),
        train_adapter(dense, tmp_path / "c-mlp", 7, r=2, lora_alpha=2, fan_in_fan_out=True,
                      target_modules=["c_fc", "c_proj"]),
    ]
    out = convert(dense, tmp_path / "moe", from_adapters=[str(a) for a in adapters],
                  progress=False)
    for expert, adapter in enumerate(adapters):
        reference = peft_logits(dense, adapter)
        assert (moe_logits(out, expert) - reference).abs().max() <= 1e-5
        # Under bf16 autocast both compute every matmul in bf16 (unit roundoff 2^-8), in
        # different orders: a few roundoffs of the logit scale apart, not more.
        bf16 = moe_logits(out, expert, bf16=True)
        bound = 8 * 2.0**-8 * reference.abs().max()
        assert (bf16 - peft_logits(dense, adapter, bf16=True)).abs().max() <= bound
        assert (bf16 - reference).abs().max() <= bound


def test_topk_checkpoint_loads_without_moe_hub_and_trains_routers_only(
        tmp_path: Path, llama: dict[str, Path]) -> None:
    from moe_hub.finetune import finetune
    from moe_hub.modeling import MoELoraForCausalLM

    out = convert(llama["dense"], tmp_path / "moe", from_adapters=[str(llama["attn"]),
                  str(llama["mlp"])], progress=False)
    char_tokenizer().save_pretrained(out)
    model = MoELoraForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=INPUT).logits
    printed = run_without_moe_hub(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True,
                                                     dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({INPUT.tolist()})).logits
        print(repr(logits.flatten().tolist()))
    """, tmp_path)
    loaded = torch.tensor(eval(printed.strip().splitlines()[-1])).view_as(expected)
    assert (loaded - expected).abs().max() <= 1e-5

    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = load_file(out / "moe_adapters.safetensors")
    for train in ("routers", "experts"):
        trained = tmp_path / f"ft-{train}"
        finetune(out, data, trained, quantize="none", train=train, max_steps=2, batch_size=4,
                 lr=5e-2, warmup=0, progress=False)
        after = load_file(trained / "moe_adapters.safetensors")
        assert after.keys() == before.keys()
        for name, tensor in before.items():
            changed = not torch.equal(after[name], tensor)
            expert = ".lora_" in name
            if (train == "routers") == expert:
                assert not changed, f"{name} changed with --train {train}"
        trained_group = [not torch.equal(after[n], before[n]) for n in before
                         if (".lora_" in n) == (train == "experts")]
        # Every router learns; experts only where B != 0 gives A a gradient.
        assert all(trained_group) if train == "routers" else any(trained_group)


def test_hub_adapter_is_downloaded_and_linked_in_the_card(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama: dict[str, Path]) -> None:
    import huggingface_hub.constants as constants
    from hub_server import serve_hub
    from huggingface_hub import CommitOperationAdd, HfApi

    token = "hf_test_alice_0123456789"
    with serve_hub({token: "alice"}) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        api = HfApi(endpoint=server.endpoint, token=token)
        api.create_repo("alice/mlp-lora")
        api.create_commit("alice/mlp-lora", commit_message="adapter", operations=[
            CommitOperationAdd(p.name, str(p)) for p in sorted(llama["mlp"].iterdir())
            if p.is_file()])
        out = convert(llama["dense"], tmp_path / "moe",
                      from_adapters=["alice/mlp-lora", str(llama["attn"])], progress=False)
    reference = peft_logits(llama["dense"], llama["mlp"])
    assert (moe_logits(out, 0) - reference).abs().max() <= 1e-5
    card = (out / "README.md").read_text()
    assert "[alice/mlp-lora](https://huggingface.co/alice/mlp-lora)" in card
    assert "`attn` (local)" in card
    records = json.loads((out / "config.json").read_text())["source_adapters"]
    assert [(r["expert"], r["name"], r["hub_id"]) for r in records] == \
        [(0, "alice/mlp-lora", "alice/mlp-lora"), (1, "attn", None)]
    assert records[0]["use_rslora"] and records[0]["r"] == 8


def test_train_choice_selects_parameter_groups(tmp_path: Path, llama: dict[str, Path]) -> None:
    from moe_hub.finetune import prepare_for_training
    from moe_hub.modeling import MoELoraForCausalLM

    out = convert(llama["dense"], tmp_path / "moe", router="rmoe", progress=False,
                  from_adapters=[str(llama["attn"]), str(llama["mlp"])])
    model = MoELoraForCausalLM.from_pretrained(out)
    adapters = set(model.adapter_parameter_names())
    shared = {n for n in adapters if ".lora_" not in n and ".router." not in n}
    assert shared  # rmoe's GRU, shared by every site
    for train in ("routers", "experts", "all"):
        names = set(prepare_for_training(model, train))
        grad = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names == grad
        experts = {n for n in adapters if ".lora_" in n}
        want = {"routers": adapters - experts, "experts": experts, "all": adapters}[train]
        assert grad == want and (train == "experts" or shared <= grad)
