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

Under DeepSpeed's bf16 mode, each router x granularity again as finetune runs it (adapters kept
float32: ``run_bf16_case``; ZeRO-2, and ZeRO-3 for every router once), and two without keeping
(``run_bf16_follow_case``), each against one process computing as that mode does; finetune's
own Trainer takes one ZeRO-3 bf16 step (``run_finetune_trainer_case``).

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


#: DeepSpeed's bf16 mode as ``finetune --bf16`` runs it: gradients reduced (and, under ZeRO-3,
#: accumulated) in float32, which finetune sets when the config leaves them out.
BF16 = {"bf16": {"enabled": True}, "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"}}


def initialize(model: torch.nn.Module, stage: int, **extra: object) -> torch.nn.Module:
    """``model`` under a DeepSpeed engine of ZeRO ``stage``, SGD on its trained parameters."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, **extra}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(params, lr=LR))
    return engine


def train_step(engine: torch.nn.Module, tokens: torch.Tensor, rank: int, world: int) -> float:
    """One optimizer step on this rank's share of ``tokens``, with its rank's noise draws; the
    rank's loss."""
    engine.train()
    mine = tokens.chunk(world)[rank]
    torch.manual_seed(100 + rank)
    out = engine(mine, labels=mine)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    engine.backward(out.loss)
    engine.step()
    return out.loss.item()


def reference_step(model: torch.nn.Module, tokens: torch.Tensor, world: int) -> list[float]:
    """One process's step on the whole global batch, each rank's share as a micro-batch with that
    rank's noise draws, gradients accumulated; the micro-batches' losses."""
    losses = []
    model.train()
    for r, shard in enumerate(tokens.chunk(world)):
        torch.manual_seed(100 + r)  # HyperMoE's noisy gate draws what rank r draws
        loss = model(shard, labels=shard).loss
        (loss / world).backward()
        losses.append(loss.item())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    return losses


