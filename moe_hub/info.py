"""What a checkpoint is, read from its config and file headers (no weights are loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import ADAPTER_WEIGHTS, require_checkpoint
from .errors import MoEHubError
from .modeling.modeling_moe_lora import _legacy_key_mapping
from .safetensors_io import read_header, tensor_names


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Base, routing setup, parameter counts (total / trainable / added) and file sizes."""
    from .modeling import MoELoraConfig
    from .skeleton import model_skeleton

    path = require_checkpoint(path)
    config = MoELoraConfig.from_pretrained(path)
    # Read before the skeleton is built: building one marks the config as the current layout.
    legacy = _legacy_key_mapping(config)
    model = model_skeleton(config)
    adapter_names = set(model.adapter_parameter_names())
    tied = set(model.tied_parameter_names())
    # The meta skeleton holds a tied head as its own parameter: count it once, as loading does.
    total = sum(p.numel() for n, p in model.named_parameters() if n not in tied)
    added = sum(p.numel() for n, p in model.named_parameters() if n in adapter_names)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    tensors = _stored_tensors(path, adapter_names)
    _check_loadable(path, model, tensors, legacy)
    adapter_bytes = sum(t.nbytes for t in tensors if t.adapter)
    base_bytes = sum(t.nbytes for t in tensors if not t.adapter)
    return {
        "path": str(path),
        "base": config.base_model_name_or_path,
        "base_revision": config.base_model_revision,
        # The Hub model a GGUF base was made from, when conversion could tell.
        "base_origin": getattr(config, "base_model_origin", None),
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
        "fine_tuned": (path / "moe_hub_training.json").is_file() or _experts_trained(path,
                                                                                     tensors),
    }


def _router_steps(config: Any, sites: list) -> str | None:
    """GraphMoE: which sites refine over several steps and which run one (others: None)."""
    if config.router != "graphmoe":
        return None
    from .modeling.router_graphmoe import steps_summary

    return steps_summary(config, sites)


@dataclass(frozen=True)
class _StoredTensor:
    name: str
    file: Path
    nbytes: int
    adapter: bool
    shape: tuple[int, ...]


def _stored_tensors(path: Path, adapter_names: set[str]) -> list[_StoredTensor]:
    """Every tensor in the folder's safetensors files, from their headers, whatever the file
    layout (moe-hub's split files, or one file written by ``save_pretrained`` after a Trainer
    run); a tensor is an adapter when the model names it one or it sits in the adapter file."""
    found = []
    for file in sorted(path.glob("*.safetensors")):
        header, _ = read_header(file)
        for name in tensor_names(header):
            begin, end = header[name]["data_offsets"]
            adapter = name in adapter_names or file.name == ADAPTER_WEIGHTS
            found.append(_StoredTensor(name, file, end - begin, adapter,
                                       tuple(header[name]["shape"])))
    return found


def _check_loadable(path: Path, model: Any, tensors: list[_StoredTensor],
                    legacy: dict[str, str]) -> None:
    """Raise when loading would fail or fill weights at random (a missing adapter file, shapes
    that disagree with config.json): the counts info prints are the config's, and would
    describe a model this folder cannot give."""
    from .modeling.modeling_moe_lora import _rename

    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = set(model.adapter_parameter_names())
    if not model.config.adapter_only:  # an adapter-only base is checked where it is loaded
        wanted |= set(params) - set(model.tied_parameter_names())
    stored = {_rename(t.name, legacy): t for t in tensors}
    missing = sorted(wanted - stored.keys())
    if missing:
        hint = "" if (path / ADAPTER_WEIGHTS).is_file() else f"; it has no {ADAPTER_WEIGHTS}"
        raise MoEHubError(f"{path} cannot load: it lacks {len(missing)} of the model's tensors "
                          f"(e.g. {missing[0]}){hint}; re-create it with `moe-hub convert`")
    for name in sorted(wanted):
        found, expected = stored[name].shape, tuple(params[name].shape)
        if found != expected:
            raise MoEHubError(
                f"{path} cannot load: {name} has shape {list(found)} in "
                f"{stored[name].file.name} but config.json makes it {list(expected)}; restore "
                f"the config.json that was written with these weights")


def _experts_trained(path: Path, tensors: list[_StoredTensor]) -> bool:
    """True when some expert's B is non-zero: conversion writes every B as zeros, so any other
    value means training (by moe-hub or by the user's own loop) changed the experts."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for tensor in tensors:
        if tensor.adapter and tensor.name.rpartition(".")[2].startswith("lora_B"):
            by_file.setdefault(tensor.file, []).append(tensor.name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            if any(bool(handle.get_tensor(name).any()) for name in names):
                return True
    return False


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
    base = max(params["base"], 1)
    rows = [
        ("base", f"{info['base']}" + (f" @ {info['base_revision']}" if info["base_revision"]
                                       else "")
         + (f" (a GGUF of {info['base_origin']})" if info.get("base_origin") else "")),
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
                       f"{params['added']:,} (+{100 * params['added'] / base:.2f}% of the "
                       f"base's {params['base']:,})"),
        ("base weights", _size(info["bytes"]["base_weights"])),
        ("adapters", _size(info["bytes"]["adapters"])),
        ("all files", _size(info["bytes"]["all_files"])),
        ("fine-tuned", "yes" if info["fine_tuned"] else "no"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
