"""``moe-hub finetune`` under ``accelerate launch`` with FSDP2 (the shipped
examples/accelerate/fsdp2.yaml), 2 gloo processes on the CPU, through the CLI.

One uninterrupted run (4 steps, sharded Trainer checkpoints at 2 and 4) and one run resumed from
its step-2 checkpoint; each test reads what they wrote. FSDP-QLoRA: the base is loaded in
bitsandbytes NF4 (packed into float32 storage under FSDP and ZeRO-3, so that it shards), the
router loss is on (weight 1) and the routers are RMoE's with ``hyper`` (a GRU and HyperMoE's
hypernetwork, both shared by every site: held by FSDP's root unit, gathered by ZeRO-3 for every
site's call)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers_distributed import REPO, accelerate_launch, torchrun
from helpers_finetune import tiny_checkpoint
from safetensors.torch import load_file

from moe_hub.finetune import finetune

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
FSDP2 = REPO / "examples" / "accelerate" / "fsdp2.yaml"
ZERO3 = REPO / "examples" / "accelerate" / "deepspeed_zero3.yaml"
# One-row micro-batches: an optimizer step holds the same rows in one process (grad_accum 2) as
# in two (one each); the load balance is per micro-batch in both. No clipping.
COMMON = dict(quantize="nf4", max_length=16, batch_size=1, lr=1e-2, warmup=0,
              scheduler="constant", logging_steps=1, save_steps=2, aux_loss_coef=1.0,
              max_steps=4, keep_checkpoints=True, save_total_limit=None,
              training_args={"max_grad_norm": 0.0})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def losses(output: Path) -> dict[int, float]:
    record = json.loads((output / "moe_hub_training.json").read_text())
    return {e["step"]: e["loss"] for e in record["log_history"] if "loss" in e}


def cli_finetune(root: Path, ckpt: Path, data: Path, out: str, *extra: str,
                 config: Path = FSDP2):
    options = root / "options.yaml"
    options.write_text(json.dumps({k: v for k, v in COMMON.items()}))
    return accelerate_launch(config, "-m", "moe_hub.cli.app", "finetune", ckpt, "--data", data,
                             "--output", root / out, "--config", options, "--no-progress",
                             *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp-cli")
    ckpt = tiny_checkpoint(root, router="rmoe", dropout=0.0,
                           router_config={"hyper": True, "embed_dim": 16})
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # The launched processes record the FSDP groups accelerate left (launched/sitecustomize).
    os.environ["MOE_HUB_TEST_FSDP_GROUPS"] = str(root / "groups.json")
    try:
        straight = cli_finetune(root, ckpt, data, "out")
    finally:
        del os.environ["MOE_HUB_TEST_FSDP_GROUPS"]
    resumed = None
    if straight.returncode == 0:
        resumed = cli_finetune(root, ckpt, data, "resumed", "--resume-from",
                               root / "out.checkpoints" / "checkpoint-2")
    # DeepSpeed ZeRO-3 runs on its CPU accelerator with gloo as it is.
    zero3 = cli_finetune(root, ckpt, data, "zero3", config=ZERO3)
    # torchrun, FSDP2 asked through Trainer's own options (a --config file), 2 steps.
    options = root / "torchrun.json"
    options.write_text(json.dumps({**COMMON, "max_steps": 2, "fsdp": "full_shard auto_wrap",
                                   "fsdp_config": {"version": 2,
                                                   "state_dict_type": "SHARDED_STATE_DICT"}}))
    plain = torchrun("-m", "moe_hub.cli.app", "finetune", ckpt, "--data", data, "--output",
                     root / "torchrun", "--config", options, "--no-progress")
    return {"root": root, "ckpt": ckpt, "data": data, "straight": straight, "resumed": resumed,
            "zero3": zero3, "torchrun": plain}


def _ok(done) -> None:
    assert done is not None and done.returncode == 0, done and (done.stdout[-2000:] +
                                                                done.stderr[-4000:])


def test_fsdp2_cli_writes_one_normal_checkpoint(runs: dict) -> None:
    _ok(runs["straight"])
    root = runs["root"]
    # FSDP ran: the Trainer checkpoints hold one shard per process (torch.distributed.checkpoint)
    step2 = root / "out.checkpoints" / "checkpoint-2"
    for folder in ("optimizer_0", "pytorch_model_fsdp_0"):
        assert sorted(p.name for p in (step2 / folder).glob("*.distcp")) == \
            ["__0_0.distcp", "__1_0.distcp"], folder
    assert (step2 / "moe_adapters.safetensors").is_file()
    # FSDP-QLoRA: the packed NF4 base (float32 storage) was sharded too, not left whole.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step2 / "pytorch_model_fsdp_0")).read_metadata()
    base = [k for k in metadata.state_dict_metadata if k.endswith("q_proj.base_layer.weight")]
    assert base and all(len(metadata.state_dict_metadata[k].chunks) == 2 for k in base), base
    # One report (rank 0 only), one output, nothing half-written beside it.
    assert runs["straight"].stdout.count('"global_step": 4') == 1
    assert sorted(p.name for p in root.iterdir() if p.name.startswith((".out", "out"))) == \
        ["out", "out.checkpoints"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "out", trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    saved = load_file(root / "out" / "moe_adapters.safetensors")
    params = dict(model.named_parameters())
    initial = load_file(runs["ckpt"] / "moe_adapters.safetensors")
    assert set(saved) == set(initial) and any(name.startswith("moe_shared.") for name in saved)
    for name, tensor in saved.items():
        assert tensor.shape == initial[name].shape, name  # whole tensors, not one shard
        assert torch.equal(params[name].detach(), tensor), name
    moved = [n for n in saved if not torch.equal(saved[n], initial[n])]
    assert len(moved) == len(saved), sorted(set(saved) - set(moved))


def test_fsdp2_cli_gives_the_routing_modules_float32_groups(runs: dict) -> None:
    """After accelerate's own sharding (fsdp2_prepare_model, TRANSFORMER_BASED_WRAP) the routers
    and the shared GRU are FSDP groups of their own that gather and reduce in float32, whatever
    accelerate's policy for the rest (tests/test_fsdp.py shows these groups keep the routers
    float32 under its bf16 policy); the decoder layers are accelerate's groups."""
    _ok(runs["straight"])
    groups = json.loads((runs["root"] / "groups.json").read_text())
    routing = {n: g for n, g in groups.items() if ".router" in n or n.startswith("moe_shared.")}
    layers = {n: g for n, g in groups.items() if n not in routing}
    # Parts of a group (the hypernetwork's head banks) are gathered with the group they are in.
    routing = {n: g for n, g in routing.items()
               if not any(n.startswith(f"{p}.") and routing[p] for p in routing)}
    assert "moe_shared.rmoe.gru" in routing and len(routing) > len(layers) >= 2, groups
    assert all(g == ["torch.float32", "torch.float32"] for g in routing.values()), routing
    assert all(g is not None for g in layers.values()), layers


