"""`moe-hub export`: block-routed top-k checkpoints become native Mixtral / Qwen2-MoE / Qwen3-MoE
models that compute what the moe-hub model computes, and what has no native form is refused.

Tolerance of the float32 comparisons: both models compute in float32 the same function in a
different order (baked W + dW against W x + dW x; sum_j g_j down(h_j) against down(sum_j g_j h_j);
softmax over k logits against softmax over E then renormalisation). Each reordering moves a
result by a few float32 ulps of the values it sums (2^-24 ~ 6e-8 relative, times sqrt of the
summed length, <= 16 here), so the logits agree to ~1e-6 of their scale; 1e-4 of the largest
logit leaves a wide margin for that and is still 100x below what a real mistake gives (one
expert's LoRA missed or mis-scaled changes the logits by ~1e-2 of their scale with B ~ N(0, 0.1)).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_error_line, run_without_moe_hub, save_tiny_dense, tiny_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moe_hub.cli.app import app
from moe_hub.convert import convert
from moe_hub.modeling import MoELoraForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM",
         "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}
SMALL = dict(granularity="block", experts=4, top_k=2, rank=4, progress=False)


def perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random B (converted experts are B = 0, a no-op) and random routers (so that the chosen
    experts differ from token to token and from the init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif ".router." in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def tuned_checkpoint(root: Path, arch: str, **options) -> Path:
    """A converted tiny ``arch`` model with perturbed experts and routers, saved with
    save_pretrained (as a fine-tuned model would be)."""
    dense = save_tiny_dense(root / f"dense-{arch}", arch)
    ckpt = convert(dense, root / f"moe-{arch}", **{**SMALL, **options})
    model = perturb(MoELoraForCausalLM.from_pretrained(ckpt))
    model.save_pretrained(root / f"tuned-{arch}")
    return root / f"tuned-{arch}"


def ids(batch: int = 2, seq: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_same_model(source: Path, native: Path, tokens: int = 8) -> None:
    """fp32 logits within 1e-4 of their scale, identical greedy continuations."""
    ref = MoELoraForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
    assert not isinstance(got, MoELoraForCausalLM)
    prompt = ids()
    with torch.no_grad():
        want, have = ref(prompt).logits, got(prompt).logits
    scale = want.abs().max()
    assert (have - want).abs().max() <= 1e-4 * scale, ((have - want).abs().max(), scale)
    settings = dict(max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ref.generate(prompt, **settings), got.generate(prompt, **settings))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    from moe_hub import export

    root = tmp_path_factory.mktemp("export")
    pairs = {}
    for arch in ARCHS:
        tuned = tuned_checkpoint(root, arch)
        export(tuned, root / f"native-{arch}", progress=False)
        pairs[arch] = (tuned, root / f"native-{arch}")
    return pairs


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_computes_what_the_checkpoint_computes(exported: dict, arch: str) -> None:
    tuned, native = exported[arch]
    config = json.loads((native / "config.json").read_text())
    assert config["architectures"] == [ARCHS[arch]]
    assert "auto_map" not in config and not list(native.glob("*.py"))
    assert_same_model(tuned, native)


def test_export_loads_where_moe_hub_cannot_be_imported(exported: dict, tmp_path: Path) -> None:
    prompt = ids()
    want = {}
    for arch, (_, native) in exported.items():
        model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
        with torch.no_grad():
            want[arch] = model(prompt).logits
    paths = {arch: str(native) for arch, (_, native) in exported.items()}
    out = run_without_moe_hub(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        prompt = torch.tensor({prompt.tolist()})
        logits = {{}}
        for arch, path in {paths!r}.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                logits[arch] = [type(model).__name__, model(prompt).logits.tolist()]
        print(json.dumps(logits))
    """, tmp_path)
    got = json.loads(out.strip().splitlines()[-1])
    for arch in ARCHS:
        assert got[arch][0] == ARCHS[arch]
        # Same weights and code; only the thread count (the matmuls' summation order) differs.
        scale = want[arch].abs().max()
        assert (torch.tensor(got[arch][1]) - want[arch]).abs().max() <= 1e-6 * scale


