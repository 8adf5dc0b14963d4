"""One FSDP2 training step per router x granularity on a 2-process gloo group (run by torchrun).

Started by ``tests/test_fsdp.py`` as ``torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT``:
one process group serves every case (starting a group costs seconds), each case runs inside its
own ``try`` and rank 0 writes one JSON entry per case to OUT, so the pytest side reports (and
fails) each case on its own.

A case: the same tiny model on every rank, sharded as accelerate's ``fsdp_version: 2`` does
(``fully_shard`` on every decoder layer, then the root, which then holds the shared routing
modules, embeddings and head), router auxiliary loss on. Each rank takes its half of the global
batch; one SGD step. The reference is one process taking the same global batch as the same
per-rank micro-batches (the loss of each divided by the world size, the gradients accumulated),
which is the step data parallelism defines: the router's load-balancing loss is a product of
per-batch means, so it is per micro-batch in both runs, as Trainer computes it on every device.

The ``bf16-*`` cases shard under accelerate's bf16 policy instead, the routing modules first put
in float32 groups by moe-hub (``run_bf16_case``).
"""

from __future__ import annotations

import itertools
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from helpers_distributed import run_cases_in_group
from test_routers import CASES, build, ids, perturb

LR = 0.5


def _trained(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _freeze_base(model: torch.nn.Module) -> None:
    adapters = set(model.adapter_parameter_names())
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapters)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_units(model: torch.nn.Module, policy: str) -> list[torch.nn.Module]:
    """The modules sharded before the root: the decoder layers, or (``no_split``, accelerate's
    TRANSFORMER_BASED_WRAP default) every module of a class in the model's ``_no_split_modules``,
    moe-hub's routed sites and HyperMoE's hypernetwork included, innermost first."""
    from moe_hub.distributed import decoder_layers

    if policy == "layers":
        return decoder_layers(model)
    names = set(model._no_split_modules)
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in names]


def router_model(router: str, granularity: str):
    def make() -> torch.nn.Module:
        model = perturb(build(router, granularity)).train()
        _freeze_base(model)
        return model

    return make


def qlora_model(checkpoint: str, dtype: torch.dtype = torch.float32):
    """FSDP-QLoRA: the checkpoint's base in bitsandbytes NF4, stored in the compute dtype
    (``bnb_4bit_quant_storage``) so that FSDP can shard the packed weights."""

    def make() -> torch.nn.Module:
        from transformers import BitsAndBytesConfig

        from moe_hub.finetune import prepare_for_training
        from moe_hub.modeling import MoELoraForCausalLM

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        model = MoELoraForCausalLM.from_pretrained(checkpoint, quantization_config=quant,
                                                   dtype=dtype)
        prepare_for_training(model)
        return perturb(model)

    return make


