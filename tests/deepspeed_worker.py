"""Every router x granularity under DeepSpeed ZeRO-3 and ZeRO-2 on a 2-process gloo group (run by
torchrun).

Started by ``tests/test_deepspeed.py`` as ``torchrun --nproc-per-node 2 tests/deepspeed_worker.py
OUT``; one group serves every case, each in its own ``try``, rank 0 writes one JSON entry per case.

A case: the same tiny model on every rank, partitioned by ``deepspeed.initialize`` (stage 3: each
parameter's data is an empty placeholder outside the forward of the module that owns it).
(1) A no-grad forward in eval mode, the decode path, equals the unpartitioned model's logits: the
packed decode storage must not read (or keep) a placeholder. (2) One SGD step on each rank's half
of the global batch equals one process taking the same micro-batches with accumulated gradients,
router auxiliary loss on. (3) The same step under ZeRO-2 (gradients and optimizer state
partitioned, parameters whole) on a fresh copy of the model equals the same reference.

One more case resumes ZeRO-3 with a 4-bit base: a run checkpointed after its first step and
continued by a fresh engine (``load_checkpoint``, strict, as Trainer's resume calls it) takes the
same losses and reaches the same adapters as the uninterrupted run.

Gradient clipping is off (``gradient_clipping: 0``): DeepSpeed clips at norm 1.0 unless told
otherwise, which would scale every gradient of a case whose global norm exceeds 1 (HyperMoE's)
and hide a wrong reduction behind a renormalised one.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from helpers_distributed import run_cases_in_group
from test_routers import CASES, build, ids, perturb

LR = 0.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(router: str, granularity: str) -> torch.nn.Module:
    model = perturb(build(router, granularity)).train()
    adapters = set(model.adapter_parameter_names())
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapters)
    return model


def initialize(model: torch.nn.Module, stage: int) -> torch.nn.Module:
    """``model`` under a DeepSpeed engine of ZeRO ``stage``, SGD on its trained parameters."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(params, lr=LR))
    return engine


def train_step(engine: torch.nn.Module, tokens: torch.Tensor, rank: int, world: int) -> None:
    """One optimizer step on this rank's share of ``tokens``, with its rank's noise draws."""
    engine.train()
    mine = tokens.chunk(world)[rank]
    torch.manual_seed(100 + rank)
    out = engine(mine, labels=mine)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    engine.backward(out.loss)
    engine.step()


def run_case(router: str, granularity: str, rank: int, world: int) -> dict:
    import deepspeed

    tokens = ids(2 * world, 9, seed=11)
    reference = make(router, granularity)
    with torch.no_grad():
        want_eval = reference.eval()(tokens).logits
    reference.train()
    for r, shard in enumerate(tokens.chunk(world)):
        torch.manual_seed(100 + r)  # HyperMoE's noisy gate draws what rank r draws
        (reference(shard, labels=shard).loss / world).backward()
    trained = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    torch.optim.SGD(trained.values(), lr=LR).step()

    model = make(router, granularity)
    engine = initialize(model, stage=3)
    placeholders = sum(p.data.numel() == 0 for p in model.parameters())
    engine.eval()
    with torch.no_grad():
        got_eval = engine(tokens).logits
    train_step(engine, tokens, rank, world)
    names = [n for n, p in model.named_parameters() if n in trained]
    with deepspeed.zero.GatheredParameters([model.get_parameter(n) for n in names]):
        got = {n: model.get_parameter(n).detach().clone() for n in names}
    worst = max(((rel(got[n], trained[n].detach()), n) for n in names), default=(0.0, ""))

    # ZeRO-2: every process holds the whole parameters again after the step.
    model = make(router, granularity)
    train_step(initialize(model, stage=2), tokens, rank, world)
    got = {n: p.detach() for n, p in model.named_parameters() if n in trained}
    worst2 = max(((rel(got[n], trained[n].detach()), n) for n in got), default=(0.0, ""))
    return {"ok": True, "placeholders": placeholders,
            "params": len(list(model.parameters())), "trained": len(names),
            "eval_rel_err": rel(got_eval, want_eval), "param_rel_err": worst[0],
            "worst": worst[1], "zero2_trained": len(got), "zero2_param_rel_err": worst2[0],
            "zero2_worst": worst2[1]}


def run_resume_case(root: Path, rank: int, world: int) -> dict:
    """ZeRO-3 on an NF4 base (float32 quant storage, as finetune asks for under ZeRO-3), AdamW:
    2 steps straight, and step 2 again on a fresh engine resumed from the step-1 checkpoint
    (step 2 reads the restored Adam moments). Errors are the largest over the processes."""
    from transformers import BitsAndBytesConfig

    from moe_hub.finetune import prepare_for_training
    from moe_hub.modeling import MoELoraForCausalLM

    if rank == 0:
        from helpers_finetune import tiny_checkpoint

        tiny_checkpoint(root, router="rmoe", dropout=0.0,
                        router_config={"hyper": True, "embed_dim": 16})
    dist.barrier()
    ckpt, saved = root / "ckpt-rmoe-0", root / "zero3-steps"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_quant_storage=torch.float32)

    def engine_and_model():
        import deepspeed

        model = MoELoraForCausalLM.from_pretrained(ckpt, quantization_config=quant)
        prepare_for_training(model)
        perturb(model)  # B = 0 would leave A without a gradient at the first step
        params = [p for p in model.parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=torch.optim.AdamW(params, lr=1e-2))
        return engine, model

    def step(engine, number: int) -> float:
        mine = ids(2 * world, 9, seed=20 + number).chunk(world)[rank]
        loss = engine(mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    def adapters(model) -> dict:
        import deepspeed

        names = model.adapter_parameter_names()
        with deepspeed.zero.GatheredParameters([model.get_parameter(n) for n in names]):
            return {n: model.get_parameter(n).detach().clone() for n in names}

    engine, model = engine_and_model()
    initial = adapters(model)
    straight = [step(engine, 1)]
    engine.save_checkpoint(str(saved), tag="step1")
    straight.append(step(engine, 2))
    want = adapters(model)
    engine, model = engine_and_model()
    engine.load_checkpoint(str(saved), tag="step1")  # strict module load, optimizer state
    resumed = step(engine, 2)
    got = adapters(model)
    errors = torch.tensor([abs(resumed - straight[1]) / abs(straight[1]),
                           max(rel(got[n], want[n]) for n in want)])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    module = torch.load(saved / "step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    return {"ok": True, "losses": straight,
            "moved": min(rel(want[n], initial[n]) for n in want),
            "quant_state_entries": sum(".weight.quant_state." in k for k in module),
            "loss_rel_err": errors[0].item(), "adapter_rel_err": errors[1].item()}


def main(out: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {f"{router}-{granularity}": partial(run_case, router, granularity, rank, world)
             for router, granularity in CASES}
    cases["zero3-resume-4bit"] = partial(run_resume_case, Path(out).parent, rank, world)
    run_cases_in_group(cases, out)


if __name__ == "__main__":
    main(sys.argv[1])
