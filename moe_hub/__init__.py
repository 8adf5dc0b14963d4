"""moe-hub: dense Hugging Face models into Mixture-of-LoRA-Experts models.

The public functions behind the CLI, importable on their own::

    from moe_hub import convert, finetune, export, push, checkpoint_info
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# Imported on first use: `import moe_hub` stays cheap and each command pulls only what it needs.
_LAZY = {
    "convert": "moe_hub.convert",
    "ConvertOptions": "moe_hub.convert",
    "checkpoint_info": "moe_hub.info",
    "export": "moe_hub.export",
    "finetune": "moe_hub.finetune",
    "FinetuneOptions": "moe_hub.finetune",
    "push": "moe_hub.hub",
    "MoELoraConfig": "moe_hub.modeling",
    "MoELoraForCausalLM": "moe_hub.modeling",
    "MoELoraModel": "moe_hub.modeling",
}

# Public functions that share their name with the submodule defining them.
_SHADOWED = {name for name, module in _LAZY.items() if module == f"{__name__}.{name}"}

__all__ = [*_LAZY, "__version__"]


class _Package(types.ModuleType):
    """The package module. Importing ``moe_hub.convert`` makes Python bind the *submodule* as the
    package attribute ``convert``, after which ``from moe_hub import convert`` would return the
    module instead of the function; bind the function in its place (``from moe_hub.convert
    import ...`` and ``importlib.import_module`` go through ``sys.modules`` and are unaffected)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (name in _SHADOWED and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}" and hasattr(value, name)):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_hub' has no attribute {name!r}")