def test_stored_form_is_the_one_transformers_saves(exported: dict) -> None:
    """Per-expert tensors, as transformers' own save_pretrained writes a Mixtral (and as the
    serving engines read it), not the fused 3-D form the class holds in memory."""
    _, native = exported["llama"]
    with safe_open(native / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert not any("gate_up_proj" in n or "lora" in n or "base_layer" in n for n in names)
    model = AutoModelForCausalLM.from_pretrained(native)
    resaved = model.state_dict()
    with safe_open(native / "model.safetensors", "pt") as f:
        gate_up = torch.cat([f.get_tensor("model.layers.0.block_sparse_moe.experts.2.w1.weight"),
                             f.get_tensor("model.layers.0.block_sparse_moe.experts.2.w3.weight")])
    assert torch.equal(resaved["model.layers.0.mlp.experts.gate_up_proj"][2], gate_up)


def test_partial_routing_tied_head_and_cost(tmp_path: Path) -> None:
    """Only layer 0's MLP routed, head tied to the embedding: Mixtral (every layer a MoE block)
    gets the unrouted MLP as every expert behind a zero gate, Qwen2-MoE a plain MLP layer; the
    printed and carded cost counts E copies of the routed MLPs only."""
    for arch in ("llama", "qwen2"):
        dense = tmp_path / f"dense-{arch}"
        config = tiny_config(arch)
        config.tie_word_embeddings = True
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(dense)
        ckpt = convert(dense, tmp_path / f"moe-{arch}",
                       targets=["re:.*layers\\.0\\.mlp\\..*", "q_proj"], **SMALL)
        perturb(MoELoraForCausalLM.from_pretrained(ckpt)).save_pretrained(tmp_path / f"t-{arch}")
        runner = CliRunner()
        result = runner.invoke(app, ["export", str(tmp_path / f"t-{arch}"),
                                     str(tmp_path / f"n-{arch}"), "--no-progress"])
        assert result.exit_code == 0, result.output
        assert_same_model(tmp_path / f"t-{arch}", tmp_path / f"n-{arch}")
        native = tmp_path / f"n-{arch}"
        config = json.loads((native / "config.json").read_text())
        assert config["tie_word_embeddings"] is True
        mlp, hidden, experts = 3 * 64 * 128, 64, 4  # one tiny MLP
        # E - 1 more MLP copies and an E x hidden gate per MoE layer (Mixtral: both layers, the
        # unrouted one replicated; Qwen2-MoE: layer 0, plus its 1 x hidden shared-expert gate).
        growth = (2 * ((experts - 1) * mlp + experts * hidden) if arch == "llama"
                  else (experts - 1) * mlp + experts * hidden + hidden)
        text = " ".join(result.output.split())
        card = (native / "README.md").read_text()
        shown = f"+{growth / 1e3:.2f}K"
        assert shown in text and shown in card, (text, card)
        base = sum(p.numel() for p in model.parameters())  # tied head counted once
        written = (native / "model.safetensors").stat().st_size
        # float32 bytes of the base and of the export (the file adds its JSON header)
        assert f"(the dense base: {base * 4 / 1024:.1f} KB)" in text
        assert f"dense base takes {base * 4 / 1024:.1f} KB" in " ".join(card.split())
        assert 0 < written - (base + growth) * 4 < 16 * 1024
        assert f"`t-{arch}`" in card  # the source checkpoint is named
        if arch == "qwen2":
            assert config["mlp_only_layers"] == [1]


def test_export_from_an_adapter_only_checkpoint(tmp_path: Path) -> None:
    """The base is read from where the adapter-only checkpoint names it, by the library's
    loader; the experts and routers from its adapter file."""
    from safetensors.torch import load_file, save_file

    dense = save_tiny_dense(tmp_path / "dense", "llama")
    ckpt = convert(dense, tmp_path / "moe", adapter_only=True, **SMALL)
    adapters = ckpt / "moe_adapters.safetensors"
    generator = torch.Generator().manual_seed(5)
    state = {name: (torch.randn(t.shape, generator=generator) * 0.1 if "lora_B" in name else t)
             for name, t in load_file(adapters).items()}
    save_file(state, adapters, metadata={"format": "pt"})
    assert not list(ckpt.glob("model*.safetensors"))
    result = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "native"),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_same_model(ckpt, tmp_path / "native")


