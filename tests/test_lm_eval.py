"""The README's Evaluate recipe: lm-evaluation-harness's ``hf`` model on a converted checkpoint
(``trust_remote_code=True``) with the local task in examples/lm_eval, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

TASK_DIR = REPO / "examples" / "lm_eval"
ROWS = sum(1 for line in (TASK_DIR / "capitals.jsonl").read_text().splitlines() if line.strip())


@pytest.mark.slow
def test_lm_eval_scores_a_converted_smollm2_on_the_local_task(
        smollm2_converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={smollm2_converted},trust_remote_code=True",
        tasks=["moe_hub_capitals"], task_manager=TaskManager(include_path=str(TASK_DIR)),
        device="cpu", batch_size=8)
    scores = results["results"]["moe_hub_capitals"]
    assert results["n-samples"]["moe_hub_capitals"]["effective"] == ROWS
    # Four choices: chance is 0.25. The instruction-tuned 135M model knows most capitals.
    print(f"moe_hub_capitals acc {scores['acc,none']:.2f}")
    assert scores["acc,none"] > 0.5, scores
