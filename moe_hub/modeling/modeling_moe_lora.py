"""Mixture-of-LoRA-Experts models built around any dense transformers causal LM.

Ships inside every checkpoint with the configuration, the layer, the routers and the optional
Triton kernel, all flat and importing only torch, transformers and each other, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` needs nothing else.

The dense model is built with ``AutoModelForCausalLM.from_config(config.text_config)`` and kept
whole under ``self.model`` (its own forward, loss, cache handling and quirks such as Gemma's
embedding scale stay untouched); every targeted linear inside it is then replaced by a
``MoELoraLinear``. Parameter names are therefore ``model.<dense name>`` with ``.base_layer``
inserted for targeted linears, and ``moe_shared.<router>.*`` for modules all sites share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast

from .configuration_moe_lora import MoELoraConfig
from .moe_lora_block import inject_moe_lora_blocks
from .moe_lora_layer import RoutingHolder, inject_moe_lora

# Importing a router module registers it; a new router is one file plus one line here.
from .router_graphmoe import GraphMoERouter  # noqa: F401
from .router_hypermoe import HyperMoERouter  # noqa: F401
from .router_rmoe import RecurrentRouter  # noqa: F401
from .router_topk import TopKRouter  # noqa: F401
from .routing import (
    ROUTERS,
    Router,
    RoutingContext,
    call_token_mask,
    load_balancing_loss,
    z_loss,
)

__all__ = ["MoELoraForCausalLM", "MoELoraModel", "MoELoraPreTrainedModel"]


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

    def __init__(self, config: MoELoraConfig) -> None:
        super().__init__(config)
        if config.router not in ROUTERS:
            raise ValueError(
                f"unknown router {config.router!r}; available routers: {sorted(ROUTERS)}"
            )
        self.model = AutoModelForCausalLM.from_config(config.text_config)
        self._no_split_modules = list(getattr(self.model, "_no_split_modules", None) or [])
        self.moe_shared = nn.ModuleDict()
        self._routing = RoutingHolder(self.moe_shared)
        block = config.routing_granularity == "block"
        inject = inject_moe_lora_blocks if block else inject_moe_lora
        self.routing_sites = inject(self.model, config, self._routing)
        for module in self.model.modules():
            if isinstance(module, Router):
                module.connect(self.routing_sites)
        shared = ROUTERS[config.router].shared_modules(config, self.routing_sites)
        if shared is not None:
            self.moe_shared[config.router] = shared
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Adapters initialise themselves when built; the dense part keeps its own scheme.
        if hasattr(module, "reset_adapter_parameters") or module is self.moe_shared:
            return
        self.model._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def adapter_parameter_names(self) -> list[str]:
        """Names of the expert and router parameters (everything that is not the dense model)."""
        return [
            name
            for name, _ in self.named_parameters()
            if ".base_layer." not in name and (".lora_" in name or ".router." in name
                                                or name.startswith("moe_shared."))
        ]

    #: Module names the wrapper inserts between a dense module and its weights.
    _wrapper_components = ("base_layer",)

    def dense_name(self, name: str) -> str | None:
        """The dense model's name for this model's tensor ``name`` (None outside ``self.model``)."""
        if not name.startswith("model."):
            return None
        parts = [p for p in name[len("model."):].split(".") if p not in self._wrapper_components]
        return ".".join(parts)

    def checkpoint_names_by_dense_name(self) -> dict[str, str]:
        """Every dense checkpoint tensor name -> this model's name for it.

        Also accepts the names of checkpoints saved from the bare base model (``layers.0...``
        rather than ``model.layers.0...``, as older GPT-2 checkpoints are).
        """
        adapters = set(self.adapter_parameter_names())
        inner_prefix = self.model.base_model_prefix + "."
        names: dict[str, str] = {}
        for name in self.state_dict():
            dense = None if name in adapters else self.dense_name(name)
            if dense is not None:
                names[dense] = name
                names.setdefault(dense.removeprefix(inner_prefix), name)
        return names

    def tied_parameter_names(self) -> list[str]:
        """Names of parameters tied to another one (absent from checkpoints that tie them)."""
        tied = getattr(self, "all_tied_weights_keys", None) or {}
        return list(tied)

    def reset_adapter_parameters(self) -> None:
        """Re-initialise every expert, router and shared routing module (in module order)."""
        for module in self.modules():
            if hasattr(module, "reset_adapter_parameters") and module is not self:
                module.reset_adapter_parameters()
        for module in self.moe_shared.modules():
            if module is not self.moe_shared and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """Transformers' loader, plus adapter-only checkpoints: their config names the base model
        (Hub id or local path, and revision), whose weights load under this model's names before
        the experts and routers are read from the checkpoint's adapter file."""
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):  # the Auto classes always pass one
            config = cls.config_class.from_pretrained(
                pretrained_model_name_or_path,
                **{k: kwargs[k] for k in (*_HUB_KWARGS, "revision", "subfolder") if k in kwargs},
            )
        if not getattr(config, "adapter_only", False):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return _load_adapter_only(cls, pretrained_model_name_or_path, config, model_args, kwargs)

    def _adjust_missing_and_unexpected_keys(self, loading_info: Any) -> None:
        super()._adjust_missing_and_unexpected_keys(loading_info)
        if self.config.adapter_only:
            # The base checkpoint has no experts or routers: they are read right after it.
            adapters = set(self.adapter_parameter_names())
            loading_info.missing_keys = {k for k in loading_info.missing_keys if k not in adapters}

    def _begin_routing(self, attention_mask: torch.Tensor | None, input_ids: Any = None,
                       inputs_embeds: Any = None) -> RoutingContext:
        return self._routing.begin(call_token_mask(attention_mask, input_ids, inputs_embeds))

    def _router_summary(
        self, ctx: RoutingContext
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple]:
        """Auxiliary losses over every site's decisions, padding excluded, each site once."""
        outputs = [ctx.outputs[i] for i in sorted(ctx.outputs)]
        if not outputs:
            zero = torch.zeros((), device=self.device)
            return {"load_balance": zero}, torch.zeros(0, self.config.num_experts), ()
        num_experts = self.config.num_experts
        logits, indices, masks, counts = [], [], [], []
        router_losses: dict[str, list[torch.Tensor]] = {}
        for out in outputs:
            tokens = out.indices.shape[0]
            mask = ctx.site_mask(tokens)
            steps = out.logits.shape[0] // tokens
            logits.append(out.logits)
            indices.append(out.balance_indices)
            if mask is not None:
                masks.append(mask.repeat(steps))
            chosen = out.indices if mask is None else out.indices[mask]
            counts.append(torch.bincount(chosen.reshape(-1), minlength=num_experts))
            for name, value in out.losses.items():
                router_losses.setdefault(name, []).append(value)
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

    # Reentrant checkpointing gives the cross-layer routing state no gradient (the "detached
    # state" ablation of RMoE): only the non-reentrant form is allowed. transformers >= 5.2x
    # routes everything through activation_checkpointing_enable; older 5.x through
    # gradient_checkpointing_enable.
    if hasattr(PreTrainedModel, "activation_checkpointing_enable"):

        def activation_checkpointing_enable(
            self, activation_checkpointing_kwargs: dict | None = None, **options: Any
        ) -> None:
            super().activation_checkpointing_enable(
                _non_reentrant(activation_checkpointing_kwargs), **options
            )

    else:

        def gradient_checkpointing_enable(
            self, gradient_checkpointing_kwargs: dict | None = None, **options: Any
        ) -> None:
            super().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=_non_reentrant(gradient_checkpointing_kwargs),
                **options,
            )


