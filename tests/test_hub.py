"""Publishing checkpoints: the real huggingface_hub client and transformers against the
Hub-protocol server of ``hub_server.py`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import assert_one_error_line, run_without_moe_hub, save_tiny_dense
from hub_server import HubServer, serve_hub
from safetensors.torch import load_file, save_file

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
        # LFS uploads go through the batch API the server implements, not Xet.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
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


def _load_in_fresh_process(hub: HubServer, repos: list[str], home: Path) -> dict:
    """Load ``repos`` with plain transformers in a new interpreter where ``import moe_hub``
    fails, with an empty HF_HOME and no token; return their logits on INPUT_IDS."""
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
out = {{}}
for repo in {repos!r}:
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    with torch.no_grad():
        out[repo] = model(torch.tensor({INPUT_IDS!r})).logits.tolist()
print("LOGITS" + json.dumps(out))
"""
    assert not home.exists()
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    stdout = run_without_moe_hub(code, home.parent, env)
    return json.loads(stdout.split("LOGITS", 1)[1])


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

    hub.state.lfs = True  # weights travel as on the Hub: LFS batch upload, then the commit
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
    lfs_paths = hub.state.repos["alice/tiny-moe"].commits[hub.head("alice/tiny-moe")].lfs
    assert lfs_paths == {*base_shards(full_files), ADAPTER_WEIGHTS}
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

    logits = _load_in_fresh_process(hub, ["alice/tiny-moe", "alice/tiny-moe-adapters"],
                                    tmp_path / "fresh-home")
    _assert_same_logits(logits["alice/tiny-moe"], expected)
    _assert_same_logits(logits["alice/tiny-moe-adapters"], expected)


@pytest.mark.parametrize(("arch", "granularity", "router"),
                         [("llama", "linear", "topk"), ("llama", "block", "topk"),
                          ("gpt2", "linear", "rmoe")])
def test_adapter_only_convert_loads_base_from_local_path(tmp_path: Path, arch: str,
                                                         granularity: str, router: str) -> None:
    dense = save_tiny_dense(tmp_path / "dense", arch, seed=3)
    options = dict(experts=3, top_k=1, rank=2, progress=False, seed=5, router=router,
                   granularity=granularity)
    full = convert(dense, tmp_path / "full", **options)
    adapters = convert(dense, tmp_path / "adapters", adapter_only=True, **options)
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
    # ... and a complete checkpoint: it holds the base, so it must not claim to be adapter-only.
    resaved = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
    assert resaved.config.adapter_only is False
    with torch.no_grad():
        _assert_same_logits(resaved(torch.tensor(INPUT_IDS)).logits.tolist(), got)


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
    # Pushing onto a pull request that does not exist: a one-line 404, nothing created.
    with pytest.raises(MoEHubError, match=r"not found \(HTTP 404\)"):
        push(checkpoint, "alice/branchy", token=TOKEN, endpoint=hub.endpoint, revision="refs/pr/9")
    assert "refs/pr/9" not in hub.state.repos["alice/branchy"].refs


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


def test_token_from_environment_or_stored_login(hub: HubServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    checkpoint = convert(save_tiny_dense(tmp_path / "dense"), tmp_path / "moe", experts=2,
                         top_k=1, rank=2, progress=False)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)  # what `hf auth login` stores
    push(checkpoint, "alice/from-login", endpoint=hub.endpoint)
    assert hub.head("alice/from-login") is not None
    Path(constants.HF_TOKEN_PATH).unlink()
    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)
    push(checkpoint, "bob/from-env", endpoint=hub.endpoint)
    assert hub.state.repos["bob/from-env"].owner == "bob"


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
    # The listing of what is sent comes first, then one error line.
    assert_one_error_line(failed.exit_code, failed.output, "HTTP 500", "retry")
    assert set(hub.files("alice/flaky")) == {".gitattributes"}

    first = runner.invoke(app, [*args, "--commit-message", "v1"], env=env)
    assert first.exit_code == 0, first.output
    head = hub.head("alice/flaky")
    assert first.stdout.strip() == f"{hub.endpoint}/alice/flaky/commit/{head}"

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


def test_lfs_push_failing_at_commit_changes_nothing(hub: HubServer, tmp_path: Path) -> None:
    """Large files are uploaded before the single commit: a failed commit leaves them unused."""
    checkpoint = convert(save_tiny_dense(tmp_path / "dense"), tmp_path / "moe", experts=2,
                         top_k=1, rank=2, progress=False)
    hub.state.lfs = True
    hub.fail_next_commit(503)
    with pytest.raises(MoEHubError, match=r"HTTP 503.*nothing was changed"):
        push(checkpoint, "alice/big", token=TOKEN, endpoint=hub.endpoint)
    assert hub.state.lfs_objects  # the weights were uploaded ...
    assert set(hub.files("alice/big")) == {".gitattributes"}  # ... but never committed
    push(checkpoint, "alice/big", token=TOKEN, endpoint=hub.endpoint)
    committed = hub.files("alice/big")
    assert committed[ADAPTER_WEIGHTS] == (checkpoint / ADAPTER_WEIGHTS).read_bytes()
    from huggingface_hub import hf_hub_download

    path = hf_hub_download("alice/big", ADAPTER_WEIGHTS, token=TOKEN)
    assert Path(path).read_bytes() == committed[ADAPTER_WEIGHTS]


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
    with pytest.raises(MoEHubError, match=r"not a moe-hub checkpoint.*moe-hub convert"):
        push(dense, "alice/x", token=TOKEN, endpoint=hub.endpoint)
    with pytest.raises(MoEHubError, match=r"no config\.json"):
        push(tmp_path, "alice/x", token=TOKEN, endpoint=hub.endpoint)
    checkpoint = convert(dense, tmp_path / "moe", experts=2, top_k=1, rank=2, progress=False)
    with pytest.raises(MoEHubError, match=r"no Hugging Face token.*HF_TOKEN"):
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
