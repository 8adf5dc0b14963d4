"""`moe-hub export CKPT OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def export_command(
    checkpoint: Annotated[Path, typer.Argument(
        help="A moe-hub checkpoint, folder or Hub repo id (block granularity, topk router)")],
    out: Annotated[Path, typer.Argument(help="Directory to write the native MoE model to")],
    dtype: Annotated[str | None, typer.Option(
        help="float32, bfloat16 or float16 for the weights [the base's dtype]")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT if it is an earlier export or an empty folder")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Export a block-routed top-k checkpoint as a native Mixtral / Qwen2-MoE / Qwen3-MoE model
    that loads with AutoModelForCausalLM.from_pretrained(OUT), no trust_remote_code."""
    from moe_hub.export import export

    summary = export(checkpoint, out, dtype=dtype, overwrite=overwrite, progress=progress)
    Console(stderr=True).print(f"[green]wrote[/green] {summary.out}: {summary.line()}")
