"""The module tree follows transformers' convention (decoder backbone under ``model.``, head as
``lm_head``), and checkpoints written in the layout before it (``checkpoint_layout`` 1: the whole
dense causal LM under ``model.``) still load, with equal logits, and re-save in the new layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_dense
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

from moe_hub.checkpoint import ADAPTER_WEIGHTS, copy_code
from moe_hub.convert import convert
from moe_hub.modeling import MoELoraForCausalLM, MoELoraModel

SMALL = dict(experts=4, top_k=2, rank=4, progress=False)
# The dense causal LM's name for its backbone: what layout 1 put after "model.".
BACKBONE = {"llama": "model", "gpt2": "transformer"}


def _names(directory: Path) -> set[str]:
    names: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names |= set(f.keys())
    return names


def _old_name(name: str, backbone: str) -> str:
    """Layout 1's name for a layout-2 tensor name (written independently of the model code)."""
    if name.startswith("model."):
        return f"model.{backbone}.{name[len('model.'):]}"
    if name.startswith("lm_head."):
        return f"model.{name}"
    return name  # moe_shared.*


def to_layout_1(directory: Path, backbone: str) -> None:
    """Rewrite a checkpoint in place the way moe-hub wrote it before the layout change: tensors
    renamed, index updated, no ``checkpoint_layout`` in config.json."""
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            tensors = {_old_name(k, backbone): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, path, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_old_name(k, backbone): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    del config["checkpoint_layout"]
    config_file.write_text(json.dumps(config))


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_names_follow_transformers_convention(tmp_path: Path, arch: str) -> None:
    out = convert(save_tiny_dense(tmp_path / "dense", arch), tmp_path / "moe", **SMALL)
    names = _names(out)
    assert "lm_head.weight" in names or arch == "gpt2"  # GPT-2 ties its head to wte
    layer = "layers.0" if arch == "llama" else "h.0"
    assert any(n.startswith(f"model.{layer}.") and n.endswith(".base_layer.weight")
               for n in names)
    assert not any(n.startswith(("model.model.", "model.transformer.", "model.lm_head"))
                   for n in names)
    assert json.loads((out / "config.json").read_text())["checkpoint_layout"] == 2
    model = MoELoraForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert model.get_decoder() is model.model is model.base_model
    assert type(model.model) is type(dense.base_model)
    assert model.get_output_embeddings() is model.lm_head
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
        expected = dense.base_model(ids).last_hidden_state
        logits = model(ids).logits
    assert (hidden - expected).abs().max() < 1e-5
    assert (logits - dense(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layout_1_checkpoint_loads_with_equal_logits_and_resaves_in_layout_2(
        tmp_path: Path, arch: str) -> None:
    new = convert(save_tiny_dense(tmp_path / "dense", arch), tmp_path / "new", **SMALL)
    # Trained-looking experts (B != 0), saved in layout 2 and rewritten in layout 1.
    reference = perturbed(MoELoraForCausalLM.from_pretrained(new)).eval()
    reference.save_pretrained(tmp_path / "reference")
    old = tmp_path / "old"
    reference.save_pretrained(old)
    copy_code(old)  # as convert and finetune ship it
    to_layout_1(old, BACKBONE[arch])
    assert any(n.startswith(f"model.{BACKBONE[arch]}.") for n in _names(old))

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    for loader in (lambda p: MoELoraForCausalLM.from_pretrained(p),
                   lambda p: AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True)):
        loaded = loader(old).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)
    resaved = tmp_path / "resaved"
    loaded.save_pretrained(resaved)
    assert _names(resaved) == _names(tmp_path / "reference")
    assert json.loads((resaved / "config.json").read_text())["checkpoint_layout"] == 2
    with torch.no_grad():
        again = MoELoraForCausalLM.from_pretrained(resaved).eval()(ids).logits
    assert torch.equal(again, expected)
    hidden = MoELoraModel.from_pretrained(old).eval()
    with torch.no_grad():
        assert torch.equal(hidden(ids).last_hidden_state,
                           reference.base_model(ids).last_hidden_state)


def test_layout_1_adapter_only_checkpoint_loads(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    adapters = convert(dense, tmp_path / "adapters", adapter_only=True, **SMALL)
    reference = perturbed(MoELoraForCausalLM.from_pretrained(adapters)).eval()
    params = dict(reference.named_parameters())
    stored = {n: params[n].detach().contiguous() for n in reference.adapter_parameter_names()}
    save_file(stored, adapters / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    to_layout_1(adapters, "model")
    assert "model.model.layers.0.self_attn.q_proj.lora_A" in _names(adapters)
    loaded = AutoModelForCausalLM.from_pretrained(adapters, trust_remote_code=True).eval()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    loaded.save_pretrained(tmp_path / "full")
    assert "model.layers.0.self_attn.q_proj.lora_A" in _names(tmp_path / "full")


def test_auto_model_holds_the_tree_minus_the_head(tmp_path: Path) -> None:
    out = convert(save_tiny_dense(tmp_path / "dense"), tmp_path / "moe", **SMALL)
    base = AutoModel.from_pretrained(out, trust_remote_code=True)
    names = {n for n, _ in base.named_parameters()}
    assert not any(n.startswith("lm_head") for n in names)
    causal = {n for n, _ in MoELoraForCausalLM.from_pretrained(out).named_parameters()}
    assert names == causal - {"lm_head.weight"}


def test_base_saved_from_the_bare_backbone_converts(tmp_path: Path) -> None:
    """Older GPT-2 checkpoints name their tensors h.0... (saved from GPT2Model)."""
    dense_dir = save_tiny_dense(tmp_path / "dense", "gpt2")
    shard = dense_dir / "model.safetensors"
    with safe_open(shard, "pt") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    assert "h.0.attn.c_attn.weight" in tensors and "lm_head.weight" not in tensors
    save_file(tensors, shard, metadata={"format": "pt"})
    out = convert(dense_dir, tmp_path / "moe", **SMALL)
    assert "model.h.0.attn.c_attn.base_layer.weight" in _names(out)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    moe = MoELoraForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max() < 1e-5
