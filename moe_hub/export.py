"""moe-hub checkpoint -> native transformers MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE).

A checkpoint with block routing (one router per decoder MLP) and the top-k router *is* a sparse
MoE: expert e is the whole MLP with ``W + (alpha / r) B_e A_e`` on gate, up and down, and the
router picks k of them per token with softmax weights. Baking every expert's LoRA into its own
copy of the MLP gives a model that the native MoE classes (and every engine that runs them:
vLLM, SGLang, TGI, llama.cpp) compute exactly, without ``trust_remote_code``. Unrouted LoRA on
other linears (attention, in block mode) is merged into those linears.

What has no native form is refused before anything is written, naming why: routers whose
decision is not a per-token softmax top-k of one linear (RMoE's recurrent state, HyperMoE's
generated module, GraphMoE's refinement steps), one router per linear, bases whose attention or
norms no native MoE class reproduces, routing arithmetic the target class does not compute.

The tensors are written in the per-expert form transformers itself saves (``revert_weight_
conversion``: ``block_sparse_moe.experts.{e}.w1.weight`` for Mixtral, ``mlp.experts.{e}.
gate_proj.weight`` for the Qwen families), which its conversion mapping fuses on load and which
the serving engines read. Output goes to a temporary sibling of OUT, renamed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    TOKENIZER_PATTERNS,
    included_files,
    publish,
    read_checkpoint_config,
    staging_dir,
    write_index,
)
from .errors import MoEHubError
from .progress import hub_tqdm
from .safetensors_io import write_tensors

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Largest safetensors shard written (transformers' own default is 50 GB; engines prefer less).
MAX_SHARD_BYTES = 5 * 1024**3
EXPORT_CARD_TEMPLATE = "export.md.jinja"


class ExportRefused(MoEHubError):
    """The checkpoint has no exact native form; the message says why."""


@dataclass(frozen=True)
class NativeForm:
    """A native transformers MoE class and how its checkpoints name an MLP block's tensors."""

    model_type: str
    architecture: str
    label: str
    block: str  # the MoE block's name inside a decoder layer in the stored form
    expert_linears: tuple[str, str, str]  # stored names of one expert's gate, up, down
    experts_field: str
    expert_size_field: str
    always_renormalises: bool  # False: norm_topk_prob says whether it does
    shared_expert: bool  # computes sigmoid(g x) * MLP_shared(x) besides the routed experts
    dense_layers: bool  # has mlp_only_layers (decoder layers with a plain MLP)
    #: base config fields copied besides the common ones
    fields: tuple[str, ...]


MIXTRAL = NativeForm("mixtral", "MixtralForCausalLM", "Mixtral", "block_sparse_moe",
                     ("w1", "w3", "w2"), "num_local_experts", "intermediate_size", True, False,
                     False, ("head_dim", "sliding_window"))
QWEN2_MOE = NativeForm("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2-MoE", "mlp",
                       ("gate_proj", "up_proj", "down_proj"), "num_experts",
                       "moe_intermediate_size", False, True, True,
                       ("head_dim", "use_sliding_window", "sliding_window", "max_window_layers",
                        "layer_types"))
QWEN3_MOE = NativeForm("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3-MoE", "mlp",
                       ("gate_proj", "up_proj", "down_proj"), "num_experts",
                       "moe_intermediate_size", False, False, True,
                       ("head_dim", "attention_bias", "use_sliding_window", "sliding_window"))
