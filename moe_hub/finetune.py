"""Fine-tune the experts and routers of a moe-hub checkpoint on a bitsandbytes-quantized base.

The checkpoint loads with the library's ``MoELoraForCausalLM`` and a ``BitsAndBytesConfig``:
transformers' quantizer replaces the dense linears (``base_layer``) with 4-bit/8-bit layers, while
experts and routers, plain parameters, stay in float32 and are the only trainable tensors.
transformers' ``Trainer`` runs the loop (so torchrun/accelerate launch it on several processes).

The output is a checkpoint in the convert format with the base in its ORIGINAL precision: the
input's base shards are hard-linked (or copied) and only ``moe_adapters.safetensors`` is new.
Everything is assembled in a temporary sibling of OUT and renamed at the end. Intermediate
Trainer checkpoints (adapters, optimizer, scheduler, RNG) live in ``<OUT>.checkpoints/`` so that an
interrupted or diverged run can be resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import (
    ADAPTER_WEIGHTS,
    INDEX_FILE,
    check_output,
    checkpoint_files,
    copy_code,
    publish,
    refuse_overlap,
    require_checkpoint,
    staging_dir,
    write_index,
)
from .data import PadCollator, model_max_length, pad_token_id, prepare_data
from .distributed import (
    full_parameters,
    launched_sharded,
    load_full_parameters,
    shard_routing_in_float32,
)
from .errors import Interrupted, MoEHubError
from .options_file import is_finite_number, read_options_file
from .outputs import published_outputs
from .routing_stats import HEATMAP_FILE, STATS_FILE, RoutingStats
from .run_checkpoints import (
    checkpoints,
    choose_resume,
    complete_checkpoints,
    finish_save,
    remove_saving_leftovers,
    run_lock,
    saving_dir,
)

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
TRAIN_CHOICES = ("all", "experts", "routers")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = ("bf16", "fp16", "fp32")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAINING_FILE = "moe_hub_training.json"
# Files of the input checkpoint that fine-tuning regenerates instead of copying.
_REGENERATED = {ADAPTER_WEIGHTS, INDEX_FILE, "README.md", "config.json", TRAINING_FILE,
                STATS_FILE, HEATMAP_FILE}


@dataclass
class FinetuneOptions:
    """Everything ``finetune`` accepts besides CHECKPOINT, DATA and OUT (also from YAML/JSON).

    ``training_args`` passes any other ``transformers.TrainingArguments`` field through; a config
    file may name such fields at its top level too.
    """

    quantize: str = "nf4"
    train: str = "all"  # all, experts (LoRA pairs) or routers (with their shared modules)
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: the precision's dtype (bfloat16, float16 or float32)
    eval_data: str | None = None
    eval_split: float = 0.0
    data_split: str = "train"
    max_length: int = 512
    packing: bool = False
    completion_only: bool = True
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    warmup: float = 0.03  # a fraction of the steps when < 1, else a step count
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    # Mixed precision: at most one of these; none set picks bf16 on a CUDA GPU that supports
    # it, fp16 on other CUDA GPUs, fp32 on a CPU (resolved_precision()).
    bf16: bool | None = None
    fp16: bool | None = None
    fp32: bool | None = None
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 200
    save_total_limit: int | None = 2
    report_to: str = "none"
    aux_loss_coef: float | None = None  # None: keep the checkpoint's
    z_loss_coef: float | None = None
    resume: bool | str = False  # True: the last checkpoint in <OUT>.checkpoints; or a path
    checkpoint_dir: str | None = None  # default <OUT>.checkpoints
    keep_checkpoints: bool = False
    tokenizer: str | None = None  # default: the checkpoint's own tokenizer
    overwrite: bool = False
    training_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> FinetuneOptions:
        """Options from a YAML or JSON file; unknown keys that are TrainingArguments fields go to
        ``training_args``; ``overrides`` (e.g. CLI flags) win."""
        path = Path(path)
        data = read_options_file(path)
        return cls.from_dict({**data, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "options") -> FinetuneOptions:
        from transformers import TrainingArguments

        own = {f.name for f in fields(cls)}
        trainer_fields = {f.name for f in fields(TrainingArguments)}
        passthrough = dict(data.get("training_args") or {})
        mine = {}
        for key, value in data.items():
            if key == "training_args":
                continue
            if key in own:
                mine[key] = value
            elif key in trainer_fields:
                passthrough[key] = value
            else:
                raise MoEHubError(f"unknown option {key!r} in {source}: use a finetune option "
                                  f"({', '.join(sorted(own))}) or a TrainingArguments field")
        return cls(**mine, training_args=passthrough)

    def validate(self) -> None:
        if self.quantize not in QUANTIZATIONS:
            raise MoEHubError(f"unknown quantization {self.quantize!r}: pass --quantize one of "
                              f"{', '.join(QUANTIZATIONS)}")
        if self.train not in TRAIN_CHOICES:
            raise MoEHubError(f"unknown --train {self.train!r}: pass one of "
                              f"{', '.join(TRAIN_CHOICES)}")
        if self.compute_dtype != "auto" and self.compute_dtype not in COMPUTE_DTYPES:
            raise MoEHubError(f"unknown compute dtype {self.compute_dtype!r}: pass auto, "
                              f"{', '.join(COMPUTE_DTYPES)}")
        for name in ("batch_size", "grad_accum", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise MoEHubError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.max_steps == 0 or self.max_steps < -1:
            # TrainingArguments reads 0 as "no limit" and still takes a step: refuse it.
            raise MoEHubError(f"max_steps must be at least 1 (got {self.max_steps}); omit it to "
                              f"train for --epochs")
        if self.max_steps < 1 and self.epochs <= 0:
            raise MoEHubError("nothing to train: pass epochs > 0 or max_steps >= 1")
        # NaN passes every comparison, and an infinite rate or weight decay gives NaN weights
        # on the first step: both are refused by name.
        if not (is_finite_number(self.lr) and self.lr > 0):
            raise MoEHubError(f"--lr must be a finite number above 0 (got {self.lr!r})")
        for name, flag in (("epochs", "--epochs"), ("warmup", "--warmup"),
                           ("weight_decay", "weight_decay")):
            value = getattr(self, name)
            if not (is_finite_number(value) and value >= 0):
                raise MoEHubError(f"{flag} must be a finite number >= 0 (got {value!r})")
        self.resolved_precision()  # both flags, or fp16 without a GPU: refuse before loading

    def resolved_precision(self, cuda: bool | None = None, cuda_bf16: bool | None = None
                           ) -> str:
        """``bf16``, ``fp16`` or ``fp32``: the one flag set, else the machine's best.
        ``cuda``/``cuda_bf16`` default to what this machine has."""
        chosen = [name for name in PRECISIONS if getattr(self, name)]
        if len(chosen) > 1:
            flags = " and ".join(f"--{name}" for name in chosen)
            raise MoEHubError(f"{flags} exclude each other: pass one of --bf16, --fp16, --fp32")
        if cuda is None:
            cuda = torch.cuda.is_available()
        if chosen:
            if chosen[0] == "fp16" and not cuda:
                raise MoEHubError("--fp16 needs a CUDA GPU (fp16 training scales the loss with "
                                  "a CUDA grad scaler): pass --bf16 or --fp32 on a CPU")
            return chosen[0]
        if not cuda:
            return "fp32"
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp16"

    def dtype(self) -> torch.dtype:
        """The base's load dtype and the bitsandbytes compute dtype."""
        if self.compute_dtype == "auto":
            return PRECISION_DTYPES[self.resolved_precision()]
        return COMPUTE_DTYPES[self.compute_dtype]