def gathered(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Whole copies of the parameters ``names`` (ZeRO-3 partitions gathered)."""
    import deepspeed

    params = [model.get_parameter(n) for n in names]
    with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")]):
        return {n: p.detach().clone() for n, p in zip(names, params)}


def worst_rel(got: dict, want: dict) -> tuple[float, str]:
    """The largest relative error of one tensor of ``got`` against ``want``, and its name."""
    return max(((rel(got[n], want[n].detach()), n) for n in want), default=(0.0, ""))


def global_rel(got: dict, want: dict, base: dict | None = None) -> float:
    """Relative error of all of ``got`` (minus ``base``: a step) against all of ``want``, as
    one vector: a few ulps of a tensor whose gradient is tiny do not dominate it."""
    def minus(t: dict, n: str) -> torch.Tensor:
        return t[n].detach().double() - (base[n].double() if base is not None else 0.0)
    diff = sum(((minus(got, n) - minus(want, n)) ** 2).sum().item() for n in want)
    return (diff / sum((minus(want, n) ** 2).sum().item() for n in want)) ** 0.5


def largest(value: float) -> float:
    """The largest ``value`` over the processes."""
    out = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item()


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


def to_bf16(model: torch.nn.Module, adapters: bool) -> torch.nn.Module:
    """What DeepSpeed's bf16 mode does to ``model`` (``p.data = p.data.to(bfloat16)``, buffers
    untouched), to the adapters too or only to the rest (kept float32)."""
    kept = set() if adapters else set(model.adapter_parameter_names())
    for name, param in model.named_parameters():
        if name not in kept:
            param.data = param.data.bfloat16()
    return model


def master_step(model: torch.nn.Module, tokens: torch.Tensor, world: int) -> list[float]:
    """``reference_step`` on bfloat16 trained parameters the way DeepSpeed's bf16 mode updates
    them: bfloat16 gradients (averaged in bfloat16), the step on float32 master copies, rounded
    back to bfloat16."""
    trained = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float() for p in trained]
    losses = []
    model.train()
    for r, shard in enumerate(tokens.chunk(world)):
        torch.manual_seed(100 + r)
        loss = model(shard, labels=shard).loss
        (loss / world).backward()
        losses.append(loss.item())
    with torch.no_grad():
        for param, master in zip(trained, masters):
            param.data = (master - LR * param.grad.float()).bfloat16()
    return losses


#: Cases whose bf16 run takes ZeRO-3 too (every router once, each granularity three times; a
#: ZeRO-3 start costs a second or two here, a ZeRO-2 one a tenth of that).
BF16_ZERO3_CASES = {("topk", "linear"), ("rmoe", "block"), ("rmoe-hyper", "linear"),
                    ("hypermoe", "block"), ("graphmoe", "linear"), ("graphmoe-message", "block")}


def bf16_reference(router: str, granularity: str, world: int, step, adapters: bool) -> tuple:
    """The one-process side of a bf16 case: the global batch, the trained names, their starting
    values, each rank's loss and the parameters after ``step`` on the model cast by
    ``to_bf16(adapters=adapters)``."""
    tokens = ids(2 * world, 9, seed=11)
    reference = make(router, granularity)
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    initial = {n: reference.get_parameter(n).detach().clone() for n in names}
    losses = step(to_bf16(reference, adapters=adapters), tokens, world)
    want = {n: reference.get_parameter(n) for n in names}
    return tokens, names, initial, losses, want


def run_bf16_case(router: str, granularity: str, rank: int, world: int) -> dict:
    """DeepSpeed's bf16 mode (``"bf16": {"enabled": true}``, what Trainer's ``--bf16`` gives) as
    finetune runs it (``keep_adapters_float32_in_deepspeed`` and ``BF16``), ZeRO-2 (and ZeRO-3
    for ``BF16_ZERO3_CASES``): the adapters start as their exact float32 values; the loss is
    one process's on a bfloat16 base with float32 adapters (DeepSpeed does not autocast: the
    same arithmetic); one step equals that process's step."""
    tokens, names, initial, losses, want = bf16_reference(router, granularity, world,
                                                          reference_step, adapters=False)
    out: dict = {"ok": True}
    for stage in (3, 2) if (router, granularity) in BF16_ZERO3_CASES else (2,):
        model = make(router, granularity)
        model.keep_adapters_float32_in_deepspeed()
        engine = initialize(model, stage, **BF16)
        start = gathered(model, names)
        loss = train_step(engine, tokens, rank, world)
        got = gathered(model, names)
        out[f"zero{stage}"] = {
            "start_float32": all(start[n].dtype == torch.float32 for n in names),
            "start_err": largest(max((start[n] - initial[n]).abs().max().item() for n in names)),
            "loss_rel_err": largest(abs(loss - losses[rank]) / abs(losses[rank])),
            "param_rel_err": worst_rel(got, want)[0], "worst": worst_rel(got, want)[1],
            "step_rel_err": global_rel(got, want, initial)}
    return out


#: Cases that also run DeepSpeed's bf16 mode without keep_adapters_float32_in_deepspeed (each
#: granularity, shared routing modules: RMoE's GRU and hypernetwork, HyperMoE's).
FOLLOW_CASES = {("rmoe-hyper", "linear"), ("hypermoe", "block")}


def run_bf16_follow_case(router: str, granularity: str, rank: int, world: int) -> dict:
    """DeepSpeed's bf16 mode under ZeRO-3 from a plain ``deepspeed.initialize`` (no keeping): it
    starts (a bare ``AssertionError`` when the routers came back float32 among bfloat16
    experts), the routers hold the bfloat16 rounding of their values, and the loss and the step
    are one process's on bfloat16 adapters with float32 master copies."""
    tokens, names, initial, losses, want = bf16_reference(router, granularity, world,
                                                          master_step, adapters=True)
    model = make(router, granularity)
    engine = initialize(model, 3, bf16={"enabled": True})
    start = gathered(model, names)
    loss = train_step(engine, tokens, rank, world)
    got = gathered(model, names)
    routers = [n for n in names if ".lora_" not in n]
    return {
        "ok": True,
        "routers_bf16": bool(routers) and all(start[n].dtype == torch.bfloat16 for n in routers),
        "start_err": largest(max((start[n].float() - initial[n].bfloat16().float()).abs().max()
                                 .item() for n in names)),
        "loss_rel_err": largest(abs(loss - losses[rank]) / abs(losses[rank])),
        "param_rel_err": global_rel(got, want)}


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


