"""A loaded checkpoint trains like a PEFT model: experts and routers require grad, the dense base
is frozen, unless the config's ``train_base`` or ``set_trainable("all")`` says otherwise; and
``print_trainable_parameters`` reports it in PEFT's format."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers_finetune import tiny_checkpoint
from transformers import AutoModelForCausalLM

from moe_hub.modeling import MoELoraForCausalLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("trainable"), router="rmoe",
                           router_config={"hidden_size": 16})


def _requires_grad(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_remote_code_checkpoint_trains_adapters_only_in_a_plain_loop(checkpoint: Path) -> None:
    """The loop a user writes: AdamW over model.parameters(). After the steps every base tensor
    is bit-identical, experts and routers (and RMoE's shared GRU) have moved."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules.")  # the checkpoint's code
    adapters = set(model.adapter_parameter_names())
    assert _requires_grad(model) == adapters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.1)
    torch.manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(4, 99, (2, 12))
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= adapters
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()
               if n not in adapters)
    assert any(n.endswith("lora_B") for n in changed)
    assert any(".router." in n for n in changed)
    assert any(n.startswith("moe_shared.rmoe.") for n in changed)


def test_train_base_and_set_trainable_choose_what_trains(checkpoint: Path) -> None:
    everything = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True,
                                                      train_base=True)
    all_names = {n for n, _ in everything.named_parameters()}
    assert _requires_grad(everything) == all_names

    model = MoELoraForCausalLM.from_pretrained(checkpoint)
    adapters = set(model.adapter_parameter_names())
    experts = {n for n in adapters if ".lora_" in n}
    assert set(model.set_trainable("experts")) == experts == _requires_grad(model)
    assert set(model.set_trainable("routers")) == adapters - experts == _requires_grad(model)
    assert set(model.set_trainable("all")) == all_names == _requires_grad(model)
    assert set(model.set_trainable()) == adapters == _requires_grad(model)
    with pytest.raises(ValueError, match="set_trainable takes one of"):
        model.set_trainable("base")


def test_print_trainable_parameters_in_peft_format(checkpoint: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    model = MoELoraForCausalLM.from_pretrained(checkpoint)
    params = dict(model.named_parameters())
    trainable = sum(params[n].numel() for n in model.adapter_parameter_names())
    total = sum(p.numel() for p in params.values())
    assert 0 < trainable < total
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| "
                         r"trainable%: (\d+\.\d{4})", line)
    assert match, line
    assert int(match[1].replace(",", "")) == trainable
    assert int(match[2].replace(",", "")) == total
    assert float(match[3]) == pytest.approx(100 * trainable / total, abs=1e-4)
    assert model.get_nb_trainable_parameters() == (trainable, total)


def test_bf16_checkpoint_with_gradient_checkpointing_keeps_its_base(checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True,
                                                 dtype=torch.bfloat16)
    adapters = set(model.adapter_parameter_names())
    assert _requires_grad(model) == adapters
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    (enable or model.gradient_checkpointing_enable)()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    tokens = torch.randint(4, 99, (2, 12))
    model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= adapters
