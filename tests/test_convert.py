"""Conversion of dense models into MoE-LoRA checkpoints that load with plain transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCHS, run_without_moe_hub, save_tiny_dense
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from moe_hub.checkpoint import ADAPTER_WEIGHTS
from moe_hub.convert import ConvertOptions, convert
from moe_hub.info import checkpoint_info

SMALL = dict(experts=4, top_k=2, rank=4, progress=False)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _sha(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.glob("*.safetensors"))}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_converted_model_equals_dense(tmp_path: Path, arch: str) -> None:
    dense_dir = save_tiny_dense(tmp_path / "dense", arch)
    out = convert(dense_dir, tmp_path / "moe", **SMALL)

    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(moe).__name__ == "MoELoraForCausalLM"
    assert any(".lora_A" in name for name, _ in moe.named_parameters())

    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    assert diff < 1e-5

    prompt = ids[:1, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, use_cache=True)
    assert moe.generate(prompt, **kwargs).tolist() == dense.generate(prompt, **kwargs).tolist()


def test_auto_classes_dtype_device_map_and_attention(tmp_path: Path, tiny_dense: Path) -> None:
    out = convert(tiny_dense, tmp_path / "moe", **SMALL)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.model_type == "moe_lora" and config.num_experts == 4

    ids = torch.randint(0, 256, (1, 7))
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense).eval()
    base = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        dense_hidden = dense.model(ids).last_hidden_state
    assert torch.allclose(hidden, dense_hidden, atol=1e-5)

    half = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.bfloat16, device_map="cpu",
        attn_implementation="eager",
    )
    assert half.get_input_embeddings().weight.dtype == torch.bfloat16
    router = half.model.layers[0].self_attn.q_proj.router.weight
    assert router.dtype == torch.float32  # routers stay in float32 whatever the model dtype
    assert half.model.config._attn_implementation == "eager"
    with torch.no_grad():
        logits = half(ids).logits
    assert torch.isfinite(logits).all()


def test_loads_without_moe_hub_installed(tmp_path: Path, tiny_dense: Path) -> None:
    out = convert(tiny_dense, tmp_path / "moe", **SMALL)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        expected = dense(ids).logits[0, -1, :5].tolist()
    printed = run_without_moe_hub(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            print(model(torch.arange(10).unsqueeze(0)).logits[0, -1, :5].tolist())
        """,
        cwd=tmp_path,
    )
    got = json.loads(printed.strip().splitlines()[-1])
    assert got == pytest.approx(expected, abs=1e-5)


def test_save_load_save_is_identical_and_seed_is_deterministic(tmp_path: Path,
                                                               tiny_dense: Path) -> None:
    first = convert(tiny_dense, tmp_path / "a", seed=7, **SMALL)
    second = convert(tiny_dense, tmp_path / "b", seed=7, **SMALL)
    other = convert(tiny_dense, tmp_path / "c", seed=8, **SMALL)
    assert _sha(first) == _sha(second)
    assert _sha(first)[ADAPTER_WEIGHTS] != _sha(other)[ADAPTER_WEIGHTS]

    model = AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True)
    model.save_pretrained(tmp_path / "resaved")
    before, after = _tensors(first), _tensors(tmp_path / "resaved")
    assert set(before) <= set(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
    reloaded.save_pretrained(tmp_path / "resaved2")
    again = _tensors(tmp_path / "resaved2")
    assert set(again) == set(after)
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_adapters_start_as_no_op_and_are_initialised(tmp_path: Path, tiny_dense: Path) -> None:
    out = convert(tiny_dense, tmp_path / "moe", **SMALL)
    with safe_open(out / ADAPTER_WEIGHTS, "pt") as f:
        names = list(f.keys())
        lora_a = [f.get_tensor(n) for n in names if n.endswith("lora_A")]
        lora_b = [f.get_tensor(n) for n in names if n.endswith("lora_B")]
        routers = [f.get_tensor(n) for n in names if ".router." in n]
    assert lora_a and lora_b and routers
    assert all(t.abs().sum() == 0 for t in lora_b)
    assert all(t.std() > 0 for t in lora_a + routers)
    with safe_open(out / ADAPTER_WEIGHTS, "pt") as f:
        q_a = f.get_tensor("model.layers.0.self_attn.q_proj.lora_A")
        down_b = f.get_tensor("model.layers.0.mlp.down_proj.lora_B")
    assert q_a.shape == (4, 64, 4)  # [experts, d_in, rank]
    assert down_b.shape == (4, 4, 64)  # [experts, rank, d_out]


def test_options_from_yaml_file_and_info(tmp_path: Path, tiny_dense: Path) -> None:
    config_file = tmp_path / "moe.yaml"
    config_file.write_text("experts: 3\ntop_k: 1\nrank: 2\ntargets: [q_proj, v_proj]\nseed: 3\n")
    out = convert(tiny_dense, tmp_path / "moe", ConvertOptions.from_file(config_file),
                  progress=False)
    info = checkpoint_info(out)
    assert (info["experts"], info["top_k"], info["rank"]) == (3, 1, 2)
    assert info["routing_sites"] == 4  # q_proj and v_proj in 2 layers
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense)
    dense_params = sum(p.numel() for p in dense.parameters())
    # per site: A (3 x 64 x 2) + B (3 x 2 x d_out) + router (3 x 64); v_proj is d_out 32 (GQA)
    added = 2 * ((3 * 64 * 2 + 3 * 2 * 64 + 3 * 64) + (3 * 64 * 2 + 3 * 2 * 32 + 3 * 64))
    assert info["parameters"]["added"] == added
    assert info["parameters"]["total"] == dense_params + added
    # Tensor bytes (fp32 adapters), not the file size with its header.
    assert info["bytes"]["adapters"] == 4 * added < (out / ADAPTER_WEIGHTS).stat().st_size


def test_dtype_option_converts_base_weights(tmp_path: Path, tiny_dense: Path) -> None:
    out = convert(tiny_dense, tmp_path / "moe", dtype="bfloat16", **SMALL)
    tensors = _tensors(out)
    base = [t for n, t in tensors.items() if ".lora_" not in n and ".router." not in n]
    assert all(t.dtype == torch.bfloat16 for t in base)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense)
    expected = dense.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16)
    assert torch.equal(tensors["model.embed_tokens.weight"], expected)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.dtype == torch.bfloat16


def test_pickle_weights_need_explicit_flag(tmp_path: Path) -> None:
    # transformers 5 always saves safetensors: write the pickle file ourselves.
    source = save_tiny_dense(tmp_path / "src")
    dense_dir = tmp_path / "dense-bin"
    dense_dir.mkdir()
    (dense_dir / "config.json").write_text((source / "config.json").read_text())
    torch.save(_tensors(source), dense_dir / "pytorch_model.bin")
    from moe_hub.errors import MoEHubError

    with pytest.raises(MoEHubError, match="--allow-pickle"):
        convert(dense_dir, tmp_path / "refused", **SMALL)
    assert not (tmp_path / "refused").exists()
    out = convert(dense_dir, tmp_path / "moe", allow_pickle=True, **SMALL)
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max() < 1e-5