def _non_reentrant(kwargs: dict | None) -> dict:
    kwargs = dict(kwargs or {})
    if kwargs.get("use_reentrant", False):
        raise ValueError(
            "MoE-LoRA models need non-reentrant gradient checkpointing: pass "
            "gradient_checkpointing_kwargs={'use_reentrant': False}"
        )
    return {**kwargs, "use_reentrant": False}


class MoELoraModel(MoELoraPreTrainedModel):
    """The MoE-LoRA decoder without its LM head's output: returns hidden states (``AutoModel``).

    Holds the same module tree as :class:`MoELoraForCausalLM` so both load the same checkpoint
    without key renaming; the head's weights are loaded but not used.
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        self._begin_routing(attention_mask, input_ids, kwargs.get("inputs_embeds"))
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class MoELoraForCausalLM(MoELoraPreTrainedModel, GenerationMixin):
    """Causal LM with MoE-LoRA experts; loss = LM loss + weighted router losses when
    ``output_router_logits`` and ``labels`` are given (as in Mixtral)."""

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

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
        **kwargs: Any,
    ) -> MoELoraCausalLMOutput:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        ctx = self._begin_routing(attention_mask, input_ids, inputs_embeds)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss, aux_loss, aux_losses, counts, router_logits = out.loss, None, None, None, None
        if output_router_logits:
            aux_losses, counts, router_logits = self._router_summary(ctx)
            aux_loss = aux_losses["load_balance"]
            if loss is not None:
                loss = loss + self._weighted_aux_loss(aux_losses).to(loss.device)
        # Drop the recorded decisions; routing state stays for checkpointed recomputation.
        ctx.outputs.clear()
        return MoELoraCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=router_logits,
            aux_losses=aux_losses,
            expert_counts=counts,
        )


ADAPTER_WEIGHTS = "moe_adapters.safetensors"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")


def _dense_key_mapping(cls: type, config: MoELoraConfig, hub: dict[str, Any]) -> dict[str, str]:
    """``key_mapping`` taking every tensor name of the dense base checkpoint to this model's name
    for it (``model.`` prefix, ``.base_layer`` inside targeted linears)."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    base, revision = config.base_model_name_or_path, config.base_model_revision
    index = cached_file(base, "model.safetensors.index.json", revision=revision,
                        _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            keys = list(json.load(f)["weight_map"])
    else:
        single = cached_file(base, "model.safetensors", revision=revision,
                             _raise_exceptions_for_missing_entries=False, **hub)
        if single is None:
            raise OSError(f"base model {base} (revision {revision}) has no safetensors weights; "
                          f"an adapter-only checkpoint needs a safetensors base")
        with safe_open(single, "pt") as f:
            keys = list(f.keys())
    with torch.device("meta"):
        ours = cls(config).checkpoint_names_by_dense_name()
    return {f"^{re.escape(key)}$": ours[key] for key in keys if key in ours}


def _load_adapter_only(cls: type, path: Any, config: MoELoraConfig, model_args: tuple,
                       kwargs: dict[str, Any]) -> MoELoraPreTrainedModel:
    from safetensors import safe_open
    from transformers.utils import cached_file

    if not config.base_model_name_or_path:
        raise ValueError(f"{path} is an adapter-only checkpoint that names no base model "
                         f"(base_model_name_or_path): re-create it with `moe-hub convert`")
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
    model._weight_conversions = [
        c for c in getattr(model, "_weight_conversions", None) or []
        if not set(getattr(c, "_original_source_patterns", ())) & set(key_mapping)
    ]
    params = dict(model.named_parameters())
    with safe_open(adapter_file, "pt") as f:
        stored = set(f.keys())
        missing = sorted(set(model.adapter_parameter_names()) - stored)
        if missing:
            raise ValueError(f"{adapter_file} lacks {len(missing)} expert/router tensor(s) (e.g. "
                             f"{missing[0]}): re-create the checkpoint with `moe-hub convert`")
        with torch.no_grad():
            for name in stored & params.keys():
                params[name].copy_(f.get_tensor(name))
    # The model in memory holds its base: save_pretrained writes a complete checkpoint.
    model.config.adapter_only = False
    return loaded
