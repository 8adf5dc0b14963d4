"""Every use of transformers internals by the code a checkpoint ships, in one place.

A checkpoint pushed today is loaded with transformers releases that do not exist yet, so each
internal is reached through a guard here: where an internal is missing or has changed, either a
fallback that is right does the job, or loading stops with one line that names the transformers
versions this code was tested with (recorded in the checkpoint's config.json at convert time as
``tested_transformers``). Everything else in the shipped files uses public API only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable
from typing import Any

import transformers

#: The transformers releases this code was tested with: the lowest pyproject allows and the one
#: ``constraints/test.txt`` pins (``scripts/test.sh --oldest`` / the pinned run check both ends).
TESTED_TRANSFORMERS = ("5.23.0", "5.25.0")


class TransformersChanged(RuntimeError):
    """A transformers internal this checkpoint's code relies on is missing or has changed."""


def tested_range(config: Any = None) -> tuple[str, str]:
    """The tested range recorded in ``config`` (set at convert time), else this code's own."""
    recorded = getattr(config, "tested_transformers", None)
    if isinstance(recorded, (list, tuple)) and len(recorded) == 2:
        return str(recorded[0]), str(recorded[1])
    return TESTED_TRANSFORMERS


def changed(what: str, config: Any = None) -> TransformersChanged:
    low, high = tested_range(config)
    return TransformersChanged(
        f"transformers {transformers.__version__} changed {what}, which this checkpoint's code "
        f"uses; it was tested with transformers {low} to {high}: install "
        f"'transformers>={low},<={high}' or re-save the checkpoint with a newer moe-hub"
    )


def init_guard(config: Any = None) -> contextlib.AbstractContextManager:
    """transformers' guard that makes torch's init functions skip tensors already loaded from a
    checkpoint. Without it, re-initialising the adapters after loading would overwrite the loaded
    experts and routers, so its absence is an error, never a silent fallback."""
    try:
        from transformers.initialization import guard_torch_init_functions
    except ImportError as error:
        raise changed("transformers.initialization.guard_torch_init_functions", config) from error
    return guard_torch_init_functions()


def no_init_weights() -> contextlib.AbstractContextManager:
    """Skip weight initialisation while building a throw-away model; only ever used on the meta
    device, where initialising costs nothing, so a plain context is a right fallback."""
    try:
        from transformers.initialization import no_init_weights as skip
    except ImportError:
        return contextlib.nullcontext()
    return skip()


def filter_loading_report(result: Any, args: tuple, *, drop_missing: Iterable[str] = (),
                          drop_unexpected_prefix: str | None = None) -> Any:
    """Remove the keys this model accounts for itself from transformers' loading report, as
    ``PreTrainedModel._adjust_missing_and_unexpected_keys`` (private) takes and returns it: since
    5.x-late a report object changed in place (returns None), in 5.0 the (missing, unexpected)
    pair, returned. The report only feeds warnings and ``output_loading_info``, so one of another
    shape is passed through unchanged (more warnings, same model)."""
    drop = set(drop_missing)

    def missing(keys: Any) -> Any:
        return type(keys)(k for k in keys if k not in drop) if drop else keys

    def unexpected(keys: Any) -> Any:
        if not drop_unexpected_prefix:
            return keys
        return type(keys)(k for k in keys if not k.startswith(drop_unexpected_prefix))

    if isinstance(result, tuple) and len(result) == 2:
        return missing(result[0]), unexpected(result[1])
    report = args[0] if result is None and args else None
    if isinstance(getattr(report, "missing_keys", None), (set, list)):
        report.missing_keys = missing(report.missing_keys)
    if isinstance(getattr(report, "unexpected_keys", None), (set, list)):
        report.unexpected_keys = unexpected(report.unexpected_keys)
    return result


