"""DeepSpeed ZeRO-3 (its CPU accelerator, gloo, 2 processes): every router x granularity with
real partitioned parameters (each parameter's data an empty placeholder outside its module's
forward). The decode path never reads a placeholder: a no-grad eval forward equals the
unpartitioned model; one SGD step equals one process on the same global batch.

One group runs every case (``deepspeed_worker.py``) and reports each on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_distributed import torchrun
from helpers_finetune import tiny_checkpoint
from test_routers import CASES

from moe_hub.errors import MoEHubError
from moe_hub.finetune import finetune

#: The shared hypernetwork, whose parameters every site uses in one forward: ZeRO-3 (0.19.8)
#: mis-reduces their gradients (measured 0.03-0.4 relative after one step; the same cases are
#: exact under FSDP2, tests/test_fsdp.py). moe-hub refuses them under ZeRO-3 (test below).
ZERO3_WRONG = {("hypermoe", "linear"), ("hypermoe", "block"), ("rmoe-hyper", "linear")}


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("zero3") / "results.json"
    done = torchrun(Path(__file__).with_name("deepspeed_worker.py"), out)
    assert done.returncode == 0 and out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("router", "granularity"), [
    pytest.param(*case, marks=pytest.mark.xfail(strict=True, reason="ZeRO-3 mis-reduces the "
                                                "shared hypernetwork's gradients"))
    if case in ZERO3_WRONG else case for case in CASES])
def test_zero3_partitioned_model_decodes_and_steps_like_one_process(
        zero3_results: dict, router: str, granularity: str) -> None:
    result = zero3_results[f"{router}-{granularity}"]
    assert result["ok"], result["error"]
    # Really partitioned: every parameter is a placeholder between forwards.
    assert result["placeholders"] == result["params"] > 0
    # The decode path gathers like any forward; float32 rounding of the packed shrink's sums.
    assert result["eval_rel_err"] < 1e-6, result
    assert result["trained"] > 0 and result["param_rel_err"] < 1e-5, result


def test_finetune_refuses_hyper_routers_under_zero3(tmp_path: Path, monkeypatch) -> None:
    """What accelerate launch with deepspeed_zero3.yaml puts in the environment: the run stops
    before loading anything, naming the configs that work."""
    ckpt = tiny_checkpoint(tmp_path, router="hypermoe")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(MoEHubError, match=r"fsdp2\.yaml.*deepspeed_zero2\.yaml") as err:
        finetune(ckpt, data, tmp_path / "out", quantize="none", max_steps=1, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