class CheckpointSaveError(Exception):
    """Writing a trainer checkpoint failed (its half-written folder is already removed)."""

    def __init__(self, step: int, run_dir: Path, cause: BaseException) -> None:
        reason = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else \
            " ".join(str(cause).split())[-160:]
        super().__init__(f"cannot save checkpoint-{step} in {run_dir} ({reason})")
        # Only a failing write (a full disk, a quota, a lost mount) is fixed by freeing space;
        # safetensors reports one as its own error carrying the OS's ("os error 27").
        self.storage = isinstance(cause, OSError) or "os error" in str(cause)


class NonFiniteLoss(RuntimeError):
    """The training loss or the adapters' gradients became NaN or infinite."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}")
        self.step = step


def _finite_guard(trainer: Any) -> Any:
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        """Stops before the optimizer applies a non-finite loss or gradient. A NaN weight does
        not always make the loss NaN (attention can mask it out), but its gradient is NaN."""

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                                  **kwargs: Any) -> None:
            losses, trainer._step_losses = trainer._step_losses, []
            if losses:
                # The step's loss as Trainer sums it for its logs (no device sync here).
                record = (state.global_step + 1, torch.stack(losses).detach().sum())
                trainer.first_step_loss = trainer.first_step_loss or record
                trainer.last_step_loss = record
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            checks = [torch.stack(torch._foreach_norm(grads)).sum()] if grads else []
            checks += [loss.float() for loss in losses]
            # One device sync per step, not one per tensor.
            if checks and bool(torch.isfinite(torch.stack(checks)).all()):
                return
            step = state.global_step + 1
            for loss in losses:
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(step, f"the loss is {float(loss)}")
            for name, param in model.named_parameters():
                if param.grad is not None and not torch.isfinite(param.grad).all():
                    raise NonFiniteLoss(step, f"the gradient of {name} is not finite")

    return FiniteGuard()


def format_log(logs: dict[str, Any], step: int, max_steps: int) -> str | None:
    """One readable line for a Trainer log (None for the end-of-training totals, which the
    summary line reports): ``step 3/6  loss 5.116  grad_norm 1.1  learning_rate 0.05 ...``."""
    if "train_runtime" in logs:
        return None
    parts = [f"step {step}/{max_steps}"]
    for key, value in logs.items():
        if key in ("total_flos", "epoch"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    if isinstance(logs.get("epoch"), int | float):
        parts.append(f"epoch {logs['epoch']:.2f}")
    return "  ".join(parts)


def _log_as_lines(trainer: Any) -> None:
    """Trainer prints each log as a Python dict (to stdout without progress bars, where the CLI
    writes its JSON): print a formatted line above the progress bar instead, nothing without."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ProgressLines(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kwargs: Any) -> None:
            line = format_log(logs or {}, state.global_step, state.max_steps)
            if state.is_world_process_zero and self.training_bar is not None and line:
                self.training_bar.write(line, file=sys.stderr)  # with the bar, off stdout

    trainer.remove_callback(PrinterCallback)
    handler = trainer.callback_handler
    if any(type(cb) is ProgressCallback for cb in handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressLines())