def test_export_of_an_nf4_finetuned_checkpoint_copies_tokenizer(tmp_path: Path) -> None:
    """Fine-tuning on an NF4 base writes the base in its original precision and new adapters;
    the export matches that checkpoint and carries its tokenizer, chat template and generation
    config."""
    from helpers_finetune import CHAT_TEMPLATE, tiny_checkpoint
    from transformers import AutoTokenizer

    from moe_hub.finetune import finetune

    ckpt = tiny_checkpoint(tmp_path, granularity="block")
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tuned = tmp_path / "tuned"
    finetune(ckpt, data, tuned, quantize="nf4", max_steps=2, max_length=48, batch_size=4,
             lr=5e-2, warmup=0, progress=False)
    result = CliRunner().invoke(app, ["export", str(tuned), str(tmp_path / "native"),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_same_model(tuned, tmp_path / "native")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "native")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tmp_path / "native" / "generation_config.json").is_file()


def test_dtype_default_is_the_base_and_can_be_chosen(tmp_path: Path) -> None:
    from moe_hub import export

    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16).save_pretrained(
        dense)
    ckpt = convert(dense, tmp_path / "moe", **SMALL)
    summary = export(ckpt, tmp_path / "bf16", progress=False)
    assert summary.dtype == "bfloat16"
    export(ckpt, tmp_path / "fp32", dtype="float32", progress=False)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    # B = 0 after conversion: every bf16 expert is the bf16 base MLP, bit for bit.
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        expert = f.get_tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight")
    with safe_open(dense / "model.safetensors", "pt") as f:
        assert torch.equal(expert, f.get_tensor("model.layers.0.mlp.down_proj.weight"))


# Refusals: one line naming why there is no native form, exit status 1, OUT never created.

REFUSALS = [
    (dict(router="rmoe"), "rmoe"),
    (dict(router="hypermoe"), "hypermoe"),
    (dict(router="graphmoe"), "graphmoe"),
    (dict(router="rmoe", router_config={"hyper": True}), "--hyper module"),
    (dict(granularity="linear", targets=["gate_proj", "up_proj", "down_proj"]),
     "linear granularity"),
    (dict(granularity="linear"), "experts on attention"),
    (dict(normalize_expert_weights=False), "renormalises"),
]


@pytest.mark.parametrize(("options", "why"), REFUSALS, ids=[w for _, w in REFUSALS])
def test_no_native_form_is_refused(tmp_path: Path, options: dict, why: str) -> None:
    dense = save_tiny_dense(tmp_path / "dense", "llama")
    ckpt = convert(dense, tmp_path / "moe", adapter_only=True, **{**SMALL, **options})
    out = tmp_path / "native"
    result = CliRunner().invoke(app, ["export", str(ckpt), str(out)])
    assert_one_error_line(result.exit_code, result.output, why)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_router_option_without_a_native_counterpart_is_refused(tmp_path: Path) -> None:
    """A top-k router option other than its initialisation (as noise or a temperature would
    be) changes the routing arithmetic: refused by name, before any weight is read."""
    dense = save_tiny_dense(tmp_path / "dense", "llama")
    ckpt = convert(dense, tmp_path / "moe", adapter_only=True, **SMALL)
    config = json.loads((ckpt / "config.json").read_text())
    config["router_config"] = {"init_std": 0.02, "jitter_noise": 0.01}
    (ckpt / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "native")])
    assert_one_error_line(result.exit_code, result.output, "'jitter_noise'", "routing differs")
    assert not (tmp_path / "native").exists()


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense", "gemma")
    ckpt = convert(dense, tmp_path / "moe", adapter_only=True, **SMALL)
    result = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "native")])
    assert_one_error_line(result.exit_code, result.output, "gemma", "no native MoE class")
    assert not (tmp_path / "native").exists()