def reported_missing_keys(result: Any, args: tuple) -> Collection[str] | None:
    """The missing keys of transformers' loading report as ``filter_loading_report`` saw it
    (both shapes of the private hook), None for a report of another shape: the caller's check
    is then skipped, as the report gives no reliable answer."""
    if isinstance(result, tuple) and len(result) == 2:
        keys = result[0]
    else:
        report = args[0] if result is None and args else None
        keys = getattr(report, "missing_keys", None)
    return keys if isinstance(keys, (set, list, tuple, frozenset)) else None


def forget_key_mapping(model: Any, key_mapping: dict[str, str], config: Any = None) -> None:
    """Make ``save_pretrained`` write this model's names rather than map ``key_mapping``'s
    renamings back to the names they were loaded from. transformers keeps the loading's renamings
    on the model (``_weight_conversions``) to reverse them on save; a model without that list is
    saved under its module names, which is what it must write."""
    conversions = getattr(model, "_weight_conversions", None)
    if not key_mapping or not conversions:
        return
    kept = []
    for conversion in conversions:
        sources = getattr(conversion, "_original_source_patterns", None)
        if sources is None:
            sources = getattr(conversion, "source_patterns", None)
        if sources is None:
            raise changed("the weight conversions kept by from_pretrained (_weight_conversions)",
                          config)
        if not set(sources) & set(key_mapping):
            kept.append(conversion)
    model._weight_conversions = kept


def conversion_rules(dense: Any) -> tuple[list, list, Any]:
    """(renamings, converters, rename function) of the installed transformers' conversion
    mapping for ``dense``: the rules by which ``from_pretrained`` reads a checkpoint's keys
    (GPT-NeoX's ``embed_out`` is ``lm_head``, legacy LayerNorm ``gamma`` is ``weight``, MoE
    experts stored one by one are stacked). The dense model is not registered in a moe-hub
    model, so transformers would not apply them: adapter-only loading and conversion both ask
    here. Empty rules and no function for a transformers without that API."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return [], [], None
    rules = get_model_conversion_mapping(dense)
    return ([r for r in rules if isinstance(r, WeightRenaming)],
            [r for r in rules if isinstance(r, WeightConverter)], rename_source_key)


def dense_names_of_keys(dense: Any, keys: list[str], known: Collection[str],
                        config: Any = None) -> dict[str, str]:
    """Checkpoint key -> the dense model's name for it under the installed transformers' renaming
    rules (``conversion_rules``).

    Without the rules' API, a key is taken as its own name; a key that then is none of the
    ``known`` dense names (one a rule would have renamed) stops loading with the tested range.
    """
    try:
        renamings, _, rename = conversion_rules(dense)
        if rename is None:
            unknown = next((key for key in keys if key not in known), None)
            if unknown is not None:
                raise changed(f"the renaming of checkpoint keys such as {unknown!r}", config)
            return {key: key for key in keys}
        state = dict.fromkeys(dense.state_dict())
        return {key: rename(key, renamings, [], dense.base_model_prefix, state)[0]
                for key in keys}
    except (TypeError, AttributeError) as error:
        raise changed("transformers.core_model_loading.rename_source_key", config) from error


def optional_file(repo: str, filename: str, **kwargs: Any) -> str | None:
    """Local path of ``filename`` in ``repo`` (a folder or a Hub repo), None if it has no such
    file; network and permission errors propagate."""
    from transformers.utils import cached_file

    try:
        return cached_file(repo, filename, _raise_exceptions_for_missing_entries=False, **kwargs)
    except TypeError:  # the private switch is gone: ask huggingface_hub directly
        pass
    import os

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if os.path.isdir(repo):
        path = os.path.join(repo, kwargs.get("subfolder") or "", filename)
        return path if os.path.isfile(path) else None
    hub = {k: v for k, v in kwargs.items()
           if k in ("revision", "cache_dir", "force_download", "local_files_only", "token",
                    "subfolder")}
    try:
        return hf_hub_download(repo, filename, **hub)
    except EntryNotFoundError:
        return None
