"""Bases whose checkpoint names differ from their module names convert as transformers loads
them: GPT-NeoX's ``embed_out`` head, legacy LayerNorm ``gamma``/``beta``, and Mixtral's
per-expert tensors that the model stacks (a value-changing rule, applied per target)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_hub.convert import convert
from moe_hub.errors import MoEHubError

SMALL = dict(experts=4, top_k=2, rank=4, progress=False)
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128)


def _save(config: tf.PretrainedConfig, path: Path) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return model.eval()


def _disk_names(path: Path) -> set[str]:
    names = set()
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names.update(f.keys())
    return names


def _assert_equal_logits(dense: tf.PreTrainedModel, out: Path) -> None:
    moe = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    # Experts start with B = 0; perturbing B would test the experts, not the base's names.
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, dense(ids).logits)


def test_gpt_neox_head_stored_as_embed_out(tmp_path: Path) -> None:
    dense = _save(tf.GPTNeoXConfig(**TINY), tmp_path / "neox")
    names = _disk_names(tmp_path / "neox")
    assert "embed_out.weight" in names and "lm_head.weight" not in names  # the case under test
    out = convert(tmp_path / "neox", tmp_path / "moe", **SMALL)
    # A pure rename: every converted tensor is in the streamed shard, none recomputed.
    assert len(list(out.glob("model-*.safetensors"))) == 1
    _assert_equal_logits(dense, out)
    # Adapter-only: the base loads from BASE at load time, through the same rules.
    _assert_equal_logits(dense, convert(tmp_path / "neox", tmp_path / "ao", adapter_only=True,
                                        **SMALL))


def test_legacy_layernorm_gamma_beta(tmp_path: Path) -> None:
    config = tf.BertConfig(**TINY, is_decoder=True)
    dense = _save(config, tmp_path / "bert")
    weights = load_file(tmp_path / "bert" / "model.safetensors")
    legacy = {}
    for name, tensor in weights.items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma")
        legacy[name.replace("LayerNorm.bias", "LayerNorm.beta")] = tensor
    # LayerNorms: the embeddings', two per layer, the head's.
    assert sum(".gamma" in n for n in legacy) == 2 * config.num_hidden_layers + 2
    save_file(legacy, tmp_path / "bert" / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():  # transformers itself reads these names as the LayerNorm weights
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "bert").eval()
        assert torch.equal(reloaded(ids).logits, dense(ids).logits)

    out = convert(tmp_path / "bert", tmp_path / "moe", **SMALL)
    _assert_equal_logits(dense, out)
    _assert_equal_logits(dense, convert(tmp_path / "bert", tmp_path / "ao", adapter_only=True,
                                        **SMALL))


def _tiny_mixtral(path: Path) -> tf.PreTrainedModel:
    config = tf.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4)
    return _save(config, path)


def test_per_expert_tensors_are_merged_as_transformers_does(tmp_path: Path) -> None:
    dense = _tiny_mixtral(tmp_path / "mixtral")
    names = _disk_names(tmp_path / "mixtral")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    out = convert(tmp_path / "mixtral", tmp_path / "moe", **SMALL)
    assert not any("block_sparse_moe" in n for n in _disk_names(out))
    _assert_equal_logits(dense, out)

    # --dtype reaches the recomputed tensors too.
    half = convert(tmp_path / "mixtral", tmp_path / "moe-bf16", **SMALL, dtype="bfloat16")
    stacked = dense.model.layers[1].mlp.experts.down_proj.detach()
    found = 0
    for shard in half.glob("model-*.safetensors"):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                assert f.get_slice(key).get_dtype() == "BF16"
                if key.endswith("layers.1.mlp.experts.down_proj"):
                    assert torch.equal(f.get_tensor(key), stacked.to(torch.bfloat16))
                    found += 1
    assert found == 1


def test_a_rule_that_cannot_apply_is_one_error_and_writes_nothing(tmp_path: Path) -> None:
    _tiny_mixtral(tmp_path / "mixtral")
    path = tmp_path / "mixtral" / "model.safetensors"
    weights = load_file(path)
    # One expert of a different width: transformers' stacking of the experts cannot apply.
    key = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    weights[key] = weights[key][:-1].clone()
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(MoEHubError, match=r"(?s)MergeModulelist.*moe-hub cannot stream") as err:
        convert(tmp_path / "mixtral", tmp_path / "moe", **SMALL)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "moe").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mixtral"]
