"""README.md model cards for moe-hub checkpoints.

The card is rendered from ``model_cards/moe_lora.md.jinja`` with huggingface_hub's ``ModelCard``
and is derived entirely from files in the checkpoint directory, so it can be re-rendered at any
time (after fine-tuning, before a push) and always describes what is actually there:

- ``config.json`` (``model_type`` ``moe_lora``): router, experts, LoRA settings, base model.
- ``moe_hub_training.json`` (optional, written by fine-tuning): ``data`` (a string or a dict),
  ``datasets`` (Hub dataset ids), ``steps``, ``hyperparameters`` (dict), ``metrics`` or
  ``final_metrics`` (dict), ``expert_load`` or ``expert_load_stats``.
- ``routing_heatmap.png`` (optional): shown in a Routing section.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .checkpoint import read_checkpoint_config
from .hub_ids import is_hub_id

TRAINING_FILE = "moe_hub_training.json"
HEATMAP_FILE = "routing_heatmap.png"
README_FILE = "README.md"
TEMPLATE_NAME = "moe_lora.md.jinja"

# Config attributes recorded when the base was a GGUF file (see moe_hub/gguf_source.py).
_ORIGIN_KEY = "base_model_origin"
_LICENSE_KEY = "base_model_license"


def looks_like_hub_id(name: str | None) -> bool:
    """True for "owner/name"-shaped strings that are not an existing local path."""
    if not name or name.endswith((".gguf", ".json", ".jsonl", ".csv", ".parquet")):
        return False
    # A Hub id is "name" or "namespace/name"; anything else (paths, .gguf files) is not metadata.
    return is_hub_id(name) and not Path(name).exists()


def license_from_readme(readme: str | os.PathLike | None) -> str | None:
    """The ``license`` field of a README's YAML front matter, or None."""
    if readme is None or not Path(readme).is_file():
        return None
    text = Path(readme).read_text(encoding="utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", text, re.DOTALL)
    if not match:
        return None
    try:
        front = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None


def base_license(base: str | None, revision: str | None = None) -> str | None:
    """License of the base model when it can be known without network traffic: the README of a
    local base folder, or the README of a Hub base already in the local cache."""
    if not base:
        return None
    local = Path(base)
    if local.is_dir():
        return license_from_readme(local / README_FILE)
    if looks_like_hub_id(base):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, README_FILE, revision=revision)
        if isinstance(cached, str):
            return license_from_readme(cached)
    return None


def read_training_record(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(checkpoint_dir) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); re-run fine-tuning or delete it"
        ) from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object; re-run fine-tuning or delete it")
    return record


#: The data name that means moe-hub's shipped set (``moe_hub.data.DEFAULT_DATASET``).
_SHIPPED_DATASET = "default"


def _training_datasets(record: dict[str, Any]) -> list[str]:
    """Hub dataset ids named by a training record (local files are not card metadata)."""
    names: list[str] = []
    declared = record.get("datasets")
    if isinstance(declared, str):
        names.append(declared)
    elif isinstance(declared, list):
        names.extend(str(n) for n in declared)
    data = record.get("data")
    if isinstance(data, dict):
        data = data.get("name") or data.get("dataset") or data.get("path")
    if isinstance(data, str):
        names.append(data)
    unique = []
    for name in names:
        # The shipped set is named like a Hub id but is not one: the Hub would link a data set
        # called "default".
        if name == _SHIPPED_DATASET:
            continue
        if looks_like_hub_id(name) and name not in unique:
            unique.append(name)
    return unique


_SOURCE_KEYS = ("path", "name", "dataset", "file", "data")


def _public_name(value: Any) -> str:
    """A data source as a public card may show it: Hub ids and the shipped set as they are, a
    local file by its name only (its folder says nothing to a reader and may be private)."""
    text = str(value)
    if text == _SHIPPED_DATASET:
        return "`default` (moe-hub's shipped multi-task chat set)"
    if looks_like_hub_id(text) and not Path(text).suffix:
        return f"[`{text}`](https://huggingface.co/datasets/{text})"
    return f"`{Path(text).name}` (local file)"


