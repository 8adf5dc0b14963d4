"""Training data for fine-tuning: load rows, tokenize them with labels, pack, split, collate.

Rows come from a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a Hub dataset id, or the
dataset moe-hub ships (``default``). Three row formats are recognised from the columns:

- ``text``: plain language modelling on the whole text;
- ``prompt`` + ``completion``: the completion follows the prompt;
- ``messages``: a chat (list of ``{"role", "content"}``) rendered with the tokenizer's template.

With ``completion_only`` the loss covers only completions / assistant turns (labels -100 elsewhere).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import MoEHubError

DEFAULT_DATASET = "default"
FORMATS = ("messages", "prompt_completion", "text")
IGNORE_INDEX = -100
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def default_dataset_path() -> Path:
    """The shipped multi-task chat dataset (see scripts/make_default_dataset.py)."""
    return Path(str(resources.files("moe_hub.datasets").joinpath("default.jsonl")))


def load_rows(data: str | os.PathLike, split: str = "train") -> Any:
    """Rows of ``data`` (local file, Hub dataset id or ``default``) as a ``datasets.Dataset``."""
    import datasets

    text = os.fspath(data)
    if text == DEFAULT_DATASET:
        text = str(default_dataset_path())
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    local = suffix in _LOCAL_BUILDERS or path.exists() or text.startswith((".", "/", "~"))
    try:
        if local:
            if path.is_dir():
                raise MoEHubError(f"data {path} is a directory: pass one .jsonl, .json, .csv or "
                                  f".parquet file")
            if not path.is_file():
                raise MoEHubError(f"data file {path} does not exist: pass an existing .jsonl, "
                                  f".json, .csv or .parquet file or a Hub dataset id")
            if suffix not in _LOCAL_BUILDERS:
                raise MoEHubError(f"data file {path} has an unknown extension: use .jsonl, .json, "
                                  f".csv or .parquet")
            if suffix != ".parquet":
                _check_utf8(path)
            try:
                return datasets.load_dataset(_LOCAL_BUILDERS[suffix], data_files=str(path),
                                             split="train", **_builder_options(path, suffix))
            # datasets 4.x raises TypeError ("'str' object is not a mapping") where a JSON
            # Lines line is a list; 5.x a DatasetGenerationError.
            except (ValueError, TypeError, datasets.exceptions.DatasetGenerationError):
                if suffix in (".jsonl", ".json"):
                    _check_json_lines(path)  # names the line, when one line is at fault
                raise
        return datasets.load_dataset(text, split=split)
    except MoEHubError:
        raise
    except StopIteration:  # datasets' json builder on a file without a single row
        raise MoEHubError(f"dataset {text!r} is empty: give at least one row") from None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as err:
        raise MoEHubError(f"dataset {text!r} not found ({err}): pass a local file or an existing "
                          f"Hub dataset id") from None
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        raise MoEHubError(f"cannot read dataset {text!r}: {cause}") from None


def _check_utf8(path: Path) -> None:
    """Arrow stores undecodable bytes and fails on the first access of their row, far from the
    file: check every line here, naming the first bad one."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise MoEHubError(
                    f"data file {path} line {number} is not UTF-8 text (byte "
                    f"0x{line[err.start]:02x} at column {err.start + 1}): save the file as UTF-8"
                ) from None


def _check_json_lines(path: Path) -> None:
    """Raise naming the first line of a JSON Lines file that is not a JSON object; return when
    every line is one (the file's problem is then another, e.g. a JSON array file)."""
    import json

    with open(path, "rb") as f:
        first = f.read(64).lstrip()
        if first.startswith(b"["):
            return  # one JSON array, not JSON Lines
        f.seek(0)
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as err:
                raise MoEHubError(f"data file {path} line {number} is not valid JSON "
                                  f"({getattr(err, 'msg', err)} at column "
                                  f"{getattr(err, 'colno', '?')}): fix or remove that line"
                                  ) from None
            if not isinstance(value, dict):
                raise MoEHubError(f"data file {path} line {number} is a JSON "
                                  f"{type(value).__name__}, not an object: give each line one "
                                  f"row such as {{\"text\": ...}}")


