"""Lets accelerate run FSDP on a CPU-only machine, for the multi-process tests only.

accelerate (1.16) turns ``distributed_type`` into FSDP only for accelerator device types
(``AcceleratorState.__init__`` lists MULTI_GPU, MULTI_XPU, ...; MULTI_CPU is not among them), so
``accelerate launch --config_file examples/accelerate/fsdp2.yaml`` on a CPU runs plain DDP. FSDP2
itself (``fully_shard``) runs on CPU tensors with gloo. This module, found first on PYTHONPATH by
the test's launched processes, makes the FSDP choice accelerate would make on a GPU: the state
becomes FSDP with the plugin read from the launcher's environment. Nothing else is changed:
accelerate's ``fsdp2_prepare_model``, Trainer's sharded checkpoints and moe-hub's code run as on
a GPU machine.
"""

import os

import accelerate.state as _state

_init = _state.AcceleratorState.__init__


_asked: list = []  # the FSDP plugin, once accelerate launch's environment or Trainer asked


def _init_with_cpu_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None:  # Trainer's fsdp / fsdp_config (torchrun)
        _asked[:] = [kwargs["fsdp_plugin"]]
    elif not _asked and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        _asked.append(getattr(self, "fsdp_plugin", None) or FullyShardedDataParallelPlugin())
    # Every later AcceleratorState() copies PartialState's MULTI_CPU back: choose again.
    if _asked and self.distributed_type == _state.DistributedType.MULTI_CPU:
        self.distributed_type = _state.DistributedType.FSDP
        self.fsdp_plugin = _asked[0]


_state.AcceleratorState.__init__ = _init_with_cpu_fsdp