def run_fp16_case(router: str, granularity: str, rank: int, world: int) -> dict:
    """DeepSpeed's fp16 mode (``finetune --fp16`` on GPUs), ZeRO-3 and ZeRO-2: the routers
    follow its float16 (float32 ones made ZeRO-3 stop at start-up, and ZeRO-2 flatten every
    trained parameter into float32 and drop its loss scaling), its dynamic loss scaler is on,
    and the loss is one process's on the same float16 parameters. No step is compared: a
    dynamic scaler may skip the first one."""
    tokens = ids(2 * world, 9, seed=11)
    reference = make(router, granularity)
    for param in reference.parameters():
        param.data = param.data.half()
    losses = []
    for r, shard in enumerate(tokens.chunk(world)):
        torch.manual_seed(100 + r)  # with autograd, as in training (no-grad forwards decode)
        losses.append(reference(shard, labels=shard).loss.item())
    out: dict = {"ok": True}
    for stage in (3, 2):
        model = make(router, granularity)
        engine = initialize(model, stage, fp16={"enabled": True})
        trained = [p for p in model.parameters() if p.requires_grad]
        loss = train_step(engine, tokens, rank, world)
        out[f"zero{stage}"] = {
            "float16": all(p.dtype == torch.float16 for p in trained),
            "dynamic_loss_scale": bool(engine.optimizer.loss_scaler.dynamic),
            "loss_rel_err": largest(abs(loss - losses[rank]) / abs(losses[rank]))}
    return out


def run_finetune_trainer_case(root: Path, rank: int, world: int) -> dict:
    """finetune's Trainer (``MoELoraTrainer``, its TrainingArguments with ``--bf16``) on a
    DeepSpeed ZeRO-3 config whose bf16 section says ``auto``, as accelerate's generated config
    does; one step. What the engine holds when training begins: float32 adapters equal to their
    values, gradients reduced and accumulated in float32 (finetune fills them in)."""
    import deepspeed
    from transformers import TrainerCallback

    from moe_hub.data import PadCollator
    from moe_hub.finetune import FinetuneOptions, _make_trainer_class, _training_arguments
    from moe_hub.routing_stats import RoutingStats

    model = make("rmoe-hyper", "linear")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    initial = {n: model.get_parameter(n).detach().clone() for n in names}
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    options = FinetuneOptions(bf16=True, max_steps=1, batch_size=1, warmup=0, report_to="none",
                              training_args={"deepspeed": config, "max_grad_norm": 0.0})
    args = _training_arguments(options, root / "trainer", has_eval=False, progress=False)
    rows = [{"input_ids": t.tolist(), "labels": t.tolist(), "attention_mask": [1] * len(t)}
            for t in ids(2 * world, 9, seed=11)]
    seen: dict = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            engine = trainer.model_wrapped
            params = [model.get_parameter(n) for n in names]
            with deepspeed.zero.GatheredParameters(params):
                seen["float32"] = all(p.dtype == torch.float32 for p in params)
                seen["start_err"] = largest(max((p.detach() - initial[n]).abs().max().item()
                                                for n, p in zip(names, params)))
            seen["reduce"] = str(engine.communication_data_type)
            seen["accumulate"] = str(engine.get_data_types()[1])

    trainer = _make_trainer_class()(
        model=model, args=args, train_dataset=rows, data_collator=PadCollator(0),
        callbacks=[AtStart()], routing_stats=RoutingStats(
            [site.name for site in model.routing_sites], model.config.num_experts))
    trainer.train()
    return {"ok": True, **seen, "steps": trainer.state.global_step}


def main(out: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {f"{router}-{granularity}": partial(run_case, router, granularity, rank, world)
             for router, granularity in CASES}
    for router, granularity in CASES:
        cases[f"{router}-{granularity}-bf16"] = partial(run_bf16_case, router, granularity,
                                                        rank, world)
    for router, granularity in sorted(FOLLOW_CASES):
        cases[f"{router}-{granularity}-bf16-follow"] = partial(
            run_bf16_follow_case, router, granularity, rank, world)
    cases["zero3-resume-4bit"] = partial(run_resume_case, Path(out).parent, rank, world)
    cases["rmoe-hyper-linear-fp16"] = partial(run_fp16_case, "rmoe-hyper", "linear", rank,
                                              world)
    # Last: Trainer leaves accelerate's process-wide state behind.
    cases["finetune-bf16-zero3"] = partial(run_finetune_trainer_case, Path(out).parent, rank,
                                           world)
    run_cases_in_group(cases, out)


if __name__ == "__main__":
    main(sys.argv[1])
