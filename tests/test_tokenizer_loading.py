"""The checkpoint's tokenizer is a standard one: the loaders the README names read it without
asking to run the checkpoint's code (checked with stdin closed, where a prompt prints and reads
EOF instead of waiting)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from helpers_finetune import tiny_checkpoint

PROMPT = "Do you wish to run the custom code?"


def _load_in_subprocess(checkpoint: Path, call: str) -> str:
    code = textwrap.dedent(f"""
        import transformers
        tok = {call}
        text = tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False,
                                       add_generation_prompt=True)
        print("TEMPLATE", text)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, cwd=checkpoint.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_readme_tokenizer_loaders_do_not_prompt(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path)
    for call in (f"transformers.PreTrainedTokenizerFast.from_pretrained({str(checkpoint)!r})",
                 f"transformers.AutoTokenizer.from_pretrained({str(checkpoint)!r}, "
                 f"trust_remote_code=True)"):
        output = _load_in_subprocess(checkpoint, call)
        assert PROMPT not in output, output
        assert "TEMPLATE <user>hi</s><assistant>" in output
    # Why the README names these two: plain AutoTokenizer resolves config.json's auto_map first
    # (transformers 5.x) and asks. When this starts failing, transformers stopped asking:
    # drop the README's note.
    assert PROMPT in _load_in_subprocess(
        checkpoint, f"transformers.AutoTokenizer.from_pretrained({str(checkpoint)!r})")