class RowError(MoEHubError):
    """One row cannot be used; ``problem`` says why (without the fix, which is shared)."""

    def __init__(self, index: int, problem: str, fix: str) -> None:
        super().__init__(f"row {index} {problem}: {fix}")
        self.index, self.problem = index, problem


def _builder_options(path: Path, suffix: str) -> dict[str, Any]:
    """CSV cells are text: without this pandas turns an answer such as ``46`` into a number
    (then refused as "no usable text"), ``NA`` into a missing value and ``007`` into 7."""
    if suffix != ".csv":
        return {}
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), None)
    if not header:
        return {}
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "na_filter": False}


def detect_format(columns: list[str]) -> str:
    """The row format implied by the dataset's columns (see the module docstring)."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise MoEHubError(
        f"the dataset has columns {sorted(columns)} but none of the known formats: give each row "
        f"'messages' (chat), 'prompt' and 'completion', or 'text'"
    )


def _field(row: dict[str, Any], name: str, index: int) -> str:
    value = row.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        value = str(value)  # a JSON number such as an arithmetic answer is its own text
    if not isinstance(value, str) or not value:
        raise RowError(index, f"has no usable '{name}' (got {value!r})",
                       "every row needs a non-empty string there")
    return value


def _check_messages(row: dict[str, Any], index: int) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError(index, f"has no usable 'messages' (got {messages!r})",
                       "give a list of {'role', 'content'} turns")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str):
            raise RowError(index, f"has a malformed message {turn!r}",
                           "each turn needs a string 'role' and 'content'")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise RowError(index, "has no assistant turn", "there is nothing to learn from it")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _render(tokenizer: Any, messages: list[dict[str, str]], index: int, **kwargs: Any) -> str:
    """The chat as text; a template that does not compile, or raises on this row, is named."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateSyntaxError as err:
        raise MoEHubError(f"the tokenizer's chat template is broken ({err.__class__.__name__}: "
                          f"{err.message} on template line {err.lineno}): fix chat_template in "
                          f"the tokenizer files or pass --tokenizer") from None
    except TemplateError as err:
        raise RowError(index, f"cannot be rendered by the tokenizer's chat template ({err})",
                       "fix the row or the chat template") from None


