"""TRL's SFTTrainer trains a converted checkpoint. From TRL 1.7 on it patches the model's forward
with a fused LM head: it calls ``model.base_model(...)``, reads ``last_hidden_state`` and applies
``get_output_embeddings()`` itself, so this exercises the backbone convention end to end."""

from __future__ import annotations

from pathlib import Path

import torch
import trl
from datasets import Dataset
from helpers_finetune import tiny_checkpoint
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def test_sft_trainer_trains_the_adapters_only(tmp_path: Path) -> None:
    assert Version(trl.__version__) >= Version("1.7")  # the fused-head path under test
    # RMoE: its state must cross layers inside TRL's backbone call for the GRU to learn.
    checkpoint = tiny_checkpoint(tmp_path, router="rmoe", router_config={"hidden_size": 16})
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    # Loaded as a user would, nothing frozen by hand: the checkpoint's code leaves the base frozen.
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    adapters = set(model.adapter_parameter_names())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"text": f"{a}+{b}={a + b}"} for a in range(4) for b in range(4)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                     learning_rate=5e-2, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, max_length=16, activation_checkpointing=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.train()

    assert trainer.model.base_model is model.model is model.get_decoder()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= adapters  # every base tensor is bit-identical
    assert any(n.endswith("lora_B") for n in changed)
    assert any(".router." in n for n in changed)
    assert any(n.startswith("moe_shared.rmoe.gru.") for n in changed)
