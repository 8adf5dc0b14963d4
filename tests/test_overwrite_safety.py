"""`--overwrite` replaces a moe-hub checkpoint (or an empty folder) and nothing else: never BASE,
an input adapter or checkpoint, a folder holding one or inside one, nor a user's own files. And a
checkpoint whose base weights are all missing does not load with freshly initialised ones."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import assert_one_error_line, save_tiny_dense
from helpers_finetune import tiny_checkpoint
from typer.testing import CliRunner

from moe_hub.cli.app import app
from moe_hub.convert import convert
from moe_hub.errors import MoEHubError
from moe_hub.finetune import finetune

FAST = dict(experts=2, rank=2, top_k=1)
FT_FAST = dict(quantize="none", batch_size=2, logging_steps=1, save_steps=1000, progress=False)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash (links by their target)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args])
    return result.exit_code, result.output




@pytest.fixture
def dense(tmp_path: Path) -> Path:
    return save_tiny_dense(tmp_path / "models" / "dense")


def _convert_cli(base: Path | str, out: Path | str, *extra: str) -> tuple[int, str]:
    return cli("convert", str(base), str(out), "--no-progress", "--experts", "2", "--rank", "2",
               "--top-k", "1", *extra)


def test_adapter_only_onto_its_own_base_is_refused_and_base_kept(tmp_path: Path,
                                                                  dense: Path) -> None:
    before = snapshot(tmp_path)
    code, output = _convert_cli(dense, dense, "--adapter-only", "--overwrite")
    assert_one_error_line(code, output, "BASE", "OUT")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["base", "parent", "inside", "new-inside", "symlink",
                                   "user-files", "file"])
def test_overwrite_never_replaces_base_or_user_data(tmp_path: Path, dense: Path,
                                                    where: str) -> None:
    sibling = save_tiny_dense(dense.parent / "sibling", seed=1)
    assert sibling.is_dir()
    user = tmp_path / "my-notes"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    inside = dense / "sub"
    inside.mkdir()
    link = tmp_path / "link-to-base"
    link.symlink_to(dense, target_is_directory=True)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    out = {"base": dense, "parent": dense.parent, "inside": inside, "symlink": link,
           "user-files": user, "file": a_file, "new-inside": dense / "moe"}[where]
    before = snapshot(tmp_path)
    code, output = _convert_cli(dense, out, "--overwrite")
    needle = "--overwrite" if where in ("user-files", "file") else "BASE"
    assert_one_error_line(code, output, needle)
    assert snapshot(tmp_path) == before


def test_overwrite_never_replaces_an_input_adapter(tmp_path: Path, dense: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapters" / "a1"
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(dense),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft.save_pretrained(adapter)
    before = snapshot(tmp_path)
    for out in (adapter, adapter.parent):
        code, output = _convert_cli(dense, out, "--overwrite", "--from-adapters", str(adapter),
                                    "--experts", "1")
        assert_one_error_line(code, output, "--from-adapters")
        assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_checkpoint_or_an_empty_folder(tmp_path: Path, dense: Path) -> None:
    out = convert(dense, tmp_path / "moe", progress=False, **FAST)
    convert(dense, out, progress=False, overwrite=True, seed=1, **FAST)
    assert json.loads((out / "config.json").read_text())["model_type"] == "moe_lora"
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(dense, empty, progress=False, overwrite=True, **FAST)
    assert (empty / "config.json").is_file()


def test_overwrite_refuses_a_symlink_to_a_checkpoint(tmp_path: Path, dense: Path) -> None:
    # Publishing would swap the link for a folder and leave the old link under a hidden name.
    out = convert(dense, tmp_path / "moe", progress=False, **FAST)
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    before = snapshot(tmp_path)
    code, output = _convert_cli(dense, link, "--overwrite")
    assert_one_error_line(code, output, "symbolic link", str(out))
    assert snapshot(tmp_path) == before


def test_python_api_refuses_before_reading_base(tmp_path: Path, dense: Path) -> None:
    # A corrupt shard would fail while reading BASE: the OUT check comes first.
    (dense / "model.safetensors").write_bytes(b"\x10" * 64)
    before = snapshot(tmp_path)
    with pytest.raises(MoEHubError, match="BASE"):
        convert(dense, dense.parent, progress=False, overwrite=True, **FAST)
    assert snapshot(tmp_path) == before


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "models", experts=2, rank=2, top_k=1)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n"
                            for i in range(4)))
    return path


@pytest.mark.parametrize("where", ["ckpt", "parent", "inside", "user-files"])
def test_finetune_output_never_replaces_its_input_or_user_data(
        tmp_path: Path, ckpt: Path, data: Path, where: str) -> None:
    user = tmp_path / "my-notes"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    inside = ckpt / "sub"
    inside.mkdir()
    out = {"ckpt": ckpt, "parent": ckpt.parent, "inside": inside, "user-files": user}[where]
    before = snapshot(tmp_path)
    with pytest.raises(MoEHubError, match="--overwrite" if where == "user-files" else "CKPT"):
        finetune(ckpt, data, out, overwrite=True, max_steps=1, **FT_FAST)
    assert snapshot(tmp_path) == before


def test_finetune_cli_output_is_its_checkpoint(tmp_path: Path, ckpt: Path, data: Path) -> None:
    before = snapshot(tmp_path)
    code, output = cli("finetune", str(ckpt), "--data", str(data), "--output", str(ckpt),
                       "--overwrite", "--max-steps", "1", "--quantize", "none", "--no-progress")
    assert_one_error_line(code, output, "CKPT", "--output")
    assert snapshot(tmp_path) == before


def test_adapter_only_checkpoint_whose_base_has_no_weights_does_not_load(tmp_path: Path,
                                                                        dense: Path) -> None:
    from moe_hub.modeling import MoELoraForCausalLM

    ckpt = convert(dense, tmp_path / "moe", adapter_only=True, progress=False, **FAST)
    # What `convert B B --adapter-only --overwrite` used to leave: a checkpoint naming itself
    # as its base, whose files hold experts and routers only.
    config = json.loads((ckpt / "config.json").read_text())
    config["base_model_name_or_path"] = str(ckpt)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="none of the base weights"):
        MoELoraForCausalLM.from_pretrained(ckpt)


def test_full_checkpoint_without_base_tensors_does_not_load(tmp_path: Path, dense: Path) -> None:
    from moe_hub.modeling import MoELoraForCausalLM

    ckpt = convert(dense, tmp_path / "moe", progress=False, **FAST)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in set(index["weight_map"].values()) - {"moe_adapters.safetensors"}:
        (ckpt / shard).unlink()
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if v == "moe_adapters.safetensors"}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="none of the base weights"):
        MoELoraForCausalLM.from_pretrained(ckpt)


def test_finetune_checkpoint_dir_removes_only_its_own_checkpoints(tmp_path: Path, ckpt: Path,
                                                                  data: Path) -> None:
    # The run folder is removed after a successful run: a folder the user named for it keeps
    # whatever else it held.
    run_dir = tmp_path / "my-runs"
    run_dir.mkdir()
    (run_dir / "thesis.txt").write_text("years of work")
    finetune(ckpt, data, tmp_path / "ft", checkpoint_dir=str(run_dir), max_steps=1, save_steps=1,
             **{k: v for k, v in FT_FAST.items() if k != "save_steps"})
    assert (tmp_path / "ft" / "config.json").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["thesis.txt"]


@pytest.mark.parametrize("where", ["ckpt", "output", "inside-ckpt"])
def test_finetune_checkpoint_dir_is_no_input_or_output(tmp_path: Path, ckpt: Path, data: Path,
                                                       where: str) -> None:
    out = tmp_path / "ft"
    run_dir = {"ckpt": ckpt, "output": out, "inside-ckpt": ckpt / "runs"}[where]
    before = snapshot(tmp_path)
    with pytest.raises(MoEHubError, match="checkpoint_dir"):
        finetune(ckpt, data, out, checkpoint_dir=str(run_dir), max_steps=1, **FT_FAST)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("option", "value", "flag"), [
    ("lr", float("nan"), "--lr"), ("lr", float("inf"), "--lr"),
    ("epochs", float("nan"), "--epochs"), ("warmup", -1.0, "--warmup"),
    ("weight_decay", float("inf"), "weight_decay")])
def test_finetune_refuses_rates_that_cannot_train(option: str, value: float, flag: str) -> None:
    from moe_hub.finetune import FinetuneOptions

    with pytest.raises(MoEHubError, match=flag):
        FinetuneOptions(**{option: value}).validate()
