"""DeepSpeed ZeRO-3 and ZeRO-2 (its CPU accelerator, gloo, 2 processes): every router x
granularity, under ZeRO-3 with real partitioned parameters (each parameter's data an empty
placeholder outside its module's forward). The decode path never reads a placeholder: a no-grad
eval forward equals the unpartitioned model; one SGD step equals one process on the same global
batch, under ZeRO-3 and under ZeRO-2, the shared routing modules included (RMoE's GRU,
HyperMoE's hypernetwork, whose banked heads ZeRO-3 gathers as external parameters of the
hypernetwork, GraphMoE's cell). In DeepSpeed's bf16 mode the adapters train in float32 from
their exact values as finetune asks (ZeRO-3 and ZeRO-2), or follow DeepSpeed's bfloat16 without
it (ZeRO-3). A ZeRO-3 run on a 4-bit base resumes from its checkpoint and continues as the
uninterrupted run.

One group runs every case (``deepspeed_worker.py``) and reports each on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deepspeed_worker import BF16_ZERO3_CASES, FOLLOW_CASES
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


#: bfloat16's unit roundoff (8 significant bits).
BF16_U = 2.0 ** -8


@pytest.mark.parametrize(("router", "granularity", "stage"),
                         [(r, g, 2) for r, g in CASES] + [(r, g, 3) for r, g in CASES
                                                          if (r, g) in BF16_ZERO3_CASES])
def test_bf16_keeps_the_adapters_float32_and_steps_like_one_process(
        zero_results: dict, router: str, granularity: str, stage: int) -> None:
    """DeepSpeed's bf16 mode as ``finetune --bf16`` runs it (``keep_adapters_float32_in_deepspeed``,
    gradients reduced and accumulated in float32). It casts every parameter to bfloat16 before
    ZeRO builds its optimizer; the experts and routers start training from their exact float32
    values, in float32 (ZeRO-3 used to stop at start-up: a bare ``AssertionError`` in its
    ``defragment``, float32 routers among bfloat16 experts).

    The reference is one process on the same bfloat16 base with float32 adapters, without
    autocast, as DeepSpeed computes: the forward is the same arithmetic, so the loss is equal.
    ZeRO-2's step is too (float32 gradients summed in float32). ZeRO-3's hooks change the order
    in which autograd sums a hidden state's gradient contributions, in bfloat16 in the base's
    backward: each sum may round apart by up to u = 2^-8, a step passes through a few of them
    (measured: at most 1.7 u over all trained tensors as one vector), so the bound is 4 u."""
    result = zero_results[f"{router}-{granularity}-bf16"]
    assert result["ok"], result["error"]
    bf16 = result[f"zero{stage}"]
    assert bf16["start_float32"] and bf16["start_err"] == 0.0, bf16
    assert bf16["loss_rel_err"] < 1e-6, bf16
    if stage == 2:
        assert bf16["param_rel_err"] < 1e-5, bf16
    else:
        assert bf16["step_rel_err"] < 4 * BF16_U, bf16


@pytest.mark.parametrize(("router", "granularity"), sorted(FOLLOW_CASES))
def test_bf16_without_keeping_routers_follow_deepspeeds_dtype(
        zero_results: dict, router: str, granularity: str) -> None:
    """A plain ``deepspeed.initialize`` in bf16 mode under ZeRO-3 (a user's own, or Trainer's
    without finetune): the routers keep the bfloat16 dtype DeepSpeed set (they came back float32
    at its move and ZeRO-3 stopped at start-up), holding the rounding of their values; the loss
    is one process's on the same bfloat16 adapters, and the step one process's on their float32
    master copies, rounded back to bfloat16: the two round apart by at most one bfloat16 ulp
    (2 u relative) where their masters differ by the gradients' bfloat16 roundings."""
    follow = zero_results[f"{router}-{granularity}-bf16-follow"]
    assert follow["ok"], follow["error"]
    assert follow["routers_bf16"] and follow["start_err"] == 0.0, follow
    assert follow["loss_rel_err"] < 1e-6, follow
    assert follow["param_rel_err"] < 2 * BF16_U, follow


@pytest.mark.parametrize("stage", [3, 2])
def test_fp16_routers_follow_deepspeed_and_keep_its_loss_scaling(zero_results: dict,
                                                                  stage: int) -> None:
    """DeepSpeed's fp16 mode (``finetune --fp16`` on GPUs): the routers keep the float16 it set,
    so ZeRO-3 starts (float32 routers among float16 experts stopped it), ZeRO-2 keeps its
    dynamic loss scaling (it flattened float32 routers and float16 experts into one float32
    buffer and scaled nothing), and the forward is one process's on the same parameters."""
    result = zero_results["rmoe-hyper-linear-fp16"]
    assert result["ok"], result["error"]
    fp16 = result[f"zero{stage}"]
    assert fp16["float16"] and fp16["dynamic_loss_scale"], fp16
    assert fp16["loss_rel_err"] < 1e-6, fp16


def test_finetune_trainer_under_zero3_bf16_trains_float32_adapters(zero_results: dict) -> None:
    """finetune's Trainer with ``--bf16`` under a ZeRO-3 config (``bf16: auto``): it trains,
    and when training begins the engine holds the adapters as their exact float32 values and
    reduces and accumulates gradients in float32 (the config left both out)."""
    result = zero_results["finetune-bf16-zero3"]
    assert result["ok"], result["error"]
    assert result["steps"] == 1, result
    assert result["float32"] and result["start_err"] == 0.0, result
    assert result["reduce"] == result["accumulate"] == "torch.float32", result


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
