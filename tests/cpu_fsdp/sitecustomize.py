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


def _record_fsdp_groups(path: str):
    """For tests/test_distributed_finetune.py: once accelerate has sharded the model, rank 0
    writes to ``path`` the mixed-precision policy of the FSDP group of each module that holds
    routing parameters (null: no group of its own) and of the decoder layers' groups."""
    import json

    import accelerate.accelerator as _accelerator

    prepare = _accelerator.fsdp2_prepare_model

    def prepare_and_record(accelerator, model):
        from torch.distributed.fsdp import FSDPModule

        from moe_hub.distributed import decoder_layers

        layers = {id(m) for m in decoder_layers(model)}  # by class name: before FSDP renames
        model = prepare(accelerator, model)

        def policy(module):
            if not isinstance(module, FSDPModule):
                return None
            mp = module._get_fsdp_state()._mp_policy
            return [str(mp.param_dtype), str(mp.reduce_dtype)]

        names = set(model.adapter_parameter_names())
        groups = {}
        for name, module in model.named_modules():
            own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
            if id(module) in layers or (own and all(n in names and ".lora_" not in n
                                                    for n in own)):
                groups[name] = policy(module)
        if accelerator.is_main_process:
            with open(path, "w") as f:
                json.dump(groups, f)
        return model

    _accelerator.fsdp2_prepare_model = prepare_and_record


if os.environ.get("MOE_HUB_TEST_FSDP_GROUPS"):
    _record_fsdp_groups(os.environ["MOE_HUB_TEST_FSDP_GROUPS"])
