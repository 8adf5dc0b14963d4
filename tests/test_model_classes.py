"""The contract of transformers' model classes that MoELoraForCausalLM must keep: parameters a
checkpoint lacks are initialised by their own rule, ``return_dict=False``, float32 routers under a
16-bit default dtype, a clear error for directories that are not moe-hub checkpoints, and the KV
cache passed under the name the installed transformers expects."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_dense, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file

from moe_hub.checkpoint import ADAPTER_WEIGHTS
from moe_hub.convert import convert
from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM

SMALL = dict(experts=4, top_k=2, rank=4, progress=False)
INIT_STD = 0.02  # the routers' default init_std (topk, rmoe)


def _check_initialised(model: MoELoraForCausalLM, names: list[str]) -> None:
    """Each named adapter tensor follows its rule: finite; lora_B zero; lora_A uniform within the
    kaiming bound 1/sqrt(d_in) and spread over it; router weights N(0, init_std)."""
    params = dict(model.named_parameters())
    for name in names:
        value = params[name].detach().double()
        assert torch.isfinite(value).all(), name
        if name.endswith("lora_B"):
            assert torch.count_nonzero(value) == 0, name
        elif name.endswith("lora_A"):
            bound = 1 / math.sqrt(value.shape[1])
            assert value.abs().max() <= bound, name
            # uniform(-b, b) has std b/sqrt(3); thousands of samples land within 10% of it
            assert abs(value.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
        else:
            # std of a sample std of n normals ~ std / sqrt(2n): n >= 256 here, 25% is > 5 sigma
            assert abs(value.std().item() - INIT_STD) < 0.25 * INIT_STD, name
            assert abs(value.mean().item()) < 0.25 * INIT_STD, name


def _drop_tensors(checkpoint: Path, names: list[str]) -> None:
    path = checkpoint / ADAPTER_WEIGHTS
    with safe_open(path, "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k not in names}
    save_file(kept, path, metadata={"format": "pt"})
    index = checkpoint / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in names}
    index.write_text(json.dumps(data))


def test_tensors_missing_from_a_checkpoint_are_refused_by_name(tmp_path: Path) -> None:
    # Initialising them (transformers' default for missing tensors) would run experts and
    # routers the checkpoint never had (issue 21): loading stops instead.
    out = convert(save_tiny_dense(tmp_path / "dense"), tmp_path / "moe", **SMALL)
    dropped = ["model.layers.1.self_attn.q_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_B",
               "model.layers.0.mlp.up_proj.router.weight"]
    _drop_tensors(out, dropped)
    with pytest.raises(ValueError, match=r"lack 3 of the .* expert/router tensors") as caught:
        MoELoraForCausalLM.from_pretrained(out)
    assert all(name in str(caught.value) for name in dropped)


def test_ignore_mismatched_sizes_initialises_the_recreated_adapters(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    out = convert(dense, tmp_path / "moe", router="rmoe", router_config={"hidden_size": 16},
                  **SMALL)
    model = MoELoraForCausalLM.from_pretrained(out, num_experts=6, ignore_mismatched_sizes=True)
    resized = [n for n, p in model.named_parameters()
               if (".lora_" in n and p.shape[0] == 6) or n.endswith("router.output_proj")]
    assert len(resized) == 3 * len(model.routing_sites)
    _check_initialised(model, resized)
    # What did load is untouched: the dense weights and the input-side router projections.
    with safe_open(out / ADAPTER_WEIGHTS, "pt") as f:
        name = "model.layers.0.self_attn.q_proj.router.input_proj"
        assert torch.equal(dict(model.named_parameters())[name], f.get_tensor(name))
    assert torch.isfinite(model(torch.arange(9).unsqueeze(0)).logits).all()


def _tiny_model(**overrides) -> MoELoraForCausalLM:
    settings = dict(num_experts=4, num_experts_per_tok=2, lora_rank=4, lora_dropout=0.0)
    settings.update(overrides)
    config = MoELoraConfig(text_config=tiny_config("llama").to_dict(), **settings)
    torch.manual_seed(0)
    return MoELoraForCausalLM(config)


def test_return_dict_false_returns_a_tuple_with_the_loss_first() -> None:
    model = _tiny_model(output_router_logits=True).eval()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        no_labels = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss)
    assert torch.equal(as_tuple[1], as_dict.aux_loss)
    assert torch.equal(as_tuple[2], as_dict.logits)
    assert torch.equal(no_labels[1], as_dict.logits)  # no loss: aux_loss, then logits


def test_from_config_under_bf16_default_keeps_routers_in_float32() -> None:
    config = MoELoraConfig(text_config=tiny_config("llama").to_dict(), router="rmoe",
                           router_config={"hidden_size": 8}, num_experts=4, lora_rank=4)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = MoELoraForCausalLM._from_config(config)  # what AutoModel.from_config calls
    finally:
        torch.set_default_dtype(previous)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    routing = [n for n in dtypes if ".router." in n or n.startswith("moe_shared.")]
    assert any(n.startswith("moe_shared.") for n in routing)
    assert all(dtypes[n] == torch.float32 for n in routing), routing
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16


def test_loading_something_else_says_what_it_is(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"is not a moe-hub checkpoint .*LlamaForCausalLM.*"
                                         r"moe-hub convert") as err:
        MoELoraForCausalLM.from_pretrained(dense)
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"is not a moe-hub checkpoint \(no moe-hub config"):
        MoELoraForCausalLM.from_pretrained(empty)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_uses_the_current_cache_name(tmp_path: Path, arch: str) -> None:
    out = convert(save_tiny_dense(tmp_path / "dense", arch), tmp_path / "moe", **SMALL)
    model = MoELoraForCausalLM.from_pretrained(out).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):  # experts that change the output
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    prompt = torch.randint(0, 256, (2, 5), generator=generator)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = model.generate(prompt, use_cache=True, **settings)
    renamed = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not renamed, renamed
    assert cached.tolist() == model.generate(prompt, use_cache=False, **settings).tolist()


def test_resize_token_embeddings_reaches_the_dense_forward_and_keeps_ties() -> None:
    config = MoELoraConfig(text_config=tiny_config("gpt2").to_dict(), num_experts=4,
                           lora_rank=4, lora_dropout=0.0)
    model = MoELoraForCausalLM(config).eval()
    model.resize_token_embeddings(300)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # GPT-2 ties them
    assert model.config.vocab_size == model.config.get_text_config().vocab_size == 300
    ids = torch.tensor([[1, 290, 299, 4, 7]])  # ids only the new rows hold
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape[-1] == 300 and torch.isfinite(out.loss)
    assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 8)
