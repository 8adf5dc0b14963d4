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