def quantization_config(options: FinetuneOptions) -> Any:
    from transformers import BitsAndBytesConfig

    if options.quantize == "none":
        return None
    if options.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quantize,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=options.dtype(),
        # FSDP / ZeRO-3 shard only floating-point storage: pack the 4-bit weights into the
        # compute dtype (the same bytes), as transformers documents for FSDP + QLoRA.
        bnb_4bit_quant_storage=options.dtype() if launched_sharded() else torch.uint8,
    )


def load_for_training(checkpoint: str | os.PathLike, options: FinetuneOptions) -> Any:
    """The checkpoint as a trainable model: quantized base (per ``options``), fp32 adapters
    that alone require grad, router losses in the loss, train mode."""
    from .modeling import MoELoraForCausalLM

    quant = quantization_config(options)
    kwargs: dict[str, Any] = {"dtype": options.dtype()}
    if quant is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise MoEHubError(f"--quantize {options.quantize} needs bitsandbytes: pip install "
                              f"bitsandbytes, or pass --quantize none") from None
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            # Trainer does not move bitsandbytes models: load each process's copy on its GPU.
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = MoELoraForCausalLM.from_pretrained(checkpoint, **kwargs)
    if options.aux_loss_coef is not None:
        model.config.router_aux_loss_coef = float(options.aux_loss_coef)
    if options.z_loss_coef is not None:
        model.config.router_z_loss_coef = float(options.z_loss_coef)
    prepare_for_training(model, options.train)
    return model


def is_expert_parameter(name: str) -> bool:
    """Expert (LoRA pair) tensors, as opposed to routers and their shared modules."""
    return ".lora_" in name


def prepare_for_training(model: Any, train: str = "all") -> list[str]:
    """Freeze the base, make adapters fp32 and the ``train`` group of them (``all``, ``experts``
    or ``routers``) trainable, disable the bnb CPU repacking; return the trainable names."""
    adapters = set(model.adapter_parameter_names())
    trainable = set()
    for name, param in model.named_parameters():
        if name in adapters:
            if type(param) is not torch.nn.Parameter:
                raise MoEHubError(f"adapter tensor {name} was quantized ({type(param).__name__}): "
                                  f"the checkpoint's code is not a moe-hub model")
            if param.dtype != torch.float32:
                param.data = param.data.float()
            wanted = train == "all" or (train == "experts") == is_expert_parameter(name)
            param.requires_grad_(wanted)
            if wanted:
                trainable.add(name)
        else:
            param.requires_grad_(False)
    try:
        import bitsandbytes as bnb

        for module in model.modules():
            # On AVX512-BF16 CPUs an eval forward repacks 4-bit weights in place and breaks them.
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    except ImportError:
        pass
    model.config.output_router_logits = True
    model.config.use_cache = model.config.get_text_config().use_cache = False  # the dense forward's
    model.train()
    return sorted(trainable)


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """Whole float32 CPU copies of the experts and routers. Collective when the model is sharded
    (FSDP2, DeepSpeed ZeRO-3): every process must call it."""
    return full_parameters(model, model.adapter_parameter_names())


