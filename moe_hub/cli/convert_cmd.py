"""`moe-hub convert BASE OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console


def parse_router_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["hidden_size=128", "hyper=true"]`` -> ``{"hidden_size": 128, "hyper": True}``."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--router-opt takes KEY=VALUE, got {pair!r}")
        options[key.strip()] = _option_value(value)
    return options


def _option_value(text: str) -> Any:
    """YAML scalar (``true``, ``128``, ``0.5``), plus the numbers YAML 1.1 reads as strings
    (``1e-3``). Whether the value suits the option is checked by the router, which names it."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
    return value


def convert_command(
    base: Annotated[str, typer.Argument(
        help="smollm2 (the embedded SmolLM2-135M-Instruct, downloaded once), a Hub model id, a "
             "local model directory or a .gguf file")],
    out: Annotated[Path, typer.Argument(help="Directory to write the checkpoint to")],
    router: Annotated[str | None, typer.Option(help="topk, rmoe, hypermoe or graphmoe")] = None,
    router_opt: Annotated[list[str] | None, typer.Option(
        "--router-opt", help="Router-specific option KEY=VALUE (repeatable)")] = None,
    hyper: Annotated[bool | None, typer.Option(
        "--hyper", help="Add HyperMoE's module built from the unselected experts")] = None,
    experts: Annotated[int | None, typer.Option(
        help="Experts per routing site [8; with --from-adapters one per adapter]")] = None,
    top_k: Annotated[int | None, typer.Option(help="Experts per token [2]")] = None,
    rank: Annotated[int | None, typer.Option(
        help="LoRA rank of each expert [16; with --from-adapters the largest adapter rank]")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha [2 * rank]")] = None,
    dropout: Annotated[float | None, typer.Option(help="LoRA dropout [0.05]")] = None,
    targets: Annotated[str | None, typer.Option(
        help="Comma-separated module names or re:<regex> [every linear in the decoder layers]")
    ] = None,
    granularity: Annotated[str | None, typer.Option(
        help="linear (a router per targeted linear) or block (MixLoRA: a router per MLP)")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="auto (keep), float32, bfloat16 or float16 for the base weights")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the expert/router init [0]")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of BASE")] = None,
    allow_pickle: Annotated[bool | None, typer.Option(
        "--allow-pickle", help="Accept pickle (.bin) base weights")] = None,
    trust_remote_code: Annotated[bool | None, typer.Option(
        "--trust-remote-code", help="Run Python code that BASE ships (its config.json auto_map); "
                                    "without it such a base is refused")] = None,
    adapter_only: Annotated[bool | None, typer.Option(
        "--adapter-only", help="Store experts + routers only; the base loads from BASE")] = None,
    overwrite: Annotated[bool | None, typer.Option(
        "--overwrite", help="Replace OUT if it is a moe-hub checkpoint or an empty folder")] = None,
    from_adapters: Annotated[str | None, typer.Option(
        help="Comma-separated PEFT LoRA adapters (directories or Hub ids) trained on BASE: "
             "adapter i becomes expert i")] = None,
    skip_adapter_base_check: Annotated[bool, typer.Option(
        "--skip-adapter-base-check",
        help="Accept adapters whose base_model_name_or_path names another model")] = False,
    config: Annotated[Path | None, typer.Option(
        help="YAML or JSON file with any of these options (flags win)")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Convert a dense causal LM into a MoE-LoRA checkpoint that loads with
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)."""
    from moe_hub.convert import ConvertOptions, convert

    given = {
        "router": router, "experts": experts, "top_k": top_k, "rank": rank, "alpha": alpha,
        "dropout": dropout, "granularity": granularity, "dtype": dtype, "seed": seed,
        "revision": revision, "allow_pickle": allow_pickle, "adapter_only": adapter_only,
        "trust_remote_code": trust_remote_code,
        "overwrite": overwrite,
        "targets": [t.strip() for t in targets.split(",") if t.strip()] if targets else None,
        "from_adapters": [a.strip() for a in from_adapters.split(",") if a.strip()]
        if from_adapters else None,
        "check_adapter_base": False if skip_adapter_base_check else None,
    }
    given = {key: value for key, value in given.items() if value is not None}
    router_config = parse_router_options(router_opt)
    if hyper:
        router_config["hyper"] = True
    options = ConvertOptions.from_file(config) if config else ConvertOptions()
    if router_config:
        given["router_config"] = {**options.router_config, **router_config}
    options = ConvertOptions(**{**options.__dict__, **given})
    path = convert(base, out, options, progress=progress)
    Console(stderr=True).print(f"[green]wrote[/green] {path}")
    from moe_hub.info import checkpoint_info, render_info

    render_info(checkpoint_info(path))
