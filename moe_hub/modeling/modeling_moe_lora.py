"""Mixture-of-LoRA-Experts models built around any dense transformers causal LM.

Ships inside every checkpoint with the configuration, the layer, the routers and the optional
Triton kernel, all flat and importing only torch, transformers and each other, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` needs nothing else.

Module tree (transformers' convention, so that TRL, PEFT and accelerate find what they expect):
the dense model is built with ``AutoModelForCausalLM.from_config(config.text_config)`` and every
targeted linear inside it is replaced by a ``MoELoraLinear``; its decoder backbone (the module its
``base_model_prefix`` names: ``model``, GPT-2's ``transformer``, GPT-NeoX's ``gpt_neox``) is then
registered here as ``self.model`` and its LM head as ``self.lm_head`` (a head nested in another
module, as BERT's ``cls.predictions.decoder``, stays in that module, registered under its own
name). Parameter names are ``model.<backbone name>`` and ``lm_head.*``, with ``.base_layer``
inserted for targeted linears, and ``moe_shared.<router>.*`` for modules all sites share. The
dense causal LM object itself is kept unregistered, only to run its forward (loss,
``logits_to_keep``, logit softcapping and other per-architecture quirks stay the library's): its
submodules are the very objects registered here, so ``.to()``, quantization, hooks and loading act
on them.

Checkpoints written before this layout (``config.checkpoint_layout`` 1: the whole causal LM under
``model.``, e.g. ``model.model.layers.0...``, ``model.lm_head.weight``) load through a key mapping
and are saved in the current layout.
"""

from __future__ import annotations

import inspect
import re
import threading
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast

from .configuration_moe_lora import CHECKPOINT_LAYOUT, MoELoraConfig
from .moe_lora_block import inject_moe_lora_blocks

# transformers 5.0 copies into its module cache only the sibling files this module imports
# itself (later releases follow imports transitively), and then fails on the files those import:
# every shipped file is named here, through an attribute every module has.
from .moe_lora_fused import __name__ as _
from .moe_lora_layer import RoutingHolder, inject_moe_lora
from .moe_lora_ops import __name__ as _  # noqa: F811

# Importing a router module registers it; a new router is one file plus one line here.
from .router_graphmoe import GraphMoERouter  # noqa: F401
from .router_hypermoe import HyperMoERouter  # noqa: F401
from .router_rmoe import RecurrentRouter  # noqa: F401
from .router_topk import TopKRouter  # noqa: F401
from .routing import (
    ROUTERS,
    Float32Modules,
    Router,
    RoutingContext,
    call_token_mask,
    checkpoint_context_fn,
    float32_routing,
    load_balancing_loss,
    z_loss,
)

try:  # the kernel sits beside this file in a checkpoint, in moe_hub.kernels in the library
    from .moe_lora_triton import __name__ as _  # noqa: F401
except ImportError:
    pass
from .transformers_compat import (
    dense_names_of_keys,
    filter_loading_report,
    forget_key_mapping,
    init_guard,
    no_init_weights,
    optional_file,
    reported_missing_keys,
)

__all__ = ["MoELoraForCausalLM", "MoELoraModel", "MoELoraPreTrainedModel"]

#: ``set_trainable``'s choices.
TRAINABLE_CHOICES = ("adapters", "experts", "routers", "all")

#: Class names device_map must not split (see MoELoraPreTrainedModel.__init__).
_NO_SPLIT_ROUTING_MODULES = ("MoELoraLinear", "MoELoraBlock", "HyperNetwork")

# transformers 5.24 renamed the outputs' ``past_key_values`` field to ``cache``.
_OUTPUT_CACHE_FIELD = next(
    (f.name for f in fields(MoeCausalLMOutputWithPast) if f.name in ("cache", "past_key_values")),
    "past_key_values",
)


@dataclass
class MoELoraCausalLMOutput(MoeCausalLMOutputWithPast):
    """Mixtral's output plus every auxiliary loss by name and the per-site expert loads.

    aux_losses: unweighted ``load_balance`` and ``z_loss``, and each router's own (already
        weighted) losses; filled when ``output_router_logits``.
    expert_counts: [sites, experts] tokens (padding excluded) sent to each expert at each site.
    """

    aux_losses: dict[str, torch.Tensor] | None = None
    expert_counts: torch.Tensor | None = None