def _shard_routing_for_fsdp2(trainer: Any) -> None:
    """Under FSDP2, give the routing modules float32 groups of their own before accelerate
    shards the model (at ``train()``, in ``fsdp2_prepare_model``, which leaves modules already
    sharded to their groups): accelerate's one mixed-precision policy would otherwise gather
    the routers in the run's 16-bit dtype and reduce their gradients in it
    (``shard_routing_in_float32``). The other settings are the ones accelerate gives its
    groups."""
    accelerator = trainer.accelerator
    if not getattr(accelerator, "is_fsdp2", False):
        return
    plugin = accelerator.state.fsdp_plugin
    quantized = any(type(p).__name__ == "Params4bit" for p in trainer.model.parameters())
    if plugin.cpu_ram_efficient_loading and not quantized:
        # accelerate then moves the model to the meta device and broadcasts rank 0's whole
        # tensors into it, which it cannot do for parameters already sharded (it does not take
        # that path for a 4-bit base).
        if accelerator.is_main_process and accelerator.mixed_precision != "no":
            from rich.console import Console

            Console(stderr=True).print(
                "FSDP2 with fsdp_cpu_ram_efficient_loading: the routers train in the run's "
                "mixed precision, not float32; set fsdp_cpu_ram_efficient_loading: false (or "
                "train on a 4-bit base) to keep them float32", highlight=False, soft_wrap=True)
        return
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:  # the data-parallel dimensions, as fsdp2_prepare_model takes them
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    shard_routing_in_float32(trainer.model, mesh=mesh,
                             reshard_after_forward=plugin.reshard_after_forward,
                             offload_policy=plugin.cpu_offload)
    if getattr(plugin, "transformer_cls_names_to_wrap", None) is None:
        # Sharded modules change class (FSDP<Name>): the model's _no_split_modules now names
        # classes it no longer has (HyperNetwork), which accelerate 1.6-1.10 refuses (1.16 skips
        # them). Name the classes that are left: what either would wrap.
        present = {type(module).__name__ for module in trainer.model.modules()}
        plugin.transformer_cls_names_to_wrap = [
            name for name in getattr(trainer.model, "_no_split_modules", None) or ()
            if name in present]


def _keep_adapters_float32_for_deepspeed(trainer: Any) -> None:
    """Under DeepSpeed's bf16 mode (``--bf16`` fills the configs' ``bf16: auto``) with ZeRO,
    train the experts and routers in float32 from their exact values, and reduce their
    gradients in float32 unless the DeepSpeed config chose otherwise.

    Why: DeepSpeed casts every parameter to bfloat16 before ZeRO builds its optimizer, so the
    routers would compute from rounded weights, and ZeRO sums gradients (and ZeRO-3
    accumulates them) in the model's dtype by default: each router gradient would be rounded
    twice more. The trained parameters are moe-hub's small adapters, so float32 costs little.
    ZeRO-2 and ZeRO-3 only (the shipped configs): not in fp16 mode (DeepSpeed scales the loss
    only when the trained parameters are fp16), nor under ZeRO-0/1, whose bf16 optimizers expect
    bfloat16 parameters; the routers follow DeepSpeed's dtype there (``_float32_cast``)."""
    if not getattr(trainer, "is_deepspeed_enabled", False) or not trainer.args.bf16:
        return
    plugin = trainer.accelerator.state.deepspeed_plugin
    stage = int(plugin.zero_stage or 0)
    if stage not in (2, 3):
        return
    trainer.model.keep_adapters_float32_in_deepspeed()
    config = plugin.deepspeed_config  # what accelerate passes to deepspeed.initialize
    config.setdefault("communication_data_type", "fp32")
    if stage == 3:  # ZeRO-2 accumulates in its partition of the (float32) parameters' dtype
        config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")


