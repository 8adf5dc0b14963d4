"""What ``--from-adapters`` refuses, each with a message naming the fix and nothing written.
Every adapter here is a real one saved by PEFT (untrained: these tests read only its files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_dense
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moe_hub.cli.app import app
from moe_hub.convert import convert
from moe_hub.errors import MoEHubError


def save_adapter(dense: Path, out: Path, config: object, **save: object) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(dense), config).save_pretrained(out, **save)
    return out


def lora(**kwargs: object) -> object:
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **kwargs})


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dense(tmp_path_factory.mktemp("errors") / "dense")


@pytest.fixture(scope="module")
def good(dense: Path) -> Path:
    return save_adapter(dense, dense.parent / "good", lora())


def refused(dense: Path, out: Path, adapters: list[Path], match: str, **options: object) -> None:
    with pytest.raises(MoEHubError, match=match):
        convert(dense, out, from_adapters=[str(a) for a in adapters], progress=False, **options)
    assert not out.exists()


@pytest.mark.parametrize("name, config, match", [
    ("ia3", "ia3", "is a IA3 adapter, not LoRA"),
    ("dora", {"use_dora": True}, r"DoRA \(use_dora\)"),
    ("bias", {"bias": "all"}, "bias='all' trains the base layers' biases"),
    ("lora-bias", {"lora_bias": True}, "lora_bias adds a trained bias"),
    ("save", {"modules_to_save": ["lm_head"]}, "modules_to_save=.*replaces whole modules"),
    ("head", {"target_modules": ["q_proj", "lm_head"]}, "lm_head, which is outside the routed"),
    ("embed", {"target_modules": ["embed_tokens"]}, "not a LoRA A/B weight of a linear"),
])
def test_unrepresentable_settings(tmp_path: Path, dense: Path, name: str, config: object,
                                  match: str) -> None:
    if config == "ia3":
        from peft import IA3Config

        peft_config = IA3Config(target_modules=["k_proj", "down_proj"],
                                feedforward_modules=["down_proj"])
    else:
        peft_config = lora(**config)
    adapter = save_adapter(dense, tmp_path / name, peft_config)
    refused(dense, tmp_path / "out", [adapter], match)


def test_adapter_of_another_base(tmp_path: Path, dense: Path, good: Path) -> None:
    # Same architecture and shapes, other weights: caught by base_model_name_or_path.
    other = save_tiny_dense(tmp_path / "other", seed=1)
    refused(other, tmp_path / "out", [good], "was trained on .*dense, not on BASE .*other")
    convert(other, tmp_path / "forced", from_adapters=[str(good)], check_adapter_base=False,
            top_k=1, progress=False)
    # Other shapes: caught by the tensors even when the name check is skipped.
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4,
                                 intermediate_size=128)).save_pretrained(wide)
    adapter = save_adapter(wide, tmp_path / "wide-adapter", lora(target_modules=["k_proj"]))
    refused(dense, tmp_path / "out", [adapter],
            r"k_proj maps 64 -> 64 features but BASE's maps 64 -> 32", check_adapter_base=False)
    # Another architecture: its module paths do not exist in BASE.
    gpt2 = save_tiny_dense(tmp_path / "gpt2", arch="gpt2")
    gpt2_adapter = save_adapter(gpt2, tmp_path / "gpt2-adapter", lora(target_modules=["c_attn"]))
    refused(dense, tmp_path / "out", [gpt2_adapter],
            r"the adapters target \['c_attn'\], but BASE has no such routable linear",
            check_adapter_base=False)
    # A model whose layers are named otherwise: one module path of the adapter is unknown.
    renamed = save_adapter(dense, tmp_path / "renamed", lora())
    weights = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v
               for k, v in weights.items()}, renamed / "adapter_model.safetensors")
    refused(dense, tmp_path / "out", [renamed], "qq_proj, which does not exist in BASE",
            check_adapter_base=False)


def test_overlapping_names(tmp_path: Path, dense: Path, good: Path) -> None:
    refused(dense, tmp_path / "out", [good, good], "is given twice")
    twin = save_adapter(dense, tmp_path / "elsewhere" / good.name, lora(r=2))
    refused(dense, tmp_path / "out", [good, twin], f"two adapters are named '{good.name}'")


def test_expert_count_and_rank(tmp_path: Path, dense: Path, good: Path) -> None:
    wide = save_adapter(dense, tmp_path / "r8", lora(r=8, target_modules=["v_proj"]))
    refused(dense, tmp_path / "out", [good, wide], "--experts 1 is fewer than the 2 adapters",
            experts=1)
    refused(dense, tmp_path / "out", [good, wide], "--rank 4 is below the rank 8 of adapter r8",
            rank=4)
    out = convert(dense, tmp_path / "ok", from_adapters=[str(good), str(wide)], experts=5,
                  rank=12, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["lora_rank"]) == (5, 12)
    assert config["target_modules"] == ["q_proj", "v_proj"]


def test_pickle_adapter_needs_allow_pickle(tmp_path: Path, dense: Path) -> None:
    adapter = save_adapter(dense, tmp_path / "bin", lora(), safe_serialization=False)
    refused(dense, tmp_path / "out", [adapter], "only pickle weights.*--allow-pickle")
    convert(dense, tmp_path / "ok", from_adapters=[str(adapter)], allow_pickle=True, top_k=1,
            progress=False)


def test_cli_error_is_one_line_and_success_writes_the_card(tmp_path: Path, dense: Path,
                                                           good: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["convert", str(dense), str(tmp_path / "out"),
                                  "--from-adapters", f"{good},{tmp_path / 'nope'}",
                                  "--no-progress"])
    assert missing.exit_code == 1
    assert missing.output.strip().count("\n") == 0 and "neither a directory nor a Hub id" in \
        missing.output
    second = save_adapter(dense, tmp_path / "second", lora(r=2, target_modules=["o_proj"]))
    result = runner.invoke(app, ["convert", str(dense), str(tmp_path / "out"), "--from-adapters",
                                 f"{good},{second}", "--experts", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Source adapters" in card and "`good` (local)" in card and "`second` (local)" in card
    assert str(tmp_path) not in card  # local directories appear by name only
    assert "have not been trained yet" not in card
