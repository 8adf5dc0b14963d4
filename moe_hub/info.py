"""What a checkpoint is, read from its config and file headers (no weights are loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import ADAPTER_WEIGHTS, require_checkpoint


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Base, routing setup, parameter counts (total / trainable / added) and file sizes."""
    from .modeling import MoELoraConfig
    from .skeleton import model_skeleton

    path = require_checkpoint(path)
    config = MoELoraConfig.from_pretrained(path)
    model = model_skeleton(config)
    adapter_names = set(model.adapter_parameter_names())
    total = sum(p.numel() for p in model.parameters())  # tied parameters are counted once
    added = sum(p.numel() for n, p in model.named_parameters() if n in adapter_names)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    adapter_bytes = files.get(ADAPTER_WEIGHTS, 0)
    base_bytes = sum(size for name, size in files.items()
                     if name.endswith(".safetensors") and name != ADAPTER_WEIGHTS)
    return {
        "path": str(path),
        "base": config.base_model_name_or_path,
        "base_revision": config.base_model_revision,
        "architecture": config.text_config.model_type,
        "format": "adapter-only" if config.adapter_only else "full",
        "router": config.router,
        "router_config": config.router_config,
        "granularity": config.routing_granularity,
        "experts": config.num_experts,
        "top_k": config.num_experts_per_tok,
        "rank": config.lora_rank,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": config.target_modules or sorted({s.kind for s in model.routing_sites}),
        "routing_sites": len(model.routing_sites),
        "router_steps": _router_steps(config, model.routing_sites),
        "parameters": {"total": total, "trainable": added, "added": added,
                       "base": total - added},
        "bytes": {"base_weights": base_bytes, "adapters": adapter_bytes,
                  "full_checkpoint_estimate": base_bytes + adapter_bytes if base_bytes else None,
                  "all_files": sum(files.values())},
        "files": files,
        "fine_tuned": (path / "moe_hub_training.json").is_file(),
    }


def _router_steps(config: Any, sites: list) -> str | None:
    """GraphMoE: which sites refine over several steps and which run one (others: None)."""
    if config.router != "graphmoe":
        return None
    from .modeling.router_graphmoe import steps_summary

    return steps_summary(config, sites)


def _size(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1024
    return str(num)


def render_info(info: dict[str, Any]) -> None:
    """Print ``checkpoint_info`` as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=info["path"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    params = info["parameters"]
    rows = [
        ("base", f"{info['base']}" + (f" @ {info['base_revision']}" if info["base_revision"]
                                       else "")),
        ("architecture", info["architecture"]),
        ("format", info["format"]),
        ("router", f"{info['router']} {json.dumps(info['router_config'])}"
         if info["router_config"] else info["router"]),
        ("granularity", info["granularity"]),
        ("experts / top-k", f"{info['experts']} / {info['top_k']}"),
        ("rank / alpha / dropout", f"{info['rank']} / {info['alpha']:g} / {info['dropout']:g}"),
        ("targets", ", ".join(info["targets"])),
        ("routing sites", str(info["routing_sites"])),
        *([("graphmoe steps", info["router_steps"])] if info.get("router_steps") else []),
        ("parameters", f"total {params['total']:,}  trainable {params['trainable']:,}  added "
                       f"{params['added']:,} ({100 * params['added'] / params['total']:.2f}%)"),
        ("base weights", _size(info["bytes"]["base_weights"])),
        ("adapters", _size(info["bytes"]["adapters"])),
        ("all files", _size(info["bytes"]["all_files"])),
        ("fine-tuned", "yes" if info["fine_tuned"] else "no"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
