"""Which tensor of a dense checkpoint becomes which tensor of the converted model.

transformers does not always store a weight under its module-tree name: GPT-NeoX keeps its head
as ``embed_out.*`` on disk and ``lm_head`` in the model, old checkpoints name LayerNorm weights
``gamma``/``beta``, and MoE models store per-expert tensors that the model holds stacked. The
installed transformers knows these rules (``transformers.conversion_mapping``); this module asks
it rather than keeping a list of its own, so a base converts exactly as ``from_pretrained`` would
load it.

A checkpoint name that a rule only renames keeps its bytes: the shard rewrite streams them under
the model's name. A name that a rule transforms (split, merged, transposed ...) is loaded,
converted by transformers' own operation and written, one target tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MoEHubError
from .modeling.transformers_compat import conversion_rules


@dataclass
class ConvertedTensor:
    """One target of a value-changing rule: the rule (transformers' ``WeightConverter``, holding
    loaders of its source tensors) and the checkpoint names it reads."""

    converter: Any
    dense_name: str
    sources: list[str] = field(default_factory=list)


@dataclass
class NamePlan:
    """renames: checkpoint name -> model name, bytes unchanged. converted: dense module name of
    a transformed target -> how to compute it. files: checkpoint name -> the shard holding it."""

    renames: dict[str, str]
    converted: dict[str, ConvertedTensor]
    files: dict[str, Path]
    dense_model: Any = None
    shapes: dict[str, tuple[int, ...]] | None = None

    def covered(self, ours_by_dense: dict[str, str]) -> set[str]:
        """Model names this plan will write."""
        found = set(self.renames.values())
        for item in self.converted.values():
            found.update(ours_by_dense[name] for name in _target_names(item)
                         if name in ours_by_dense)
        return found


def _dense_skeleton(text_config: Any, trust_remote_code: bool = False) -> Any:
    """The dense causal LM on the meta device (its conversion rules and parameter shapes)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: correct, only slower
        from contextlib import nullcontext as no_init_weights
    with torch.device("meta"), no_init_weights():
        return AutoModelForCausalLM.from_config(text_config, trust_remote_code=trust_remote_code)


def plan_names(text_config: Any, ours_by_dense: dict[str, str],
               names_by_file: dict[Path, list[str]],
               trust_remote_code: bool = False) -> NamePlan:
    """Map every checkpoint tensor name to the model's name, as ``from_pretrained`` would.

    ``ours_by_dense``: the dense model's module-tree names -> the converted model's names (the
    model's ``checkpoint_names_by_dense_name()``); ``names_by_file``: each shard's tensor names.
    Names that match nothing (e.g. ``attn.masked_bias`` buffers of old GPT-2 files) are dropped,
    as transformers drops them as unexpected keys.
    """
    dense = _dense_skeleton(text_config, trust_remote_code)
    renamings, converters, rename = conversion_rules(dense)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = dict.fromkeys(dense.state_dict())
    plan = NamePlan({}, {}, {}, dense)
    for path, names in names_by_file.items():
        for key in names:
            plan.files[key] = path
            pattern = None
            renamed = key
            if rename is not None:
                renamed, pattern = rename(key, renamings, converters, dense.base_model_prefix, meta)
                if renamed not in ours_by_dense and key in ours_by_dense:
                    renamed, pattern = key, None  # transformers' own fallback: keep the name
            if pattern is None:
                if renamed in ours_by_dense:
                    plan.renames[key] = ours_by_dense[renamed]
                continue
            item = plan.converted.get(renamed)
            if item is None:
                item = plan.converted[renamed] = ConvertedTensor(
                    deepcopy(by_pattern[pattern]), renamed)
            item.converter.add_tensor(renamed, key, pattern, _loader(path, key))
            item.sources.append(key)
    return plan


def _loader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    # transformers' converters accept callables as "not yet loaded" tensors (its sync path):
    # sources are read only when their target is computed, one target at a time.
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return f.get_tensor(key)

    return load


def _target_names(item: ConvertedTensor) -> list[str]:
    """Dense names a rule's targets get: its first target pattern in ``dense_name`` replaced by
    each target pattern (how transformers expands them after converting)."""
    patterns = item.converter.target_patterns
    prefix, found, suffix = item.dense_name.partition(patterns[0])
    if not found:
        return [item.dense_name]
    return [prefix + p + suffix for p in patterns]


def convert_tensors(item: ConvertedTensor, plan: NamePlan, text_config: Any,
                    ours_by_dense: dict[str, str]) -> dict[str, torch.Tensor]:
    """Apply a value-changing rule; return {model name: tensor}, checked against the shapes the
    dense model declares. Any failure is one MoEHubError naming the rule and its tensors."""
    rule = type(item.converter).__name__
    ops = [type(op).__name__ for op in getattr(item.converter, "operations", [])]
    what = f"transformers' {rule}({', '.join(ops)}) rule for {item.sources[:3]}"
    fix = ("moe-hub cannot stream this checkpoint format: convert a base saved in the model's "
           "own layout, or report the architecture")
    try:
        produced = item.converter.convert(item.dense_name, model=plan.dense_model,
                                          config=text_config)
    except Exception as err:  # an operation transformers could not apply to these tensors
        raise MoEHubError(f"{what} failed ({type(err).__name__}: {err}): {fix}") from None
    if plan.shapes is None:
        plan.shapes = {name: tuple(t.shape) for name, t in plan.dense_model.state_dict().items()}
    shapes = plan.shapes
    out: dict[str, torch.Tensor] = {}
    for name, value in produced.items():
        tensor = value[0] if isinstance(value, list) else value
        if name not in ours_by_dense or tuple(tensor.shape) != shapes.get(name):
            raise MoEHubError(
                f"{what} produced {name} {tuple(tensor.shape)}, which the model does not have "
                f"with that shape (expected {shapes.get(name)}): {fix}"
            )
        out[ours_by_dense[name]] = tensor.contiguous()
    return out


__all__ = ["NamePlan", "convert_tensors", "plan_names"]
