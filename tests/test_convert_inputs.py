"""Inconsistent BASE inputs never become checkpoints: every shard header is checked against
itself and the model built from BASE's config, index entries stay inside BASE, and config.json
states the sizes its weights have, all before OUT exists. Errors name BASE's file and tensor."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_one_error_line, save_tiny_dense
from typer.testing import CliRunner

from moe_hub.cli.app import app
from moe_hub.convert import convert
from moe_hub.errors import MoEHubError

QKV = "model.layers.0.self_attn.q_proj.weight"  # [64, 64] F32
DOWN = "model.layers.1.mlp.down_proj.weight"  # [64, 128] F32


def _edit_header(shard: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite ``shard``'s JSON header with ``edit`` applied; the data bytes stay as they are."""
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


def _set(name: str, **fields) -> Callable[[dict], None]:
    return lambda header: header[name].update(fields)


def _overlap(header: dict) -> None:
    # Two same-size tensors sharing bytes: the file size still adds up (one gap, one overlap).
    first = header[QKV]["data_offsets"]
    other = "model.layers.0.self_attn.o_proj.weight"
    header[other]["data_offsets"] = list(first)


CASES = {
    # shape x dtype disagrees with the offsets
    "shape": (_set(QKV, shape=[64, 32]), [QKV, "[64, 32]", "offsets"]),
    "dtype": (_set(QKV, dtype="F33"), [QKV, "unknown dtype 'F33'"]),
    # two negative dimensions: the element count (and so the size) is still right
    "negative": (_set(QKV, shape=[-64, -64]), [QKV, "[-64, -64]"]),
    "overlap": (_overlap, ["model.layers.0.self_attn", "overlaps"]),
    # consistent with itself, not with the model: [128, 64] stored where [64, 128] belongs
    "skeleton": (_set(DOWN, shape=[128, 64]), [DOWN, "[128, 64]", "[64, 128]"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_shard_header_is_refused_naming_base_file_and_tensor(tmp_path: Path,
                                                                 case: str) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    edit, needles = CASES[case]
    _edit_header(dense / "model.safetensors", edit)
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["convert", str(dense), str(out), "--experts", "2",
                                    "--no-progress"])
    assert_one_error_line(done.exit_code, done.output, str(dense / "model.safetensors"),
                          *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dense"]  # no staging left either
    # --adapter-only writes no base shard but still refuses a base that cannot load.
    with pytest.raises(MoEHubError, match=r"model\.safetensors tensor"):
        convert(dense, out, experts=2, adapter_only=True, progress=False)
    assert not out.exists()


def test_config_sizes_must_match_the_weights(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    config_path = dense / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "vocab_size": 200}))
    with pytest.raises(MoEHubError, match=r"config\.json gives vocab_size 200, but .*"
                                          r"model\.safetensors tensor "
                                          r"'(model\.embed_tokens|lm_head)\.weight' has 256 "
                                          r"rows: set vocab_size to 256"):
        convert(dense, tmp_path / "out", experts=2, progress=False)
    del config["hidden_size"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(MoEHubError, match=r"config\.json has no hidden_size"):
        convert(dense, tmp_path / "out", experts=2, progress=False)
    assert not (tmp_path / "out").exists()


def _sharded(tmp_path: Path) -> Path:
    """A tiny base saved as two shards with an index."""
    return save_tiny_dense(tmp_path / "dense", max_shard_size="200KB")


@pytest.mark.parametrize("where", ["parent", "absolute", "list"])
def test_index_entries_stay_inside_base(tmp_path: Path, where: str) -> None:
    dense = _sharded(tmp_path)
    index_path = dense / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    (dense / shard).rename(outside)  # the weights exist, but outside BASE
    if where == "list":
        index["weight_map"] = [[k, v] for k, v in index["weight_map"].items()]
        needles = ["weight_map", "list"]
    else:
        target = "../outside.safetensors" if where == "parent" else str(outside)
        index["weight_map"] = {k: (target if v == shard else v)
                               for k, v in index["weight_map"].items()}
        needles = [target, "not a file inside BASE"]
    index_path.write_text(json.dumps(index))
    done = CliRunner().invoke(app, ["convert", str(dense), str(tmp_path / "out"),
                                    "--experts", "2", "--no-progress"])
    assert_one_error_line(done.exit_code, done.output, str(index_path), *needles)
    assert not (tmp_path / "out").exists()


def test_sharded_base_still_converts(tmp_path: Path) -> None:
    dense = _sharded(tmp_path)
    assert len(json.loads((dense / "model.safetensors.index.json").read_text())["weight_map"])
    out = convert(dense, tmp_path / "out", experts=2, progress=False)
    assert (out / "config.json").is_file()


def _base_with_code(path: Path, marker: Path, model_type: str) -> Path:
    """A BASE folder whose config.json sends AutoConfig/AutoModel to a marker.py that, when
    imported, writes ``marker``."""
    dense = save_tiny_dense(path)
    config = json.loads((dense / "config.json").read_text())
    config.update(model_type=model_type, auto_map={
        "AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerModel"})
    (dense / "config.json").write_text(json.dumps(config))
    (dense / "marker.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class MarkerConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class MarkerModel(LlamaForCausalLM):\n    config_class = MarkerConfig\n")
    return dense


def test_base_code_never_runs_without_trust_remote_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker-ran"
    dense = _base_with_code(tmp_path / "custom", marker, "marker_arch")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # A pipe answering "y" to any prompt: there must be no prompt to answer.
    done = subprocess.run([sys.executable, "-m", "moe_hub.cli.app", "convert", str(dense),
                           str(out), "--experts", "2", "--no-progress"], input="y\ny\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert_one_error_line(done.returncode, done.stderr, str(dense), "marker.py",
                          "--trust-remote-code")
    assert "[y/N]" not in done.stdout + done.stderr
    assert not marker.exists()
    assert not out.exists()
    with pytest.raises(MoEHubError, match="--trust-remote-code"):
        convert(dense, out, experts=2, progress=False)
    assert not marker.exists()

    # An architecture transformers knows loads with its own code, whatever auto_map says.
    known = _base_with_code(tmp_path / "known", marker, "llama")
    convert(known, out, experts=2, progress=False)
    assert not marker.exists()


def _gguf_with_unloadable_weights(path: Path) -> Path:
    """A tiny Llama GGUF: sound metadata, but its only tensor has a shape no layer has, so
    dequantising and loading its weights fails."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(256)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(256)])
    writer.add_token_scores([0.0] * 256)
    writer.add_token_types([1] * 256)
    writer.add_tensor("token_embd.weight", np.zeros((3, 5), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_targets_are_refused_before_any_weight_is_read(tmp_path: Path) -> None:
    # A pickle base whose weights file is garbage: reading it would fail first.
    dense = save_tiny_dense(tmp_path / "dense")
    (dense / "model.safetensors").unlink()
    (dense / "pytorch_model.bin").write_bytes(b"\x80\x05 not a pickle at all" * 100)
    runner = CliRunner()
    done = runner.invoke(app, ["convert", str(dense), str(tmp_path / "out"), "--allow-pickle",
                               "--targets", "nosuch_proj", "--no-progress"])
    assert_one_error_line(done.exit_code, done.output, "nosuch_proj")
    # A GGUF whose weights cannot be dequantised into the model: its metadata is enough.
    gguf_file = _gguf_with_unloadable_weights(tmp_path / "gguf" / "tiny.gguf")
    done = runner.invoke(app, ["convert", str(gguf_file), str(tmp_path / "out"),
                               "--targets", "nosuch_proj", "--no-progress"])
    assert_one_error_line(done.exit_code, done.output, "nosuch_proj")
    # ... and with good targets the weights are read, and their failure reported.
    done = runner.invoke(app, ["convert", str(gguf_file), str(tmp_path / "out"),
                               "--targets", "q_proj", "--no-progress"])
    assert_one_error_line(done.exit_code, done.output, str(gguf_file))
    assert not (tmp_path / "out").exists()


def test_bad_targets_on_a_hub_base_download_no_weights(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants
    from hub_server import serve_hub
    from huggingface_hub import CommitOperationAdd, HfApi

    dense = save_tiny_dense(tmp_path / "dense")
    with serve_hub({"hf_test_token": "alice"}) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        api = HfApi(endpoint=server.endpoint, token="hf_test_token")
        api.create_repo("alice/tiny")
        api.create_commit("alice/tiny", commit_message="base", operations=[
            CommitOperationAdd(p.name, str(p)) for p in sorted(dense.iterdir())])
        server.state.requests.clear()
        with pytest.raises(MoEHubError, match="nosuch_proj"):
            convert("alice/tiny", tmp_path / "out", targets=["nosuch_proj"], progress=False)
        fetched = [path for _, path, _ in server.state.requests if "/resolve/" in path]
        assert fetched and all(path.endswith("/config.json") for path in fetched)
    assert not (tmp_path / "out").exists()
