"""Bad input to `moe-hub convert`: one clear line naming the fix, exit code != 0, no OUT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_error_line, save_tiny_dense
from typer.testing import CliRunner

from moe_hub.cli.app import app


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["convert", *args, "--no-progress"])
    return result.exit_code, result.output


def _assert_clean_failure(tmp_path: Path, out: Path, code: int, output: str, *needles: str) -> None:
    assert_one_error_line(code, output, *needles)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def dense(tmp_path: Path) -> Path:
    return save_tiny_dense(tmp_path / "dense")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--top-k", "5", "--experts", "4"], ["top-k", "--experts"]),
        (["--rank", "0"], ["rank", "--rank"]),
        (["--router", "nosuch"], ["unknown router", "topk"]),
        (["--targets", "nosuch_proj"], ["--targets", "q_proj"]),
        (["--dropout", "1.5"], ["dropout"]),
        # Numbers no model can use: each refused naming its flag, before BASE is read.
        (["--alpha", "inf"], ["--alpha"]),
        (["--alpha", "nan"], ["--alpha"]),
        (["--alpha", "-1"], ["--alpha"]),
        (["--alpha", "0"], ["--alpha"]),
        (["--rank", "-2"], ["--rank"]),
        (["--experts", "0"], ["--experts"]),
        (["--experts", "-3"], ["--experts"]),
        (["--top-k", "0"], ["--top-k"]),
        (["--top-k", "3", "--experts", "2"], ["--top-k", "--experts"]),
        (["--dropout", "nan"], ["--dropout"]),
        (["--dropout", "-0.1"], ["--dropout"]),
        (["--dropout", "1"], ["--dropout"]),
        (["--router-opt", "init_std=-0.5"], ["init_std"]),
        (["--router-opt", "init_std=nan"], ["init_std"]),
        (["--dtype", "float8"], ["--dtype"]),
    ],
)
def test_bad_options(tmp_path: Path, dense: Path, args: list[str], needles: list[str]) -> None:
    out = tmp_path / "out"
    code, output = _run(str(dense), str(out), *args)
    _assert_clean_failure(tmp_path, out, code, output, *needles)


@pytest.mark.parametrize(
    ("option", "value", "flag"),
    [("alpha", float("inf"), "--alpha"), ("alpha", float("nan"), "--alpha"),
     ("rank", -1, "--rank"), ("experts", 0, "--experts"), ("top_k", 0, "--top-k"),
     ("dropout", float("nan"), "--dropout"), ("router_config", {"init_std": -1.0}, "init_std"),
     ("aux_loss_coef", float("nan"), "aux_loss_coef")],
)
def test_python_api_refuses_impossible_numbers_before_reading_base(
        tmp_path: Path, option: str, value: object, flag: str) -> None:
    from moe_hub.convert import convert
    from moe_hub.errors import MoEHubError

    out = tmp_path / "out"
    # BASE does not exist: the options are checked before it is even looked at.
    with pytest.raises(MoEHubError, match=flag) as caught:
        convert(tmp_path / "nowhere", out, progress=False, **{option: value})
    assert "\n" not in str(caught.value)
    assert not out.exists()


def test_missing_base(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _run(str(tmp_path / "nowhere"), str(out))
    _assert_clean_failure(tmp_path, out, code, output, "does not exist")


def test_unreadable_base_config(tmp_path: Path, dense: Path) -> None:
    (dense / "config.json").write_text("{not json")
    out = tmp_path / "out"
    code, output = _run(str(dense), str(out))
    _assert_clean_failure(tmp_path, out, code, output, "config.json")


def test_directory_without_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code, output = _run(str(empty), str(out))
    _assert_clean_failure(tmp_path, out, code, output, "config.json")


def test_existing_out_needs_overwrite(tmp_path: Path, dense: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = _run(str(dense), str(out))
    assert code != 0 and "--overwrite" in output
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces checkpoints only: a folder of the user's own files stays as it is.
    code, output = _run(str(dense), str(out), "--overwrite", "--experts", "2", "--rank", "2")
    assert code != 0 and "only replaces a moe-hub checkpoint" in output, output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    for seed in ("0", "1"):  # an empty folder, then the checkpoint written into it
        code, output = _run(str(dense), str(out), "--overwrite", "--experts", "2", "--rank", "2",
                            "--seed", seed)
        assert code == 0, output
        assert (out / "config.json").is_file()


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupt_shard(tmp_path: Path, dense: Path, damage: str) -> None:
    shard = dense / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x10" * 64 + data)
    out = tmp_path / "out"
    code, output = _run(str(dense), str(out))
    _assert_clean_failure(tmp_path, out, code, output, "model.safetensors", "corrupt")


def test_pickle_only_base_refused(tmp_path: Path, dense: Path) -> None:
    (dense / "model.safetensors").rename(dense / "pytorch_model.bin")
    out = tmp_path / "out"
    code, output = _run(str(dense), str(out))
    _assert_clean_failure(tmp_path, out, code, output, "--allow-pickle")


def test_config_file_with_unknown_option(tmp_path: Path, dense: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"experts": 2, "bogus": 1}))
    out = tmp_path / "out"
    code, output = _run(str(dense), str(out), "--config", str(config))
    _assert_clean_failure(tmp_path, out, code, output, "bogus")


def test_sigint_while_writing_leaves_nothing(tmp_path: Path) -> None:
    # Enough shards that the interrupt lands while they are being written.
    dense = tmp_path / "dense"
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(dense, max_shard_size="4MB")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    slow_writer = (
        "import time, moe_hub.safetensors_io as io\n"
        "real = io.rewrite_shard\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.5)\n"
        "    return real(*a, **k)\n"
        "io.rewrite_shard = slow\n"
        "import importlib; c = importlib.import_module('moe_hub.convert')\n"
        "c.rewrite_shard = slow\n"
        "from moe_hub.cli.app import main; import sys\n"
        f"sys.argv = ['moe-hub', 'convert', {str(dense)!r}, {str(out)!r}, '--no-progress']\n"
        "main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow_writer], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        staging = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")
                   and p.name.endswith(".partial")]
        if staging and list(staging[0].glob("model-*.safetensors")):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("conversion never started writing shards")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
