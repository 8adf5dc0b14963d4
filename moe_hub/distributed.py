"""What a moe-hub run needs to know about the distributed engine it runs under.

moe-hub brings no engine of its own: ``accelerate launch`` (FSDP2, DeepSpeed ZeRO) or ``torchrun``
start the processes, transformers' Trainer drives them. This module answers the few questions
the rest of the code asks of them: which process writes files, which modules are the decoder
layers FSDP2 shards one by one, and how the full model state comes back from the shards.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

#: moe-hub's own module classes that sharding must not treat as decoder layers.
_ROUTING_CLASSES = ("MoELoraLinear", "MoELoraBlock", "HyperNetwork")


def world_size() -> int:
    """Processes in this run: the process group's size, or what the launcher announced (the
    group is not up yet while the CLI parses its arguments)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes the run's files (rank 0; the only process without a
    launcher)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a moe-hub model (or any transformers model): the modules of the
    classes its dense model keeps whole on one device (``_no_split_modules``), moe-hub's own
    routing modules excepted. These are the units FSDP2 shards one by one."""
    dense = getattr(model, "dense_model", model)
    names = set(getattr(dense, "_no_split_modules", None) or ()) - set(_ROUTING_CLASSES)
    return [m for m in model.modules() if type(m).__name__ in names]


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The full (unsharded) state of a model sharded by FSDP2, on CPU, on every rank (a plain
    model's own state dict otherwise). Collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def routing_shard_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The routing modules of ``model`` as FSDP2 groups: each decoder layer's routers together
    (routers outside every decoder layer, if any, as one more group), then each module of
    ``moe_shared`` that the routers call (RMoE's GRU cell and hypernetwork, HyperMoE's
    hypernetwork, GraphMoE's cell), each alone. The shared ones are called once per site, and a
    one-module group is gathered and reduced around each call, as FSDP2 expects of a module it
    sees several times in one forward."""
    from .modeling.routing import Router

    def routers(module: nn.Module) -> list[nn.Module]:
        return [m for m in module.modules() if isinstance(m, Router)]

    groups, grouped = [], set()
    for layer in decoder_layers(model):
        found = [r for r in routers(layer) if r not in grouped]
        grouped.update(found)
        if found:
            groups.append(found)
    rest = [r for r in routers(model) if r not in grouped]
    if rest:
        groups.append(rest)
    shared = getattr(model, "moe_shared", None)
    pending = list(shared.children()) if shared is not None else []
    while pending:  # containers (RMoE's ModuleDict) are never called: their children are
        module = pending.pop(0)
        if isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            pending[:0] = list(module.children())
        elif next(module.parameters(), None) is not None:
            groups.append([module])
    return groups


def shard_routing_in_float32(model: nn.Module, **fully_shard_kwargs: Any) -> int:
    """Shard ``model``'s routers and shared routing modules with FSDP2 in groups of their own
    that gather, compute and reduce in float32; call it before sharding the rest of the model
    (``fully_shard`` on the decoder layers and the root, or accelerate's ``prepare``), which
    then leaves these parameters to their groups. Returns the number of groups.

    Why: FSDP2's mixed precision is one policy per group, and accelerate gives every group the
    run's dtype (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)`` for
    ``mixed_precision: bf16``). Left in the decoder-layer and root groups, the routers would be
    all-gathered as bfloat16, so their logits come from rounded weights, and their gradients
    summed in bfloat16: the float32 routing that ``Router._apply`` and ``float32_linear`` keep
    everywhere else. ``fully_shard_kwargs`` (mesh, reshard_after_forward, offload_policy) should
    be the rest of the model's; the mixed-precision policy is this function's own.
    Collective: every process calls it on the same model."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs off: a router reads the 16-bit hidden states as they are (float32_linear
    # upcasts them in the matmul and keeps the 16-bit copy for backward, not a float32 one).
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    groups = routing_shard_groups(model)
    for group in groups:
        fully_shard(group if len(group) > 1 else group[0], mp_policy=policy,
                    **fully_shard_kwargs)
    return len(groups)


def _is_zero3_partitioned(param: Any) -> bool:
    # DeepSpeed ZeRO-3 replaces every parameter's data by an empty placeholder and records the
    # real size in ds_numel; GatheredParameters brings the whole tensor back for a while.
    return hasattr(param, "ds_numel") and hasattr(param, "ds_status")


def full_parameters(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """Whole copies (CPU, float32, contiguous) of the parameters ``names`` of ``model``, whatever
    holds them: plain tensors, FSDP2 shards (DTensor) or DeepSpeed ZeRO-3 partitions.

    Collective when the parameters are sharded: every process must call it, with the same names
    (each gets the whole tensors; moe-hub's adapters are small next to the base)."""
    import torch

    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    partitioned = [params[n] for n in names if _is_zero3_partitioned(params[n])]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            for name in names:
                if _is_zero3_partitioned(params[name]):
                    out[name] = params[name].detach().to("cpu", torch.float32).clone()
    for name in names:
        if name in out:
            continue
        tensor = params[name].detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor: FSDP2's shard of the parameter
            tensor = tensor.full_tensor()
        out[name] = tensor.to("cpu", torch.float32).contiguous()
    return out


def load_full_parameters(model: nn.Module, tensors: dict[str, Any]) -> None:
    """Copy whole tensors into the parameters of the same names, sharded or not (each process
    keeps its own shard of them). Every process must call it when the parameters are sharded."""
    import torch

    params = dict(model.named_parameters())
    partitioned = [params[n] for n in tensors if n in params and _is_zero3_partitioned(params[n])]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0), torch.no_grad():
            for name, tensor in tensors.items():
                if name in params and _is_zero3_partitioned(params[name]):
                    params[name].copy_(tensor.to(params[name].dtype))
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params.get(name)
            if param is None or _is_zero3_partitioned(param):
                continue
            if hasattr(param, "device_mesh"):  # a DTensor: keep this process's shard
                from torch.distributed.tensor import distribute_tensor

                whole = tensor.to(param.device, param.dtype)
                param.copy_(distribute_tensor(whole, param.device_mesh, param.placements,
                                              src_data_rank=None))
            else:
                param.copy_(tensor.to(param.dtype))


def launched_sharded() -> bool:
    """Whether the launcher asked for sharded parameters (accelerate's FSDP, or DeepSpeed
    ZeRO-3), read from its environment: the model is loaded before the Trainer exists."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return True
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and \
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"

