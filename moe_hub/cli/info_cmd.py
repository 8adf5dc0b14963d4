"""`moe-hub info PATH`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def info_command(
    path: Annotated[Path, typer.Argument(help="A moe-hub checkpoint directory")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Describe a checkpoint: base, router, experts, parameter counts, file sizes."""
    from moe_hub.info import checkpoint_info, render_info

    info = checkpoint_info(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        render_info(info)
