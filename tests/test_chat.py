"""`moe-hub chat`: the checkpoint's chat template, greedy replies equal to ``generate``'s, the
system message, a history across turns, and one-shot ``-p``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_one_error_line
from helpers_finetune import tiny_checkpoint
from typer.testing import CliRunner

from moe_hub.cli.app import app
from moe_hub.modeling import MoELoraForCausalLM

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tiny_checkpoint(tmp_path_factory.mktemp("chat"))
    # A converted model has B = 0 (it is the dense model): give the experts a say.
    model = MoELoraForCausalLM.from_pretrained(path)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.2)
    model.save_pretrained(path)
    return path


def greedy(checkpoint: Path, messages: list[dict[str, str]]) -> str:
    """The reference: the chat template applied by hand, model.generate without sampling."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    model = MoELoraForCausalLM.from_pretrained(checkpoint).eval()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_one_shot_prompt_prints_the_greedy_reply(checkpoint: Path) -> None:
    result = CliRunner().invoke(app, ["chat", str(checkpoint), "-p", "2+2=", "--system", "math",
                                      "--max-new-tokens", str(NEW_TOKENS)])
    assert result.exit_code == 0, result.output
    want = greedy(checkpoint, [{"role": "system", "content": "math"},
                               {"role": "user", "content": "2+2="}])
    assert want.strip()
    assert result.stdout == want + "\n"


def test_interactive_turns_keep_the_history(checkpoint: Path) -> None:
    result = CliRunner().invoke(app, ["chat", str(checkpoint), "--max-new-tokens",
                                      str(NEW_TOKENS)], input="hello\nand?\n/reset\nand?\n")
    assert result.exit_code == 0, result.output
    first = greedy(checkpoint, [{"role": "user", "content": "hello"}])
    second = greedy(checkpoint, [{"role": "user", "content": "hello"},
                                 {"role": "assistant", "content": first},
                                 {"role": "user", "content": "and?"}])
    fresh = greedy(checkpoint, [{"role": "user", "content": "and?"}])
    assert second != fresh  # the history changes the reply, so the check below can fail
    assert result.stdout == f"{first}\n{second}\n{fresh}\n"


def test_bad_options_are_refused_in_one_line(checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["chat", str(checkpoint), "-p", "x",
                                      "--max-new-tokens", "0"])
    assert_one_error_line(result.exit_code, result.output, "--max-new-tokens")
    result = CliRunner().invoke(app, ["chat", str(tmp_path), "-p", "x"])
    assert_one_error_line(result.exit_code, result.output, str(tmp_path))
    dense = checkpoint.parent / "dense-0"  # the tiny model it was converted from
    result = CliRunner().invoke(app, ["chat", str(dense), "-p", "x"])
    assert_one_error_line(result.exit_code, result.output, "not a moe-hub checkpoint",
                          "moe-hub convert")


def test_the_demos_what_next_commands_run(checkpoint: Path) -> None:
    """The demo's closing lines name real commands on the real path: the chat line runs as
    printed (plus -p to make it one-shot), the push line names the checkpoint."""
    import shlex

    from moe_hub.demo import what_next

    lines = what_next(checkpoint).splitlines()
    assert lines[0] == "What next:"
    commands = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in lines[1:]}
    assert set(commands) == {"chat", "evaluate", "publish"}
    chat = shlex.split(commands["chat"])
    assert chat[:3] == ["moe-hub", "chat", str(checkpoint)]
    result = CliRunner().invoke(app, [*chat[1:], "-p", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert f"pretrained={checkpoint},trust_remote_code=True" in commands["evaluate"]
    assert shlex.split(commands["publish"])[:3] == ["moe-hub", "push", str(checkpoint)]
