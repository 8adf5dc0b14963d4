"""moe-hub: dense Hugging Face models into Mixture-of-LoRA-Experts models.

The public functions behind the CLI, importable on their own::

    from moe_hub import convert, finetune, push, checkpoint_info
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use: `import moe_hub` stays cheap and each command pulls only what it needs.
_LAZY = {
    "convert": "moe_hub.convert",
    "ConvertOptions": "moe_hub.convert",
    "checkpoint_info": "moe_hub.info",
    "finetune": "moe_hub.finetune",
    "push": "moe_hub.hub",
    "MoELoraConfig": "moe_hub.modeling",
    "MoELoraForCausalLM": "moe_hub.modeling",
    "MoELoraModel": "moe_hub.modeling",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_hub' has no attribute {name!r}")
