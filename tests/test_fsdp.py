"""FSDP2 (``fully_shard``) on a real 2-process gloo group: one SGD step of every router x
granularity equals the single-process step on the same global batch, router aux loss on.

One group runs every case (``fsdp_worker.py``; a group costs seconds to start) and reports each
on its own; every case is its own test here, so one failing case names itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_distributed import torchrun
from helpers_finetune import tiny_checkpoint
from test_routers import CASES

POLICIES = ("layers", "no_split")


def _check(result: dict) -> None:
    assert result["ok"], result["error"]
    assert result["params"] > 0 and result["layers"] >= 2
    assert result["unmoved"] == [], f"no gradient reached {result['unmoved']}"
    assert result["param_rel_err"] < 1e-5, result
    assert result["update_rel_err"] < 1e-3, result


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    out = root / "results.json"
    qlora = tiny_checkpoint(root, router="topk")
    done = torchrun(Path(__file__).with_name("fsdp_worker.py"), out, qlora)
    assert done.returncode == 0 and out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_fsdp2_step_equals_single_process(fsdp_results: dict, router: str, granularity: str,
                                          policy: str) -> None:
    """``layers``: every decoder layer, then the root (which holds the shared routing modules:
    RMoE's GRU, HyperMoE's hypernetwork, GraphMoE's cell); ``no_split``: what accelerate's
    TRANSFORMER_BASED_WRAP does with the model's ``_no_split_modules`` (the routed sites and the
    hypernetwork get groups of their own). Parameters within 1e-5 relative (the requirement);
    the updates themselves (lr * gradient) within 1e-3: every gradient is the same fp32 sum taken
    in another order (all-gathered operands, reduce-scattered halves), and a wrong or missing
    gradient term moves them by O(1)."""
    _check(fsdp_results[f"{router}-{granularity}-{policy}"])


@pytest.mark.parametrize("policy", POLICIES)
def test_fsdp_qlora_step_equals_single_process(fsdp_results: dict, policy: str) -> None:
    """FSDP-QLoRA: the base in bitsandbytes NF4 stored as float32 (``bnb_4bit_quant_storage``,
    the compute dtype, as transformers documents for FSDP + QLoRA), sharded like the rest: each
    process holds about half of the frozen (packed 4-bit) base, and the step equals the
    unsharded 4-bit model's on the same global batch."""
    result = fsdp_results[f"qlora-nf4-{policy}"]
    _check(result)
    # Half, plus FSDP's padding of dim 0 to a multiple of 2 (small tensors: norms, biases).
    assert 0.45 < result["frozen_share"] < 0.55, result["frozen_share"]


def _check_bf16(result: dict, exact_gradients: bool) -> None:
    assert result["ok"], result["error"]
    assert result["routing_modules"] > 0 and result["params"] > 0
    assert result["not_float32"] == [], result["not_float32"]
    assert result["logits_rel_err"] <= 1e-6, result
    assert result["grad_rel_err"] <= (1e-6 if exact_gradients else 0.2), result


@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_fsdp2_bf16_keeps_routing_in_float32(fsdp_results: dict, router: str,
                                             granularity: str) -> None:
    """accelerate's FSDP2 policy for ``mixed_precision: bf16`` (every group gathers in bfloat16
    and reduces in it), under its default wrap, after ``shard_routing_in_float32``: every
    forward of a router or shared routing module sees float32 parameters, and the routing
    gradients are those of one process computing with the bfloat16 parameters that policy
    gathers and the float32 routers moe-hub keeps.

    Bounds: each rank's forward is op for op the reference's on its micro-batch, so the logits
    are the same bits (measured 0.0); a router weight gathered in bfloat16 moves them by its
    rounding, 2^-9 per element (measured 2.6e-3 to 0.39 without the fix; 0.0 only for
    HyperMoE, whose router weights start at zero, caught by the dtypes). Gradients, block
    routing (one router per layer): the backward is op for op the reference's too, and the
    reduction is one float32 sum of two terms and a halving, both exact (measured 0.0); reduced
    in bfloat16 they round by up to 2^-9 (measured 4.5e-3 to 0.46). Per-linear routing: FSDP2's
    input hooks on the grouped modules re-associate bfloat16 sums of activation gradients, each
    rounding 2^-9, which the softmax's cancellations magnify (measured up to 0.08): 0.2 still
    catches a missing or doubled reduction, which moves them by about 1."""
    _check_bf16(fsdp_results[f"bf16-{router}-{granularity}"], granularity == "block")


def test_fsdp_qlora_bf16_keeps_routing_in_float32(fsdp_results: dict) -> None:
    """FSDP-QLoRA in bfloat16 (the NF4 base stored and gathered in bfloat16): routers still
    compute from float32 weights (per-linear routing: gradient bound as above)."""
    _check_bf16(fsdp_results["bf16-qlora-nf4"], exact_gradients=False)