def test_attention_bias_is_refused(tmp_path: Path) -> None:
    config = tiny_config("llama")
    config.attention_bias = True
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "dense")
    ckpt = convert(tmp_path / "dense", tmp_path / "moe", adapter_only=True, **SMALL)
    result = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "native")])
    assert_one_error_line(result.exit_code, result.output, "attention_bias", "Mixtral")
    assert not (tmp_path / "native").exists()


def test_bad_input_is_one_line_and_overwrite_replaces_only_an_export(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense", "llama")
    ckpt = convert(dense, tmp_path / "moe", adapter_only=True, **SMALL)
    runner = CliRunner()
    out = tmp_path / "native"

    def export_cli(*args: str):
        return runner.invoke(app, ["export", *args, "--no-progress"])

    result = export_cli(str(tmp_path / "missing"), str(out))
    assert_one_error_line(result.exit_code, result.output, "missing")
    result = export_cli(str(dense), str(out))
    assert_one_error_line(result.exit_code, result.output, "not a moe-hub checkpoint")
    result = export_cli(str(ckpt), str(out), "--dtype", "int8")
    assert_one_error_line(result.exit_code, result.output, "--dtype", "bfloat16")
    result = export_cli(str(ckpt), str(ckpt / "inside"))
    assert_one_error_line(result.exit_code, result.output, "inside")
    assert not out.exists() and not (ckpt / "inside").exists()

    assert export_cli(str(ckpt), str(out)).exit_code == 0
    result = export_cli(str(ckpt), str(out))
    assert_one_error_line(result.exit_code, result.output, "--overwrite")
    assert export_cli(str(ckpt), str(out), "--overwrite").exit_code == 0  # an earlier export
    result = export_cli(str(ckpt), str(dense), "--overwrite")  # a dense model: not replaced
    assert_one_error_line(result.exit_code, result.output, "not an empty folder or an earlier")
    assert (dense / "model.safetensors").is_file()
    # A Mixtral that export did not write (its card lacks the tag) is not replaced either.
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n# someone's Mixtral\n")
    result = export_cli(str(ckpt), str(out), "--overwrite")
    assert_one_error_line(result.exit_code, result.output, "not an empty folder or an earlier")
    assert "someone's Mixtral" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe", "native"]


def test_structure_guard_names_the_tensor_that_differs(exported: dict) -> None:
    """Behind the per-architecture rules, every tensor outside the experts is compared with
    what the native class holds: a translation that lost a base setting (here the head size)
    is refused naming the tensor, never written."""
    from moe_hub.export import MIXTRAL, ExportRefused, _Plan

    model = MoELoraForCausalLM.from_pretrained(exported["llama"][0])
    plan = _Plan(model, MIXTRAL)
    config = plan.native_config(model.config.text_config, torch.float32)
    plan.check_against(config)
    config.head_dim = 32
    with pytest.raises(ExportRefused,
                       match=r"Mixtral has another shape for model\.layers\.0\.self_attn\.k_proj"):
        plan.check_against(config)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_export_is_as_close_to_float64_as_the_checkpoint(exported: dict, arch: str,
                                                             tmp_path: Path) -> None:
    """16-bit export: the weights rounded once after baking. Against the float64 computation
    of the checkpoint it errs no more than the checkpoint itself run in bf16 (both ~1e-2: bf16's
    unit roundoff 2^-8 accumulated over two layers), also under bf16 autocast of the float32
    export (transformers' own autocast path)."""
    from moe_hub import export

    tuned, native = exported[arch]
    export(tuned, tmp_path / "bf16", dtype="bfloat16", progress=False)
    prompt = ids(4, 16)

    def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
        return ((got.double() - ref).norm() / ref.norm()).item()

    with torch.no_grad():
        ref = MoELoraForCausalLM.from_pretrained(tuned, dtype=torch.float64)(prompt).logits
        own = MoELoraForCausalLM.from_pretrained(tuned, dtype=torch.bfloat16)(prompt).logits
        bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
        assert bf16.dtype == torch.bfloat16
        got = bf16(prompt).logits
        fp32 = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = fp32(prompt).logits
    bound = max(1.5 * rel_err(own, ref), 2**-8)
    assert rel_err(got, ref) <= bound
    assert rel_err(autocast, ref) <= bound
