"""Publishing checkpoints: the real huggingface_hub client and transformers against the
Hub-protocol server of ``hub_server.py`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_dense
from hub_server import HubServer, serve_hub
from moe_hub.checkpoint import ADAPTER_WEIGHTS
from moe_hub.convert import convert
from moe_hub.errors import MoEHubError
from moe_hub.hub import push

TOKEN = "hf_test_alice_0123456789"  # a string that must never reach a file
BOB_TOKEN = "hf_test_bob_9876543210"
BASE_REPO = "alice/tiny-llama"
INPUT_IDS = [[5, 17, 99, 3, 250, 42, 7, 128], [1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubServer:
    """The server, with this process's huggingface_hub pointed at it, an empty cache and no
    token from the environment or a stored login."""
    import huggingface_hub.constants as constants

    with serve_hub({TOKEN: "alice", BOB_TOKEN: "bob"}) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield server


def _nonzero_experts(checkpoint: Path, seed: int = 1) -> None:
    """Stand-in for fine-tuning: give every expert a non-zero B so the adapters change outputs."""
    path = checkpoint / ADAPTER_WEIGHTS
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for name, value in tensors.items():
        if name.endswith("lora_B"):
            tensors[name] = 0.2 * torch.randn(value.shape, generator=generator)
    save_file(tensors, path, metadata={"format": "pt"})


def _upload_base(hub: HubServer, dense: Path) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(BASE_REPO)
    api.create_commit(BASE_REPO, commit_message="dense base", operations=[
        CommitOperationAdd(p.name, str(p)) for p in sorted(dense.iterdir()) if p.is_file()])


def _local_logits(checkpoint: Path) -> torch.Tensor:
    from moe_hub.modeling import MoELoraForCausalLM

    model = MoELoraForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits


def _load_in_fresh_process(hub: HubServer, repos: list[str], home: Path,
                           token: str | None = None) -> subprocess.CompletedProcess:
    """Load ``repos`` with plain transformers in a new interpreter with an empty HF_HOME."""
    code = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for repo in {repos!r}:
            model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
            with torch.no_grad():
                out[repo] = model(torch.tensor({INPUT_IDS!r})).logits.tolist()
        print("LOGITS" + json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    assert not home.exists()
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=home.parent)


def _assert_same_logits(got: list, want: torch.Tensor) -> None:
    got = torch.tensor(got, dtype=want.dtype)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale


def test_full_and_adapter_only_push_load_in_fresh_process(hub: HubServer, tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    _upload_base(hub, dense)
    # Converting from the Hub id records it as the base, as a user's conversion would.
    checkpoint = convert(BASE_REPO, tmp_path / "moe", experts=4, top_k=2, rank=4, progress=False)
    _nonzero_experts(checkpoint)
    expected = _local_logits(checkpoint)
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        dense_logits = AutoModelForCausalLM.from_pretrained(dense)(torch.tensor(INPUT_IDS)).logits
    assert (expected - dense_logits).abs().max() > 1e-3  # the experts matter

    full_url = push(checkpoint, "alice/tiny-moe", token=TOKEN, endpoint=hub.endpoint)
    adapter_url = push(checkpoint, "alice/tiny-moe-adapters", token=TOKEN, endpoint=hub.endpoint,
                       adapter_only=True)
    assert full_url == f"{hub.endpoint}/alice/tiny-moe/commit/{hub.head('alice/tiny-moe')}"
    assert adapter_url.endswith(hub.head("alice/tiny-moe-adapters"))

    full_files = hub.files("alice/tiny-moe")
    adapter_files = hub.files("alice/tiny-moe-adapters")
    def base_shards(files: dict) -> list[str]:
        return [n for n in files if n.startswith("model") and n.endswith(".safetensors")]

    assert base_shards(full_files) and ADAPTER_WEIGHTS in full_files
    assert base_shards(adapter_files) == [] and ADAPTER_WEIGHTS in adapter_files
    adapter_config = json.loads(adapter_files["config.json"])
    assert adapter_config["adapter_only"] is True
    assert adapter_config["base_model_name_or_path"] == BASE_REPO
    assert json.loads(adapter_files["model.safetensors.index.json"])["weight_map"]
    assert set(json.loads(adapter_files["model.safetensors.index.json"])["weight_map"].values()) \
        == {ADAPTER_WEIGHTS}
    assert "base_model_relation: adapter" in adapter_files["README.md"].decode()
    assert 'from_pretrained("alice/tiny-moe"' in full_files["README.md"].decode()
    assert {"modeling_moe_lora.py", "configuration_moe_lora.py"} <= set(adapter_files)

    # The token is in no file of the checkpoint or of either pushed repository.
    for path in checkpoint.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes()
    for files in (full_files, adapter_files):
        assert all(TOKEN.encode() not in data for data in files.values())

    done = _load_in_fresh_process(hub, ["alice/tiny-moe", "alice/tiny-moe-adapters"],
                                  tmp_path / "fresh-home")
    assert done.returncode == 0, done.stderr[-3000:]
    logits = json.loads(done.stdout.split("LOGITS", 1)[1])
    _assert_same_logits(logits["alice/tiny-moe"], expected)
    _assert_same_logits(logits["alice/tiny-moe-adapters"], expected)


def test_adapter_only_convert_loads_base_from_local_path(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense", seed=3)
    full = convert(dense, tmp_path / "full", experts=3, top_k=1, rank=2, progress=False, seed=5)
    adapters = convert(dense, tmp_path / "adapters", experts=3, top_k=1, rank=2, progress=False,
                       seed=5, adapter_only=True)
    assert not list(adapters.glob("model*.safetensors"))
    _nonzero_experts(full, seed=2)
    _nonzero_experts(adapters, seed=2)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(adapters, trust_remote_code=True)
    with torch.no_grad():
        got = loaded(torch.tensor(INPUT_IDS)).logits
    _assert_same_logits(got.tolist(), _local_logits(full))
    # Saving it again writes this model's names (not the dense ones it was mapped from).
    loaded.save_pretrained(tmp_path / "resaved")
    names = {n for f in (tmp_path / "resaved").glob("*.safetensors") for n in load_file(f)}
    assert any(".base_layer." in name for name in names)


def test_branch_and_pull_request_pushes(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    checkpoint = convert(save_tiny_dense(tmp_path / "dense"), tmp_path / "moe", experts=2,
                         top_k=1, rank=2, progress=False)
    url = push(checkpoint, "alice/branchy", token=TOKEN, endpoint=hub.endpoint, revision="dev",
               commit_message="first on dev")
    main_files = hub.files("alice/branchy")
    assert set(main_files) == {".gitattributes"}  # main untouched
    assert "config.json" in hub.files("alice/branchy", "dev")
    assert url.endswith(hub.head("alice/branchy", "dev"))
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    assert "dev" in {b.name for b in api.list_repo_refs("alice/branchy").branches}
    path = hf_hub_download("alice/branchy", "config.json", revision="dev", token=TOKEN)
    assert json.loads(Path(path).read_text())["model_type"] == "moe_lora"

    pr_url = push(checkpoint, "alice/branchy", token=TOKEN, endpoint=hub.endpoint, create_pr=True)
    assert pr_url == f"{hub.endpoint}/alice/branchy/discussions/1"
    assert set(hub.files("alice/branchy")) == {".gitattributes"}
    info = api.model_info("alice/branchy", revision="refs/pr/1")
    assert "moe_adapters.safetensors" in {s.rfilename for s in info.siblings}
    assert hub.state.repos["alice/branchy"].commits[info.sha].message \
        == "Upload MoE-LoRA model with moe-hub"


def test_private_repo_needs_token(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    checkpoint = convert(save_tiny_dense(tmp_path / "dense"), tmp_path / "moe", experts=2,
                         top_k=1, rank=2, progress=False)
    push(checkpoint, "alice/secret", token=TOKEN, endpoint=hub.endpoint, private=True)
    assert hub.state.repos["alice/secret"].private
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(f"{hub.endpoint}/alice/secret/resolve/main/config.json")
    assert raw.value.code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", token=False)
    with pytest.raises(RepositoryNotFoundError):  # another user's token does not open it either
        hf_hub_download("alice/secret", "config.json", token=BOB_TOKEN)
    path = hf_hub_download("alice/secret", "config.json", token=TOKEN)
    assert json.loads(Path(path).read_text())["model_type"] == "moe_lora"
    # Bob cannot push into Alice's namespace: a clear one-line error.
    with pytest.raises(MoEHubError, match=r"no write access .*HTTP 403"):
        push(checkpoint, "alice/secret", token=BOB_TOKEN, endpoint=hub.endpoint)
    with pytest.raises(MoEHubError, match=r"refused the token \(HTTP 401\)"):
        push(checkpoint, "alice/secret", token="hf_not_a_real_token", endpoint=hub.endpoint)


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_hub.cli.app", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_failed_push_leaves_main_unchanged_and_retry_succeeds(hub: HubServer,
                                                                tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moe_hub.cli.app import app

    checkpoint = convert(save_tiny_dense(tmp_path / "dense"), tmp_path / "moe", experts=2,
                         top_k=1, rank=2, progress=False)
    runner = CliRunner()
    args = ["push", str(checkpoint), "alice/flaky", "--endpoint", hub.endpoint]
    env = {"HF_TOKEN": TOKEN}

    hub.fail_next_commit(500)
    failed = runner.invoke(app, args, env=env)
    assert failed.exit_code != 0
    assert "HTTP 500" in failed.output and "retry" in failed.output
    assert len(failed.output.strip().splitlines()) == 1
    assert set(hub.files("alice/flaky")) == {".gitattributes"}

    first = runner.invoke(app, [*args, "--commit-message", "v1"], env=env)
    assert first.exit_code == 0, first.output
    head = hub.head("alice/flaky")
    assert first.output.strip() == f"{hub.endpoint}/alice/flaky/commit/{head}"

    _nonzero_experts(checkpoint)
    hub.drop_next_commit()
    dropped = runner.invoke(app, [*args, "--commit-message", "v2"], env=env)
    assert dropped.exit_code != 0
    assert "lost the connection" in dropped.output
    assert hub.head("alice/flaky") == head  # main still at v1
    assert hub.files("alice/flaky")[ADAPTER_WEIGHTS] != (checkpoint / ADAPTER_WEIGHTS).read_bytes()

    retried = runner.invoke(app, [*args, "--commit-message", "v2"], env=env)
    assert retried.exit_code == 0, retried.output
    assert hub.head("alice/flaky") != head
    assert hub.files("alice/flaky")[ADAPTER_WEIGHTS] == (checkpoint / ADAPTER_WEIGHTS).read_bytes()
    assert TOKEN not in first.output + dropped.output + retried.output


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "alice/", "/name", "alice/na me",
                                     "alice/name--x", "alice/.hidden", ""])
def test_malformed_repo_id_refused_before_any_traffic(hub: HubServer, tmp_path: Path,
                                                      repo_id: str) -> None:
    checkpoint = tmp_path / "not-even-read"
    with pytest.raises(MoEHubError, match="malformed repo id"):
        push(checkpoint, repo_id, token=TOKEN, endpoint=hub.endpoint)
    assert hub.state.requests == []


def test_bad_input_refused_before_any_traffic(hub: HubServer, tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    with pytest.raises(MoEHubError, match="not a moe-hub checkpoint.*moe-hub convert"):
        push(dense, "alice/x", token=TOKEN, endpoint=hub.endpoint)
    with pytest.raises(MoEHubError, match="no config.json"):
        push(tmp_path, "alice/x", token=TOKEN, endpoint=hub.endpoint)
    checkpoint = convert(dense, tmp_path / "moe", experts=2, top_k=1, rank=2, progress=False)
    with pytest.raises(MoEHubError, match="no Hugging Face token.*HF_TOKEN"):
        push(checkpoint, "alice/x", endpoint=hub.endpoint)
    # A local base cannot back an adapter-only repository: nobody else could load it.
    with pytest.raises(MoEHubError, match="adapter-only repository must name a base"):
        push(checkpoint, "alice/x", token=TOKEN, endpoint=hub.endpoint, adapter_only=True)
    assert hub.state.requests == []

    # The same through the command line, in a separate process: one line, exit code 1.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env["HF_HOME"] = str(tmp_path / "empty-home")
    done = _run_cli(["push", str(checkpoint), "alice/x", "--endpoint", hub.endpoint], env)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: no Hugging Face token")
    assert len(done.stderr.strip().splitlines()) == 1
    assert hub.state.requests == []
