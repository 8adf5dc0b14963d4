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
