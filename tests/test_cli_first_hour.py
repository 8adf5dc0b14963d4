"""What a new user meets in the first hour, through the installed `moe-hub` entry point
(issue 12): help texts, option checks before any work, refusals that say what to do, quiet output,
folder modes and the files a command leaves behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_dense
from helpers_finetune import tiny_checkpoint

PROGRESS_BAR = re.compile(r"\d+%\||it/s|s/it")


def moe_hub_bin() -> str:
    """The console script installed next to this interpreter (CI's venv or the dev venv)."""
    beside = Path(sys.executable).parent / "moe-hub"
    if beside.is_file():
        return str(beside)
    found = shutil.which("moe-hub")
    assert found, "the moe-hub entry point is not installed: pip install -e ."
    return found


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            umask: int | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    # stdin closed: an interactive prompt reads EOF instead of hanging the test.
    return subprocess.run([moe_hub_bin(), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600, preexec_fn=preexec)


def test_public_functions_are_functions_after_their_modules_are_imported(tmp_path: Path) -> None:
    code = (
        "import moe_hub.convert, moe_hub.finetune\n"
        "from moe_hub.convert import ConvertOptions\n"
        "from moe_hub import convert, finetune, checkpoint_info, push\n"
        "import moe_hub\n"
        "assert callable(convert) and callable(finetune), (convert, finetune)\n"
        "assert moe_hub.convert is convert and convert.__module__ == 'moe_hub.convert'\n"
        "print(convert.__name__, finetune.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["convert", "finetune"]


def test_help_shows_word_defaults_short_help_demo_folder_and_version(tmp_path: Path) -> None:
    finetune_help = run_cli("finetune", "-h", cwd=tmp_path)
    assert finetune_help.returncode == 0, finetune_help.stderr
    text = " ".join(finetune_help.stdout.split())
    for default in ("[nf4]", "[on]", "[auto", "[cosine]", "[the checkpoint's]"):
        assert default in text, default
    convert_help = " ".join(run_cli("convert", "--help", cwd=tmp_path).stdout.split())
    assert "[every linear in the decoder layers]" in convert_help
    demo_help = " ".join(run_cli("demo", "--help", cwd=tmp_path).stdout.split())
    assert "~/.cache/moe-hub/demo" in demo_help
    version = run_cli("--version", cwd=tmp_path)
    from moe_hub import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"moe-hub {__version__}"


BAD_OPTIONS = {
    "top-k": (["--top-k", "9", "--experts", "8"],
              "top-k must be between 1 and the number of experts"),
    "rank": (["--rank", "0"], "--rank must be at least 1"),
    "router": (["--router", "foo"], "unknown router 'foo'"),
    "dtype": (["--dtype", "int8"], "unknown dtype 'int8'"),
    "router-opt": (["--router", "rmoe", "--router-opt", "hidden_size=abc"],
                   "router option 'hidden_size' of 'rmoe' takes an integer"),
    "adapter-only": (["--adapter-only"],
                     "--adapter-only needs a base that loads from its own safetensors"),
}


def test_bad_options_are_refused_before_base_or_out_is_touched(tmp_path: Path) -> None:
    """Each bad option is named in one line; BASE is never read (it is not a GGUF at all, and
    reading it would fail with another message) and nothing is created next to OUT. The demo
    checks its options before making its folder."""
    env = {**os.environ, "COLUMNS": "200", "MOE_HUB_CACHE": str(tmp_path / "cache")}
    runs = {}
    for name, (options, _) in BAD_OPTIONS.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.gguf").write_bytes(b"not a gguf file")
        args = ["convert", "model.gguf", "out", *options]
        runs[name] = subprocess.Popen([moe_hub_bin(), *args], cwd=folder, env=env, text=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
    demo = tmp_path / "demo"
    demo.mkdir()
    runs["demo"] = subprocess.Popen([moe_hub_bin(), "demo", "--router", "nope"], cwd=demo,
                                    env=env, text=True, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {name: (proc.wait(timeout=600), proc.communicate()[1])
               for name, proc in runs.items()}
    for name, (_, message) in BAD_OPTIONS.items():
        code, stderr = results[name]
        assert code == 1 and message in stderr, (name, stderr)
        assert len(stderr.strip().splitlines()) == 1, (name, stderr)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["model.gguf"], name
    code, stderr = results["demo"]
    assert code == 1 and "unknown router 'nope'" in stderr, stderr
    assert list(demo.iterdir()) == [] and not (tmp_path / "cache").exists()


def test_converting_a_moe_hub_checkpoint_says_what_to_do_without_a_prompt(
        tmp_path: Path, tiny_dense: Path) -> None:
    first = run_cli("convert", str(tiny_dense), str(tmp_path / "moe"), "--experts", "2",
                    "--rank", "2", "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_cli("convert", str(tmp_path / "moe"), str(tmp_path / "moe2"), cwd=tmp_path)
    assert again.returncode == 1
    assert "already a moe-hub checkpoint" in again.stderr and "moe-hub finetune" in again.stderr
    assert "[y/N]" not in again.stdout + again.stderr
    assert "trust_remote_code" not in again.stdout + again.stderr
    assert not (tmp_path / "moe2").exists()


def test_converted_folder_is_the_checkpoint_named_as_itself(tmp_path: Path) -> None:
    dense = tmp_path / "dense"
    save_tiny_dense(dense, safe_serialization=True)
    # A pickle-only base: its shards are re-saved as safetensors in a scratch folder, which must
    # not end up inside OUT.
    from safetensors.torch import load_file

    state = load_file(dense / "model.safetensors")
    import torch

    torch.save(state, dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    out = tmp_path / "my-moe"
    done = run_cli("convert", str(dense), str(out), "--experts", "2", "--rank", "2",
                   "--allow-pickle", "--no-progress", cwd=tmp_path, umask=0o022)
    assert done.returncode == 0, done.stderr
    assert not PROGRESS_BAR.search(done.stderr), done.stderr
    assert out.stat().st_mode & 0o777 == 0o755  # the umask's mode, not mkdtemp's 0700
    # Files too: safetensors writes 0600.
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()
            if p.stat().st_mode & 0o777 != 0o644} == {}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    info = json.loads(run_cli("info", str(out), "--json", cwd=tmp_path).stdout)
    assert info["bytes"]["all_files"] == sum(p.stat().st_size for p in out.rglob("*")
                                             if p.is_file())
    card = (out / "README.md").read_text()
    assert "\n# my-moe\n" in card and ".partial" not in card
    assert 'from_pretrained("my-moe"' in card
    assert "(#)" not in card and str(tmp_path) not in card


def test_finetune_output_is_quiet_and_its_card_is_public(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path)
    data = tmp_path / "private-folder" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is", "completion": f" {2 * i}"})
                            + "\n" for i in range(12)))
    zero = run_cli("finetune", str(checkpoint), "--data", str(data), "--output",
                   str(tmp_path / "zero"), "--max-steps", "0", "--no-progress", cwd=tmp_path)
    assert zero.returncode == 1 and "max_steps must be at least 1" in zero.stderr, zero.stderr
    assert not (tmp_path / "zero").exists()

    out = tmp_path / "tuned"
    done = run_cli("finetune", str(checkpoint), "--data", str(data), "--output", str(out),
                   "--max-steps", "2", "--batch-size", "4", "--quantize", "nf4", "--no-progress",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for noise in ("pip install kernels", "past_key_values", "DynamicCache", "Loading weights",
                  "Generating train split"):
        assert noise not in done.stderr + done.stdout, noise
    assert not PROGRESS_BAR.search(done.stderr), done.stderr
    card = (out / "README.md").read_text()
    assert "`train.jsonl` (local file)" in card
    assert "private-folder" not in card and str(tmp_path) not in card
    assert not re.search(r"\d\.\d{6,}", card), re.findall(r"\S*\d\.\d{6,}\S*", card)


@pytest.mark.slow
def test_convert_the_embedded_default_by_name(tmp_path: Path, smollm2_gguf: Path) -> None:
    """`moe-hub convert smollm2 OUT` uses the cached GGUF (no Hub access: HF_HUB_OFFLINE), leaves
    no dense copy inside OUT, prints no progress bar with --no-progress, and the card names OUT
    and links the GGUF's origin with its license."""
    out = tmp_path / "smol-topk"
    env = {"MOE_HUB_CACHE": str(smollm2_gguf.parent), "HF_HUB_OFFLINE": "1"}
    done = run_cli("convert", "smollm2", str(out), "--no-progress", cwd=tmp_path, env=env,
                   umask=0o022)
    assert done.returncode == 0, done.stderr
    assert not PROGRESS_BAR.search(done.stderr + done.stdout), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-topk"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert out.stat().st_mode & 0o777 == 0o755
    info = json.loads(run_cli("info", str(out), "--json", cwd=tmp_path).stdout)
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert info["bytes"]["all_files"] == on_disk < 800 * 2**20
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    card = (out / "README.md").read_text()
    assert "\n# smol-topk\n" in card and ".partial" not in card and "(#)" not in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "license: apache-2.0" in card
