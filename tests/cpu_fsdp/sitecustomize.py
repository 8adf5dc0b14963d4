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

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    import accelerate.state as _state

    _init = _state.AcceleratorState.__init__

    def _init_with_cpu_fsdp(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if self.distributed_type == _state.DistributedType.MULTI_CPU:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None) \
                or FullyShardedDataParallelPlugin()
            self.distributed_type = _state.DistributedType.FSDP
            self.fsdp_plugin = plugin

    _state.AcceleratorState.__init__ = _init_with_cpu_fsdp
