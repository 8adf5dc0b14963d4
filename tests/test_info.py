"""`moe-hub info` against what loading the checkpoint actually gives."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from conftest import save_tiny_dense, tiny_config
from safetensors import safe_open

from moe_hub.convert import convert
from moe_hub.info import checkpoint_info


def _info_cli(path: Path) -> dict:
    from test_cli_first_hour import moe_hub_bin

    done = subprocess.run([moe_hub_bin(), "info", str(path), "--json"], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_tied_embedding_is_counted_once_and_trainer_style_folder_is_read(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    checkpoint = convert(dense, tmp_path / "moe", experts=3, rank=2, progress=False)
    info = checkpoint_info(checkpoint)
    assert info["fine_tuned"] is False

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    loaded = sum(p.numel() for p in model.parameters())  # shared tensors once
    assert info["parameters"]["total"] == loaded

    # What a user's own training loop followed by save_pretrained leaves: one file with every
    # tensor (no moe_adapters.safetensors) and non-zero expert B matrices, no training record.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    saved = tmp_path / "user-trained"
    model.save_pretrained(saved)
    assert not (saved / "moe_adapters.safetensors").exists()
    adapter_names = set(model.adapter_parameter_names())
    expected = 0
    for file in saved.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key in adapter_names:
                    tensor = handle.get_tensor(key)
                    expected += tensor.numel() * tensor.element_size()
    assert expected > 0
    info = _info_cli(saved)
    assert info["bytes"]["adapters"] == expected
    assert info["fine_tuned"] is True
    assert info["parameters"]["total"] == loaded


def test_info_sizes_add_up_on_a_converted_checkpoint(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    checkpoint = convert(dense, tmp_path / "moe", experts=2, rank=2, progress=False)
    info = checkpoint_info(checkpoint)
    files = info["files"]
    header_overhead = sum(size for name, size in files.items() if name.endswith(".safetensors")) \
        - info["bytes"]["adapters"] - info["bytes"]["base_weights"]
    # Only the safetensors headers (JSON, a few KiB here) are outside the tensor bytes.
    assert 0 < header_overhead < 64 * 1024


def _info_cli_result(path: Path) -> tuple[int, str]:
    from typer.testing import CliRunner

    from moe_hub.cli.app import app

    result = CliRunner().invoke(app, ["info", str(path), "--json"])
    return result.exit_code, result.output


def test_info_refuses_a_checkpoint_that_cannot_load(tmp_path: Path) -> None:
    """Missing experts, or experts whose shapes disagree with config.json, load as an error:
    info says so instead of printing numbers for a model that does not exist."""
    dense = save_tiny_dense(tmp_path / "dense")
    good = convert(dense, tmp_path / "moe", experts=2, rank=2, top_k=1, progress=False)
    assert _info_cli_result(good)[0] == 0

    no_adapters = convert(dense, tmp_path / "no-adapters", experts=2, rank=2, top_k=1,
                          progress=False)
    (no_adapters / "moe_adapters.safetensors").unlink()
    wrong_rank = convert(dense, tmp_path / "wrong-rank", experts=2, rank=2, top_k=1,
                         progress=False)
    config = json.loads((wrong_rank / "config.json").read_text())
    config["lora_rank"] = 4
    (wrong_rank / "config.json").write_text(json.dumps(config))
    for path, needle in ((no_adapters, "lacks"), (wrong_rank, "shape")):
        code, output = _info_cli_result(path)
        assert code != 0, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], output
        assert "Traceback" not in output
