"""PEFT's LoRA on top of a moe-hub checkpoint, as the README documents it: the targeted linears
are ``MoELoraLinear`` wrappers that PEFT does not know, their dense linear is ``base_layer``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_finetune import tiny_checkpoint
from transformers import AutoModelForCausalLM

TOKENS = torch.tensor([[5, 17, 40, 33, 9, 60, 71, 7, 88, 12]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("peft"))


def _load(checkpoint: Path):
    return AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)


def test_plain_module_names_are_refused_by_peft(checkpoint: Path) -> None:
    """Why the README names ``q_proj.base_layer``: PEFT refuses the wrapper itself."""
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match=r"(?s)MoELoraLinear.*not supported"):
        get_peft_model(_load(checkpoint), LoraConfig(target_modules=["q_proj", "v_proj"]))


def test_documented_recipe_trains_and_reloads_a_peft_adapter(checkpoint: Path,
                                                             tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    model = _load(checkpoint)
    with torch.no_grad():
        before = model(TOKENS).logits
    model.requires_grad_(False)  # the recipe: PEFT's LoRA alone trains
    peft = get_peft_model(model, LoraConfig(
        target_modules=["q_proj.base_layer", "v_proj.base_layer"], r=4, lora_dropout=0.0))
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(".base_layer.lora_" in n and ".default." in n for n in trainable)
    assert {n.split(".base_layer.")[0].rsplit(".", 1)[1] for n in trainable} == \
        {"q_proj", "v_proj"}
    frozen = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(peft.parameters(), lr=5e-2)
    peft.train()
    for _ in range(3):
        peft(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in peft.named_parameters() if n in frozen)
    with torch.no_grad():
        after = peft(TOKENS).logits
    assert not torch.allclose(after, before)  # the adapter acts inside the MoE-LoRA linears
    peft.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_load(checkpoint), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, after)