def test_fsdp2_cli_matches_one_process_with_the_same_global_batch(runs: dict, tmp_path) -> None:
    _ok(runs["straight"])
    single = finetune(runs["ckpt"], runs["data"], tmp_path / "single", grad_accum=2,
                      progress=False, **{**COMMON, "keep_checkpoints": False})
    two, one = losses(runs["root"] / "out"), losses(tmp_path / "single")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    # Same rows per step, same math; float32 sums in another order, which Adam's normalised
    # first steps amplify on near-zero gradients (as for DDP in test_finetune.py).
    assert abs(two[1] - one[1]) <= 1e-5 * abs(one[1])  # before any update: same forward
    for step in (2, 3, 4):
        assert abs(two[step] - one[step]) <= 2e-3 * abs(one[step]), (step, two, one)
    assert single["global_step"] == 4
    mine = load_file(runs["root"] / "out" / "moe_adapters.safetensors")
    theirs = load_file(tmp_path / "single" / "moe_adapters.safetensors")
    errs = sorted(rel_err(mine[name], tensor) for name, tensor in theirs.items())
    assert errs[len(errs) // 2] < 2e-2 and errs[-1] < 0.2, errs


def test_fsdp2_resume_from_a_sharded_checkpoint_continues_the_same_run(runs: dict) -> None:
    _ok(runs["straight"])
    _ok(runs["resumed"])
    root = runs["root"]
    straight, resumed = losses(root / "out"), losses(root / "resumed")
    # The resumed run trained steps 3 and 4 only (1 and 2 come from the restored state)...
    report = runs["resumed"].stdout
    report = json.loads(report[report.index("{", report.rfind("\n{") + 1):])
    assert (report["first_loss_step"], report["final_loss_step"]) == (3, 4), report
    # ...with the restored adapters, optimizer, scheduler, RNG and data position.
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - straight[step]) <= 1e-5 * abs(straight[step]), step
    a = load_file(root / "out" / "moe_adapters.safetensors")
    b = load_file(root / "resumed" / "moe_adapters.safetensors")
    for name, tensor in a.items():
        assert rel_err(b[name], tensor) < 1e-5, name