def _make_trainer_class() -> type:
    from transformers import Trainer

    class MoELoraTrainer(Trainer):
        """Trainer that logs router losses by name, counts expert loads, stops on a non-finite
        loss before the optimizer applies it, and checkpoints only the adapters."""

        def __init__(self, *args: Any, routing_stats: RoutingStats, **kwargs: Any) -> None:
            model = kwargs["model"]
            # Trainer refuses a quantized model unless PEFT adapters are attached; the MoE-LoRA
            # experts are such adapters, so say so for the duration of its check.
            flag = getattr(model, "_hf_peft_config_loaded", False)
            model._hf_peft_config_loaded = True
            try:
                super().__init__(*args, **kwargs)
            finally:
                model._hf_peft_config_loaded = flag
            self.routing_stats = routing_stats
            self._aux_sums: dict[str, torch.Tensor] = {}
            self._aux_count = 0
            self._step_losses: list[torch.Tensor] = []
            self._saving_into: str | None = None
            #: (step, loss) of the first and the last optimizer step this run took
            self.first_step_loss: tuple[int, torch.Tensor] | None = None
            self.last_step_loss: tuple[int, torch.Tensor] | None = None
            self.add_callback(_finite_guard(self))
            _log_as_lines(self)
            _shard_routing_for_fsdp2(self)
            _keep_adapters_float32_for_deepspeed(self)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if model.training:
                for name, value in (outputs.get("aux_losses") or {}).items():
                    value = value.detach().float()
                    self._aux_sums[name] = self._aux_sums.get(name, 0.0) + value
                self._aux_count += 1
                self.routing_stats.add(outputs.get("expert_counts"))
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model: Any, inputs: dict[str, Any],
                          num_items_in_batch: Any = None) -> torch.Tensor:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._step_losses.append(loss.detach())  # checked by the guard before the update
            return loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self._aux_count:
                for name, total in self._aux_sums.items():
                    logs[f"router_{name}"] = round(float(total) / self._aux_count, 6)
                self._aux_sums, self._aux_count = {}, 0
            super().log(logs, start_time)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            # Every process gathers (sharded adapters need all of them), the main one writes:
            # the same file whatever engine ran, so resuming may even change engines.
            adapters = adapter_state(self.accelerator.unwrap_model(self.model))
            self._save(output_dir, state_dict=adapters)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if not self.args.should_save:
                return
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            names = model.adapter_parameter_names()
            # save_model passes the gathered adapters (a full state dict holds them too).
            state_dict = adapter_state(model) if state_dict is None else \
                {name: state_dict[name].to("cpu", torch.float32).contiguous() for name in names}
            save_file(state_dict, os.path.join(output_dir, ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def _get_output_dir(self, trial: Any) -> str:
            # While a checkpoint is saved: the hidden folder it is written in.
            return self._saving_into or super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            """Trainer's save, written into a hidden folder and renamed to checkpoint-N once
            complete: an interrupted save (Ctrl-C, kill, full disk) never leaves a checkpoint-N
            that a resume would pick."""
            run_dir = Path(super()._get_output_dir(trial))
            step = self.state.global_step
            staging = saving_dir(run_dir, step)
            self._saving_into = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            except BaseException as err:
                if self.args.should_save:
                    shutil.rmtree(staging, ignore_errors=True)
                if isinstance(err, Exception):  # a full disk, a quota, a lost mount...
                    raise CheckpointSaveError(step, run_dir, err) from err
                raise
            finally:
                self._saving_into = None
            self.accelerator.wait_for_everyone()  # every process wrote its RNG state into it
            if self.args.should_save:
                best = self.state.best_model_checkpoint
                if best and Path(best).parent == staging:
                    self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                    self.state.save_to_json(str(staging / Path(best).name / "trainer_state.json"))
                finish_save(run_dir, step)
                _rotate_checkpoints(self, run_dir)
            self.accelerator.wait_for_everyone()

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            model = self.accelerator.unwrap_model(model or self.model)
            load_adapters(model, Path(resume_from_checkpoint) / ADAPTER_WEIGHTS)

        def _load_best_model(self) -> None:
            best = self.state.best_model_checkpoint
            if best:
                load_adapters(self.accelerator.unwrap_model(self.model),
                              Path(best) / ADAPTER_WEIGHTS)

    return MoELoraTrainer


def _rotate_checkpoints(trainer: Any, run_dir: Path) -> None:
    """Trainer's ``save_total_limit`` rotation, on the run folder (Trainer's own ran on the
    saving folder). Checkpoints are ordered by step: their names say it, mtimes need not."""
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # transformers before the function: the method did the same
        trainer._rotate_checkpoints(use_mtime=False, output_dir=str(run_dir))
        return
    rotate_checkpoints(output_dir=str(run_dir), save_total_limit=trainer.args.save_total_limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)


def load_adapters(model: Any, path: Path) -> None:
    """Copy the adapter tensors saved in ``path`` into ``model`` (all of them must be there)."""
    if not path.is_file():
        raise MoEHubError(f"{path.parent} is not a moe-hub training checkpoint (no "
                          f"{ADAPTER_WEIGHTS}): pass a checkpoint-N directory")
    tensors = load_file(path)
    missing = sorted(set(model.adapter_parameter_names()) - set(tensors))
    if missing:
        raise MoEHubError(f"{path} lacks adapter tensor(s) such as {missing[0]}: it belongs to "
                          f"a different model")
    load_full_parameters(model, tensors)  # collective for sharded parameters


def _training_arguments(options: FinetuneOptions, run_dir: Path, has_eval: bool,
                        progress: bool) -> Any:
    from transformers import TrainingArguments

    warmup = options.warmup if options.warmup < 1 else int(options.warmup)
    precision = options.resolved_precision()
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir),
        learning_rate=options.lr,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        warmup_steps=warmup,
        lr_scheduler_type=options.scheduler,
        weight_decay=options.weight_decay,
        seed=options.seed,
        data_seed=options.seed,
        # Trainer's autocast: the expert op computes with 16-bit operands, routers stay fp32.
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=options.logging_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=options.eval_steps or options.save_steps if has_eval else None,
        report_to=options.report_to,
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    # transformers 5.x renamed gradient checkpointing to activation checkpointing.
    known = {f.name for f in fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in known else "gradient"
    kwargs[f"{prefix}_checkpointing"] = options.gradient_checkpointing
    kwargs[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
    kwargs.update(options.training_args)
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise MoEHubError(f"invalid training arguments: {err}") from None


def _resume_point(options: FinetuneOptions, run_dir: Path) -> str | None:
    """The checkpoint-N folder to resume from (None: a fresh run); says which half-written
    newer ones it skips."""
    if not options.resume:
        if checkpoints(run_dir):
            raise MoEHubError(f"{run_dir} holds checkpoints of an earlier run: pass --resume to "
                              f"continue it, or delete the directory to start over")
        return None
    explicit = options.resume if isinstance(options.resume, str) and \
        options.resume not in ("true", "True") else None
    chosen, skipped = choose_resume(run_dir, explicit)
    if chosen is None:
        partial = f" ({', '.join(p.name for p in skipped)} were never finished)" if skipped else ""
        raise MoEHubError(f"nothing to resume: {run_dir} holds no complete checkpoint-N "
                          f"directory{partial}")
    if skipped:
        from rich.console import Console

        Console(stderr=True).print(
            f"skipped {', '.join(p.name for p in skipped)} in {run_dir} (saves interrupted "
            f"before they finished); resuming from {chosen.name}", highlight=False, soft_wrap=True)
    return str(chosen)


def _load_tokenizer(checkpoint: Path, options: FinetuneOptions, config: Any) -> Any:
    from transformers import AutoTokenizer

    source = options.tokenizer or checkpoint
    # The dense config picks the tokenizer class when tokenizer_config.json names none, and
    # keeps transformers from resolving the checkpoint's auto_map (a remote-code prompt).
    extra = {} if options.tokenizer else {"config": config.text_config}
    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise MoEHubError(f"cannot load a tokenizer from {source} ({err.__class__.__name__}): "
                          f"pass --tokenizer NAME_OR_PATH") from None


def _check_token_ids(tokenizer: Any, prepared: Any, config: Any,
                     options: FinetuneOptions) -> None:
    """Every id the training will feed (data and padding) must be a row of the model's
    embedding; otherwise torch fails mid-step with "index out of range in self"."""
    rows = int(config.text_config.vocab_size)
    largest = pad_token_id(tokenizer)
    for split in (prepared.train, prepared.eval):
        if split is not None and len(split):
            largest = max(largest, max(max(ids, default=0) for ids in split["input_ids"]))
    if largest < rows:
        return
    source = f"--tokenizer {options.tokenizer}" if options.tokenizer else "the tokenizer"
    raise MoEHubError(
        f"{source} has {len(tokenizer)} tokens and produced id {largest}, but the model's "
        f"embedding has {rows} rows (vocab_size): use the tokenizer the model was trained with "
        f"(drop --tokenizer, or pass the base model's) or one with at most {rows} tokens"
    )


def finetune(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    options: FinetuneOptions | None = None,
    *,
    config_file: str | os.PathLike | None = None,
    callbacks: list[Any] | None = None,
    progress: bool = True,
    **option_overrides: Any,
) -> dict[str, Any]:
    """Fine-tune the experts and routers of ``checkpoint`` on ``data``; write the result to
    ``output`` and return the final metrics.

    Example::

        from moe_hub import finetune
        finetune("smol-moe", "default", "smol-moe-ft", quantize="nf4", max_steps=100)
    """
    started = time.perf_counter()  # wall_seconds: the whole call, loading and writing included
    if config_file is not None:
        if options is not None:
            raise MoEHubError("pass either options or config_file, not both")
        options = FinetuneOptions.from_file(config_file, **option_overrides)
    elif option_overrides or options is None:
        options = FinetuneOptions.from_dict({**(asdict(options) if options else {}),
                                             **option_overrides})
    options.validate()
    checkpoint = require_checkpoint(checkpoint)
    output = Path(output)
    inputs = _inputs(checkpoint, data, options)
    check_output(output, options.overwrite, inputs, "--output")
    run_dir = Path(options.checkpoint_dir or f"{output}.checkpoints")
    refuse_overlap(run_dir, inputs, "checkpoint_dir")
    ours, final = run_dir.resolve(), output.resolve()
    if ours == final or final in ours.parents or ours in final.parents:
        # Publishing replaces OUT whole and the run folder is removed after it: either would
        # take the other with it.
        raise MoEHubError(f"checkpoint_dir {run_dir} overlaps --output {output}: pass a "
                          f"checkpoint_dir outside it (the default is {output}.checkpoints)")
    # A run folder the user already had is theirs: only this run's checkpoints leave it.
    run_dir_existed = run_dir.exists()
    # One run per checkpoint folder, taken before any work; every process of a distributed run
    # shares the folder, so only the first takes the lock.
    with run_lock(run_dir, output) if _is_first_process() else contextlib.nullcontext():
        if _is_first_process():
            _say_removed(remove_saving_leftovers(run_dir), "half-saved checkpoint folder")
        resume_from = _resume_point(options, run_dir)
        try:
            return _finetune_locked(checkpoint, data, output, options, run_dir, run_dir_existed,
                                    resume_from, callbacks, progress, started)
        except KeyboardInterrupt as interrupt:
            raise _interrupted(interrupt, output, run_dir) from None
        except CheckpointSaveError as err:
            kept = complete_checkpoints(run_dir)
            then = (f"then resume from {kept[0].name} with --resume" if kept else
                    "then run again")
            advice = "free disk space, " if err.storage else "fix that, "
            raise MoEHubError(f"{err}: {output} was not written; {advice}{then}"
                              ) from None


def _is_first_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say_removed(removed: list[Path], what: str) -> None:
    if removed:
        from rich.console import Console

        Console(stderr=True).print(
            f"removed {len(removed)} {what}(s) left by interrupted runs: "
            f"{', '.join(str(p) for p in removed)}", highlight=False, soft_wrap=True)


def _interrupted(interrupt: KeyboardInterrupt, output: Path, run_dir: Path) -> KeyboardInterrupt:
    """The interrupt, told what is on disk: the complete checkpoints a resume can start from."""
    if isinstance(interrupt, Interrupted) or output in published_outputs():
        return interrupt
    kept = complete_checkpoints(run_dir)
    if not kept:
        return interrupt
    names = ", ".join(path.name for path in kept)
    return Interrupted(f"interrupted; {output} was not written, but {run_dir} holds complete "
                       f"checkpoint(s) {names}", resume=f"resume from {kept[0].name}")


def _finetune_locked(checkpoint: Path, data: Any, output: Path, options: FinetuneOptions,
                     run_dir: Path, run_dir_existed: bool, resume_from: str | None,
                     callbacks: list[Any] | None, progress: bool, started: float
                     ) -> dict[str, Any]:
    from .modeling import MoELoraConfig

    config = MoELoraConfig.from_pretrained(checkpoint)
    tokenizer = _load_tokenizer(checkpoint, options, config)
    prepared = prepare_data(
        data, tokenizer, max_length=options.max_length, completion_only=options.completion_only,
        packing=options.packing, eval_data=options.eval_data, eval_split=options.eval_split,
        data_split=options.data_split, seed=options.seed, model_limit=model_max_length(config),
    )
    _check_token_ids(tokenizer, prepared, config, options)
    model = load_for_training(checkpoint, options)
    stats = RoutingStats([site.name for site in model.routing_sites], model.config.num_experts)
    args = _training_arguments(options, run_dir, prepared.eval is not None, progress)
    trainer = _make_trainer_class()(
        model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
        data_collator=PadCollator(pad_token_id(tokenizer)),
        callbacks=callbacks,
        routing_stats=stats,
    )
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteLoss as err:
        kept = complete_checkpoints(run_dir)
        last = kept[0] if kept else None
        kept = (f"the last good checkpoint is {last}: resume from it with a lower --lr"
                if last else "no checkpoint was saved before it")
        raise MoEHubError(f"training stopped: {err}; {output} was not written and {kept}") from None
    metrics: dict[str, Any] = dict(result.metrics)
    if prepared.eval is not None:
        final_eval = [e for e in trainer.state.log_history
                      if "eval_loss" in e and e.get("step") == trainer.state.global_step]
        metrics.update({k: v for k, v in final_eval[-1].items() if k.startswith("eval_")}
                       if final_eval else trainer.evaluate())
    stats.all_reduce()
    first, final = _step_loss(trainer, trainer.first_step_loss), \
        _step_loss(trainer, trainer.last_step_loss)
    metrics.update({
        "global_step": trainer.state.global_step,
        # One step's loss each, not a logging window's mean (a short run has one window).
        "first_loss": first[1] if first else None,
        "first_loss_step": first[0] if first else None,
        "final_loss": final[1] if final else None,
        "final_loss_step": final[0] if final else None,
        "train_rows": prepared.rows,
        "train_examples": len(prepared.train),
        "train_tokens": prepared.tokens,
        "truncated_rows": prepared.truncated,
        "wall_seconds": round(time.perf_counter() - started, 3),
    })
    for entry in reversed(trainer.state.log_history):
        router = {k: v for k, v in entry.items() if k.startswith("router_")}
        if router:
            metrics.update(router)
            break
    trained = trainer.accelerator.unwrap_model(trainer.model)
    adapters = adapter_state(trained)  # every process: gathering sharded adapters is collective
    if trainer.is_world_process_zero():
        _write_output(checkpoint, output, trained, options, data, prepared, metrics, stats,
                      trainer.state.log_history, adapters)
        if not options.keep_checkpoints:
            _remove_run_checkpoints(run_dir, run_dir_existed)
        metrics["output"] = str(output)
        _print_summary(metrics, output, progress)
    trainer.accelerator.wait_for_everyone()
    return metrics


def _step_loss(trainer: Any, record: tuple[int, torch.Tensor] | None
               ) -> tuple[int, float] | None:
    """(step, loss) averaged over the processes, as Trainer's logs average it (every process
    calls this)."""
    if record is None:
        return None
    step, loss = record
    if trainer.args.world_size > 1:
        loss = trainer.accelerator.reduce(loss.clone(), reduction="mean")
    return step, float(loss)


def _inputs(checkpoint: Path, data: Any, options: FinetuneOptions) -> list[tuple[str, Any]]:
    """Everything a run reads that a local OUT could overlap: CKPT, the base an adapter-only
    CKPT loads from, the data and tokenizer (non-paths are skipped by ``check_output``)."""
    from .checkpoint import read_checkpoint_config

    config = read_checkpoint_config(checkpoint)
    inputs: list[tuple[str, Any]] = [("CKPT", checkpoint)]
    if config.get("adapter_only") and isinstance(config.get("base_model_name_or_path"), str):
        inputs.append(("the base of CKPT", config["base_model_name_or_path"]))
    for label, value in (("--data", data), ("--eval-data", options.eval_data),
                         ("--tokenizer", options.tokenizer)):
        if isinstance(value, (str, os.PathLike)):
            inputs.append((label, value))
    return inputs


def _remove_run_checkpoints(run_dir: Path, existed: bool) -> None:
    """Remove the Trainer checkpoints of a finished run: the whole folder when this run made it,
    else only its checkpoint-N folders (and the folder itself once that leaves it empty)."""
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    for child in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if child.is_dir() and not child.is_symlink() and child.name.rpartition("-")[2].isdigit():
            shutil.rmtree(child, ignore_errors=True)
    try:
        run_dir.rmdir()
    except OSError:
        pass  # it holds the user's own files


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the base shards are unchanged: share them instead of copying GBs
    except OSError:
        shutil.copy2(src, dst)


def _write_output(checkpoint: Path, output: Path, model: Any, options: FinetuneOptions,
                  data: Any, prepared: Any, metrics: dict[str, Any], stats: RoutingStats,
                  log_history: list[dict[str, Any]],
                  adapters: dict[str, torch.Tensor] | None = None) -> None:
    from .model_card import write_model_card

    with staging_dir(output) as staging:
        # Only the checkpoint's own files: strays in CKPT (logs, credentials) stay behind.
        for name in checkpoint_files(checkpoint):
            if name not in _REGENERATED and not name.endswith(".py"):
                _link_or_copy(checkpoint / name, staging / name)
        adapters = adapter_state(model) if adapters is None else adapters
        save_file(adapters, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        index_path = checkpoint / INDEX_FILE
        weight_map = json.loads(index_path.read_text())["weight_map"] if index_path.is_file() \
            else {}
        weight_map = {k: v for k, v in weight_map.items() if v != ADAPTER_WEIGHTS}
        weight_map.update(dict.fromkeys(adapters, ADAPTER_WEIGHTS))
        write_index(staging, weight_map)
        config = json.loads((checkpoint / "config.json").read_text())
        config["router_aux_loss_coef"] = model.config.router_aux_loss_coef
        config["router_z_loss_coef"] = model.config.router_z_loss_coef
        config["output_router_logits"] = False
        # The output ships this release's code (copy_code): record it, as convert does.
        from . import __version__
        from .modeling.transformers_compat import TESTED_TRANSFORMERS

        config["moe_hub_version"] = __version__
        config["tested_transformers"] = list(TESTED_TRANSFORMERS)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_code(staging)
        stats_path, _ = stats.write(staging)
        summary = json.loads(stats_path.read_text())
        record = {
            "base_checkpoint": str(checkpoint),
            "data": str(data),
            "data_format": prepared.format,
            "eval_data": options.eval_data,
            "steps": metrics["global_step"],
            "hyperparameters": {
                k: v for k, v in asdict(options).items()
                if k not in ("overwrite", "checkpoint_dir", "keep_checkpoints", "resume")
            } | {"precision": options.resolved_precision()},
            "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
            "expert_load_stats": {k: v for k, v in summary.items() if k != "sites"},
            "log_history": log_history,
        }
        from . import __version__

        record["moe_hub_version"] = __version__
        (staging / TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        write_model_card(staging, repo_id=output.name)
        publish(staging, output, options.overwrite)


def _print_summary(metrics: dict[str, Any], output: Path, progress: bool) -> None:
    from rich.console import Console

    parts = [f"{metrics['global_step']} steps in {metrics['wall_seconds']:.1f}s"]
    if metrics.get("first_loss") is not None:
        parts.append(f"loss {metrics['first_loss']:.4f} (step {metrics['first_loss_step']}) -> "
                     f"{metrics['final_loss']:.4f} (step {metrics['final_loss_step']})")
    if metrics.get("eval_loss") is not None:
        parts.append(f"eval loss {metrics['eval_loss']:.4f}")
    Console(stderr=True, quiet=not progress).print(
        f"[green]fine-tuned[/green] {', '.join(parts)}; wrote {output}", soft_wrap=True)


__all__ = ["QUANTIZATIONS", "TRAIN_CHOICES", "FinetuneOptions", "finetune", "load_for_training",
           "prepare_for_training"]
