"""The `moe-hub` command line over real checkpoints."""

from __future__ import annotations

import json
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
