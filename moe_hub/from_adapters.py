"""Experts from existing PEFT LoRA adapters (``moe-hub convert BASE OUT --from-adapters A1,A2``).

Adapter i becomes expert i at every routing site it targets. The adapters are read from PEFT's own
files (``adapter_config.json`` + ``adapter_model.safetensors``) without building PEFT models. PEFT
stores, per targeted module ``M`` (its path in the dense causal LM),
``base_model.model.M.lora_A.weight`` [r, d_in] and ``base_model.model.M.lora_B.weight``
[d_out, r], and computes ``delta = s * (x A^T) B^T`` with ``s = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA), ``r`` and ``alpha`` per module through ``rank_pattern`` / ``alpha_pattern``.
moe-hub stores expert e as ``A_e`` [d_in, R], ``B_e`` [R, d_out] and computes
``delta = S * (x A_e) B_e`` with one global ``S = lora_alpha / lora_rank``. So

- ``A_e[:, :r] = A^T`` and ``B_e[:r] = (s / S) * B^T``: ``S * x A_e B_e = s * x A^T B^T``, the
  adapter's own scale folded into its B, with no new parameter and no kernel change;
- ranks below R are padded: the extra rows of ``B_e`` are zero, so ``x A_e B_e`` is unchanged
  whatever the extra columns of ``A_e`` hold. Those keep the usual random LoRA init (as do the A
  of sites an adapter does not target, whose B is zero): the expert computes exactly the adapter,
  yet if experts are trained later the padded rank is live capacity (with A = B = 0 both
  gradients would be zero forever);
- experts beyond the adapters start as usual (random A, B = 0).

At ``--granularity block`` an expert is the MLP with LoRA on each MLP linear: adapter i's LoRA on
``gate_proj``/``up_proj``/``down_proj`` becomes expert i's pair on that linear, which is exact.
Attention linears there carry one LoRA shared by all experts, so an adapter's attention LoRA is
representable only when it is the only adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MoEHubError
from .hub_ids import download_snapshot, is_hub_id
from .modeling.moe_lora_block import LoraLinear, MoELoraBlock
from .modeling.moe_lora_layer import MoELoraLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_GGUF_TAG = re.compile(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$")

# PEFT LoraConfig fields whose non-default values change what the adapter computes in ways a LoRA
# expert cannot hold: field -> (value that is fine, why another value is not representable).
_UNREPRESENTABLE = {
    "use_dora": (False, "DoRA (use_dora) rescales the whole weight by a learned magnitude"),
    "bias": ("none", "bias={value!r} trains the base layers' biases"),
    "lora_bias": (False, "lora_bias adds a trained bias to lora_B"),
    "modules_to_save": (None, "modules_to_save={value} replaces whole modules"),
    "trainable_token_indices": (None, "trainable_token_indices retrains embedding rows"),
    "layer_replication": (None, "layer_replication duplicates decoder layers"),
    "target_parameters": (None, "target_parameters puts LoRA on raw parameters"),
    "alora_invocation_tokens": (None, "aLoRA activates only after invocation tokens"),
    "use_qalora": (False, "QA-LoRA pools the input groupwise"),
    "use_bdlora": (None, "BD-LoRA uses block-diagonal factors"),
    "arrow_config": (None, "Arrow routes over its own adapters"),
    "megatron_config": (None, "Megatron-parallel LoRA layers"),
}
# Init methods that rewrite the base weights, so the adapter only works on the modified base.
_BASE_REWRITING_INIT = ("pissa", "olora", "loftq", "corda", "lora_ga")


@dataclass
class LoraPair:
    """One module's LoRA in PEFT's layout: A [r, d_in], B [d_out, r], delta = scale x A^T B^T."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class PeftLoraAdapter:
    """A PEFT LoRA adapter read from disk; ``pairs`` maps dense module paths to their LoRA."""

    name: str
    source: str
    hub_id: str | None
    base: str | None
    r: int
    alpha: float
    rslora: bool
    pairs: dict[str, LoraPair]

    def record(self, expert: int) -> dict[str, Any]:
        """What the checkpoint's config keeps about this adapter (local paths by name only)."""
        return {
            "expert": expert, "name": self.name, "hub_id": self.hub_id,
            "base_model_name_or_path": self.base if _looks_like_hub_id(self.base) else None,
            "r": self.r, "lora_alpha": self.alpha, "use_rslora": self.rslora,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in self.pairs}),
        }