def run_case(make, policy: str, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    tokens = ids(2 * world, 9, seed=11)
    reference = make()
    before = {n: p.detach().clone() for n, p in _trained(reference).items()}
    for r, shard in enumerate(tokens.chunk(world)):
        torch.manual_seed(100 + r)  # HyperMoE's noisy gate draws what rank r draws
        (reference(shard, labels=shard).loss / world).backward()
    unmoved = [n for n, p in _trained(reference).items() if not p.grad.abs().sum() > 0]
    torch.optim.SGD(_trained(reference).values(), lr=LR).step()

    model = make()
    full_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    mesh = init_device_mesh("cpu", (world,))
    layers = shard_units(model, policy)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local_frozen = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                       for p in model.parameters() if not p.requires_grad)
    mine = tokens.chunk(world)[rank]
    torch.manual_seed(100 + rank)
    out = model(mine, labels=mine)
    assert out.aux_loss is not None and out.aux_loss.item() > 0  # the router loss is on
    out.loss.backward()
    torch.optim.SGD(_trained(model).values(), lr=LR).step()

    want = _trained(reference)
    got = {n: _full(p.detach()) for n, p in _trained(model).items()}
    if set(got) != set(want):
        return {"ok": False, "error": f"trained parameters differ: {sorted(set(got) ^ set(want))}"}
    worst_param, worst_update, worst_name = 0.0, 0.0, ""
    for name, param in want.items():
        ref, new = param.detach().double(), got[name].double()
        err = ((new - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        step = ref - before[name].double()
        moved = new - before[name].double()
        update_err = ((moved - step).norm() / step.norm().clamp_min(1e-30)).item()
        if step.norm() == 0:
            update_err = moved.norm().item()
        if err > worst_param:
            worst_param, worst_name = err, name
        worst_update = max(worst_update, update_err)
    return {"ok": True, "unmoved": unmoved, "frozen_share": local_frozen / full_frozen,
            "layers": len(layers), "params": len(want), "param_rel_err": worst_param,
            "update_rel_err": worst_update, "worst": worst_name}


def _routing(model: torch.nn.Module) -> set[str]:
    """Names of the router and shared routing parameters: what moe-hub keeps in float32."""
    return {n for n in model.adapter_parameter_names()
            if ".router." in n or n.startswith("moe_shared.")}


def _record_routing_dtypes(model: torch.nn.Module) -> dict[str, set[str]]:
    """Forward pre-hooks on every routing module that holds parameters of its own, recording the
    dtypes of all its parameters as its forward sees them (FSDP2's hooks come first: they are
    prepended, so these see the gathered parameters)."""
    names = _routing(model)
    seen: dict[str, set[str]] = {}
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if own and all(n in names for n in own):
            def record(mod, args, prefix=prefix):
                seen.setdefault(prefix, set()).update(str(p.dtype) for p in mod.parameters())
            module.register_forward_pre_hook(record)
    return seen


def _record_router_logits(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Forward hooks on every router, keeping the logits of each call."""
    from moe_hub.modeling.routing import Router

    logits: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Router):
            def record(mod, args, out, name=name):
                logits.setdefault(name, []).append(out.logits.detach().double())
            module.register_forward_hook(record)
    return logits


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def run_bf16_case(make, policy: str, rank: int, world: int) -> dict:
    """FSDP2 with accelerate's policy for ``mixed_precision: bf16`` on every group it makes
    (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)``), the routing modules first
    put in float32 groups of their own by ``moe_hub.distributed.shard_routing_in_float32``.

    The reference is what that policy computes with, in one process: every parameter in
    bfloat16 (parameters only: FSDP2 casts no buffers) except the routing ones, which moe-hub
    keeps float32; the same per-rank micro-batches, losses divided by the world size, gradients
    accumulated in float32. Reported: the routing modules whose forward saw a parameter in
    another dtype than float32, each router's logits against the reference's for this rank's
    micro-batch, and the routing parameters' gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from moe_hub.distributed import shard_routing_in_float32

    tokens = ids(2 * world, 9, seed=11)
    reference = make()
    routing = _routing(reference)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name not in routing and param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
    ran = _record_routing_dtypes(reference)
    want_logits = _record_router_logits(reference)
    for r, shard in enumerate(tokens.chunk(world)):
        torch.manual_seed(100 + r)  # HyperMoE's noisy gate draws what rank r draws
        (reference(shard, labels=shard).loss / world).backward()
    want = {n: p.grad for n, p in reference.named_parameters() if n in routing}

    model = make()
    mesh = init_device_mesh("cpu", (world,))
    shard_routing_in_float32(model, mesh=mesh)
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for unit in shard_units(model, policy):
        if not isinstance(unit, FSDPModule):  # accelerate skips modules sharded already
            fully_shard(unit, mesh=mesh, mp_policy=bf16)
    fully_shard(model, mesh=mesh, mp_policy=bf16)
    seen = _record_routing_dtypes(model)
    got_logits = _record_router_logits(model)
    mine = tokens.chunk(world)[rank]
    torch.manual_seed(100 + rank)
    model(mine, labels=mine).loss.backward()
    got = {n: _full(p.grad) for n, p in model.named_parameters() if n in routing}
    same_calls = set(got_logits) == set(want_logits)
    logits_err = torch.tensor(max(_rel(got_logits[n][0], want_logits[n][rank])
                                  for n in want_logits) if same_calls else float("inf"))
    dist.all_reduce(logits_err, op=dist.ReduceOp.MAX)  # every rank's micro-batch
    missing = sorted(n for n in want if want[n] is None or got.get(n) is None)
    if missing or set(seen) != set(ran) or not same_calls:
        return {"ok": False, "error": f"no gradient for {missing[:3]}, or other modules ran: "
                                      f"{sorted(set(seen) ^ set(ran))[:3]}"}
    errs = {n: _rel(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    return {"ok": True, "params": len(want), "routing_modules": len(seen), "not_float32": sorted(
                f"{k}: {sorted(v)}" for k, v in seen.items() if v != {"torch.float32"}),
            "logits_rel_err": logits_err.item(), "grad_rel_err": errs[worst], "worst": worst}


POLICIES = ("layers", "no_split")


def main(out: str, qlora_checkpoint: str | None = None) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {f"{router}-{granularity}-{policy}": (router_model(router, granularity), policy)
             for (router, granularity), policy in itertools.product(CASES, POLICIES)}
    if qlora_checkpoint:
        cases.update({f"qlora-nf4-{policy}": (qlora_model(qlora_checkpoint), policy)
                      for policy in POLICIES})
    runs = {key: partial(run_case, make, policy, rank, world)
            for key, (make, policy) in cases.items()}
    # bf16 mixed precision, under accelerate's default wrap (the model's _no_split_modules).
    runs.update({f"bf16-{router}-{granularity}": partial(
        run_bf16_case, router_model(router, granularity), "no_split", rank, world)
        for router, granularity in CASES})
    if qlora_checkpoint:  # the 4-bit base stored (and gathered) in bfloat16
        runs["bf16-qlora-nf4"] = partial(run_bf16_case, qlora_model(
            qlora_checkpoint, torch.bfloat16), "no_split", rank, world)
    run_cases_in_group(runs, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