def _chat_spans(
    messages: list[dict[str, str]], tokenizer: Any, index: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Render the chat; return the text and the character spans of the assistant replies.

    Each assistant span starts after the prefix rendered with the generation prompt (so the
    "assistant:" header is not trained) and ends where the next prefix ends.
    """
    full = _render(tokenizer, messages, index)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], index, add_generation_prompt=True) if i else ""
        end = _render(tokenizer, messages[: i + 1], index)
        if not full.startswith(end) or not end.startswith(start):
            raise MoEHubError("the tokenizer's chat template does not render a chat as a prefix of "
                              "its continuation: pass completion_only=False")
        spans.append((len(start), len(end)))
    return full, spans


#: Characters tokenised per token wanted, at first: a token rarely covers more; a row whose
#: cut text gives too few tokens is cut again four times longer, up to the whole row.
_CHARS_PER_TOKEN = 8
#: Tokens beyond the ones kept, so that a token split by the character cut is never kept.
_CUT_MARGIN = 16


def tokenize_row(
    row: dict[str, Any], index: int, tokenizer: Any, fmt: str, completion_only: bool,
    max_length: int,
) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels of one row, truncated to ``max_length``.

    Long fields are cut to a bounded number of characters before they reach the tokenizer (a
    single 20 MB line otherwise costs gigabytes of token offsets): the cut is widened until it
    gives more tokens than are kept, so the result equals tokenising the whole row."""
    limit = _CHARS_PER_TOKEN * (max_length + _CUT_MARGIN)
    while True:
        example, cut = _tokenize_cut(row, index, tokenizer, fmt, completion_only, limit)
        if not cut or len(example["input_ids"]) > max_length + _CUT_MARGIN:
            return {key: value[:max_length] for key, value in example.items()}
        limit *= 4


def _tokenize_cut(row: dict[str, Any], index: int, tokenizer: Any, fmt: str,
                  completion_only: bool, limit: int) -> tuple[dict[str, list[int]], bool]:
    """The row tokenised with each text field cut to ``limit`` characters; whether any was."""
    cut = False

    def bounded(text: str) -> str:
        nonlocal cut
        if len(text) > limit:
            cut = True
            return text[:limit]
        return text

    if fmt == "text":
        ids = _with_eos(tokenizer(bounded(_field(row, "text", index)))["input_ids"], tokenizer)
        labels = list(ids)
    elif fmt == "prompt_completion":
        prompt = tokenizer(bounded(_field(row, "prompt", index)))["input_ids"]
        completion = tokenizer(bounded(_field(row, "completion", index)),
                               add_special_tokens=False)["input_ids"]
        completion = _with_eos(completion, tokenizer)
        ids = prompt + completion
        labels = ([IGNORE_INDEX] * len(prompt) if completion_only else list(prompt)) + completion
    elif fmt == "messages":
        messages = [{**turn, "content": bounded(turn["content"])}
                    for turn in _check_messages(row, index)]
        if getattr(tokenizer, "chat_template", None) is None:
            raise MoEHubError("the tokenizer has no chat template, so 'messages' rows cannot be "
                              "rendered: use a chat tokenizer or 'prompt'/'completion' rows")
        text, spans = _chat_spans(messages, tokenizer, index)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=completion_only)
        ids = encoded["input_ids"]
        if completion_only:
            labels = [
                token if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                for token, (start, _) in zip(ids, encoded["offset_mapping"])
            ]
        else:
            labels = list(ids)
    else:
        raise MoEHubError(f"unknown data format {fmt!r}: use one of {FORMATS}")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, cut


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut them into ``max_length`` blocks (the last may be shorter)."""
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids.extend(example["input_ids"])
        labels.extend(example["labels"])
    blocks = []
    for start in range(0, len(ids), max_length):
        chunk = ids[start:start + max_length]
        blocks.append({"input_ids": chunk, "attention_mask": [1] * len(chunk),
                       "labels": labels[start:start + max_length]})
    return blocks


@dataclass
class PreparedData:
    train: Any
    eval: Any | None
    format: str
    rows: int
    truncated: int
    tokens: int


def model_max_length(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _tokenize_all(rows: Any, tokenizer: Any, completion_only: bool, max_length: int,
                  name: str) -> tuple[Any, str, int, int]:
    import datasets

    if len(rows) == 0:
        raise MoEHubError(f"{name} is empty: give at least one row")
    fmt = detect_format(list(rows.column_names))
    examples, truncated, problems = [], 0, []
    for index, row in enumerate(rows):
        try:
            example = tokenize_row(row, index, tokenizer, fmt, completion_only, max_length + 1)
        except RowError as err:
            problems.append(f"row {err.index} {err.problem}")
            continue
        if len(example["input_ids"]) > max_length:
            truncated += 1
            example = {key: value[:max_length] for key, value in example.items()}
        if not any(label != IGNORE_INDEX for label in example["labels"][1:]):
            continue  # truncation removed every trained token: the row teaches nothing
        examples.append(example)
    if problems:
        _refuse_mixed_formats(rows, name)
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise MoEHubError(f"{len(problems)} of {len(rows)} rows of {name} are unusable ({shown}): "
                          f"fix or remove them (row numbers count from 0)")
    if not examples:
        raise MoEHubError(f"no row of {name} has a trained token within max_length={max_length}: "
                          f"raise max_length")
    if len(examples) < len(rows):
        logging.getLogger(__name__).warning(
            "%d of %d rows of %s lose every trained token to max_length=%d and are skipped",
            len(rows) - len(examples), len(rows), name, max_length)
    return datasets.Dataset.from_list(examples), fmt, truncated, len(rows)


def _row_format(row: dict[str, Any]) -> str | None:
    """The format a single row is written in (its non-empty fields), None if none."""
    present = {key for key, value in row.items() if value not in (None, "", [])}
    if "messages" in present:
        return "messages"
    if {"prompt", "completion"} <= present:
        return "prompt_completion"
    return "text" if "text" in present else None


def _refuse_mixed_formats(rows: Any, name: str) -> None:
    """A file whose rows use different formats loads as one table with the union of their
    columns: say that, rather than blame each row for the other format's missing field."""
    first: dict[str, int] = {}
    for index, row in enumerate(rows):
        fmt = _row_format(row)
        if fmt is not None:
            first.setdefault(fmt, index)
    if len(first) > 1:
        kinds = ", ".join(f"row {index} is {fmt.replace('_', '/')}"
                          for fmt, index in sorted(first.items(), key=lambda kv: kv[1]))
        raise MoEHubError(f"{name} mixes row formats ({kinds}): give every row the same "
                          f"format: 'messages', 'prompt' and 'completion', or 'text'")