def _looks_like_hub_id(text: str | None) -> bool:
    return is_hub_id(text, owner_required=True) and not Path(text).expanduser().exists()


def _resolve_files(spec: str, revision: str | None) -> tuple[Path, Path, str | None]:
    """(adapter_config.json, weights file, Hub id or None) of a directory or Hub adapter."""
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / ADAPTER_CONFIG
        if not config.is_file():
            raise MoEHubError(f"adapter {spec} has no {ADAPTER_CONFIG}: point --from-adapters at "
                              f"a directory written by PEFT's save_pretrained")
        weights = path / ADAPTER_SAFETENSORS
        return config, weights if weights.is_file() else path / ADAPTER_BIN, None
    if path.exists() or not is_hub_id(spec, owner_required=True):
        raise MoEHubError(f"adapter {spec} is neither a directory nor a Hub id (user/name): pass "
                          f"a PEFT adapter directory or Hub repository")

    # One listing, then only the adapter's files: the listing request fails at once when the Hub
    # is unreachable (a per-file download would retry for half a minute first).
    folder = download_snapshot(spec, revision, [ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_BIN],
                               kind="adapter", role="adapter")
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        raise MoEHubError(f"Hub repository {spec} has no {ADAPTER_CONFIG}: it is not a PEFT "
                          f"adapter")
    weights = folder / ADAPTER_SAFETENSORS
    weights = weights if weights.is_file() else folder / ADAPTER_BIN
    return config, weights, spec


