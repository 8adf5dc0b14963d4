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
