"""What fine-tuning prints: the summary's losses are single steps' (not one logging window's
mean twice), one duration for the whole stage, and log lines rather than Python dicts."""

from __future__ import annotations

import json

import pytest
from helpers_finetune import tiny_checkpoint

from moe_hub.finetune import finetune

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
FAST = dict(max_length=16, batch_size=4, lr=5e-2, warmup=0, scheduler="constant")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tiny_checkpoint(root), data, root


def test_a_short_run_reports_its_first_and_last_step_losses(setup, capfd):
    ckpt, data, root = setup
    # Every step logged: the reference losses of the same seeded run.
    finetune(ckpt, data, root / "each", max_steps=12, logging_steps=1, progress=False, **FAST)
    logged = [e for e in json.loads((root / "each" / "moe_hub_training.json").read_text())
              ["log_history"] if "loss" in e]
    capfd.readouterr()
    # The default logging window (10 steps) holds one log in 12 steps.
    metrics = finetune(ckpt, data, root / "short", max_steps=12, progress=True, **FAST)
    assert (metrics["first_loss_step"], metrics["final_loss_step"]) == (1, 12)
    assert metrics["first_loss"] == pytest.approx(logged[0]["loss"], abs=5e-5)
    assert metrics["final_loss"] == pytest.approx(logged[-1]["loss"], abs=5e-5)
    assert logged[0]["loss"] != logged[-1]["loss"]
    err = capfd.readouterr().err
    summary = next(line for line in err.splitlines() if "fine-tuned" in line)
    assert f"loss {metrics['first_loss']:.4f} (step 1) -> {metrics['final_loss']:.4f} (step 12)" \
        in summary
    # One duration for the stage: the whole call, the same number the demo reports.
    assert f"12 steps in {metrics['wall_seconds']:.1f}s" in summary
    # Logs are lines, not dicts, and never on stdout.
    assert "step 10/12  loss " in err and "{'loss'" not in err


def test_without_progress_nothing_but_the_caller_s_output_reaches_stdout(setup, capfd):
    ckpt, data, root = setup
    capfd.readouterr()
    finetune(ckpt, data, root / "quiet", max_steps=2, logging_steps=1, progress=False, **FAST)
    assert capfd.readouterr().out == ""
