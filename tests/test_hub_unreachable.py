"""A Hub that cannot be reached (nothing listens at HF_ENDPOINT) is reported as such, at once:
never blamed on the adapter or the model asked for."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import assert_one_error_line, save_tiny_dense
from typer.testing import CliRunner

from moe_hub.cli.app import app


@pytest.fixture
def closed_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """An endpoint on a local port nobody listens on, an empty cache, no token."""
    import huggingface_hub.constants as constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return endpoint


def test_from_adapters_says_the_hub_cannot_be_reached(tmp_path: Path,
                                                      closed_endpoint: str) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    done = CliRunner().invoke(app, ["convert", str(dense), str(tmp_path / "out"),
                                    "--from-adapters", "alice/smol-arithmetic-lora",
                                    "--no-progress"])
    assert_one_error_line(done.exit_code, done.output, "cannot reach the Hub", closed_endpoint,
                          "alice/smol-arithmetic-lora")
    assert "adapter_config.json" not in done.output
    assert not (tmp_path / "out").exists()


def test_hub_base_says_the_hub_cannot_be_reached(tmp_path: Path, closed_endpoint: str) -> None:
    done = CliRunner().invoke(app, ["convert", "alice/tiny-llama", str(tmp_path / "out"),
                                    "--no-progress"])
    assert_one_error_line(done.exit_code, done.output, "cannot reach the Hub", closed_endpoint,
                          "BASE alice/tiny-llama")
    assert not (tmp_path / "out").exists()
