"""The shipped code survives transformers releases that change the internals it touches.

Each test loads a real converted checkpoint through ``AutoModelForCausalLM`` (the shipped code)
after making the installed transformers look like a later release: an internal removed or
changed. The outcome is a working fallback (same logits as the intact library) or one line that
names the tested transformers range recorded in the checkpoint's config.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
import transformers.conversion_mapping as conversion_mapping
import transformers.core_model_loading as core_model_loading
import transformers.initialization as initialization
import transformers.utils as transformers_utils
from conftest import REPO, run_without_moe_hub, save_tiny_dense
from transformers import AutoModelForCausalLM

from moe_hub.convert import convert
from moe_hub.modeling.transformers_compat import TESTED_TRANSFORMERS

SMALL = dict(experts=4, top_k=2, rank=4, progress=False)


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """A full and an adapter-only checkpoint of one tiny Llama, B perturbed in the full one so
    that a re-initialised expert would change the logits."""
    base = save_tiny_dense(tmp_path / "dense", "llama")
    full = convert(base, tmp_path / "full", **SMALL)
    model = AutoModelForCausalLM.from_pretrained(full, trust_remote_code=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(full)
    adapter_only = convert(base, tmp_path / "adapter_only", adapter_only=True, **SMALL)
    return full, adapter_only


def _logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.arange(2, 26).reshape(2, 12)
    with torch.no_grad():
        return model(ids).logits


def test_tested_range_matches_what_the_suite_runs(checkpoints):
    """The range the error names is the one scripts/test.sh checks: pyproject's lower bound
    (--oldest) and the pinned release (constraints/test.txt), and convert records it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lower = next(re.search(r">=\s*([\d.]+)", d)[1] for d in project["dependencies"]
                 if d.startswith("transformers"))
    pinned = re.search(r"^transformers==([\d.]+)$",
                       (REPO / "constraints" / "test.txt").read_text(), re.M)[1]
    as_tuple = lambda v: tuple(int(p) for p in v.split("."))  # noqa: E731
    assert as_tuple(TESTED_TRANSFORMERS[0])[:2] == as_tuple(lower)[:2]
    assert TESTED_TRANSFORMERS[1] == pinned
    full, _ = checkpoints
    assert json.loads((full / "config.json").read_text())["tested_transformers"] == list(
        TESTED_TRANSFORMERS)


def test_missing_init_guard_stops_loading_with_the_recorded_range(checkpoints, monkeypatch):
    """Without transformers' guard, re-initialising adapters after loading would overwrite the
    loaded experts: loading must stop, naming the range config.json records."""
    full, _ = checkpoints
    config = json.loads((full / "config.json").read_text())
    config["tested_transformers"] = ["5.1.0", "5.2.0"]
    (full / "config.json").write_text(json.dumps(config))
    monkeypatch.delattr(initialization, "guard_torch_init_functions")
    with pytest.raises(RuntimeError) as error:
        _logits(full)
    message = str(error.value)
    assert "\n" not in message
    assert "guard_torch_init_functions" in message
    assert "tested with transformers 5.1.0 to 5.2.0" in message
    assert transformers.__version__ in message


def test_changed_renaming_api_stops_adapter_only_loading(checkpoints, monkeypatch):
    _, adapter_only = checkpoints
    monkeypatch.setattr(core_model_loading, "rename_source_key", lambda key: (key, None))
    with pytest.raises(RuntimeError, match=r"rename_source_key.*tested with transformers"):
        _logits(adapter_only)


def test_removed_renaming_api_falls_back_for_plain_names(checkpoints, monkeypatch):
    """A Llama checkpoint stores module names: without the renaming rules it loads the same."""
    _, adapter_only = checkpoints
    expected = _logits(adapter_only)
    # Not rename_source_key itself: transformers' own loading calls it through its module.
    monkeypatch.delattr(conversion_mapping, "get_model_conversion_mapping")
    assert torch.equal(_logits(adapter_only), expected)


def test_private_cached_file_switch_removed_falls_back(checkpoints, monkeypatch):
    """``cached_file``'s private ``_raise_exceptions_for_missing_entries`` gone: the base's
    index or single shard is still found (through huggingface_hub or the folder)."""
    _, adapter_only = checkpoints
    expected = _logits(adapter_only)
    original = transformers_utils.cached_file

    def cached_file_without_switch(*args, **kwargs):
        if "_raise_exceptions_for_missing_entries" in kwargs:
            raise TypeError("cached_file() got an unexpected keyword argument")
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers_utils, "cached_file", cached_file_without_switch)
    assert torch.equal(_logits(adapter_only), expected)


def test_full_checkpoint_loads_equal_with_perturbed_experts(checkpoints):
    """The guard in place: loading keeps the perturbed experts (a reset would zero B)."""
    full, _ = checkpoints
    model = AutoModelForCausalLM.from_pretrained(full, trust_remote_code=True)
    b = [p for n, p in model.named_parameters() if ".lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)


@pytest.fixture(scope="module")
def foreign_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints written by another environment: scripts/test.sh --newest/--oldest make them
    with the pinned set and name the folder in MOE_HUB_COMPAT_CHECKPOINTS. In a plain run this
    environment writes them (the same script), so the loading path is exercised either way."""
    given = os.environ.get("MOE_HUB_COMPAT_CHECKPOINTS")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("compat")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_compat_checkpoints.py"),
                    str(out)], check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.parametrize("name", ["full-topk", "full-rmoe", "full-hypermoe", "full-graphmoe",
                                  "adapter-only"])
def test_checkpoint_from_another_environment_loads_with_its_logits(foreign_checkpoints, name,
                                                                    tmp_path):
    """Loaded with this environment's transformers, in a process where moe_hub cannot be
    imported, the checkpoint's shipped code gives the logits the writing environment computed.
    Same float32 arithmetic on one CPU: only a changed reduction order can differ (relative
    1e-5 covers a few ulps accumulated over two layers)."""
    path = foreign_checkpoints / name
    out = run_without_moe_hub(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        expected = load_file({str(path / "expected_logits.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
        with torch.no_grad():
            logits = model.eval()(expected["input_ids"]).logits
        error = (logits - expected["logits"]).abs().max() / expected["logits"].abs().max()
        print(float(error))
    """, cwd=tmp_path)
    assert float(out.split()[-1]) < 1e-5


def test_reported_missing_keys_reads_both_report_shapes() -> None:
    """The missing-base check reads the loading report in 5.0's returned pair and in the later
    in-place report object; a report of another shape gives None (the check is skipped)."""
    from types import SimpleNamespace

    from moe_hub.modeling.transformers_compat import reported_missing_keys

    assert reported_missing_keys(({"a"}, set()), ()) == {"a"}
    report = SimpleNamespace(missing_keys={"b"}, unexpected_keys=set())
    assert reported_missing_keys(None, (report,)) == {"b"}
    assert reported_missing_keys(None, (object(),)) is None
    assert reported_missing_keys(None, ()) is None