def _describe_data(data: Any) -> str | None:
    if data is None:
        return None
    if isinstance(data, dict):
        return ", ".join(
            f"{key}: {_public_name(value) if key in _SOURCE_KEYS else f'`{value}`'}"
            for key, value in data.items())
    if isinstance(data, list):
        return ", ".join(_public_name(item) for item in data)
    return _public_name(data)


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits (losses, rates), lists element-wise."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _card_base(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """(Hub id the checkpoint derives from, shown name of its base). A GGUF base derives from
    the model its metadata (or moe-hub's embedded default) names; a local folder is shown by its
    name only."""
    base = config.get("base_model_name_or_path")
    if looks_like_hub_id(base):
        return base, base
    origin = config.get(_ORIGIN_KEY)
    shown = Path(str(base)).name if base else None
    return (origin if looks_like_hub_id(origin) else None), shown


def checkpoint_card_data(
    config: dict[str, Any],
    training: dict[str, Any] | None = None,
    *,
    license: str | None = None,
) -> ModelCardData:
    """Hub metadata for a checkpoint described by ``config`` (and its training record)."""
    hub_base, _ = _card_base(config)
    router = str(config.get("router") or "topk")
    tags = ["moe", "lora", "moe-lora", "moe-hub", router, "custom_code"]
    extra: dict[str, Any] = {}
    if hub_base:
        extra["base_model_relation"] = "adapter" if config.get("adapter_only") else "finetune"
    datasets = _training_datasets(training) if training else []
    return ModelCardData(
        base_model=hub_base,
        library_name="transformers",
        license=license,
        tags=tags,
        datasets=datasets or None,
        pipeline_tag="text-generation",
        **extra,
    )


def render_model_card(
    checkpoint_dir: str | os.PathLike,
    *,
    config: dict[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """Render the card of ``checkpoint_dir``; ``config`` overrides its config.json (used by an
    adapter-only push of a full checkpoint)."""
    path = Path(checkpoint_dir)
    if config is None:
        config = read_checkpoint_config(path)
    training = read_training_record(path)
    base = config.get("base_model_name_or_path")
    revision = config.get("base_model_revision")
    if license is None:
        # A re-render (after fine-tuning, before a push) keeps the license found at conversion.
        license = config.get(_LICENSE_KEY) or base_license(base, revision) \
            or license_from_readme(path / README_FILE)
    card_data = checkpoint_card_data(config, training, license=license)
    text_config = config.get("text_config") or {}
    architectures = text_config.get("architectures") or []
    arch = architectures[0] if architectures else text_config.get("model_type", "dense")
    hub_base, shown_base = _card_base(config)
    base_label = shown_base or "the dense base model"
    base_link = f"https://huggingface.co/{hub_base}" if hub_base else None
    # A GGUF base is a quantised copy of hub_base: name both.
    base_origin = hub_base if hub_base and hub_base != shown_base else None
    repo_id = repo_id or path.resolve().name
    training = training or {}
    template = resources.files("moe_hub.model_cards").joinpath(TEMPLATE_NAME).read_text("utf-8")
    target_modules = config.get("target_modules")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=f"{repo_id.split('/')[-1]}",
        repo_id=repo_id,
        adapter_only=bool(config.get("adapter_only")),
        base_label=base_label,
        base_link=base_link,
        base_origin=base_origin,
        base_revision=revision,
        arch=arch,
        router=config.get("router", "topk"),
        router_config={k: format_value(v) for k, v in (config.get("router_config") or {}).items()},
        num_experts=config.get("num_experts"),
        top_k=config.get("num_experts_per_tok"),
        routing_granularity=config.get("routing_granularity", "linear"),
        lora_rank=config.get("lora_rank"),
        lora_alpha=format_value(config.get("lora_alpha")),
        lora_dropout=format_value(config.get("lora_dropout")),
        target_modules=", ".join(f"`{m}`" for m in target_modules) if target_modules else "default",
        fine_tuned=bool(training),
        data=_describe_data(training.get("data")),
        steps=training.get("steps") or training.get("global_step"),
        hyperparameters=_formatted(training.get("hyperparameters"), drop_paths=True),
        metrics=_formatted(training.get("metrics") or training.get("final_metrics")),
        expert_load=_formatted(training.get("expert_load") or training.get("expert_load_stats")),
        heatmap=HEATMAP_FILE if (path / HEATMAP_FILE).is_file() else None,
        source_adapters=_source_adapters(config),
    )


def _source_adapters(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The PEFT adapters the experts were built from: Hub ids become links, local directories
    appear by name only."""
    rows = []
    for entry in config.get("source_adapters") or []:
        hub_id = entry.get("hub_id")
        rows.append({**entry, "link": f"https://huggingface.co/{hub_id}" if hub_id else None,
                     "targets": ", ".join(f"`{t}`" for t in entry.get("target_modules") or [])})
    return rows


def _formatted(table: dict[str, Any] | None, drop_paths: bool = False) -> dict[str, str]:
    """``table`` with display-ready values; with ``drop_paths`` local paths (eval data, a
    tokenizer folder) are shown by name only."""
    shown = {}
    for key, value in (table or {}).items():
        if value is None:
            continue
        if drop_paths and isinstance(value, str) and (os.sep in value or Path(value).exists()) \
                and not looks_like_hub_id(value):
            value = Path(value).name
        shown[key] = format_value(value)
    return shown


def write_model_card(
    checkpoint_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Render README.md into ``checkpoint_dir`` (replacing any previous card) and return its path.

    ``repo_id`` fills the loading snippets (defaults to the folder name); ``license`` overrides
    the license read from the base model's README.
    """
    path = Path(checkpoint_dir)
    card = render_model_card(path, repo_id=repo_id, license=license)
    target = path / README_FILE
    partial = path / f".{README_FILE}.partial"
    partial.write_text(str(card), encoding="utf-8")
    os.replace(partial, target)
    return target