#: dense model_type -> its native MoE form. Qwen2 is not Mixtral: Qwen2's q/k/v carry biases,
#: Mixtral's attention has none; Qwen3's q/k RMSNorms exist only in Qwen3-MoE.
NATIVE_FORMS = {"llama": MIXTRAL, "mistral": MIXTRAL, "qwen2": QWEN2_MOE, "qwen3": QWEN3_MOE}
_COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "tie_word_embeddings", "rope_parameters", "attention_dropout",
)
_WHY_NOT = {
    "rmoe": "its GRU carries routing state from each layer to the next, and a native MoE gate "
            "sees only the current token's hidden state",
    "hypermoe": "its hypernetwork adds, per token, a module generated from the unselected "
                "experts, which no native MoE block computes",
    "graphmoe": "it routes in several steps, re-running the experts on refined inputs, and a "
                "native MoE block routes once",
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def check_exportable(config: dict[str, Any]) -> NativeForm:
    """The native form of the checkpoint described by ``config`` (its config.json), or
    ExportRefused naming why it has none. Reads no weights."""
    router = config.get("router", "topk")
    router_config = config.get("router_config") or {}
    if router_config.get("hyper"):
        raise ExportRefused(
            f"no native form: this {router} checkpoint has the --hyper module (HyperMoE's "
            f"per-token module generated from the unselected experts), which no native MoE "
            f"block computes; serve it with trust_remote_code (vLLM's Transformers backend)")
    if router != "topk":
        why = _WHY_NOT.get(router, "only the top-k softmax router has a native equivalent")
        raise ExportRefused(f"no native form for router {router}: {why}; serve it with "
                            f"trust_remote_code (vLLM's Transformers backend)")
    # Options that only set the initialisation leave the routing arithmetic alone; any other
    # (noise, a bias, a temperature a later version may add) has no native counterpart.
    changes = sorted(set(router_config) - {"init_std"})
    if changes:
        raise ExportRefused(f"routing differs: the native gates have no counterpart of the topk "
                            f"router option {changes[0]!r}")
    if config.get("routing_granularity", "linear") != "block":
        attention = _routes_attention(config)
        what = ("experts on attention: native MoE models route only the MLP"
                if attention else "linear granularity (one router per linear): native MoE "
                "models have one router per MLP block")
        raise ExportRefused(f"no native form for {what}; convert with --granularity block to "
                            f"export, or serve it with trust_remote_code")
    text = config.get("text_config") or {}
    model_type = text.get("model_type")
    form = NATIVE_FORMS.get(model_type)
    if form is None:
        raise ExportRefused(
            f"no native MoE class has the attention and norms of a {model_type} base: export "
            f"supports llama and mistral (as Mixtral), qwen2 (as Qwen2-MoE) and qwen3 (as "
            f"Qwen3-MoE)")
    normalize = config.get("normalize_expert_weights", True)
    if form.always_renormalises and not normalize:
        raise ExportRefused(
            f"routing differs: {form.label} always renormalises the top-k weights to sum to one, "
            f"this checkpoint keeps the raw softmax probabilities (normalize_expert_weights "
            f"false)")
    if text.get("mlp_bias"):
        raise ExportRefused(f"the {model_type} base has MLP biases (mlp_bias) and "
                            f"{form.label}'s experts have none")
    if form is MIXTRAL and text.get("attention_bias"):
        raise ExportRefused(f"the {model_type} base has attention biases (attention_bias) and "
                            f"Mixtral's attention has none")
    if form is QWEN3_MOE and text.get("use_sliding_window"):
        kinds = set(text.get("layer_types") or [])
        if kinds != {"sliding_attention"}:
            raise ExportRefused(
                "the qwen3 base mixes sliding-window and full-attention layers "
                "(max_window_layers) and Qwen3-MoE applies one window to every layer")
    return form


def _routes_attention(config: dict[str, Any]) -> bool:
    """Whether a linear-granularity checkpoint routes a linear outside the MLPs."""
    from .modeling import MoELoraConfig
    from .skeleton import model_skeleton

    try:
        skeleton = model_skeleton(MoELoraConfig(**{**config, "adapter_only": False}))
    except (ValueError, TypeError, KeyError):
        return False
    return any(".mlp." not in f".{site.name}." for site in skeleton.routing_sites)


@dataclass
class ExportSummary:
    """What an export wrote: parameter and byte counts of the base and of the export."""

    out: Path
    form: str
    experts: int
    routed_layers: int
    base_parameters: int
    export_parameters: int
    mlp_parameters: int  # one MLP copy summed over the routed layers
    export_bytes: int  # tensor bytes written
    dtype: str

    @property
    def base_bytes(self) -> int:
        """The dense base's tensor bytes in the export's dtype."""
        return self.base_parameters * _itemsize(getattr(torch, self.dtype))

    @property
    def growth_parameters(self) -> int:
        return self.export_parameters - self.base_parameters

    def line(self) -> str:
        return (f"{self.form} with {self.experts} experts in {self.routed_layers} layers: "
                f"{_count(self.base_parameters)} -> {_count(self.export_parameters)} parameters "
                f"(+{_count(self.growth_parameters)}: {self.experts} copies of the MLP where the "
                f"source had one, "
                f"{self.export_parameters / max(self.base_parameters, 1):.2f}x the base), "
                f"{_size(self.export_bytes)} in {self.dtype} (the dense base: "
                f"{_size(self.base_bytes)})")


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def export(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportSummary:
    """Write the moe-hub checkpoint ``ckpt`` (a folder or a Hub repo id) as a native
    transformers MoE checkpoint at ``out`` (``AutoModelForCausalLM.from_pretrained(out)``, no
    remote code) and return what it wrote.

    ``dtype``: float32, bfloat16 or float16 for the weights (default: the base's dtype); the
    experts are baked in float32 and rounded once. Example::

        from moe_hub import export
        export("smol-moe-tuned", "smol-mixtral")
    """
    from .progress import third_party_progress

    out = Path(out)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise MoEHubError(f"unknown dtype {dtype!r}: pass --dtype {', '.join(DTYPE_NAMES)}")
    with third_party_progress(progress):
        # A Hub checkpoint: its config first, so that a refusal downloads no weights.
        ckpt_path = _fetch(ckpt, ["config.json"])
        config = read_checkpoint_config(ckpt_path)
        form = check_exportable(config)
        _check_out(out, ckpt_path, overwrite)
        ckpt_path = _fetch(ckpt, None)
        model = _load(ckpt_path)
    target_dtype = DTYPE_NAMES[dtype] if dtype else _base_dtype(config)
    text_config = model.config.text_config
    plan = _Plan(model, form)
    native_config = plan.native_config(text_config, target_dtype)
    plan.check_against(native_config)
    with staging_dir(out) as staging:
        sizes = plan.write(staging, target_dtype, progress)
        native_config.save_pretrained(staging)
        _copy_tokenizer_and_generation_config(ckpt_path, staging, native_config)
        summary = ExportSummary(
            out=out, form=form.label, experts=model.config.num_experts,
            routed_layers=len(plan.expert_layers()), base_parameters=plan.base_parameters(),
            export_parameters=sum(plan.numels.values()),
            mlp_parameters=plan.mlp_parameters(),
            export_bytes=sum(sizes.values()),
            dtype=str(target_dtype).removeprefix("torch."))
        _write_card(staging, summary, config, str(ckpt), ckpt_path, form, out.name)
        publish(staging, out, overwrite)
    return summary


def _fetch(ckpt: str | os.PathLike, patterns: list[str] | None) -> Path:
    """``ckpt`` itself when it is a local path (or no Hub id), else the Hub snapshot of its
    files matching ``patterns`` (all with None), downloaded into the Hub cache."""
    from .model_card import looks_like_hub_id

    if Path(ckpt).exists() or not looks_like_hub_id(str(ckpt)):
        return Path(ckpt)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(str(ckpt), allow_patterns=patterns))
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise MoEHubError(f"cannot fetch {ckpt} from the Hub ({err.__class__.__name__}): check "
                          f"the repo id, the network and your token (HF_TOKEN)") from None


def _check_out(out: Path, ckpt: Path, overwrite: bool) -> None:
    from .checkpoint import refuse_overlap

    refuse_overlap(out, [("CKPT", ckpt)], "OUT")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise MoEHubError(f"{out} already exists: pass --overwrite to replace it")
    if out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or is_export(out)):
        return
    raise MoEHubError(f"OUT {out} is not an empty folder or an earlier export: --overwrite only "
                      f"replaces those, so pass another OUT")


