"""``moe-hub finetune`` precision: defaults per machine, --bf16/--fp16/--fp32 overrides, and a
bf16 step on the CPU under Trainer's autocast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_finetune import tiny_checkpoint
from transformers import TrainerCallback

from moe_hub.errors import MoEHubError
from moe_hub.finetune import FinetuneOptions, finetune
from moe_hub.modeling.moe_lora_layer import MoELoraLinear


@pytest.mark.parametrize("flags,cuda,cuda_bf16,want", [
    ({}, False, False, "fp32"),
    ({}, True, True, "bf16"),
    ({}, True, False, "fp16"),
    ({"bf16": True}, False, False, "bf16"),  # CPU autocast bf16 works
    ({"fp32": True}, True, True, "fp32"),
    ({"fp16": True}, True, True, "fp16"),
    ({"bf16": False}, True, False, "fp16"),  # a flag set to false chooses nothing
])
def test_precision_resolution(flags, cuda, cuda_bf16, want):
    options = FinetuneOptions(**flags)
    assert options.resolved_precision(cuda=cuda, cuda_bf16=cuda_bf16) == want


def test_precision_flags_exclude_each_other_and_fp16_needs_a_gpu():
    with pytest.raises(MoEHubError, match="--bf16 and --fp32 exclude each other"):
        FinetuneOptions(bf16=True, fp32=True).resolved_precision(cuda=True, cuda_bf16=True)
    with pytest.raises(MoEHubError, match="--fp16 needs a CUDA GPU"):
        FinetuneOptions(fp16=True).resolved_precision(cuda=False)


def test_cli_shows_the_flags_and_refuses_two_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from moe_hub.cli.app import app

    runner = CliRunner()
    shown = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"})
    assert all(flag in shown.output for flag in ("--bf16", "--fp16", "--fp32"))
    result = runner.invoke(app, ["finetune", str(tmp_path / "ckpt"), "--output",
                                 str(tmp_path / "out"), "--bf16", "--fp16", "--no-progress"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bf16 and --fp16 exclude each other" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


class AutocastProbe(TrainerCallback):
    """Records, for every expert site call during training, whether autocast was on, its dtype
    and the dtypes of the site's output and master adapters."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.calls = []
        for module in model.modules():
            if isinstance(module, MoELoraLinear):
                module.register_forward_hook(self.record)

    def record(self, module, args, output):
        self.calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                           output.dtype, module.lora_A.dtype))


def test_bf16_on_the_cpu_trains_a_step_under_autocast(tmp_path: Path):
    torch.set_num_threads(1)
    ckpt = tiny_checkpoint(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1)}) + "\n"
                            for a in range(8)))
    probe = AutocastProbe()
    metrics = finetune(ckpt, data, tmp_path / "out", bf16=True, quantize="none", max_steps=1,
                       max_length=16, batch_size=4, warmup=0, logging_steps=1, progress=False,
                       callbacks=[probe])
    assert metrics["global_step"] == 1 and metrics["final_loss"] is not None
    assert probe.calls
    assert all(on and dtype == torch.bfloat16 for on, dtype, _, _ in probe.calls)
    assert all(out == torch.bfloat16 and master == torch.float32
               for _, _, out, master in probe.calls)
    record = json.loads((tmp_path / "out" / "moe_hub_training.json").read_text())
    assert record["hyperparameters"]["precision"] == "bf16"
