"""What the multi-process tests' launched processes need on a CPU-only machine; test-only.

Found first on ``PYTHONPATH`` (``helpers_distributed.launch_env``) by every process a test starts
with torchrun or ``accelerate launch``. Each change applies when the module it changes is
imported, so a process that never imports it pays nothing.

1. accelerate runs FSDP on the CPU. accelerate (1.16) turns ``distributed_type`` into FSDP only
   for accelerator device types (``AcceleratorState.__init__`` lists MULTI_GPU, MULTI_XPU, ...;
   MULTI_CPU is not among them), so ``accelerate launch --config_file
   examples/accelerate/fsdp2.yaml`` on a CPU runs plain DDP. FSDP2 itself (``fully_shard``) runs
   on CPU tensors with gloo. This makes the FSDP choice accelerate would make on a GPU, when the
   launcher's environment or Trainer's options ask for FSDP: the state becomes FSDP with the
   plugin read from them. accelerate's ``fsdp2_prepare_model``, Trainer's sharded checkpoints
   and moe-hub's code run as on a GPU machine.
2. DeepSpeed does not build its shared-memory all-reduce. Its CPU accelerator compiles that C++
   op (about a minute on two cores) when its process group starts, for
   ``inference_all_reduce`` alone: training's collectives are torch.distributed's (gloo here),
   so the tests leave it unbuilt and a fresh machine's suite does not pay the compile.
"""

import importlib.abc
import importlib.machinery
import os
import sys


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``patch(module)`` right after the module ``name`` has been executed."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_patch(module):
            execute(module)
            self.patch(module)

        spec.loader.exec_module = execute_then_patch
        return spec


def _cpu_fsdp(_state):
    init = _state.AcceleratorState.__init__
    asked: list = []  # the FSDP plugin, once accelerate launch's environment or Trainer asked

    def init_with_cpu_fsdp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if kwargs.get("fsdp_plugin") is not None:  # Trainer's fsdp / fsdp_config (torchrun)
            asked[:] = [kwargs["fsdp_plugin"]]
        elif not asked and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            from accelerate.utils import FullyShardedDataParallelPlugin

            asked.append(getattr(self, "fsdp_plugin", None) or FullyShardedDataParallelPlugin())
        # Every later AcceleratorState() copies PartialState's MULTI_CPU back: choose again.
        if asked and self.distributed_type == _state.DistributedType.MULTI_CPU:
            self.distributed_type = _state.DistributedType.FSDP
            self.fsdp_plugin = asked[0]

    _state.AcceleratorState.__init__ = init_with_cpu_fsdp


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


def _no_shm_op(comm_torch):
    comm_torch.build_shm_op = lambda: None  # TorchBackend then uses torch.distributed alone


sys.meta_path.insert(0, _AfterImport("accelerate.state", _cpu_fsdp))
sys.meta_path.insert(0, _AfterImport("deepspeed.comm.torch", _no_shm_op))
if os.environ.get("MOE_HUB_TEST_FSDP_GROUPS"):
    _record_fsdp_groups(os.environ["MOE_HUB_TEST_FSDP_GROUPS"])
