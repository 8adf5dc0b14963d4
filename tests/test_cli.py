"""The `moe-hub` command line over real checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from moe_hub.cli.app import app


def test_convert_then_info(tmp_path: Path, tiny_dense: Path) -> None:
    out = tmp_path / "moe"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tiny_dense), str(out), "--experts", "3",
                                 "--top-k", "1", "--rank", "2", "--targets", "q_proj,down_proj",
                                 "--router-opt", "init_std=0.05", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output

    config = json.loads((out / "config.json").read_text())
    assert config["router_config"] == {"init_std": 0.05}
    assert config["target_modules"] == ["q_proj", "down_proj"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe_lora.MoELoraForCausalLM"

    table = runner.invoke(app, ["info", str(out)])
    assert table.exit_code == 0, table.output
    for needle in ("topk", "3 / 1", "q_proj, down_proj", "routing sites"):
        assert needle in table.output

    as_json = runner.invoke(app, ["info", str(out), "--json"])
    info = json.loads(as_json.output)
    assert info["routing_sites"] == 4 and info["format"] == "full"
    assert info["parameters"]["trainable"] == info["parameters"]["added"] > 0


def test_info_on_a_dense_model_is_refused(tiny_dense: Path) -> None:
    result = CliRunner().invoke(app, ["info", str(tiny_dense)])
    assert result.exit_code == 1
    assert "not a moe-hub checkpoint" in result.output and "moe-hub convert" in result.output


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "info", "demo"):
        assert command in result.output



def test_convert_with_no_progress_prints_no_progress_bar(tmp_path: Path, tiny_dense: Path) -> None:
    quiet = CliRunner().invoke(app, ["convert", str(tiny_dense), str(tmp_path / "quiet"),
                                     "--experts", "2", "--rank", "2", "--no-progress"])
    assert quiet.exit_code == 0, quiet.output
    assert "Writing model shards" not in quiet.output
    assert "it/s" not in quiet.output and "%|" not in quiet.output, quiet.output


def test_convert_bars_are_all_one_style(tmp_path: Path, tiny_dense: Path, capfd) -> None:
    """moe-hub's own bar (writing base shards) is drawn like the download and GGUF reader bars
    it follows (huggingface_hub's tqdm: "desc: 100%|...| n/total"), on stderr, not in a second
    (rich) style; and --no-progress silences it with the rest."""
    from moe_hub.convert import convert

    capfd.readouterr()
    convert(tiny_dense, tmp_path / "loud", experts=2, rank=2)
    err = capfd.readouterr().err
    assert re.search(r"writing base shards: +100%\|.*\| [\d.]+k?/[\d.]+k?", err), err[-2000:]
    convert(tiny_dense, tmp_path / "quiet", experts=2, rank=2, progress=False)
    assert "writing base shards" not in capfd.readouterr().err


def test_no_progress_silences_transformers_shard_writing(tmp_path: Path, capfd) -> None:
    """Convert's one save_pretrained (a GGUF base, dequantised) runs inside
    ``third_party_progress(False)``: there transformers' "Writing model shards" bar is off, and
    outside it the bar is on again (the capture does see it)."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from moe_hub.progress import third_party_progress

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    capfd.readouterr()
    with third_party_progress(False):
        model.save_pretrained(tmp_path / "quiet")
    assert "Writing model shards" not in capfd.readouterr().err
    model.save_pretrained(tmp_path / "loud")
    assert "Writing model shards" in capfd.readouterr().err


def test_convert_help_names_the_embedded_default_base() -> None:
    result = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "smollm2 (the embedded SmolLM2-135M-Instruct" in " ".join(result.output.split())


def test_info_says_what_the_added_share_is_of(tmp_path: Path, tiny_dense: Path) -> None:
    out = tmp_path / "moe"
    assert CliRunner().invoke(app, ["convert", str(tiny_dense), str(out), "--experts", "2",
                                    "--rank", "2", "--no-progress"]).exit_code == 0
    info = json.loads(CliRunner().invoke(app, ["info", str(out), "--json"]).output)
    params = info["parameters"]
    table = CliRunner().invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    share = 100 * params["added"] / params["base"]
    assert f"(+{share:.2f}% of the base's {params['base']:,})" in table.output, table.output
