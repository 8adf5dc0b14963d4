"""Write moe_hub/datasets/conflict.jsonl and conflict_eval.jsonl: tasks that fight over one adapter.

Every row shows the same kind of input, a short list of words, and names a task; the six tasks
map that input to answers that differ in skill and in format, so one shared adapter must learn
six incompatible mappings of the same inputs (what routing to experts is meant to relieve):

    reverse  the words in reverse order          " stone river apple"
    sort     the words in alphabetical order     " apple river stone"
    last     the last word only                  " stone"
    count    how many words, as digits           " 3"
    upper    the words in capitals               " APPLE RIVER STONE"
    json     the words as a JSON list            ' ["apple", "river", "stone"]'

Rows are ``prompt``/``completion`` pairs (no chat template: short sequences keep a CPU run
cheap) with a ``task`` field; answers are short and exact, so the comparison scores held-out
exact match per task. The held-out file draws from the same distribution with a different
random stream, and no held-out prompt occurs in the training file. Deterministic: the same
script always writes the same bytes. Run from the repository root:

    python scripts/make_conflict_dataset.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[1] / "moe_hub" / "datasets"
TRAIN, EVAL = DATASETS / "conflict.jsonl", DATASETS / "conflict_eval.jsonl"
TRAIN_PER_TASK, EVAL_PER_TASK = 200, 30
SEED = 2025

WORDS = [
    "apple", "river", "stone", "cloud", "green", "music", "table", "light", "north", "paper",
    "train", "horse", "glass", "bread", "chair", "smile", "ocean", "tiger", "plant", "storm",
    "house", "money", "water", "night",
]


def _json_list(words: list[str]) -> str:
    return json.dumps(words)


TASKS: dict[str, Callable[[list[str]], str]] = {
    "reverse": lambda words: " ".join(reversed(words)),
    "sort": lambda words: " ".join(sorted(words)),
    "last": lambda words: words[-1],
    "count": lambda words: str(len(words)),
    "upper": lambda words: " ".join(words).upper(),
    "json": _json_list,
}


def prompt(task: str, words: list[str]) -> str:
    return f"task: {task}\nwords: {' '.join(words)}\nanswer:"


def draw(rng: random.Random, task: str) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {"task": task, "prompt": prompt(task, words), "completion": " " + TASKS[task](words)}


def make_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    train_rng, eval_rng = random.Random(SEED), random.Random(SEED + 1)
    train = [draw(train_rng, task) for _ in range(TRAIN_PER_TASK) for task in TASKS]
    seen = {row["prompt"] for row in train}
    held: list[dict[str, str]] = []
    for task in TASKS:
        rows: list[dict[str, str]] = []
        while len(rows) < EVAL_PER_TASK:
            row = draw(eval_rng, task)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        held.extend(rows)
    return train, held


def write(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train, held = make_rows()
    DATASETS.mkdir(parents=True, exist_ok=True)
    write(TRAIN, train)
    write(EVAL, held)
    print(f"wrote {len(train)} rows to {TRAIN} and {len(held)} held-out rows to {EVAL}")


if __name__ == "__main__":
    main()