def test_deepspeed_zero3_cli_trains_as_fsdp2_does(runs: dict) -> None:
    """The same command under examples/accelerate/deepspeed_zero3.yaml: parameters partitioned
    (the routers' backward re-gathers them: tests/test_deepspeed.py), the same rows per step as
    the FSDP2 run, so the same losses up to float32 summation order; a normal checkpoint."""
    _ok(runs["straight"])
    _ok(runs["zero3"])
    root = runs["root"]
    step2 = root / "zero3.checkpoints" / "checkpoint-2"
    partitions = sorted(p.name for p in (step2 / "global_step2").glob("*.pt"))
    assert [p for p in partitions if "optim_states" in p] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (step2 / "moe_adapters.safetensors").is_file()
    zero3, fsdp2 = losses(root / "zero3"), losses(root / "out")
    assert sorted(zero3) == [1, 2, 3, 4]
    assert abs(zero3[1] - fsdp2[1]) <= 1e-5 * abs(fsdp2[1])
    for step in (2, 3, 4):
        assert abs(zero3[step] - fsdp2[step]) <= 2e-3 * abs(fsdp2[step]), (step, zero3, fsdp2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "zero3", trust_remote_code=True)
    saved = load_file(root / "zero3" / "moe_adapters.safetensors")
    initial = load_file(runs["ckpt"] / "moe_adapters.safetensors")
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        assert tensor.shape == initial[name].shape, name
        assert torch.equal(params[name].detach(), tensor), name
    theirs = load_file(root / "out" / "moe_adapters.safetensors")
    errs = sorted(rel_err(tensor, theirs[name]) for name, tensor in saved.items())
    assert errs[len(errs) // 2] < 2e-2 and errs[-1] < 0.2, errs


def test_torchrun_with_trainer_fsdp_options_trains_as_accelerate_does(runs: dict) -> None:
    """``torchrun -m moe_hub.cli.app finetune ... --config`` with Trainer's ``fsdp`` and
    ``fsdp_config`` (version 2): the same sharded run as accelerate launch's, step for step."""
    _ok(runs["straight"])
    _ok(runs["torchrun"])
    root = runs["root"]
    step2 = root / "torchrun.checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in (step2 / "optimizer_0").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    mine, theirs = losses(root / "torchrun"), losses(root / "out")
    assert sorted(mine) == [1, 2]
    for step in (1, 2):
        assert abs(mine[step] - theirs[step]) <= 1e-5 * abs(theirs[step]), (step, mine, theirs)