#: The card tag that marks a folder as written by ``export`` (``--overwrite`` replaces only such
#: a folder: a Mixtral downloaded from the Hub has the same config.json).
EXPORT_TAG = "moe-lora-export"


def is_export(path: Path) -> bool:
    """Whether ``path`` holds a model this module wrote: a native MoE config.json and a card
    tagged ``EXPORT_TAG``."""
    from .model_card import README_FILE

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        card = (path / README_FILE).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    native = {form.model_type for form in NATIVE_FORMS.values()}
    front = card.split("---", 2)[1] if card.startswith("---") and card.count("---") >= 2 else ""
    return isinstance(config, dict) and config.get("model_type") in native and \
        re.search(rf"^- {re.escape(EXPORT_TAG)}$", front, re.MULTILINE) is not None


def _load(ckpt: Path) -> Any:
    """The checkpoint as a MoE-LoRA model in float32, through the library's own loader (full and
    adapter-only checkpoints, earlier layouts): float32 holds a 16-bit base exactly and bakes
    the experts without a second rounding."""
    from .modeling import MoELoraForCausalLM

    try:
        model = MoELoraForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise MoEHubError(" ".join(str(err).split())) from None
    return model.eval()


def _base_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype the checkpoint stores its base in (its config.json, as convert wrote it)."""
    for source in (config.get("text_config") or {}, config):
        value = getattr(torch, str(source.get("dtype") or source.get("torch_dtype")), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return torch.float32


class _Plan:
    """Which tensors the export writes, computed per decoder layer from the loaded model."""

    def __init__(self, model: Any, form: NativeForm) -> None:
        from .modeling.moe_lora_block import LoraLinear, MoELoraBlock

        self.model, self.form = model, form
        self.dense = model.dense_model
        self.config = model.config
        self.scale = model.config.lora_scale
        modules = dict(self.dense.named_modules())
        self.blocks = {name: m for name, m in modules.items() if isinstance(m, MoELoraBlock)}
        self.loras = {name: m for name, m in modules.items() if isinstance(m, LoraLinear)}
        other = [name for name, m in modules.items() if _routes(m) and name not in self.blocks]
        if other:  # a block checkpoint routes MLPs only; anything else has no native form
            raise ExportRefused(f"no native form: {other[0]} is routed outside an MLP block")
        for name, block in self.blocks.items():
            extra = sorted(set(dict(block.router.named_parameters())) - {"weight"})
            if extra:  # the native gate is one bias-free linear
                raise ExportRefused(f"routing differs: {name}'s router has {extra[0]} besides "
                                    f"its weight, the native gate has not")
            if block.layout.style != "gated":
                raise ExportRefused(f"{name} is a {block.layout.style} MLP; native MoE experts "
                                    f"are gated (gate_proj, up_proj, down_proj)")
        self.layers = self.config.text_config.num_hidden_layers
        self.routed_layers = {int(_LAYER.search(f".{n}.").group(1)) for n in self.blocks}
        self.numels: dict[str, int] = {}
        self.tied = bool(getattr(self.config.text_config, "tie_word_embeddings", False))

    # -- configuration -------------------------------------------------------------------
    def native_config(self, text_config: Any, dtype: torch.dtype) -> Any:
        from transformers import AutoConfig

        form = self.form
        source = text_config.to_dict()
        fields = {k: source[k] for k in (*_COMMON_FIELDS, *form.fields) if k in source}
        block = next(iter(self.blocks.values()))
        intermediate = block.base_layer.gate_proj.out_features
        fields.update({
            form.experts_field: self.config.num_experts,
            "num_experts_per_tok": self.config.num_experts_per_tok,
            form.expert_size_field: intermediate,
            "output_router_logits": False,
            "router_aux_loss_coef": self.config.router_aux_loss_coef,
        })
        if form is MIXTRAL:
            fields["router_jitter_noise"] = 0.0  # moe-hub's router adds no noise
        else:
            fields["norm_topk_prob"] = bool(self.config.normalize_expert_weights)
            fields["intermediate_size"] = source.get("intermediate_size", intermediate)
            fields["decoder_sparse_step"] = 1
            fields["mlp_only_layers"] = sorted(set(range(self.layers)) - self.routed_layers)
        if form is QWEN2_MOE:
            fields["qkv_bias"] = True
            # No shared expert in moe-hub: size 0 makes its output exactly zero (the gate
            # tensor still exists in the class and is written as zeros).
            fields["shared_expert_intermediate_size"] = 0
        config = AutoConfig.for_model(form.model_type, **fields)
        config.architectures = [form.architecture]
        config.dtype = dtype
        return config

    def check_against(self, native_config: Any) -> None:
        """Refuse when a tensor outside the experts differs from what the native class holds (a
        bias, a norm, a shape): its attention or norms would not be the base's."""
        from transformers import AutoModelForCausalLM

        from .skeleton import _no_init

        with torch.device("meta"), _no_init(), warnings.catch_warnings():
            # Qwen2-MoE's size-0 shared expert: torch warns that initialising it does nothing.
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            native = AutoModelForCausalLM.from_config(native_config)
        wanted = {n: tuple(t.shape) for n, t in native.state_dict().items()
                  if not _is_moe_tensor(n)}
        if self.tied:
            wanted.pop("lm_head.weight", None)
        ours = {n: tuple(s) for n, s in self._shapes().items() if not _is_moe_tensor(n)}
        for name in sorted(set(wanted) | set(ours)):
            if wanted.get(name) != ours.get(name):
                label = self.form.label
                what = (f"{label} has no {name}" if name not in wanted
                        else f"{label} has {name}, the base has none" if name not in ours
                        else f"{label} has another shape for {name}")
                raise ExportRefused(
                    f"the {self.config.text_config.model_type} base's attention or norms differ "
                    f"from {label}'s: {what}")

    # -- tensors -------------------------------------------------------------------------
    def _shapes(self) -> dict[str, torch.Size]:
        shapes: dict[str, torch.Size] = {}
        for unit in self._units():
            for name, shape in unit.shapes().items():
                shapes[name] = shape
        return shapes

    def _units(self) -> list[_Unit]:
        """One unit per decoder layer plus one for everything outside the layers."""
        state = self.dense.state_dict()
        groups: dict[int, list[str]] = {}
        for name in state:
            match = _LAYER.search(f".{name}")
            groups.setdefault(int(match.group(1)) if match else -1, []).append(name)
        return [_Unit(self, layer, names, state) for layer, names in sorted(groups.items())]

    def write(self, staging: Path, dtype: torch.dtype, progress: bool) -> dict[str, int]:
        units = self._units()
        per_unit = [sum(s.numel() for s in u.shapes().values()) * _itemsize(dtype) for u in units]
        shards: list[list[int]] = [[]]
        filled = 0
        for i, size in enumerate(per_unit):
            if shards[-1] and filled + size > MAX_SHARD_BYTES:
                shards.append([])
                filled = 0
            shards[-1].append(i)
            filled += size
        sizes: dict[str, int] = {}
        weight_map: dict[str, str] = {}
        with hub_tqdm(total=len(units), desc="baking experts", unit="layer",
                      disable=not progress) as bar:

            def batches(indices: list[int]) -> Iterator[dict[str, torch.Tensor]]:
                for i in indices:
                    tensors = units[i].tensors()
                    self.numels.update({n: t.numel() for n, t in tensors.items()})
                    yield tensors
                    bar.update()

            for number, indices in enumerate(shards, start=1):
                name = ("model.safetensors" if len(shards) == 1
                        else f"model-{number:05d}-of-{len(shards):05d}.safetensors")
                written = write_tensors(staging / name, batches(indices), dtype)
                weight_map.update(dict.fromkeys(written, name))
                sizes.update(written)
        if len(shards) > 1:
            write_index(staging, weight_map)
        return sizes

    # -- counts for the card ---------------------------------------------------------------
    def base_parameters(self) -> int:
        """Parameters of the dense base (tied weights once), without adapters."""
        adapters = set(self.model.adapter_parameter_names())
        return sum(p.numel() for n, p in self.model.named_parameters() if n not in adapters)

    def expert_layers(self) -> list[int]:
        """Decoder layers stored with E copies of their MLP (Mixtral: all of them)."""
        return sorted(self.routed_layers) if self.form.dense_layers else list(range(self.layers))

    def mlp_parameters(self) -> int:
        """One MLP copy summed over the layers stored with E of them."""
        return sum(p.numel() for layer in self.expert_layers()
                   for p in self._mlp(layer).parameters())

    def _mlp(self, layer: int) -> nn.Module:
        routed = [b.base_layer for n, b in self.blocks.items()
                  if int(_LAYER.search(f".{n}.").group(1)) == layer]
        return routed[0] if routed else self.dense.get_submodule(f"model.layers.{layer}.mlp")