def _check_settings(spec: str, config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise MoEHubError(f"adapter {spec} is a {config.get('peft_type')} adapter, not LoRA: "
                          f"--from-adapters takes PEFT LoRA adapters only")
    for name, (fine, why) in _UNREPRESENTABLE.items():
        value = config.get(name, fine)
        if value != fine and not (fine is None and value in ([], {}, "")):
            reason = why.format(value=value)
            raise MoEHubError(f"adapter {spec} cannot be represented exactly as a LoRA expert: "
                              f"{reason}; retrain it without {name}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INIT):
        raise MoEHubError(f"adapter {spec} was initialised with {init}, which rewrites the base "
                          f"weights: save it with PEFT's path_initial_model_for_weight_conversion "
                          f"to get a plain LoRA first")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule (get_pattern_key): the first pattern that matches a dotted suffix of the path.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load_weights(spec: str, weights: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if weights.name == ADAPTER_SAFETENSORS and weights.is_file():
        from safetensors.torch import load_file

        return load_file(weights)
    if weights.is_file() and allow_pickle:
        return torch.load(weights, map_location="cpu", weights_only=True)
    if weights.is_file():
        raise MoEHubError(f"adapter {spec} has only pickle weights ({ADAPTER_BIN}): pass "
                          f"--allow-pickle if you trust it, or re-save it with safetensors")
    raise MoEHubError(f"adapter {spec} has no {ADAPTER_SAFETENSORS}: re-save it with PEFT's "
                      f"save_pretrained")


def read_adapter(spec: str, *, revision: str | None = None,
                 allow_pickle: bool = False) -> PeftLoraAdapter:
    """Read one PEFT LoRA adapter (directory or Hub id), refusing what a LoRA expert can't hold."""
    config_path, weights_path, hub_id = _resolve_files(spec, revision)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoEHubError(f"adapter {spec}: {config_path.name} is not valid JSON ({err})") from None
    _check_settings(spec, config)
    tensors = _load_weights(spec, weights_path, allow_pickle)
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora"))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if (match := _KEY.match(key)) is not None:
            found.setdefault(match["module"], {})[match["part"]] = tensor
    for key in tensors:
        # PEFT saves a copy of the base weight of an embedding / LM head it put LoRA on.
        copy = re.match(r"^base_model\.model\.(.+)\.base_layer\.weight$", key)
        if _KEY.match(key) is None and not (copy and copy[1] in found):
            raise MoEHubError(f"adapter {spec} holds {key}, which is not a LoRA A/B weight of a "
                              f"linear (embedding LoRA, DoRA magnitudes and biases can't be "
                              f"represented as experts)")
    pairs: dict[str, LoraPair] = {}
    for module, parts in sorted(found.items()):
        if set(parts) != {"A", "B"}:
            raise MoEHubError(f"adapter {spec} has lora_{set('AB') - set(parts)} missing for "
                              f"{module}: the file is incomplete")
        A, B = parts["A"], parts["B"]
        rank = int(_pattern_value(config.get("rank_pattern") or {}, module, r))
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank or B.shape[1] != rank:
            raise MoEHubError(f"adapter {spec}: {module} has lora_A {tuple(A.shape)} and lora_B "
                              f"{tuple(B.shape)}, not rank {rank} as its config says")
        module_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        pairs[module] = LoraPair(A, B, scale)
    if not pairs:
        raise MoEHubError(f"adapter {spec} holds no LoRA weights")
    name = hub_id or Path(spec).expanduser().resolve().name
    return PeftLoraAdapter(name, spec, hub_id, config.get("base_model_name_or_path"), r, alpha,
                           rslora, pairs)


def read_adapters(specs: list[str], *, allow_pickle: bool = False) -> list[PeftLoraAdapter]:
    """Read every adapter; refuse one given twice or two with the same name."""
    keys: dict[str, str] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        key = str(path.resolve()) if path.exists() else spec
        if key in keys:
            raise MoEHubError(f"adapter {spec} is given twice in --from-adapters ({keys[key]!r} "
                              f"and {spec!r}): each adapter becomes one expert, list it once")
        keys[key] = spec
    adapters = [read_adapter(spec, allow_pickle=allow_pickle) for spec in specs]
    seen: dict[str, str] = {}
    for adapter in adapters:
        if adapter.name in seen:
            raise MoEHubError(f"two adapters are named {adapter.name!r} ({seen[adapter.name]} and "
                              f"{adapter.source}): rename one directory so the experts can be "
                              f"told apart")
        seen[adapter.name] = adapter.source
    return adapters


def check_expert_count(experts: int | None, adapters: int) -> None:
    """Every adapter needs an expert of its own (``None``: one per adapter, the default)."""
    if experts is not None and experts < adapters:
        raise MoEHubError(f"--experts {experts} is fewer than the {adapters} adapters: pass "
                          f"--experts {adapters} or more (or leave it out)")


def resolve_options(options: Any, adapters: list[PeftLoraAdapter]) -> Any:
    """Fill ``experts`` / ``rank`` / ``targets`` (and ``top_k`` when the experts default to one
    per adapter) from the adapters, and check given values."""
    count = len(adapters)
    experts = options.experts if options.experts is not None else count
    check_expert_count(experts, count)
    name, module, need = max(((a.name, m, p.rank) for a in adapters for m, p in a.pairs.items()),
                             key=lambda item: item[2])
    rank = options.rank if options.rank is not None else need
    if rank < need:
        raise MoEHubError(f"--rank {rank} is below the rank {need} of adapter {name} at {module}: "
                          f"pass --rank {need} or more (or leave it out)")
    targets = options.targets if options.targets is not None else adapter_targets(adapters)
    top_k = options.top_k
    if options.experts is None:
        top_k = min(top_k, experts)  # one adapter, default top-2: one expert per token
    return replace(options, experts=experts, rank=rank, targets=targets, top_k=top_k)


def adapter_targets(adapters: list[PeftLoraAdapter]) -> list[str]:
    """The default ``--targets`` with adapters: the short names of every module they target."""
    return sorted({m.rsplit(".", 1)[-1] for a in adapters for m in a.pairs})


def _same_base(adapter_base: str, base: str) -> bool:
    """Same string, same local directory, or the same model name (last path component, a GGUF
    file's quantisation tag dropped): an adapter trained on the Hub id converts from its GGUF."""
    if adapter_base == base:
        return True
    a, b = Path(adapter_base).expanduser(), Path(base).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()

    def stem(text: str) -> str:
        last = text.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix(".gguf")
        return _GGUF_TAG.sub("", last)

    return stem(adapter_base) == stem(base)


@dataclass
class _Slot:
    """Where one dense linear's LoRA lives in the MoE-LoRA model."""

    module: nn.Module
    key: str | None  # the linear's name inside a routed MLP block, else None
    routed: bool  # False: a plain LoRA shared by all experts (attention at block granularity)
    d_in: int
    d_out: int

    def tensors(self) -> tuple[nn.Parameter, nn.Parameter]:
        if self.key is None:
            return self.module.lora_A, self.module.lora_B
        return self.module.lora_A[self.key], self.module.lora_B[self.key]


def _slots(model: nn.Module) -> dict[str, _Slot]:
    """Dense module path -> slot, for every linear that carries LoRA in ``model``; dense paths
    come from the model's own naming (``dense_name``), never from assumed prefixes."""
    names = {id(param): name for name, param in model.named_parameters()}

    def dense_path(linear: nn.Module) -> str:
        return model.dense_name(names[id(linear.weight)]).rpartition(".")[0]

    slots: dict[str, _Slot] = {}
    for module in model.modules():
        if isinstance(module, MoELoraLinear | LoraLinear):
            A = module.lora_A
            d_in, d_out = A.shape[-2], module.lora_B.shape[-1]
            slots[dense_path(module.base_layer)] = _Slot(module, None,
                                                         isinstance(module, MoELoraLinear),
                                                         d_in, d_out)
        elif isinstance(module, MoELoraBlock):
            for key, A in module.lora_A.items():
                slots[dense_path(module.base_layer.get_submodule(key))] = _Slot(
                    module, key, True, A.shape[1], module.lora_B[key].shape[2])
    return slots


class AdapterPlan:
    """Adapter i -> expert i at every site it targets, checked against the model skeleton before
    anything is written; :meth:`apply` fills the materialised expert tensors."""

    def __init__(self, adapters: list[PeftLoraAdapter], model: nn.Module, base: str,
                 check_base: bool = True) -> None:
        self.adapters = adapters
        self.scale = float(model.config.lora_scale)
        self.slots = _slots(model)
        dense_modules = {model.dense_name(n).rpartition(".")[0]
                         for n, _ in model.named_parameters() if model.dense_name(n)}
        for adapter in adapters:
            if check_base and adapter.base and not _same_base(adapter.base, base):
                raise MoEHubError(
                    f"adapter {adapter.name} was trained on {adapter.base}, not on BASE {base}: "
                    f"convert from that base (or pass --skip-adapter-base-check if they hold the "
                    f"same weights)")
            for module, pair in adapter.pairs.items():
                slot = self.slots.get(module)
                if slot is None:
                    where = ("is outside the routed linears (moe-hub routes linears inside the "
                             "decoder layers that --targets selects)" if module in dense_modules
                             else "does not exist in BASE: it was trained on another model")
                    raise MoEHubError(f"adapter {adapter.name} has LoRA on {module}, which {where}")
                if pair.A.shape[1] != slot.d_in or pair.B.shape[0] != slot.d_out:
                    raise MoEHubError(
                        f"adapter {adapter.name}: {module} maps {pair.A.shape[1]} -> "
                        f"{pair.B.shape[0]} features but BASE's maps {slot.d_in} -> {slot.d_out}: "
                        f"the adapter was trained on another model")
                if not slot.routed and len(adapters) > 1:
                    raise MoEHubError(
                        f"adapter {adapter.name} has LoRA on {module}, which --granularity "
                        f"block gives one LoRA shared by all experts, "
                        f"so it can't be kept per adapter: use --granularity linear, or adapters "
                        f"with MLP targets only")

    def apply(self, model: nn.Module) -> None:
        """Copy every adapter into its expert of the (materialised, initialised) ``model``."""
        self.slots = _slots(model)  # the skeleton's parameters have been replaced since
        with torch.no_grad():
            for expert, adapter in enumerate(self.adapters):
                for module, pair in adapter.pairs.items():
                    slot = self.slots[module]
                    A, B = slot.tensors()
                    rank = pair.rank
                    # The adapter's own scale is folded into B: S * x A (s/S B) = s * x A B.
                    factor = pair.scale / self.scale
                    a = pair.A.to(torch.float64).T
                    b = pair.B.to(torch.float64).T * factor
                    if slot.routed:
                        A[expert, :, :rank] = a.to(A.dtype)
                        B[expert, :rank] = b.to(B.dtype)
                        B[expert, rank:] = 0
                    else:
                        A[:, :rank] = a.to(A.dtype)
                        B[:rank] = b.to(B.dtype)
                        B[rank:] = 0

    def records(self) -> list[dict[str, Any]]:
        return [adapter.record(i) for i, adapter in enumerate(self.adapters)]


def prepare(options: Any) -> tuple[Any, list[PeftLoraAdapter]]:
    """Read ``options.from_adapters`` and return (options completed from them, the adapters)."""
    adapters = read_adapters(list(options.from_adapters), allow_pickle=options.allow_pickle)
    return resolve_options(options, adapters), adapters


__all__ = ["AdapterPlan", "LoraPair", "PeftLoraAdapter", "prepare", "read_adapter",
           "read_adapters", "resolve_options"]
