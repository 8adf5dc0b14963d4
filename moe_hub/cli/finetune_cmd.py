"""`moe-hub finetune CKPT --data DATA --output OUT`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def finetune_command(
    checkpoint: Annotated[Path, typer.Argument(help="A moe-hub checkpoint directory")],
    out: Annotated[Path, typer.Option(
        "--output", "-o", help="Directory to write the fine-tuned checkpoint to")],
    data: Annotated[str, typer.Option(
        help="Training data: .jsonl/.json/.csv/.parquet file, Hub dataset id, or 'default' (the "
             "shipped multi-task chat set)")] = "default",
    quantize: Annotated[str | None, typer.Option(help="nf4, fp4, int8 or none [nf4]")] = None,
    train: Annotated[str | None, typer.Option(
        help="What to train: all, experts, or routers (e.g. routing over frozen adapters) [all]")
    ] = None,
    double_quant: Annotated[bool | None, typer.Option(
        help="Quantize the 4-bit quantization constants too [on]")] = None,
    compute_dtype: Annotated[str | None, typer.Option(
        help="Base / bitsandbytes compute dtype: auto, float32, bfloat16 or float16 [auto: "
             "follows the precision]")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Separate evaluation data")] = None,
    eval_split: Annotated[float | None, typer.Option(
        help="Fraction of DATA held out for evaluation [0]")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per example [512]")] = None,
    packing: Annotated[bool | None, typer.Option(help="Pack examples into full rows")] = None,
    completion_only: Annotated[bool | None, typer.Option(
        help="Loss on completions / assistant turns only [on]")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate [2e-4]")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs [1]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N steps (wins over epochs)")
                         ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-device batch size [4]")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps [1]")] = None,
    warmup: Annotated[float | None, typer.Option(
        help="Warm-up: fraction of steps (< 1) or step count [0.03]")] = None,
    scheduler: Annotated[str | None, typer.Option(help="LR scheduler [cosine]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [0]")] = None,
    bf16: Annotated[bool | None, typer.Option(
        "--bf16", help="bfloat16 mixed precision [default on a GPU that supports it]")] = None,
    fp16: Annotated[bool | None, typer.Option(
        "--fp16", help="float16 mixed precision [default on other CUDA GPUs]")] = None,
    fp32: Annotated[bool | None, typer.Option(
        "--fp32", help="float32 throughout [default on a CPU]")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing", help="Recompute activations in backward")] = None,
    logging_steps: Annotated[int | None, typer.Option(help="Log every N steps [10]")] = None,
    eval_steps: Annotated[int | None, typer.Option(help="Evaluate every N steps")] = None,
    save_steps: Annotated[int | None, typer.Option(help="Checkpoint every N steps [200]")] = None,
    report_to: Annotated[str | None, typer.Option(help="none, tensorboard, wandb, ...")] = None,
    aux_loss_coef: Annotated[float | None, typer.Option(
        help="Load-balancing loss weight [checkpoint's]")] = None,
    z_loss_coef: Annotated[float | None, typer.Option(
        help="Router z-loss weight [checkpoint's]")] = None,
    resume: Annotated[bool | None, typer.Option(
        "--resume", help="Continue from the last checkpoint in OUT.checkpoints")] = None,
    resume_from: Annotated[Path | None, typer.Option(
        help="Continue from this checkpoint-N directory")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="Tokenizer name or path [the checkpoint's]")] = None,
    overwrite: Annotated[bool | None, typer.Option(
        "--overwrite", help="Replace OUT if it is a moe-hub checkpoint or an empty folder")] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML/JSON file with these options or any TrainingArguments field (flags win)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress and logs")] = True,
) -> None:
    """Fine-tune the experts and routers of a checkpoint on a quantized base; the result keeps
    the base in its original precision."""
    from moe_hub.finetune import FinetuneOptions, finetune

    given: dict[str, Any] = {
        "quantize": quantize, "train": train, "double_quant": double_quant,
        "compute_dtype": compute_dtype,
        "eval_data": eval_data, "eval_split": eval_split, "max_length": max_length,
        "packing": packing, "completion_only": completion_only, "lr": lr, "epochs": epochs,
        "max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum,
        "warmup": warmup, "scheduler": scheduler, "seed": seed,
        "bf16": bf16, "fp16": fp16, "fp32": fp32,
        "gradient_checkpointing": gradient_checkpointing, "logging_steps": logging_steps,
        "eval_steps": eval_steps, "save_steps": save_steps, "report_to": report_to,
        "aux_loss_coef": aux_loss_coef, "z_loss_coef": z_loss_coef, "resume": resume,
        "tokenizer": tokenizer, "overwrite": overwrite,
    }
    if resume_from is not None:
        given["resume"] = str(resume_from)
    given = {key: value for key, value in given.items() if value is not None}
    options = FinetuneOptions.from_file(config, **given) if config else \
        FinetuneOptions.from_dict(given)
    from moe_hub.progress import third_party_progress

    with third_party_progress(progress, data=True):
        metrics = finetune(checkpoint, data, out, options, progress=progress)
    from moe_hub.distributed import is_main_process

    if not progress and is_main_process():  # one report per run, not one per process
        typer.echo(json.dumps({k: v for k, v in metrics.items()
                               if isinstance(v, int | float | str)}, indent=2))
