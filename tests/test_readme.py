"""The README's code blocks run as written, and the files it cites exist in the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Blocks that mention these need the embedded SmolLM2 model: run in order by the slow test.
SMOLLM2_BLOCK = re.compile(r"smol-moe|smollm2")

#: Blocks not executed by these tests, by their first line, with the reason.
NOT_RUN = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install "
    "-e . && moe-hub demo":
        "creates a virtualenv and installs torch and moe-hub from a package index (network); "
        "the test environment is that install, and the demo takes minutes",
    "bash scripts/test.sh":
        "runs this test suite itself (what CI runs)",
    "bash scripts/test.sh                      # everything (CI), pinned versions, in .venv":
        "runs this test suite itself",
    "# FSDP2 (torch's fully_shard): parameters, gradients and optimizer state sharded over the "
    "GPUs":
        "launches several GPU processes; tests/test_distributed_finetune.py runs the FSDP2 "
        "command with the same config on 2 CPU processes, tests/test_fsdp.py the sharding",
    "moe-hub convert HuggingFaceTB/SmolLM2-135M-Instruct smol-mix \\":
        "the adapter names stand for the reader's own adapters; tests/test_from_adapters.py "
        "runs these commands on adapters trained in the test, scripts/train_task_adapters.py "
        "on SmolLM2",
    "moe-hub convert smollm2 smol-mixlora --granularity block --experts 8 --top-k 2":
        "needs chat.jsonl and minutes of fine-tuning and a token for the push; "
        "tests/test_export.py and tests/test_export_hub.py run convert, finetune, export and "
        "push on tiny models of each family",
    "from vllm import LLM, SamplingParams":
        "needs vLLM and a GPU: scripts/gpu_session.sh vllm runs it on the device machine",
    "lm_eval --model hf --model_args pretrained=smol-moe-ft,trust_remote_code=True \\":
        "downloads the arc_easy data set from the Hub (network)",
    "HF_DATASETS_OFFLINE=1 lm_eval --model hf \\":
        "runs from the repository root; tests/test_lm_eval.py runs the same task on a converted "
        "SmolLM2 through lm-eval's Python API",
}


def code_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block tagged python or bash, in README order."""
    return [(lang, code) for lang, code in FENCE.findall(README.read_text())
            if lang in ("python", "bash")]


def _first_line(code: str) -> str:
    return code.strip().splitlines()[0].strip()


def _runnable() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(fast blocks, SmolLM2 blocks) to execute; every other block must be in NOT_RUN."""
    fast, smollm2 = [], []
    for lang, code in code_blocks():
        if _first_line(code) in NOT_RUN:
            continue
        (smollm2 if SMOLLM2_BLOCK.search(code) else fast).append((lang, code))
    return fast, smollm2


def _env() -> dict[str, str]:
    # `moe-hub` and `python` resolve to this interpreter's environment, as after the install.
    # The repository root goes before site-packages on the path, as for a `python -c` or a
    # notebook started in the checkout: a root folder shadowing a distribution breaks the block.
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _run(lang: str, code: str, cwd: Path, timeout: int) -> None:
    command = [sys.executable, "-c", code] if lang == "python" else \
        ["bash", "-e", "-o", "pipefail", "-c", code]
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    assert done.returncode == 0, f"README block failed:\n{code}\n{done.stdout}\n{done.stderr}"


def test_every_block_is_valid_and_either_run_or_excluded_with_a_reason() -> None:
    blocks = code_blocks()
    assert len(blocks) >= 6
    first_lines = [_first_line(code) for _, code in blocks]
    stale = [line for line in NOT_RUN if line not in first_lines]
    assert not stale, f"NOT_RUN names blocks the README no longer has: {stale}"
    for lang, code in blocks:
        if lang == "python":
            compile(code, "README.md", "exec")
        else:
            check = subprocess.run(["bash", "-n", "-c", code], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
    fast, smollm2 = _runnable()
    assert len(fast) + len(smollm2) + len(NOT_RUN) == len(blocks)
    assert smollm2, "the Python API example should run on the embedded default model"


def test_fast_blocks_run(tmp_path: Path) -> None:
    fast, _ = _runnable()
    assert fast
    for lang, code in fast:
        _run(lang, code, tmp_path, timeout=300)
    assert (tmp_path / "chat.jsonl").is_file()  # written by the prompt/completion example


@pytest.mark.slow
def test_smollm2_blocks_run_in_order(tmp_path: Path, smollm2_gguf: Path) -> None:
    """The Python API example (convert the embedded default), loading the checkpoint in bf16,
    4-bit and through a pipeline, and the finetune command, in one folder as a user would."""
    _, smollm2 = _runnable()
    assert len(smollm2) >= 3
    for lang, code in smollm2:
        _run(lang, code, tmp_path, timeout=1800)
    assert (tmp_path / "smol-moe" / "config.json").is_file()
    assert (tmp_path / "smol-moe-ft" / "moe_hub_training.json").is_file()


def _tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.split()
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
            and ".venv" not in p.parts and ".git" not in p.parts]


def test_cited_repository_files_exist() -> None:
    """Documents, scripts and source files the README names are in the repository (files a
    checkpoint holds, .json/.safetensors/.png, are output, not repository files)."""
    text = README.read_text()
    tracked = _tracked_files()
    names = {Path(p).name for p in tracked}
    cited = set(re.findall(r"(?<![\w/.-])((?:[\w.-]+/)*[\w*.-]+\.(?:md|py|sh))\b", text))
    missing = []
    for citation in sorted(cited):
        if "/" in citation:
            found = any(Path(p).match(citation) for p in tracked)
        else:
            found = any(Path(name).match(citation) for name in names)
        if not found:
            missing.append(citation)
    assert not missing, f"README cites files the repository does not have: {missing}"


def test_checkpoint_layout_names_every_shipped_code_file() -> None:
    """The README's checkpoint layout lists every file convert copies into a checkpoint."""
    from moe_hub.checkpoint import code_files

    text = README.read_text()
    section = text.split("## Checkpoint layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"[\w*]+\.py", section))
    shipped = {path.name for path in code_files()}
    assert shipped
    missing = {name for name in shipped
               if not any(Path(name).match(pattern) for pattern in listed)}
    assert not missing, f"README's checkpoint layout omits {sorted(missing)}"


def test_cross_references_name_existing_sections() -> None:
    """Every 'See "X"' in the README names a section heading it has."""
    text = README.read_text()
    headings = {h.strip() for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for name in re.findall(r"[Ss]ee [\"“]([^\"”]+)[\"”]", text):
        name = " ".join(name.split())
        assert name in headings, f'README says See "{name}", but has no such section'
