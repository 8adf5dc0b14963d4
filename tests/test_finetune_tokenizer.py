"""A tokenizer whose ids exceed the model's embedding is refused before training, naming both
sizes and the fix (it used to end mid-step in "index out of range in self")."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from helpers_finetune import tiny_checkpoint
from typer.testing import CliRunner

from moe_hub.cli.app import app
from moe_hub.errors import MoEHubError
from moe_hub.finetune import finetune

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(3) for b in range(3)]
FAST = dict(max_length=16, batch_size=4, max_steps=1, progress=False)


def wide_tokenizer(path: Path) -> Path:
    """A real fast tokenizer whose printable characters have ids 304..398, above the tiny
    models' 256 embedding rows (300 filler tokens come first)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    fillers = [f"<filler{i}>" for i in range(300)]
    vocab = {t: i for i, t in enumerate(specials + fillers + list(string.printable[:95]))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tok")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tiny_checkpoint(root), wide_tokenizer(root / "wide"), data


def test_python_api_names_both_sizes(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    checkpoint, wide, data = setup
    with pytest.raises(MoEHubError) as err:
        finetune(checkpoint, data, tmp_path / "out", tokenizer=str(wide), **FAST)
    message = str(err.value)
    assert "399 tokens" in message and "256 rows" in message and "drop --tokenizer" in message
    assert not (tmp_path / "out").exists()


def test_cli_one_line(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    checkpoint, wide, data = setup
    result = CliRunner().invoke(app, ["finetune", str(checkpoint), "--data", str(data),
                                      "--output", str(tmp_path / "out"), "--tokenizer", str(wide),
                                      "--max-steps", "1", "--no-progress"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "256 rows" in lines[0] and "index out of range" not in lines[0]
    assert not (tmp_path / "out").exists()