class MoELoraPreTrainedModel(PreTrainedModel):
    config_class = MoELoraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # Routers (and their shared modules) compute in float32 whatever dtype the model loads in.
    _keep_in_fp32_modules_strict = ["router", "moe_shared"]
    #: Whether this class registers the dense model's LM head (and what holds it).
    _keeps_head = True

    def __init__(self, config: MoELoraConfig) -> None:
        super().__init__(config)
        if config.router not in ROUTERS:
            raise ValueError(
                f"unknown router {config.router!r}; available routers: {sorted(ROUTERS)}"
            )
        dense = AutoModelForCausalLM.from_config(config.text_config)
        # One text config object for both: resizing the vocabulary or choosing the attention
        # implementation through this model's config reaches the dense forward.
        config.text_config = dense.config
        self.moe_shared = Float32Modules()
        self._routing = RoutingHolder(self.moe_shared)
        #: dense name prefix -> this model's (``model``, ``lm_head``; other children keep theirs)
        self._dense_prefixes = _dense_prefixes(dense)
        #: this model's name of the child that is or holds the LM head
        self._head_prefix = self._dense_prefixes[_head_path(dense).partition(".")[0]]
        block = config.routing_granularity == "block"
        inject = inject_moe_lora_blocks if block else inject_moe_lora
        # Target patterns match the dense model's own module names, as in every checkpoint so
        # far; sites are named as this model's modules are.
        self.routing_sites = inject(dense, config, self._routing, site_name=self._from_dense)
        for module in dense.modules():
            if isinstance(module, Router):
                module.connect(self.routing_sites)
        shared = ROUTERS[config.router].shared_modules(config, self.routing_sites)
        if shared is not None:
            self.moe_shared[config.router] = float32_routing(shared)
        self._adopt(dense)
        # Whatever the config said it was loaded from, this model is saved in the current layout.
        config.checkpoint_layout = CHECKPOINT_LAYOUT
        self.register_load_state_dict_pre_hook(_take_unchanged_quant_state)
        self.post_init()

    def _adopt(self, dense: PreTrainedModel) -> None:
        """Register ``dense``'s backbone as ``self.model`` and its head as ``self.lm_head``."""
        backbone = dense.base_model
        self.model = backbone
        for name, child in dense.named_children():
            holds_tensors = next(iter(child.parameters()), None) is not None or \
                next(iter(child.buffers()), None) is not None
            ours = self._dense_prefixes[name]
            if child is backbone or not holds_tensors or (ours == self._head_prefix
                                                           and not self._keeps_head):
                continue
            if ours == "lm_head":
                self.lm_head = child
                continue
            if hasattr(self, name):
                raise ValueError(f"{type(dense).__name__}.{name} clashes with "
                                 f"{type(self).__name__}.{name}")
            self.add_module(name, child)
        # Unregistered: its forward is reused, its tensors are the ones registered above.
        self.__dict__["_dense"] = dense
        _route_backbone_calls(backbone, self._routing)
        tied = getattr(dense, "all_tied_weights_keys", None) or {}
        mapped = {self._from_dense(k): self._from_dense(v) for k, v in tied.items()}
        self._tied_weights_keys = {k: v for k, v in mapped.items() if k and v}
        # device_map keeps each of these whole on one device: a routed site reads its experts'
        # banks and router together, the hypernetwork its trunk and heads.
        self._no_split_modules = [*(getattr(dense, "_no_split_modules", None) or []),
                                  *_NO_SPLIT_ROUTING_MODULES]
        self._cache_argument = _cache_argument(dense)

    @property
    def dense_model(self) -> PreTrainedModel:
        """The dense causal LM whose modules this model registers (not itself registered).

        A DataParallel replica (``_replicate_for_data_parallel`` copies ``__dict__``, so it
        starts out with the original's dense model) gets a shallow copy of it holding the
        replica's own children, made on its first call."""
        dense = self.__dict__["_dense"]
        if dense._modules.get(dense.base_model_prefix) is not self._modules.get("model"):
            dense = self.__dict__["_dense"] = self._dense_holding_own_children(dense)
        return dense

    def _dense_holding_own_children(self, dense: PreTrainedModel) -> PreTrainedModel:
        view = dense._replicate_for_data_parallel()
        for name in dense._modules:
            ours = self._dense_prefixes.get(name)
            if ours is not None and ours in self._modules:
                view._modules[name] = self._modules[ours]
        return view

    def _from_dense(self, name: str) -> str | None:
        """This model's name for the dense causal LM's module or tensor ``name`` (None when this
        class does not hold it: the head of ``MoELoraModel``)."""
        first, _, rest = name.partition(".")
        prefix = self._dense_prefixes.get(first)
        if prefix is None or (prefix == self._head_prefix and not self._keeps_head):
            return None
        return f"{prefix}.{rest}" if rest else prefix

    def _init_weights(self, module: nn.Module) -> None:
        # Adapters and shared routing modules follow their own rule (initialize_weights); the
        # dense part keeps the dense model's scheme.
        if hasattr(module, "reset_adapter_parameters") or module is self.moe_shared:
            return
        self.dense_model._init_weights(module)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialisation of the dense part, then every expert, router and shared
        routing module by its own rule (LoRA A kaiming-uniform, B zero, routers as at
        conversion). Tensors already loaded from a checkpoint are left alone: the init functions
        skip them (``_is_hf_initialized``), so only missing or re-created ones are initialised."""
        super().initialize_weights()
        with init_guard(self.config):
            self._reset_adapters()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.model

    def set_decoder(self, decoder: nn.Module) -> None:
        raise NotImplementedError("the MoE-LoRA layers live inside the decoder: build a new model")

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        # The top-level copy generation and pipelines read (the text config is already updated).
        self.config.vocab_size = self.config.get_text_config().vocab_size
        return embeddings

    def adapter_parameter_names(self) -> list[str]:
        """Names of the expert and router parameters (everything that is not the dense model)."""
        return [
            name
            for name, _ in self.named_parameters()
            if ".base_layer." not in name and (".lora_" in name or ".router." in name
                                                or name.startswith("moe_shared."))
        ]

    def set_trainable(self, which: str = "adapters") -> list[str]:
        """Choose what trains, as a PEFT model does: ``adapters`` (experts and routers: what
        ``from_pretrained`` leaves trainable unless the config's ``train_base`` is true),
        ``experts`` (LoRA pairs only), ``routers`` (routers and their shared modules only) or
        ``all`` (the dense base too). Everything else is frozen; returns the trainable names."""
        if which not in TRAINABLE_CHOICES:
            raise ValueError(f"set_trainable takes one of {TRAINABLE_CHOICES} (got {which!r})")
        adapters = set(self.adapter_parameter_names())
        trainable = []
        for name, param in self.named_parameters():
            if which == "all":
                wanted = True
            elif name not in adapters:
                wanted = False
            else:
                wanted = which == "adapters" or (which == "experts") == (".lora_" in name)
            if wanted and not param.is_floating_point():
                raise ValueError(f"{name} is quantized ({param.dtype}): a quantized base can't "
                                 f"train; call set_trainable('adapters')")
            param.requires_grad_(wanted)
            if wanted:
                trainable.append(name)
        return trainable

    def keep_adapters_float32_in_deepspeed(self) -> int:
        """Keep the experts, routers and shared routing modules float32, with their exact values,
        through DeepSpeed's bf16 mode: call it right before ``deepspeed.initialize`` (or before
        ``Trainer.train()`` under a DeepSpeed config). Returns the number of tensors kept.

        Why: DeepSpeed's bf16 mode casts every parameter (``p.data = p.data.to(bfloat16)``,
        past ``Module._apply``) and then moves the model. Left alone, the routers follow it
        (``routing._float32_cast``): they read bfloat16-rounded weights, and ZeRO keeps their
        float32 master copies. Kept, the adapters get their float32 tensors back at that move,
        before ZeRO builds its optimizer: every trained parameter is then float32, which ZeRO-2
        and ZeRO-3 take (ZeRO-3 takes one dtype for all of them, so the experts come too), the
        routers compute from exact float32 weights and the experts are stored in float32 as on
        one GPU (the expert op still computes with the base's bfloat16 operands). Not for
        DeepSpeed's fp16 mode: it scales the loss only when the trained parameters are fp16.

        Only a cast that happens after this call and past ``_apply`` is undone, once; a cast of
        the model through ``.to(dtype)``/``.half()`` in between cancels it."""
        adapters = set(self.adapter_parameter_names())
        named = dict(self.named_parameters())
        trained_base = sorted(n for n, p in named.items() if p.requires_grad and n not in adapters)
        if trained_base:
            raise ValueError(f"{trained_base[0]} trains too: DeepSpeed ZeRO-3 trains one dtype, "
                             f"so float32 adapters need a frozen base (set_trainable('adapters'))")
        wrong = sorted(n for n in adapters if named[n].dtype != torch.float32)
        if wrong:
            raise ValueError(f"adapter {wrong[0]} is {named[wrong[0]].dtype}, not float32: make "
                             f"the adapters float32 first (moe_hub.finetune.prepare_for_training)")
        # The tensors themselves, not copies: nothing is held twice until DeepSpeed's cast
        # replaces them, and in-place changes meanwhile (a state-dict load) are kept.
        self.__dict__["_float32_adapters"] = [(named[n], named[n].data) for n in sorted(adapters)]
        return len(adapters)

    def _apply(self, fn: Any, recurse: bool = True) -> MoELoraPreTrainedModel:
        kept = self.__dict__.get("_float32_adapters")
        if kept:
            # 16-bit since keep_adapters_float32_in_deepspeed: cast past _apply, as DeepSpeed's
            # bf16 mode does just before this move. Their float32 tensors come back, once.
            cast = [(p, t) for p, t in kept if p.dtype in (torch.float16, torch.bfloat16)]
            if cast:
                for param, tensor in cast:
                    param.data = tensor
                kept = self.__dict__["_float32_adapters"] = None
        dtypes = [p.dtype for p, _ in kept] if kept else []
        super()._apply(fn, recurse)
        if kept and any(p.dtype != dtype for (p, _), dtype in zip(kept, dtypes)):
            self.__dict__["_float32_adapters"] = None  # the caller cast the model: theirs wins
        return self

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; a 4-bit weight counts its unpacked elements."""
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        """Print the trainable share of the parameters, in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    #: Module names the wrapper inserts between a dense module and its weights.
    _wrapper_components = ("base_layer",)

    def dense_name(self, name: str) -> str | None:
        """The dense causal LM's name for this model's tensor ``name`` (None for the adapters'
        shared modules and anything else outside the dense model)."""
        first, _, rest = name.partition(".")
        dense = {ours: d for d, ours in self._dense_prefixes.items()}.get(first)
        if dense is None or not rest:
            return None
        parts = [p for p in rest.split(".") if p not in self._wrapper_components]
        return ".".join([dense, *parts])

    def checkpoint_names_by_dense_name(self) -> dict[str, str]:
        """Every dense checkpoint tensor name -> this model's name for it.

        The one place that maps the dense model's names to this model's: ``convert`` streams the
        base shards through it and adapter-only checkpoints load their base with it. Also accepts
        the names of checkpoints saved from the bare backbone (``layers.0...`` rather than
        ``model.layers.0...``, as older GPT-2 checkpoints are).
        """
        adapters = set(self.adapter_parameter_names())
        backbone_prefix = self.dense_model.base_model_prefix + "."
        names: dict[str, str] = {}
        for name in self.state_dict():
            dense = None if name in adapters else self.dense_name(name)
            if dense is not None:
                names[dense] = name
                names.setdefault(dense.removeprefix(backbone_prefix), name)
        return names

    def tied_parameter_names(self) -> list[str]:
        """Names of parameters tied to another one (absent from checkpoints that tie them)."""
        tied = getattr(self, "all_tied_weights_keys", None) or {}
        return list(tied)

    def reset_adapter_parameters(self) -> None:
        """Re-initialise every expert, router and shared routing module (in module order)."""
        self._reset_adapters()

    def _reset_adapters(self) -> None:
        for module in self.modules():
            if hasattr(module, "reset_adapter_parameters") and module is not self:
                module.reset_adapter_parameters()
        for module in self.moe_shared.modules():
            if module is not self.moe_shared and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """Transformers' loader, plus adapter-only checkpoints (their config names the base model,
        Hub id or local path and revision, whose weights load under this model's names before
        the experts and routers are read from the checkpoint's adapter file) and checkpoints in
        the layout before this one (renamed while loading, saved in the current layout)."""
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):  # the Auto classes always pass one
            config = cls.config_class.from_pretrained(
                pretrained_model_name_or_path,
                **{k: kwargs[k] for k in (*_HUB_KWARGS, "revision", "subfolder") if k in kwargs},
            )
        _require_moe_config(config, pretrained_model_name_or_path)
        legacy = _legacy_key_mapping(config)
        if getattr(config, "adapter_only", False):
            loaded = _load_adapter_only(cls, pretrained_model_name_or_path, config, model_args,
                                        kwargs, legacy)
        else:
            if legacy:
                kwargs["key_mapping"] = {**legacy, **(kwargs.get("key_mapping") or {})}
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                             **kwargs)
            forget_key_mapping(loaded[0] if isinstance(loaded, tuple) else loaded, legacy,
                               config)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # A loaded checkpoint trains like a PEFT model: experts and routers, base frozen
        # (Trainer, TRL and plain loops optimise whatever requires grad).
        model.set_trainable("all" if getattr(model.config, "train_base", False) else "adapters")
        return loaded

    def _adjust_missing_and_unexpected_keys(self, *args: Any, **kwargs: Any) -> Any:
        # transformers' hook for trimming the loading report (private, and its signature moved
        # within 5.x: the compat helper handles both; only warnings depend on it)
        result = filter_loading_report(
            super()._adjust_missing_and_unexpected_keys(*args, **kwargs), args,
            # An adapter-only checkpoint's base has no experts or routers: read right after it.
            drop_missing=self.adapter_parameter_names() if self.config.adapter_only else (),
            drop_unexpected_prefix=None if self._keeps_head else self._head_prefix + ".",
        )
        missing = reported_missing_keys(result, args)
        try:
            self._refuse_missing_base(missing)
            if missing is not None and not self.config.adapter_only:
                # An adapter-only checkpoint's adapters are checked against its adapter file.
                refuse_missing_adapters(self, missing, "the checkpoint's weight files")
        except ValueError:
            # transformers logs its report even when loading stops: without the missing keys,
            # so that the error is the one account of them, not a table of weights "newly
            # initialized ... consider training" for a model that will not exist.
            filter_loading_report(result, args, drop_missing=missing)
            raise
        return result

    def _refuse_missing_base(self, missing: Any) -> None:
        """transformers initialises missing weights at random and only warns: with every base
        weight missing (a base folder overwritten by its own checkpoint, shards lost) the model
        would run and train on noise, so that case stops loading."""
        if missing is None:
            return
        skip = set(self.adapter_parameter_names()) | set(self.tied_parameter_names())
        base = [name for name, _ in self.named_parameters(remove_duplicate=False)
                if name not in skip]
        if not base or any(name not in missing for name in base):
            return
        if self.config.adapter_only:
            raise ValueError(
                f"the base model {self.config.base_model_name_or_path} holds none of the base "
                f"weights this adapter-only checkpoint needs (e.g. {base[0]}): set "
                f"base_model_name_or_path in its config.json to the dense model it was "
                f"converted from")
        raise ValueError(
            f"the checkpoint's weight files hold none of the base weights (e.g. {base[0]}): "
            f"they are incomplete; re-create the checkpoint with `moe-hub convert`")

    def _routing_scope(self, attention_mask: torch.Tensor | None, input_ids: Any = None,
                       inputs_embeds: Any = None):
        """The routing context of one forward of this model (a context manager)."""
        return self._routing.begin(call_token_mask(attention_mask, input_ids, inputs_embeds),
                                   self.moe_shared)

    def _router_summary(
        self, ctx: RoutingContext, device: torch.device
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple]:
        """Auxiliary losses over every site's decisions, padding excluded, each site once.

        Sites may sit on different devices (``device_map`` across GPUs): every per-site tensor
        is moved to ``device`` (where the LM loss is) before they are combined. The moves are
        differentiable, so each router still gets its gradient on its own device.
        """
        outputs = [ctx.outputs[i] for i in sorted(ctx.outputs)]
        num_experts = self.config.num_experts
        if not outputs:
            zero = torch.zeros((), device=device)
            return {"load_balance": zero}, torch.zeros(0, num_experts, device=device), ()
        logits, indices, masks, counts = [], [], [], []
        router_losses: dict[str, list[torch.Tensor]] = {}
        for out in outputs:
            tokens = out.indices.shape[0]
            mask = ctx.site_mask(tokens)
            mask = None if mask is None else mask.to(device)
            steps = out.logits.shape[0] // tokens
            logits.append(out.logits.to(device))
            indices.append(out.balance_indices.to(device))
            if mask is not None:
                masks.append(mask.repeat(steps))
            # One-hot sums, not bincount over masked rows: no host synchronisation on a GPU.
            chosen = F.one_hot(out.indices.to(device), num_experts)
            if mask is not None:
                chosen = chosen * mask.view(-1, 1, 1)
            counts.append(chosen.sum(dim=(0, 1)))
            for name, value in out.losses.items():
                router_losses.setdefault(name, []).append(value.to(device))
        all_logits = torch.cat(logits)
        mask = torch.cat(masks) if len(masks) == len(outputs) else None
        losses = {
            "load_balance": load_balancing_loss(all_logits, torch.cat(indices), num_experts, mask)
        }
        if self.config.router_z_loss_coef:
            losses["z_loss"] = z_loss(all_logits, mask)
        for name, values in router_losses.items():
            # Summed over sites, as HyperMoE's reference sums its per-layer loss over layers.
            losses[name] = torch.stack(values).sum()
        return losses, torch.stack(counts).detach(), tuple(o.logits for o in outputs)

    def _weighted_aux_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        # load_balance is always reported; routers with their own balancing (HyperMoE's cv^2,
        # as in its reference) do not train with it.
        switch = ROUTERS[self.config.router].load_balance
        total = self.config.router_aux_loss_coef * losses["load_balance"] * switch
        if "z_loss" in losses:
            total = total + self.config.router_z_loss_coef * losses["z_loss"]
        for name, value in losses.items():
            if name not in ("load_balance", "z_loss"):
                total = total + value
        return total

    if hasattr(PreTrainedModel, "is_activation_checkpointing"):

        @property
        def is_gradient_checkpointing(self) -> bool:
            # PEFT and TRL still read the old name, which transformers 5.2x deprecates with a
            # FutureWarning on every read; the answer is the same.
            return self.is_activation_checkpointing

    # Reentrant checkpointing gives the cross-layer routing state no gradient (the "detached
    # state" ablation of RMoE): only the non-reentrant form is allowed, and it gets a context_fn
    # that recomputes every layer with its own forward's routing context. transformers >= 5.2x
    # routes everything through activation_checkpointing_enable; older 5.x through
    # gradient_checkpointing_enable.
    if hasattr(PreTrainedModel, "activation_checkpointing_enable"):

        def activation_checkpointing_enable(
            self, activation_checkpointing_kwargs: dict | None = None, **options: Any
        ) -> None:
            super().activation_checkpointing_enable(
                _checkpoint_kwargs(activation_checkpointing_kwargs), **options
            )

    else:

        def gradient_checkpointing_enable(
            self, gradient_checkpointing_kwargs: dict | None = None, **options: Any
        ) -> None:
            super().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=_checkpoint_kwargs(gradient_checkpointing_kwargs),
                **options,
            )


def _take_unchanged_quant_state(model: nn.Module, state_dict: dict[str, Any], prefix: str,
                                *_: Any) -> None:
    """``load_state_dict`` pre-hook: take the 4-bit base's quantization-state entries that equal
    what its modules already hold, so that a strict load of the model's own ``state_dict()``
    succeeds.

    bitsandbytes' ``Linear4bit`` writes its weight's quantization state (``weight.absmax``, ...)
    into ``state_dict()`` but never reads it back in ``load_state_dict``: a strict load of a 4-bit
    model's own state dict fails on those "unexpected" keys. DeepSpeed's checkpoints are such
    state dicts, loaded strictly on resume (Trainer's ``deepspeed_load_checkpoint``, or
    ``engine.load_checkpoint`` called directly). The base is frozen and the resumed run loads the
    same base, so the entries match what is there: nothing to load. An entry that differs (a
    base quantized otherwise) stays in the state dict and is reported as before."""
    # Every 4-bit weight's entries include "<name>.weight.quant_state.bitsandbytes__<type>".
    if not any(".weight.quant_state." in key for key in state_dict):
        return
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is None or not hasattr(quant_state, "as_dict"):
            continue
        head = f"{name}.weight." if name else "weight."
        for key, held in quant_state.as_dict(packed=True).items():
            given = state_dict.get(head + key)
            if isinstance(given, torch.Tensor) and isinstance(held, torch.Tensor) and \
                    given.shape == held.shape and given.dtype == held.dtype and \
                    torch.equal(given.to(held.device), held):
                del state_dict[head + key]


def _checkpoint_kwargs(kwargs: dict | None) -> dict:
    kwargs = dict(kwargs or {})
    if kwargs.get("use_reentrant", False):
        raise ValueError(
            "MoE-LoRA models need non-reentrant gradient checkpointing: pass "
            "gradient_checkpointing_kwargs={'use_reentrant': False}"
        )
    user_fn = kwargs.get("context_fn")
    if not getattr(user_fn, "moe_hub_routing", False):
        kwargs["context_fn"] = checkpoint_context_fn(user_fn)
    return {**kwargs, "use_reentrant": False}


def _route_backbone_calls(backbone: nn.Module, routing: RoutingHolder) -> None:
    """Make every call of the backbone route inside a context: the one of the causal LM's forward
    in progress, or its own when it is called directly (TRL's fused LM head calls
    ``model.base_model(...)`` and applies the head itself).

    Hooks, not a wrapped ``forward`` stored on the instance: a bound method in the instance's
    ``__dict__`` would travel into DataParallel's replicas (``_replicate_for_data_parallel``
    copies ``__dict__``) still bound to the original, and a replica would run the original's
    layers. Hooks receive the module they run on."""
    forward = type(backbone).forward
    parameters = list(inspect.signature(forward).parameters)
    mask_position = parameters.index("attention_mask") if "attention_mask" in parameters else None
    ids_first = parameters[1:2] == ["input_ids"]
    open_scopes = threading.local()  # per thread: DataParallel runs each replica in its own

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and mask_position is not None and len(args) >= mask_position:
            mask = args[mask_position - 1]  # args exclude self
        input_ids = kwargs.get("input_ids", args[0] if args and ids_first else None)
        scope = module._moe_routing.join(call_token_mask(mask, input_ids,
                                                          kwargs.get("inputs_embeds")))
        scope.__enter__()
        stack = getattr(open_scopes, "stack", None)
        if stack is None:
            stack = open_scopes.stack = []
        stack.append(scope)

    def leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # always_call: runs when the forward raised too, so no context outlives its call.
        open_scopes.stack.pop().__exit__(None, None, None)

    backbone._moe_routing = routing
    backbone.register_forward_pre_hook(enter, with_kwargs=True, prepend=True)
    backbone.register_forward_hook(leave, with_kwargs=True, always_call=True)


def _cache_argument(dense: nn.Module) -> str:
    """The name the dense forward takes the KV cache under (``cache`` from transformers 5.24,
    ``past_key_values`` before; the old name warns from 5.24 and goes in 5.40)."""
    parameters = inspect.signature(type(dense).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class MoELoraModel(MoELoraPreTrainedModel):
    """The MoE-LoRA decoder without an LM head: returns hidden states (``AutoModel``).

    Holds the same module tree as :class:`MoELoraForCausalLM` minus ``lm_head``, so both load
    the same checkpoint (the head's weights are skipped).
    """

    _keeps_head = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if "past_key_values" in kwargs and self._cache_argument != "past_key_values":
            kwargs[self._cache_argument] = kwargs.pop("past_key_values")
        with self._routing_scope(attention_mask, input_ids, kwargs.get("inputs_embeds")):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class MoELoraForCausalLM(MoELoraPreTrainedModel, GenerationMixin):
    """Causal LM with MoE-LoRA experts; loss = LM loss + weighted router losses when
    ``output_router_logits`` and ``labels`` are given (as in Mixtral).

    The router losses are defined per optimizer step. A plain call (no ``num_items_in_batch``)
    adds ``aux = coef * load_balance (+ z-loss and router losses)`` of this batch. When
    ``num_items_in_batch`` N is given (transformers' Trainer passes it because ``forward``
    accepts ``**kwargs``; the LM loss is then summed over this micro-batch's label tokens and
    divided by N, the label tokens of the whole optimizer step), the aux term is weighted by this
    micro-batch's share of those tokens, ``n / N`` (n: labels != -100 after the causal shift, or
    of ``shift_labels``). Trainer then skips its division by the gradient-accumulation steps and,
    with ``average_tokens_across_devices`` (N counted over all processes), multiplies the loss by
    the world size W while DDP averages gradients over W. Summed over the micro-batches and
    averaged over the processes, the aux term is therefore ``sum_m (n_m / N) aux_m``: the
    token-weighted mean of the micro-batch aux losses, whatever grad_accum and W are. Without
    that weight it would grow as grad_accum x W. With ``average_tokens_across_devices=False``
    N is each process's own count and nothing is multiplied: the aux term is then the mean over
    processes of each one's token-weighted mean, exactly as the LM loss is (read from Trainer's
    source; the tests cover the default).
    """

    def get_output_embeddings(self) -> nn.Module:
        return self.dense_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.dense_model.set_output_embeddings(value)
        if self._head_prefix == "lm_head":
            self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MoELoraCausalLMOutput | tuple:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        # Generation passes the cache as ``cache`` from transformers 5.24 on, as
        # ``past_key_values`` before; the dense forward gets it under the name it declares.
        cache = kwargs.pop("cache", None)
        kwargs[self._cache_argument] = past_key_values if past_key_values is not None else cache
        with self._routing_scope(attention_mask, input_ids, inputs_embeds) as ctx:
            out = self.dense_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **kwargs,
            )
            loss, aux_loss, aux_losses, counts, router_logits = out.loss, None, None, None, None
            if output_router_logits:
                aux_losses, counts, router_logits = self._router_summary(ctx, out.logits.device)
                aux_loss = aux_losses["load_balance"]
                if loss is not None:
                    weighted = self._weighted_aux_loss(aux_losses).to(loss.device)
                    num_items = kwargs.get("num_items_in_batch")
                    if num_items is not None:
                        weighted = weighted * loss_token_share(
                            labels, kwargs.get("shift_labels"), num_items, loss.device)
                    loss = loss + weighted
        output = MoELoraCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=out.logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=router_logits,
            aux_losses=aux_losses,
            expert_counts=counts,
            **{_OUTPUT_CACHE_FIELD: getattr(out, _OUTPUT_CACHE_FIELD, None)},
        )
        return output if return_dict else output.to_tuple()


def loss_token_share(
    labels: torch.Tensor | None, shift_labels: torch.Tensor | None, num_items: Any,
    device: torch.device,
) -> torch.Tensor:
    """This micro-batch's loss tokens over ``num_items`` (the optimizer step's, as Trainer counts
    them: ``labels[..., 1:] != -100``, or ``shift_labels`` when the collator provides them)."""
    targets = shift_labels if shift_labels is not None else (
        None if labels is None else labels[..., 1:])
    if targets is None:
        raise ValueError("num_items_in_batch was passed without labels or shift_labels: the "
                         "router losses can't be weighted by this batch's share of the tokens")
    tokens = targets.ne(-100).sum().to(device, torch.float32)
    total = torch.as_tensor(num_items, device=device, dtype=torch.float32)
    return tokens / total.clamp_min(1.0)


#: Experts and routers of a checkpoint (all of it but the base): the adapter-only format's file.
ADAPTER_WEIGHTS = "moe_adapters.safetensors"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")


def refuse_missing_adapters(model: MoELoraPreTrainedModel, present_or_missing: Any,
                            where: str, present: bool = False) -> None:
    """transformers re-initialises missing tensors and only warns: an expert or router that the
    config describes and the weights lack (``router`` or ``num_experts`` edited in config.json,
    entries dropped from the index) would run on fresh random values, so loading stops naming
    them. ``present_or_missing``: the names missing, or with ``present`` the names stored."""
    wanted = model.adapter_parameter_names()
    keys = set(present_or_missing)
    missing = [name for name in wanted if (name not in keys if present else name in keys)]
    if not missing:
        return
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    raise ValueError(
        f"{where} lack {len(missing)} of the {len(wanted)} expert/router tensors config.json "
        f"describes (router {model.config.router!r}, {model.config.num_experts} experts): "
        f"{shown}; config.json and the weights disagree: restore the config.json written with "
        f"them, or re-create the checkpoint with `moe-hub convert`")


def _require_moe_config(config: PretrainedConfig, path: Any) -> None:
    """One clear error for a directory that holds some other model (a dense checkpoint) or none
    (the config class then reads an empty config)."""
    if getattr(config, "text_config", None) is not None:
        return
    architectures = getattr(config, "architectures", None)
    if architectures:
        raise ValueError(
            f"{path} is not a moe-hub checkpoint (its config.json describes "
            f"{', '.join(architectures)}): load it with AutoModelForCausalLM.from_pretrained, or "
            f"convert it first with `moe-hub convert {path} OUT`"
        )
    raise ValueError(f"{path} is not a moe-hub checkpoint (no moe-hub config.json): pass a "
                     f"directory or Hub repo written by `moe-hub convert`")


def _legacy_key_mapping(config: MoELoraConfig) -> dict[str, str]:
    """``key_mapping`` for a checkpoint saved in layout 1 (the whole dense causal LM under
    ``model.``), empty for the current layout. Read before a model is built from ``config``
    (building one marks the config as the current layout)."""
    if getattr(config, "checkpoint_layout", 1) >= CHECKPOINT_LAYOUT:
        return {}
    with torch.device("meta"), no_init_weights():
        dense = AutoModelForCausalLM.from_config(config.text_config)
    return {f"^model\\.{re.escape(old)}\\.": f"{new}."
            for old, new in _dense_prefixes(dense).items()}


def _dense_prefixes(dense: PreTrainedModel) -> dict[str, str]:
    """First name component in the dense causal LM -> in this model's tree: its backbone
    becomes ``model``, its head ``lm_head``, other children keep their names."""
    backbone = dense.base_model
    if backbone is dense:
        raise ValueError(f"{type(dense).__name__} names no decoder backbone "
                         f"(base_model_prefix {dense.base_model_prefix!r}): not supported")
    head_name = _head_path(dense)
    if next(dense.named_parameters(recurse=False), None) is not None or \
            next(dense.named_buffers(recurse=False), None) is not None:
        raise ValueError(f"{type(dense).__name__} keeps tensors outside its submodules: "
                         f"not supported")
    prefixes = {name: name for name, _ in dense.named_children()}
    prefixes[dense.base_model_prefix] = "model"
    if "." not in head_name:  # a head nested in another child stays there, under its name
        prefixes[head_name] = "lm_head"
    return prefixes


def _head_path(dense: PreTrainedModel) -> str:
    head = dense.get_output_embeddings()
    path = next((n for n, m in dense.named_modules() if head is not None and m is head), None)
    if not path:
        raise ValueError(f"{type(dense).__name__} has no LM head: not a causal LM")
    return path


def _rename(name: str, mapping: dict[str, str]) -> str:
    for pattern, target in mapping.items():
        renamed = re.sub(pattern, target, name, count=1)
        if renamed != name:
            return renamed
    return name


def _dense_key_mapping(cls: type, config: MoELoraConfig, hub: dict[str, Any]) -> dict[str, str]:
    """``key_mapping`` taking every tensor name of the dense base checkpoint to this model's name
    for it (``model.`` prefix, ``.base_layer`` inside targeted linears)."""
    import json

    from safetensors import safe_open

    base, revision = config.base_model_name_or_path, config.base_model_revision
    index = optional_file(base, "model.safetensors.index.json", revision=revision, **hub)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            keys = list(json.load(f)["weight_map"])
    else:
        single = optional_file(base, "model.safetensors", revision=revision, **hub)
        if single is None:
            raise OSError(f"base model {base} (revision {revision}) has no safetensors weights; "
                          f"an adapter-only checkpoint needs a safetensors base")
        with safe_open(single, "pt") as f:
            keys = list(f.keys())
    with torch.device("meta"):
        model = cls(config)
    ours = model.checkpoint_names_by_dense_name()
    renamed = dense_names_of_keys(model.dense_model, keys, ours, config)
    mapping = {}
    for key, dense in renamed.items():
        dense = dense if dense in ours else key
        if dense in ours:
            mapping[f"^{re.escape(key)}$"] = ours[dense]
    return mapping


def _require_local_base(path: Any, base: str) -> None:
    """A base recorded as a local path (absolute, ``./``, ``~``, or more than owner/name) that
    is gone would otherwise be looked up on the Hub as a repo id and fail there obscurely."""
    import os

    text = str(base)
    local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 \
        or (os.sep != "/" and os.sep in text)
    if local and not os.path.isdir(os.path.expanduser(text)):
        config_file = os.path.join(str(path), "config.json")
        raise OSError(
            f"{path} is an adapter-only checkpoint whose base model {text} "
            f"(base_model_name_or_path in its config.json) does not exist any more: move the "
            f"base back there, or set base_model_name_or_path in {config_file} to where it is now")


def _load_adapter_only(cls: type, path: Any, config: MoELoraConfig, model_args: tuple,
                       kwargs: dict[str, Any], legacy: dict[str, str]) -> MoELoraPreTrainedModel:
    from safetensors import safe_open
    from transformers.utils import cached_file

    if not config.base_model_name_or_path:
        raise ValueError(f"{path} is an adapter-only checkpoint that names no base model "
                         f"(base_model_name_or_path): re-create it with `moe-hub convert`")
    _require_local_base(path, config.base_model_name_or_path)
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    adapter_file = cached_file(path, ADAPTER_WEIGHTS, revision=kwargs.get("revision"),
                               subfolder=kwargs.get("subfolder", ""), **hub)
    config_fields = config.to_dict()
    # Revision and PEFT lookups the Auto class resolved refer to the adapter repo, not the base.
    base_kwargs = {k: v for k, v in kwargs.items() if k not in
                   ("config", "revision", "subfolder", "_commit_hash", "adapter_kwargs")}
    for key in [k for k in base_kwargs if k in config_fields and k not in ("dtype", "torch_dtype")]:
        setattr(config, key, base_kwargs.pop(key))  # config overrides, as transformers applies them
    key_mapping = _dense_key_mapping(cls, config, hub)
    loaded = super(MoELoraPreTrainedModel, cls).from_pretrained(
        config.base_model_name_or_path, *model_args, config=config,
        revision=config.base_model_revision, key_mapping=key_mapping, **base_kwargs,
    )
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    # save_pretrained must write this model's names, not map them back to the dense ones.
    forget_key_mapping(model, key_mapping, config)
    params = dict(model.named_parameters())
    with safe_open(adapter_file, "pt") as f:
        # Adapter files of layout 1 name tensors model.<dense name>: renamed to this model's.
        names = {_rename(name, legacy): name for name in f.keys()}
        stored = set(names)
        refuse_missing_adapters(model, stored, str(adapter_file), present=True)
        with torch.no_grad():
            for name in stored & params.keys():
                params[name].copy_(f.get_tensor(names[name]))
    # The model in memory holds its base: save_pretrained writes a complete checkpoint.
    model.config.adapter_only = False
    return loaded
