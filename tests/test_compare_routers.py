"""The router comparison's data set and scoring (scripts/compare_routers.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from conftest import REPO, tiny_config
from transformers import AutoModelForCausalLM

from moe_hub.data import PadCollator


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conflict_dataset_is_shipped_regenerates_and_holds_out_unseen_prompts() -> None:
    make = _script("make_conflict_dataset")
    train, held = make.make_rows()
    for path, rows in ((make.TRAIN, train), (make.EVAL, held)):
        assert path.read_text(encoding="utf-8") == "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held)
    counts: dict[str, int] = {}
    for row in held:
        counts[row["task"]] = counts.get(row["task"], 0) + 1
    assert counts == dict.fromkeys(make.TASKS, make.EVAL_PER_TASK)
    # The tasks conflict: one input, six different answers.
    words = ["stone", "apple", "river"]
    answers = {task: fn(words) for task, fn in make.TASKS.items()}
    assert answers == {"reverse": "river apple stone", "sort": "apple river stone",
                       "last": "river", "count": "3", "upper": "STONE APPLE RIVER",
                       "json": '["stone", "apple", "river"]'}


def test_exact_match_is_greedy_decoding_of_the_answer() -> None:
    compare = _script("compare_routers")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    prompts = [[5, 9, 17, 33], [40, 41, 2, 7, 8]]
    examples = []
    for task, prompt in zip(("a", "b"), prompts, strict=True):
        with torch.no_grad():
            greedy = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        for answer, name in ((greedy, task), ([*greedy[:2], (greedy[2] + 1) % 256], task + "!")):
            ids = prompt + answer
            examples.append((name, {"input_ids": ids, "attention_mask": [1] * len(ids),
                                    "labels": [-100] * len(prompt) + answer}))
    result = compare.evaluate(model, examples, PadCollator(0), batch_size=3)
    assert result["accuracy"] == {"a": 1.0, "a!": 0.0, "b": 1.0, "b!": 0.0}
    assert result["eval_tokens"] == 12 and result["eval_loss"] > 0


def test_report_tables_mean_and_spread_over_seeds(tmp_path: Path) -> None:
    compare = _script("compare_routers")
    runs = {}
    for seed, (loss, hit) in enumerate(((1.0, 0.5), (2.0, 1.0))):
        runs[f"topk/block@{seed}"] = {
            "method": "topk/block", "seed": seed, "rank": 8, "trainable_params": 10, "steps": 4,
            "curve": [[1, 3.0], [2, loss]], "eval_loss": loss, "mean_accuracy": hit,
            "accuracy": {"sort": hit}, "load_entropy": 0.9, "seconds_per_step": 1.0,
            "cpu_seconds_per_step": 2.0, "cpu_seconds": 8.0,
        }
    (tmp_path / "compare_routers.json").write_text(json.dumps({"runs": runs}))
    compare.report(tmp_path)
    table = (tmp_path / "compare_routers.md").read_text().splitlines()
    assert table[2].split(" | ")[4:7] == ["1.500 ± 0.707", "0.750 ± 0.354", "0.75"]
    assert (tmp_path / "compare_routers.png").stat().st_size > 1000


def test_plot_draws_a_single_logged_point_per_method() -> None:
    """--quick logs one loss per run: every method must still show up as a visible marker."""
    import matplotlib.pyplot as plt

    compare = _script("compare_routers")
    runs = {f"{method}@0": {"method": method, "seed": 0, "curve": [[8, 2.5]]}
            for method in ("lora-rank", "topk/linear", "topk/block")}
    fig = compare.curve_figure({"runs": runs})
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    plt.close(fig)
    assert len(lines) == 4  # plain LoRA on both panels, one router on each
    for line in lines:
        assert len(line.get_xdata()) == 1
        assert line.get_marker() not in (None, "", " ", "None") and line.get_markersize() > 0
