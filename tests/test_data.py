"""Loading, validating, tokenizing, packing and collating fine-tuning data (no model needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers_finetune import char_tokenizer

from moe_hub.data import (
    IGNORE_INDEX,
    PadCollator,
    default_dataset_path,
    detect_format,
    load_rows,
    pack,
    prepare_data,
    tokenize_row,
)
from moe_hub.errors import MoEHubError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tok, example: dict) -> str:
    ids = [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    return tok.decode(ids).replace(" ", "")


def test_formats_are_detected_from_columns():
    assert detect_format(["messages", "task"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["text", "id"]) == "text"
    with pytest.raises(MoEHubError, match=r"'messages'.*'prompt' and 'completion'.*'text'"):
        detect_format(["question", "answer"])


def test_completion_only_labels_cover_exactly_the_completion(tok):
    row = {"prompt": "Q: 2+3?", "completion": "5!"}
    ex = tokenize_row(row, 0, tok, "prompt_completion", True, 100)
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
    assert trained_text(tok, ex) == "5!</s>"
    full = tokenize_row(row, 0, tok, "prompt_completion", False, 100)
    assert full["labels"] == full["input_ids"]


def test_chat_labels_cover_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok"},
    ]
    ex = tokenize_row({"messages": messages}, 0, tok, "messages", True, 500)
    assert tok.decode(ex["input_ids"]).replace(" ", "") == \
        tok.apply_chat_template(messages, tokenize=False).replace(" ", "")
    # Both replies and their end-of-turn tokens; no headers, no user or system text.
    assert trained_text(tok, ex) == "yo</s>ok</s>"


def test_text_rows_train_everything_and_truncate(tok):
    ex = tokenize_row({"text": "abcdefgh"}, 0, tok, "text", True, 5)
    assert ex["labels"] == ex["input_ids"] and len(ex["input_ids"]) == 5
    assert tok.decode(ex["input_ids"]).replace(" ", "") == "abcde"


def test_row_without_expected_field_names_the_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                              {"prompt": "c", "completion": None}])
    with pytest.raises(MoEHubError, match="row 1 has no usable 'completion'"):
        prepare_data(path, tok, max_length=16)
    bad_chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(MoEHubError, match="row 0 has no assistant turn"):
        prepare_data(bad_chat, tok, max_length=16)


def test_missing_empty_and_unknown_files_are_refused(tmp_path, tok):
    with pytest.raises(MoEHubError, match=r"nope\.jsonl does not exist"):
        prepare_data(tmp_path / "nope.jsonl", tok, max_length=16)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MoEHubError, match="empty"):
        prepare_data(empty, tok, max_length=16)
    other = tmp_path / "data.xml"
    other.write_text("<a/>")
    with pytest.raises(MoEHubError, match="unknown extension"):
        prepare_data(other, tok, max_length=16)


def test_max_length_over_model_limit_is_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}])
    with pytest.raises(MoEHubError, match=r"over the model's limit of 128.*max_length <= 128"):
        prepare_data(path, tok, max_length=129, model_limit=128)


def test_packing_keeps_every_token_and_label_in_order(tmp_path, tok):
    rows = [{"prompt": f"p{i}" * (i + 1), "completion": f"c{i}"} for i in range(7)]
    examples = [tokenize_row(r, i, tok, "prompt_completion", True, 100)
                for i, r in enumerate(rows)]
    blocks = pack(examples, 8)
    assert all(len(b["input_ids"]) == 8 for b in blocks[:-1]) and len(blocks[-1]["input_ids"]) <= 8
    flat_ids = [t for e in examples for t in e["input_ids"]]
    flat_labels = [t for e in examples for t in e["labels"]]
    assert [t for b in blocks for t in b["input_ids"]] == flat_ids
    assert [t for b in blocks for t in b["labels"]] == flat_labels


def test_csv_parquet_and_eval_split(tmp_path, tok):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "d.csv")
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        prepared = prepare_data(tmp_path / name, tok, max_length=32, eval_split=0.25, seed=3)
        assert prepared.format == "prompt_completion" and prepared.rows == 20
        assert len(prepared.train) == 15 and len(prepared.eval) == 5
        train_ids = {tuple(x) for x in prepared.train["input_ids"]}
        assert not train_ids & {tuple(x) for x in prepared.eval["input_ids"]}
    with pytest.raises(MoEHubError, match="either eval_data or eval_split"):
        prepare_data(tmp_path / "d.csv", tok, max_length=32, eval_split=0.2,
                     eval_data=tmp_path / "d.csv")


def test_collator_pads_inputs_mask_and_labels(tok):
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    batch = PadCollator(0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["labels"].dtype == torch.long


def test_default_dataset_is_shipped_and_regenerates_identically(tok):
    path = default_dataset_path()
    rows = load_rows("default")
    assert path.is_file() and len(rows) == 300
    assert detect_format(rows.column_names) == "messages"
    tasks = {}
    for row in rows:
        tasks[row["task"]] = tasks.get(row["task"], 0) + 1
    assert len(tasks) == 6 and set(tasks.values()) == {50}
    spec = importlib.util.spec_from_file_location("mkds", REPO / "scripts" /
                                                  "make_default_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    regenerated = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in script.rows())
    assert regenerated == path.read_text(encoding="utf-8")
    capital = next(r for r in rows if r["task"] == "capital")
    country = capital["messages"][0]["content"].removeprefix("What is the capital of ")[:-1]
    assert script.CAPITALS[country] == capital["messages"][1]["content"]


def test_every_bad_row_is_named_and_csv_cells_stay_text(tmp_path, tok):
    """Arithmetic answers such as 46 are text in a CSV (not numbers refused as "no usable
    completion" at row 0), and the error lists the rows that really are bad."""
    lines = ["prompt,completion"] + [f"{i} + {i} =,{2 * i + 40}" for i in range(8)]
    lines[4] = "1 + 2 =,"  # row 3: empty completion
    lines[6] = "2 + 2 =,"  # row 5
    path = tmp_path / "sums.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MoEHubError) as caught:
        prepare_data(path, tok, max_length=32)
    message = str(caught.value)
    assert "2 of 8 rows" in message
    assert "row 3 has no usable 'completion'" in message
    assert "row 5 has no usable 'completion'" in message
    assert "row 0" not in message

    lines[4], lines[6] = "1 + 2 =,NA", "2 + 2 =,007"
    path.write_text("\n".join(lines) + "\n")
    prepared = prepare_data(path, tok, max_length=32, completion_only=True)
    completions = [trained_text(tok, ex) for ex in prepared.train]
    assert completions[0] == "40</s>" and completions[3] == "NA</s>"
    assert completions[5] == "007</s>"

    # In JSON a number is its own text too; a missing value is still refused by row.
    rows = [{"prompt": f"{i}+{i}=", "completion": 2 * i} for i in range(4)]
    rows[2]["completion"] = None
    with pytest.raises(MoEHubError, match=r"1 of 4 rows .*\(row 2 has no usable 'completion'"):
        prepare_data(write_jsonl(tmp_path / "n.jsonl", rows), tok, max_length=32)
