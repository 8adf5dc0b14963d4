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

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast

from .configuration_moe_lora import MoELoraConfig
from .moe_lora_layer import RoutingHolder, inject_moe_lora
from .routing import ROUTERS, RoutingContext, load_balancing_loss, z_loss

# Importing a router module registers it; a new router is one file plus one line here.
from .router_topk import TopKRouter  # noqa: F401

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
        self.routing_sites = inject_moe_lora(self.model, config, self._routing)
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

    def _begin_routing(self, attention_mask: torch.Tensor | None) -> RoutingContext:
        token_mask = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        return self._routing.begin(token_mask)

    def _router_summary(self, ctx: RoutingContext) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple]:
        """Auxiliary losses over every site's decisions, padding excluded, each site counted once."""
        outputs = [ctx.outputs[i] for i in sorted(ctx.outputs)]
        if not outputs:
            zero = torch.zeros((), device=self.device)
            return {"load_balance": zero}, torch.zeros(0, self.config.num_experts), ()
        num_experts = self.config.num_experts
        logits, indices, masks, counts = [], [], [], []
        router_losses: dict[str, list[torch.Tensor]] = {}
        for out in outputs:
            tokens = out.indices.shape[0]
            mask = ctx.flat_mask(tokens)
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
            losses[name] = torch.stack(values).mean()
        return losses, torch.stack(counts).detach(), tuple(o.logits for o in outputs)

    def _weighted_aux_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = self.config.router_aux_loss_coef * losses["load_balance"]
        if "z_loss" in losses:
            total = total + self.config.router_z_loss_coef * losses["z_loss"]
        for name, value in losses.items():
            if name not in ("load_balance", "z_loss"):
                total = total + value
        return total

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        # Reentrant checkpointing gives the cross-layer routing state no gradient (the "detached
        # state" ablation of RMoE): only the non-reentrant form is correct here.
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", False):
            raise ValueError(
                "MoE-LoRA models need non-reentrant gradient checkpointing: pass "
                "gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        kwargs["use_reentrant"] = False
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
        self._begin_routing(attention_mask)
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
        ctx = self._begin_routing(attention_mask)
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
