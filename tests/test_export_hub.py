"""Export from an adapter-only checkpoint whose base is on the Hub, then `moe-hub push` of the
export, loaded back with plain transformers in a process where moe_hub cannot be imported."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import run_without_moe_hub, save_tiny_dense
from hub_server import HubServer
from safetensors.torch import load_file, save_file
from test_hub import BASE_REPO, INPUT_IDS, TOKEN, _upload_base, hub  # noqa: F401 (fixture)
from typer.testing import CliRunner

from moe_hub.checkpoint import ADAPTER_WEIGHTS
from moe_hub.cli.app import app
from moe_hub.convert import convert
from moe_hub.modeling import MoELoraForCausalLM


def test_export_of_hub_based_adapters_pushes_and_loads_without_remote_code(
        hub: HubServer, tmp_path: Path) -> None:  # noqa: F811
    _upload_base(hub, save_tiny_dense(tmp_path / "dense"))
    ckpt = convert(BASE_REPO, tmp_path / "moe", granularity="block", experts=4, top_k=2, rank=4,
                   adapter_only=True, progress=False)
    tensors = load_file(ckpt / ADAPTER_WEIGHTS)
    generator = torch.Generator().manual_seed(2)
    for name, value in tensors.items():
        if name.endswith("lora_B") or ".lora_B." in name:
            tensors[name] = 0.2 * torch.randn(value.shape, generator=generator)
    save_file(tensors, ckpt / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    with torch.no_grad():
        want = MoELoraForCausalLM.from_pretrained(ckpt)(torch.tensor(INPUT_IDS)).logits

    native = tmp_path / "tiny-mixtral"
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(ckpt), str(native), "--no-progress"])
    assert result.exit_code == 0, result.output
    card = (native / "README.md").read_text()
    assert f"base_model: {BASE_REPO}" in card  # the card's metadata names the Hub base
    assert "checkpoint `moe`" in " ".join(card.split())  # and the text the source checkpoint

    # What else lies in the folder stays home unless --include names it, as for a checkpoint.
    (native / "notes").mkdir()
    (native / "notes" / "eval.json").write_text('{"acc": 0.5}')
    (native / "credentials.json").write_text("secret")
    result = runner.invoke(app, ["push", str(native), "alice/tiny-mixtral", "--token", TOKEN,
                                 "--endpoint", hub.endpoint, "--include", "notes/*"])
    assert result.exit_code == 0, result.output
    files = hub.files("alice/tiny-mixtral")
    assert set(files) - {".gitattributes"} == {"config.json", "generation_config.json",
                                               "model.safetensors", "README.md",
                                               "notes/eval.json"}
    assert 'from_pretrained("alice/tiny-mixtral")' in files["README.md"].decode()
    assert json.loads(files["config.json"])["architectures"] == ["MixtralForCausalLM"]

    home = tmp_path / "fresh-home"
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("alice/tiny-mixtral", dtype=torch.float32)
with torch.no_grad():
    print("LOGITS" + json.dumps(model(torch.tensor({INPUT_IDS!r})).logits.tolist()))
"""
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    got = torch.tensor(json.loads(run_without_moe_hub(code, tmp_path, env).split("LOGITS")[1]))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()

    # CKPT may itself be a Hub repo: fetched like any model, named as the source in the card.
    result = runner.invoke(app, ["push", str(ckpt), "alice/tiny-moe-block", "--token", TOKEN,
                                 "--endpoint", hub.endpoint])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", "alice/tiny-moe-block", str(tmp_path / "from-hub"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-hub" / "model.safetensors").read_bytes() == \
        (native / "model.safetensors").read_bytes()
    card = (tmp_path / "from-hub" / "README.md").read_text()
    assert "[alice/tiny-moe-block](https://huggingface.co/alice/tiny-moe-block)" in card
    assert f"base_model: {BASE_REPO}" in card