def prepare_data(
    data: str | os.PathLike,
    tokenizer: Any,
    *,
    max_length: int,
    completion_only: bool = True,
    packing: bool = False,
    eval_data: str | os.PathLike | None = None,
    eval_split: float = 0.0,
    data_split: str = "train",
    seed: int = 0,
    model_limit: int | None = None,
) -> PreparedData:
    """Load, validate and tokenize the training (and evaluation) data."""
    if max_length < 2:
        raise MoEHubError(f"max_length must be at least 2 (got {max_length})")
    if model_limit is not None and max_length > model_limit:
        raise MoEHubError(f"max_length {max_length} is over the model's limit of {model_limit} "
                          f"positions: pass max_length <= {model_limit}")
    if eval_data is not None and eval_split:
        raise MoEHubError("pass either eval_data or eval_split, not both")
    if not 0.0 <= eval_split < 1.0:
        raise MoEHubError(f"eval_split is a fraction in [0, 1) (got {eval_split})")
    rows = load_rows(data, data_split)
    train, fmt, truncated, count = _tokenize_all(rows, tokenizer, completion_only, max_length,
                                                 f"dataset {os.fspath(data)}")
    evaluation = None
    if eval_data is not None:
        evaluation, _, _, _ = _tokenize_all(load_rows(eval_data, data_split), tokenizer,
                                            completion_only, max_length,
                                            f"eval dataset {os.fspath(eval_data)}")
    elif eval_split:
        held = max(1, math.floor(len(train) * eval_split))
        if held >= len(train):
            raise MoEHubError(f"eval_split {eval_split} leaves no training rows: lower it")
        parts = train.train_test_split(test_size=held, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    if packing:
        import datasets

        train = datasets.Dataset.from_list(pack(list(train), max_length))
        if evaluation is not None:
            evaluation = datasets.Dataset.from_list(pack(list(evaluation), max_length))
    tokens = sum(len(ids) for ids in train["input_ids"])
    return PreparedData(train, evaluation, fmt, count, truncated, tokens)


class PadCollator:
    """Right-pads a batch: pad id for inputs, 0 for the mask, -100 for labels."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            gap = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * gap)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * gap)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * gap)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def pad_token_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


__all__ = [
    "DEFAULT_DATASET", "FORMATS", "IGNORE_INDEX", "PadCollator", "PreparedData",
    "default_dataset_path", "detect_format", "load_rows", "model_max_length", "pack",
    "pad_token_id", "prepare_data", "tokenize_row",
]
