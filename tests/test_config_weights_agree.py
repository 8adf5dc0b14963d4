"""A moe-hub checkpoint whose config.json disagrees with its weights does not load: every expert
and router tensor the config describes must be stored (full and adapter-only alike), and a
checkpoint written by a newer moe-hub says which release it needs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import edited_copy, save_tiny_dense
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_hub
from moe_hub.checkpoint import ADAPTER_WEIGHTS
from moe_hub.convert import convert
from moe_hub.modeling import MoELoraForCausalLM

SMALL = dict(experts=4, top_k=2, rank=4, progress=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agree")
    dense = save_tiny_dense(root / "dense")
    return {"full": convert(dense, root / "full", **SMALL),
            "adapter-only": convert(dense, root / "adapter-only", adapter_only=True, **SMALL)}


def load(path: Path, remote_code: bool) -> None:
    if remote_code:
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    else:
        MoELoraForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("kind", ["full", "adapter-only"])
@pytest.mark.parametrize("remote_code", [False, True])
def test_a_router_switched_in_config_json_is_refused(tmp_path, checkpoints, kind, remote_code):
    edited = edited_copy(checkpoints[kind], tmp_path / "edited", router="rmoe")
    with pytest.raises(ValueError, match=r"lack 32 of the 60 expert/router tensors config.json "
                                         r"describes \(router 'rmoe', 4 experts\): "
                                         r"moe_shared\.rmoe\.gru\.\w+, .*, \.\.\.; config.json "
                                         r"and the weights disagree"):
        load(edited, remote_code)


@pytest.mark.parametrize("kind", ["full", "adapter-only"])
def test_adapter_tensors_missing_from_the_weights_are_named(tmp_path, checkpoints, kind):
    edited = edited_copy(checkpoints[kind], tmp_path / "edited")
    tensors = load_file(edited / ADAPTER_WEIGHTS)
    dropped = sorted(name for name in tensors if ".lora_B" in name)[:2]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, edited / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    index = edited / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        for name in dropped:
            del data["weight_map"][name]
        index.write_text(json.dumps(data))
    # transformers' logger does not propagate to pytest's: listen on it directly.
    logger, records = logging.getLogger("transformers"), []
    listener = logging.Handler()
    listener.emit = records.append
    logger.addHandler(listener)
    try:
        with pytest.raises(ValueError, match=r"lack 2 of the 42 expert/router tensors") as caught:
            MoELoraForCausalLM.from_pretrained(edited)
    finally:
        logger.removeHandler(listener)
    assert all(name in str(caught.value) for name in dropped)
    # The error is the one account: no loading report calling them "newly initialized".
    logged = "\n".join(record.getMessage() for record in records)
    assert "LOAD REPORT" not in logged and not any(name in logged for name in dropped), logged


def test_every_adapter_entry_dropped_from_the_index_is_refused(tmp_path, checkpoints):
    edited = edited_copy(checkpoints["full"], tmp_path / "edited")
    index = edited / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != ADAPTER_WEIGHTS}
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"weight files lack 42 of the 42 expert/router"):
        MoELoraForCausalLM.from_pretrained(edited)


def test_the_unedited_checkpoints_still_load(checkpoints):
    for path in checkpoints.values():
        MoELoraForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("field, value, needed", [
    ("moe_hub_version", "9.3.0", "it needs moe-hub 9.3.0 or newer"),
    ("checkpoint_layout", 3, "checkpoint_layout 3; this code reads layouts up to 2"),
])
def test_a_checkpoint_of_a_newer_moe_hub_says_which_release_it_needs(tmp_path, checkpoints,
                                                                      field, value, needed):
    edited = edited_copy(checkpoints["full"], tmp_path / "edited", **{field: value})
    with pytest.raises(ValueError, match=f"written by a newer moe-hub .*{needed}"):
        MoELoraForCausalLM.from_pretrained(edited)


def test_the_shipped_code_knows_its_release():
    from moe_hub.modeling.configuration_moe_lora import CODE_VERSION

    assert CODE_VERSION == moe_hub.__version__


def test_a_fine_tuned_checkpoint_records_the_release_of_the_code_it_ships(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers_finetune import tiny_checkpoint

    from moe_hub.finetune import finetune

    ckpt = tiny_checkpoint(tmp_path)
    old = json.loads((ckpt / "config.json").read_text())
    old["moe_hub_version"], old["tested_transformers"] = "0.0.1", ["4.0.0", "4.1.0"]
    (ckpt / "config.json").write_text(json.dumps(old))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    out = finetune(ckpt, data, tmp_path / "out", max_steps=1, max_length=16, batch_size=1,
                   progress=False)["output"]
    config = json.loads((Path(out) / "config.json").read_text())
    from moe_hub.modeling.transformers_compat import TESTED_TRANSFORMERS

    assert config["moe_hub_version"] == moe_hub.__version__
    assert config["tested_transformers"] == list(TESTED_TRANSFORMERS)
