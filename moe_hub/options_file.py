"""Option files (YAML or JSON) for `convert --config` and `finetune --config`, and the number
check both commands' options share."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from .errors import MoEHubError


def read_options_file(path: Path) -> dict[str, Any]:
    """The mapping of option names to values in ``path`` (``.json``, else YAML)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise MoEHubError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text) or {}
    except (ValueError, yaml.YAMLError) as err:
        first_line = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise MoEHubError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{first_line}") from None
    if not isinstance(data, dict):
        raise MoEHubError(f"{path} must hold a mapping of option names to values")
    return data


def is_finite_number(value: Any) -> bool:
    """A finite int or float. NaN passes every comparison and bools are ints to Python, so range
    checks on options start here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)
