"""What `moe-hub push` publishes: the checkpoint's own files, checked, listed first; strays in
the folder (credentials, logs, run folders, big files, links out of it) stay behind unless named
with --include. Real HTTP to the Hub-protocol server of ``hub_server.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import assert_one_error_line, save_tiny_dense
from hub_server import HubServer
from test_hub import TOKEN, hub  # noqa: F401  (the fixture, shared)
from typer.testing import CliRunner

from moe_hub.checkpoint import ADAPTER_WEIGHTS
from moe_hub.cli.app import app
from moe_hub.convert import convert
from moe_hub.errors import MoEHubError
from moe_hub.hub import push

STRAYS = {
    "credentials.json": json.dumps({"token": TOKEN}),
    "secrets.yaml": f"hf_token: {TOKEN}\n",
    "id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "token.txt": TOKEN,
    "nohup.out": "step 1 loss 2.0\n",
    "wandb/run-1/files/output.log": f"HF_TOKEN={TOKEN}\n",
    "runs/Dec06/events.out.tfevents.1": "events",
    "notes/eval.md": "# eval\n",
}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return convert(save_tiny_dense(tmp_path / "dense"), tmp_path / "moe", experts=2, top_k=1,
                   rank=2, progress=False)


def _own_files(checkpoint: Path) -> set[str]:
    return {p.name for p in checkpoint.iterdir()}


def _add_strays(checkpoint: Path, outside: Path) -> None:
    for rel, text in STRAYS.items():
        (checkpoint / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / rel).write_text(text)
    with open(checkpoint / "stray.bin", "wb") as f:  # a big file nobody asked to publish
        f.truncate(3 * 1024 * 1024)
    outside.write_text(f"private {TOKEN}")
    os.symlink(outside, checkpoint / "linked.txt")


def test_push_sends_only_the_checkpoint_and_lists_it_first(hub: HubServer,  # noqa: F811
                                                           checkpoint: Path,
                                                           tmp_path: Path) -> None:
    own = _own_files(checkpoint)
    _add_strays(checkpoint, tmp_path / "outside.txt")
    runner = CliRunner()
    done = runner.invoke(app, ["push", str(checkpoint), "alice/clean", "--endpoint",
                               hub.endpoint], env={"HF_TOKEN": TOKEN})
    assert done.exit_code == 0, done.output
    files = hub.files("alice/clean")
    assert set(files) == own | {".gitattributes"}
    assert all(TOKEN.encode() not in data for data in files.values())
    assert done.stdout.strip().endswith(hub.head("alice/clean"))
    listing = done.stderr
    total = sum(len(data) for name, data in files.items() if name != ".gitattributes")
    assert f"{len(own)} files" in listing.splitlines()[0]
    assert f"{total / 1000:.1f} KB" in listing.splitlines()[0]
    for name in own:
        assert f"  {name}  " in listing
    skipped = next(line for line in listing.splitlines() if line.startswith("skipped"))
    for name in ("credentials.json", "secrets.yaml", "id_rsa", "token.txt", "nohup.out",
                 "wandb/", "runs/", "notes/", "stray.bin", "linked.txt"):
        assert name in skipped

    # Named extras travel; a folder pattern takes what is below it.
    done = runner.invoke(app, ["push", str(checkpoint), "alice/extras", "--endpoint",
                               hub.endpoint, "--include", "notes", "--include", "nohup.*"],
                         env={"HF_TOKEN": TOKEN})
    assert done.exit_code == 0, done.output
    assert set(hub.files("alice/extras")) == own | {".gitattributes", "notes/eval.md",
                                                    "nohup.out"}


def test_dry_run_lists_without_token_or_traffic(hub: HubServer,  # noqa: F811
                                                checkpoint: Path) -> None:
    (checkpoint / "token.txt").write_text(TOKEN)
    done = CliRunner().invoke(app, ["push", str(checkpoint), "alice/dry", "--endpoint",
                                    hub.endpoint, "--dry-run"], env={"HF_TOKEN": ""})
    assert done.exit_code == 0, done.output
    assert done.stdout == ""
    assert ADAPTER_WEIGHTS in done.stderr and "skipped" in done.stderr
    assert "token.txt" in done.stderr.splitlines()[-1]
    assert hub.state.requests == []
    # The Python API takes the same parameters.
    assert push(checkpoint, "alice/dry", endpoint=hub.endpoint, dry_run=True,
                include=["token.txt"]) is None
    assert hub.state.requests == []


def test_links_out_of_the_checkpoint_are_refused(hub: HubServer, checkpoint: Path,  # noqa: F811
                                                 tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "tokenizer.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps({"token": TOKEN}))
    os.symlink(secret, checkpoint / "tokenizer.json")  # a name the checkpoint may own
    runner = CliRunner()
    done = runner.invoke(app, ["push", str(checkpoint), "alice/links", "--endpoint",
                               hub.endpoint], env={"HF_TOKEN": TOKEN})
    assert_one_error_line(done.exit_code, done.output, str(checkpoint / "tokenizer.json"),
                          "symbolic link", "outside the checkpoint")
    (checkpoint / "tokenizer.json").unlink()
    os.symlink(secret, checkpoint / "extra.json")
    with pytest.raises(MoEHubError, match=r"extra\.json is a symbolic link"):
        push(checkpoint, "alice/links", token=TOKEN, endpoint=hub.endpoint,
             include=["extra.json"])
    assert hub.state.requests == []


@pytest.mark.parametrize("damage", ["truncate", "header", "index"])
def test_corrupt_weights_are_refused_and_the_remote_is_unchanged(
        hub: HubServer, checkpoint: Path, damage: str) -> None:  # noqa: F811
    push(checkpoint, "alice/sound", token=TOKEN, endpoint=hub.endpoint, progress=False)
    head = hub.head("alice/sound")
    requests = len(hub.state.requests)
    adapters = checkpoint / ADAPTER_WEIGHTS
    data = adapters.read_bytes()
    if damage == "truncate":
        adapters.write_bytes(data[:-100])
        needle = "truncated"
    elif damage == "header":  # sizes agree, but a tensor's shape says more bytes than it has
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        name = next(n for n in header if n != "__metadata__")
        header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]]
        encoded = json.dumps(header).encode()
        adapters.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])
        needle = name
    else:  # the index places a tensor in a file that does not hold it
        index = checkpoint / "model.safetensors.index.json"
        content = json.loads(index.read_text())
        key = next(k for k, v in content["weight_map"].items() if v != ADAPTER_WEIGHTS)
        content["weight_map"][key] = ADAPTER_WEIGHTS
        index.write_text(json.dumps(content))
        needle = key
    done = CliRunner().invoke(app, ["push", str(checkpoint), "alice/sound", "--endpoint",
                                    hub.endpoint], env={"HF_TOKEN": TOKEN})
    assert_one_error_line(done.exit_code, done.output, needle)
    assert hub.head("alice/sound") == head
    assert len(hub.state.requests) == requests  # refused before any request


def test_index_pointing_outside_is_refused(hub: HubServer, checkpoint: Path,  # noqa: F811
                                           tmp_path: Path) -> None:
    index = checkpoint / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    shard = next(v for v in content["weight_map"].values() if v != ADAPTER_WEIGHTS)
    (tmp_path / "elsewhere.safetensors").write_bytes((checkpoint / shard).read_bytes())
    content["weight_map"] = {k: ("../elsewhere.safetensors" if v == shard else v)
                             for k, v in content["weight_map"].items()}
    index.write_text(json.dumps(content))
    with pytest.raises(MoEHubError, match=r"'\.\./elsewhere\.safetensors', which is not a file "
                                          r"inside"):
        push(checkpoint, "alice/out", token=TOKEN, endpoint=hub.endpoint)
    assert hub.state.requests == []


def test_finetune_output_leaves_strays_behind(tmp_path: Path) -> None:
    from helpers_finetune import tiny_checkpoint

    from moe_hub.finetune import finetune

    checkpoint = tiny_checkpoint(tmp_path, experts=2, rank=2)
    own = _own_files(checkpoint)
    _add_strays(checkpoint, tmp_path / "outside.txt")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1)}) + "\n"
                            for a in range(4)))
    finetune(checkpoint, data, tmp_path / "tuned", max_steps=1, max_length=16, batch_size=2,
             quantize="none", progress=False)
    written = _own_files(tmp_path / "tuned")
    assert own <= written  # base shards, tokenizer, code ... all carried over
    assert not written & {"credentials.json", "secrets.yaml", "id_rsa", "token.txt",
                          "nohup.out", "wandb", "runs", "notes", "stray.bin", "linked.txt"}
    assert written - own <= {"moe_hub_training.json", "routing_stats.json",
                             "routing_heatmap.png"}
