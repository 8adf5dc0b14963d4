"""DeepSpeed ZeRO-3 and ZeRO-2 (its CPU accelerator, gloo, 2 processes): every router x
granularity, under ZeRO-3 with real partitioned parameters (each parameter's data an empty
placeholder outside its module's forward). The decode path never reads a placeholder: a no-grad
eval forward equals the unpartitioned model; one SGD step equals one process on the same global
batch, under ZeRO-3 and under ZeRO-2, the shared routing modules included (RMoE's GRU,
HyperMoE's hypernetwork, whose banked heads ZeRO-3 gathers as external parameters of the
hypernetwork, GraphMoE's cell). A ZeRO-3 run on a 4-bit base resumes from its checkpoint and
continues as the uninterrupted run.

One group runs every case (``deepspeed_worker.py``) and reports each on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_distributed import torchrun
from test_routers import CASES


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("zero") / "results.json"
    done = torchrun(Path(__file__).with_name("deepspeed_worker.py"), out)
    assert done.returncode == 0 and out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_zero3_partitioned_model_decodes_and_steps_like_one_process(
        zero_results: dict, router: str, granularity: str) -> None:
    result = zero_results[f"{router}-{granularity}"]
    assert result["ok"], result["error"]
    # Really partitioned: every parameter is a placeholder between forwards.
    assert result["placeholders"] == result["params"] > 0
    # The decode path gathers like any forward; float32 rounding of the packed shrink's sums.
    assert result["eval_rel_err"] < 1e-6, result
    assert result["trained"] > 0 and result["param_rel_err"] < 1e-5, result


@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_zero2_step_equals_one_process(zero_results: dict, router: str,
                                       granularity: str) -> None:
    result = zero_results[f"{router}-{granularity}"]
    assert result["ok"], result["error"]
    assert result["zero2_trained"] == result["trained"] > 0, result
    assert result["zero2_param_rel_err"] < 1e-5, result


def test_zero3_resume_with_a_4bit_base_continues_the_same_run(zero_results: dict) -> None:
    """DeepSpeed's checkpoint holds the model's ``state_dict()``, bitsandbytes' quantization
    state included, and ``load_checkpoint`` (Trainer's resume) loads it strictly: the model takes
    the entries equal to its loaded base (``_take_unchanged_quant_state``); optimizer state and
    partitions come back, so step 2 repeats the uninterrupted run's."""
    result = zero_results["zero3-resume-4bit"]
    assert result["ok"], result["error"]
    assert result["quant_state_entries"] > 0, result  # the 4-bit base's entries were there
    assert result["moved"] > 1e-4, result  # every adapter trained
    assert result["loss_rel_err"] < 1e-6 and result["adapter_rel_err"] < 1e-6, result
