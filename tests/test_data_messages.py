"""Data problems are named in one line (file and line, row, "chat template"), and a huge row is
cut before the tokenizer sees it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_finetune import char_tokenizer

from moe_hub.data import prepare_data, tokenize_row
from moe_hub.errors import MoEHubError


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9 au lait"}\n',
     r"d.jsonl line 2 is not UTF-8 text \(byte 0xe9 at column 14\)"),
    ("d.csv", b"text\nok\ncaf\xe9\n", r"d.csv line 3 is not UTF-8 text"),
    ("d.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n',
     r"d.jsonl line 4 is not valid JSON \(Expecting value at column 10\)"),
    ("d.jsonl", b'{"text": "a"}\n["b"]\n', r"d.jsonl line 2 is a JSON list, not an object"),
    ("d.jsonl", b'{"text": "a"}\n{"prompt": "1+1=", "completion": "2"}\n',
     r"mixes row formats \(row 0 is text, row 1 is prompt/completion\)"),
])
def test_bad_data_files_name_the_line_or_the_formats(tmp_path, name, content, message):
    with pytest.raises(MoEHubError, match=message):
        prepare_data(write(tmp_path / name, content), char_tokenizer(), max_length=16)


def test_a_broken_chat_template_is_called_a_chat_template(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }{% endfor %}"
    rows = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}]}
    data = write(tmp_path / "chat.jsonl", (json.dumps(rows) + "\n").encode())
    with pytest.raises(MoEHubError, match=r"the tokenizer's chat template is broken "
                                          r"\(TemplateSyntaxError"):
        prepare_data(data, tok, max_length=16)


def counting_tokenizer():
    """The real character tokenizer, recording the length of every text it is called on."""
    tok = char_tokenizer()
    seen: list[int] = []

    class Counting(type(tok)):
        def __call__(self, text, *args, **kwargs):
            seen.append(len(text))
            return super().__call__(text, *args, **kwargs)

    tok.__class__ = Counting
    return tok, seen


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "messages"])
def test_a_huge_row_is_cut_before_the_tokenizer_and_tokenises_as_whole(fmt):
    big = "".join(chr(ord("a") + i % 26) for i in range(2_000_000))
    row = {"text": big} if fmt == "text" else \
        {"prompt": "Q: ", "completion": big} if fmt == "prompt_completion" else \
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": big}]}
    tok, seen = counting_tokenizer()
    example = tokenize_row(row, 0, tok, fmt, True, 33)
    # Bounded by the row's max_length, not by the row: 8 characters per token kept, plus margin.
    assert max(seen) <= 8 * (33 + 16) + 200
    assert len(example["input_ids"]) == 33
    # The same tokens as tokenising a whole (smaller) row with the same start.
    small = {k: (v[:5000] if isinstance(v, str) else v) for k, v in row.items()}
    if fmt == "messages":
        small = {"messages": [row["messages"][0], {"role": "assistant", "content": big[:5000]}]}
    assert tokenize_row(small, 0, char_tokenizer(), fmt, True, 33) == example


def test_a_row_of_long_tokens_widens_the_cut_until_it_has_enough():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word = "x" * 500  # one token of 500 characters: the first cut holds not even one
    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, word: 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    text = " ".join([word] * 200)
    example = tokenize_row({"text": text}, 0, tok, "text", True, 40)
    assert example["input_ids"] == [2] * 40
