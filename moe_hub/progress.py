"""Switching off the progress bars of the libraries moe-hub drives (``--no-progress``)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# moe-hub's own bars (writing shards, baking experts) are huggingface_hub's tqdm: the style of
# the other bars a run shows (downloads, the GGUF reader, the Trainer), one switch for them all.
from huggingface_hub.utils import tqdm as hub_tqdm


@contextmanager
def third_party_progress(enabled: bool, *, data: bool = False) -> Iterator[None]:
    """While active and not ``enabled``, hide the bars of transformers (weight loading),
    huggingface_hub (downloads), transformers' GGUF reader and, with ``data``, datasets
    (loading, map); the previous settings come back on exit. ``data`` is for steps that load
    data: importing datasets costs ~90 MB of memory, which conversion must not spend."""
    if enabled:
        yield
        return
    import huggingface_hub.utils as hub
    from transformers.utils import logging as tf_logging

    restore = []
    if tf_logging.is_progress_bar_enabled():
        tf_logging.disable_progress_bar()
        restore.append(tf_logging.enable_progress_bar)
    if not hub.are_progress_bars_disabled():
        hub.disable_progress_bars()
        restore.append(hub.enable_progress_bars)
    if data:
        import datasets
    if data and datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        restore.append(datasets.enable_progress_bars)
    try:
        # The GGUF reader calls tqdm.auto directly, outside transformers' switch.
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    if gguf_utils is not None and hasattr(gguf_utils, "tqdm"):
        original = gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(original, disable=True)
        restore.append(lambda: setattr(gguf_utils, "tqdm", original))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


@contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' own bars (weight loading, shard writing) off while active: for a stage whose
    progress another bar already shows."""
    from transformers.utils import logging as tf_logging

    enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            tf_logging.enable_progress_bar()


def quiet_library_notices() -> None:
    """Hide library notices that ask a user for something irrelevant to moe-hub: bitsandbytes'
    advice to install the Hub ``kernels`` package (its CPU fallback is what runs here),
    DeepSpeed's notice that it falls back to the CPU (on stdout), and
    transformers' per-step notices that the base model's ``past_key_values`` argument is being
    renamed to ``cache`` (a notice for the model code, not for the person running a command)."""
    import logging
    import warnings

    # Only that message: it names a Hub kernel package, and bitsandbytes logs it at import.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_advice)
    # DeepSpeed (imported by accelerate/transformers wherever it is installed) logs its CPU
    # fallback to stdout, where `finetune --no-progress` writes its JSON report.
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: "Setting accelerator to CPU" not in record.getMessage())
    # Both the rename notice and the "both names set" notice, which prints the whole cache.
    warnings.filterwarnings("ignore", message=r".*`past_key_values`", category=FutureWarning)
    logging.getLogger("transformers.utils.generic").addFilter(
        lambda record: "are deprecated. Use `cache` instead" not in record.getMessage())


def _not_the_kernels_advice(record: Any) -> bool:
    return "Failed to load CPU gemm_4bit_forward from kernels-community" not in record.getMessage()


__all__ = ["hub_tqdm", "quiet_library_notices", "third_party_progress", "transformers_bars_off"]
