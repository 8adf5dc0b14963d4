"""Leftovers of killed runs are removed by the next run into the same OUT (and only those of
processes that no longer run), and one-line messages name the field or path at fault."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_error_line, edited_copy, save_tiny_dense
from typer.testing import CliRunner

from moe_hub.cli.app import app
from moe_hub.convert import convert
from moe_hub.errors import MoEHubError
from moe_hub.modeling import MoELoraForCausalLM

SMALL = dict(experts=4, top_k=2, rank=4, progress=False)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return save_tiny_dense(tmp_path_factory.mktemp("left") / "dense")


def dead_pid() -> int:
    """The id of a process that has exited (what a SIGKILLed run's pid is afterwards)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_the_next_convert_removes_temporaries_of_dead_runs_only(tmp_path, dense, capfd):
    out = tmp_path / "moe"
    dead = dead_pid()
    stale = [tmp_path / f".moe.{dead}-0123abcd.partial", tmp_path / f".moe.{dead}-89abcdef.scratch"]
    live = tmp_path / f".moe.{os.getpid()}-00000000.partial"  # a run that is still going
    other = tmp_path / f".other.{dead}-0123abcd.partial"  # another OUT's
    for folder in (*stale, live, other):
        (folder / "gguf-dense").mkdir(parents=True)
    capfd.readouterr()
    convert(dense, out, **SMALL)
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    err = capfd.readouterr().err
    assert "removed 2 temporary folder(s) of interrupted runs" in err
    assert all(p.name in err for p in stale)
    # The run's own temporaries carry its pid, so that a later run can tell.
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("where", [".", ".."])
def test_out_may_not_be_the_current_directory(tmp_path, dense, monkeypatch, where):
    # An empty current directory passed --overwrite's check before: the shell's folder was
    # then renamed away and replaced.
    work = tmp_path / "parent" / "work"
    work.mkdir(parents=True)
    identity = work.stat().st_ino
    monkeypatch.chdir(work)
    with pytest.raises(MoEHubError, match=r"OUT \.\.? is (the current directory|a folder "
                                          r"holding the current one): OUT must be a new folder"):
        convert(dense, Path(where), overwrite=True, **SMALL)
    assert work.stat().st_ino == identity and not any(work.iterdir())


@pytest.mark.parametrize("change, message", [
    ({"router_config": ["hidden_size", 16]},
     "config.json router_config must be a mapping of router options"),
    ({"num_experts": "four"}, "config.json num_experts must be an integer (got 'four')"),
    ({"lora_alpha": "high"}, "config.json lora_alpha must be a number (got 'high')"),
    ({"num_experts_per_tok": 1.5}, "config.json num_experts_per_tok must be an integer"),
])
def test_config_fields_of_the_wrong_type_are_named(tmp_path, dense, change, message):
    ckpt = edited_copy(convert(dense, tmp_path / "moe", **SMALL), tmp_path / "edited", **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoELoraForCausalLM.from_pretrained(ckpt)
    result = CliRunner().invoke(app, ["info", str(ckpt)])
    assert_one_error_line(result.exit_code, result.output, message)


def test_an_adapter_only_checkpoint_whose_base_moved_says_where_it_looked(tmp_path, dense):
    base = tmp_path / "base"
    shutil.copytree(dense, base)
    ckpt = convert(base, tmp_path / "moe", adapter_only=True, **SMALL)
    base.rename(tmp_path / "moved")
    with pytest.raises(OSError, match=rf"adapter-only checkpoint whose base model {base} "
                                      r"\(base_model_name_or_path in its config.json\) does not "
                                      r"exist any more: move the base back there, or set "
                                      r"base_model_name_or_path in .*config.json"):
        MoELoraForCausalLM.from_pretrained(ckpt)