def _routes(module: nn.Module) -> bool:
    from .modeling.moe_lora_layer import MoELoraLinear

    return isinstance(module, MoELoraLinear)


def _is_moe_tensor(name: str) -> bool:
    return bool(re.search(r"\.(mlp|block_sparse_moe)\.", name))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _Unit:
    """The tensors of one decoder layer (or of everything outside the layers, ``layer`` -1)."""

    def __init__(self, plan: _Plan, layer: int, names: list[str],
                 state: dict[str, torch.Tensor]) -> None:
        self.plan, self.layer, self.names, self.state = plan, layer, names, state

    def shapes(self) -> dict[str, torch.Size]:
        # Shapes only: every output tensor has the shape of the base tensor it is made from.
        return {name: tensor.shape for name, tensor in self._items(bake=False)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._items(bake=True))

    def _items(self, bake: bool) -> Iterator[tuple[str, torch.Tensor]]:
        plan, form = self.plan, self.plan.form
        handled: set[str] = set()
        for prefix, block in plan.blocks.items():
            if not self.names or not any(n.startswith(prefix + ".") for n in self.names):
                continue
            handled.update(n for n in self.names if n.startswith(prefix + "."))
            yield from self._experts(prefix[: -len(".mlp")], block, bake)
        for prefix, lora in plan.loras.items():
            owned = [n for n in self.names if n.startswith(prefix + ".")]
            if not owned:
                continue
            handled.update(owned)
            for name in owned:
                if ".lora_" in name:
                    continue
                target = name.replace(".base_layer.", ".")
                tensor = self.state[name]
                if bake and target.endswith(".weight"):
                    delta = (lora.lora_A.detach().float() @ lora.lora_B.detach().float()).t()
                    tensor = tensor.float() + plan.scale * delta
                yield target, tensor
        for name in self.names:
            if name in handled:
                continue
            if plan.tied and name == "lm_head.weight":
                continue  # tied to the embedding: transformers writes it once
            if form.dense_layers is False and ".mlp." in name:
                continue  # handled with the layer's experts (replicated, see _experts)
            yield name.replace(".base_layer.", "."), self.state[name]
        if not form.dense_layers and self.layer >= 0 and self.layer not in plan.routed_layers:
            yield from self._replicated(bake)

    def _experts(self, layer_prefix: str, block: Any, bake: bool
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        plan, form = self.plan, self.plan.form
        experts = plan.config.num_experts
        mlp = block.base_layer
        stored = f"{layer_prefix}.{form.block}"
        for linear, short in zip(("gate_proj", "up_proj", "down_proj"), form.expert_linears,
                                 strict=True):
            weight = getattr(mlp, linear).weight.detach()
            if bake:
                # W_e = W + (alpha / r) (A_e B_e)^T: A_e [d_in, r], B_e [r, d_out], W [d_out, d_in]
                lora_A = block.lora_A.fetch(linear).detach().float()
                lora_B = block.lora_B.fetch(linear).detach().float()
                deltas = torch.bmm(lora_A, lora_B).transpose(1, 2) * plan.scale
            for e in range(experts):
                tensor = weight.float() + deltas[e] if bake else weight
                yield f"{stored}.experts.{e}.{short}.weight", tensor
        yield f"{stored}.gate.weight", block.router.weight.detach()
        if form.shared_expert:
            hidden = block.router.weight.shape[1]
            empty = torch.zeros(0, hidden)
            yield f"{stored}.shared_expert.gate_proj.weight", empty
            yield f"{stored}.shared_expert.up_proj.weight", empty
            yield f"{stored}.shared_expert.down_proj.weight", empty.t()
            yield f"{stored}.shared_expert_gate.weight", torch.zeros(1, hidden)

    def _replicated(self, bake: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """An unrouted layer in a class without plain-MLP layers (Mixtral): every expert is the
        frozen MLP and the gate is zero, so the renormalised top-k weights are 1/k each and the
        block computes the MLP itself."""
        plan, form = self.plan, self.plan.form
        prefix = f"model.layers.{self.layer}"
        mlp = self.plan.dense.get_submodule(f"{prefix}.mlp")
        for linear, short in zip(("gate_proj", "up_proj", "down_proj"), form.expert_linears,
                                 strict=True):
            weight = getattr(mlp, linear).weight.detach()
            for e in range(plan.config.num_experts):
                yield f"{prefix}.{form.block}.experts.{e}.{short}.weight", weight
        yield f"{prefix}.{form.block}.gate.weight", torch.zeros(
            plan.config.num_experts, mlp.gate_proj.in_features)


def _copy_tokenizer_and_generation_config(ckpt: Path, staging: Path, native_config: Any) -> None:
    """The checkpoint's tokenizer files (chat template included) and generation config, copied
    as files: loading them through the Auto classes would read the checkpoint's config.json,
    which names remote code."""
    from transformers import GenerationConfig

    for pattern in TOKENIZER_PATTERNS:
        for path in ckpt.glob(pattern):
            if path.is_file():
                shutil.copy2(path, staging / path.name)
    if (ckpt / "generation_config.json").is_file():
        shutil.copy2(ckpt / "generation_config.json", staging / "generation_config.json")
    else:
        GenerationConfig.from_model_config(native_config).save_pretrained(staging)


#: What an export holds, all plain transformers files (the allow-list ``moe-hub push`` uploads).
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                "model-*-of-*.safetensors", "model.safetensors.index.json", "README.md",
                *TOKENIZER_PATTERNS)


def export_upload_plan(directory: Path, repo_id: str, adapter_only: bool = False,
                       include: list[str] | None = None) -> dict[str, bytes | Path]:
    """What ``moe-hub push`` uploads for an export: its files (``EXPORT_FILES``) and those
    matching an ``include`` pattern, the card's loading snippets naming ``repo_id`` instead of
    the folder."""
    if adapter_only:
        raise MoEHubError(f"{directory} is a native MoE export: it has no adapters to push "
                          f"alone; push it without --adapter-only")
    plan: dict[str, bytes | Path] = {}
    for pattern in EXPORT_FILES:
        for path in directory.glob(pattern):
            if path.is_file() and not path.name.startswith("."):
                plan[path.name] = path
    plan.update({rel: directory / rel for rel in sorted(included_files(directory, include))})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            raise MoEHubError(f"{index} is corrupt: export again") from None
        missing = sorted(name for name in shards if name not in plan)
        if missing:
            raise MoEHubError(f"{directory} lacks {missing[0]} named in its index: export again")
    elif "model.safetensors" not in plan:
        raise MoEHubError(f"{directory} has no model weights: export again")
    readme = directory / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        for call in ("from_pretrained", "LLM"):
            text = text.replace(f'{call}("{directory.name}")', f'{call}("{repo_id}")')
        plan["README.md"] = text.encode()
    return plan


def _write_card(staging: Path, summary: ExportSummary, config: dict[str, Any], source: str,
                ckpt: Path, form: NativeForm, repo_name: str) -> None:
    from importlib import resources

    from huggingface_hub import ModelCard, ModelCardData

    from .model_card import _card_base, base_license, looks_like_hub_id

    hub_base, shown_base = _card_base(config)
    source_id = source if looks_like_hub_id(source) and not Path(source).exists() else None
    # The dense base (the Hub's model tree); a source checkpoint on the Hub when the base is not.
    base_model = hub_base or source_id
    license = config.get("base_model_license") or base_license(
        config.get("base_model_name_or_path"), config.get("base_model_revision"))
    card_data = ModelCardData(
        base_model=base_model, library_name="transformers", license=license,
        tags=["moe", "moe-hub", EXPORT_TAG, form.model_type],
        pipeline_tag="text-generation",
        **({"base_model_relation": "finetune"} if base_model else {}))
    template = resources.files("moe_hub.model_cards").joinpath(EXPORT_CARD_TEMPLATE).read_text(
        "utf-8")
    card = ModelCard.from_template(
        card_data, template_str=template, title=repo_name, repo_id=repo_name,
        form=form.label, architecture=form.architecture,
        source=source_id or ckpt.resolve().name, source_link=source_id,
        base=shown_base or "the dense base model", base_link=hub_base,
        summary=summary, base_parameters=_count(summary.base_parameters),
        export_parameters=_count(summary.export_parameters),
        growth_parameters=_count(summary.growth_parameters),
        growth_ratio=f"{summary.export_parameters / max(summary.base_parameters, 1):.2f}",
        mlp_parameters=_count(summary.mlp_parameters),
        export_size=_size(summary.export_bytes), base_size=_size(summary.base_bytes),
        top_k=config.get("num_experts_per_tok"),
        normalize=config.get("normalize_expert_weights", True),
        lora_rank=config.get("lora_rank"), lora_alpha=config.get("lora_alpha"),
    )
    (staging / "README.md").write_text(str(card), encoding="utf-8")


__all__ = ["NATIVE_FORMS", "ExportRefused", "ExportSummary", "NativeForm", "check_exportable",
           "export"]
