"""Where a GGUF base comes from, for the model card's ``base_model`` and ``license`` metadata.

A GGUF file is a quantised copy of some model; the Hub links a derived model to the original
repository, not to a local file. GGUF metadata may name it (``general.source.*`` for a converted
model, ``general.base_model.0.*`` for a fine-tune) and may carry ``general.license``; for the
embedded default the origin is known.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: Config attributes written at conversion (read by the model card).
ORIGIN_KEY = "base_model_origin"
LICENSE_KEY = "base_model_license"

_HF_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+)/?$")


def _read_fields(path: Path) -> dict[str, Any]:
    """The ``general.*`` string fields of a GGUF header ({} when the file cannot be parsed)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception:  # an unreadable header is reported when transformers reads the file
        return {}
    values = {}
    for name, field in reader.fields.items():
        if not name.startswith("general."):
            continue
        try:
            value = field.contents()
        except Exception:
            continue
        if isinstance(value, str):
            values[name] = value
    return values


def _hub_repo(fields: dict[str, str], prefix: str) -> str | None:
    """An "owner/name" from ``<prefix>.repo_url`` or ``<prefix>.huggingface.repository``."""
    repository = fields.get(f"{prefix}.huggingface.repository")
    if repository and re.fullmatch(r"[\w.-]+/[\w.-]+", repository):
        return repository
    match = _HF_URL.match(fields.get(f"{prefix}.repo_url") or fields.get(f"{prefix}.url") or "")
    return match.group(1) if match else None


def gguf_provenance(path: Path, default_model: bool = False) -> dict[str, str]:
    """``{ORIGIN_KEY: hub id, LICENSE_KEY: license}``, each only when known."""
    fields = _read_fields(path)
    origin = _hub_repo(fields, "general.source") or _hub_repo(fields, "general.base_model.0")
    license_ = fields.get("general.license")
    if default_model:
        from .default_model import DEFAULT_LICENSE, DEFAULT_ORIGIN

        origin, license_ = origin or DEFAULT_ORIGIN, license_ or DEFAULT_LICENSE
    found = {ORIGIN_KEY: origin, LICENSE_KEY: license_}
    return {key: value for key, value in found.items() if value}


__all__ = ["LICENSE_KEY", "ORIGIN_KEY", "gguf_provenance"]
