"""Block granularity (MixLoRA): one router per decoder MLP block, experts = the frozen MLP + LoRA.

Each expert e is the whole MLP with its own LoRA pair on every MLP linear, over the shared frozen
weights; a token's block output is the weighted sum of its top-k experts' MLP outputs. Attention
(and any other targeted linear outside the MLP) gets one ordinary, unrouted LoRA.

Cheap form (the MixLoRA layout, Li et al. 2024, arXiv 2404.15159): the frozen gate/up (or
c_fc) projections run once per token; per selected expert only the LoRA deltas, the activation
and the gate * up product are computed; the frozen down projection is linear, so
sum_j g_j down(h_j) = down(sum_j g_j h_j) + (sum_j g_j - 1) * bias runs once on the mixture.
The LoRA deltas use the grouped expert form: the (token, slot) pairs are sorted by expert once
per block, each expert's LoRA runs on its own pairs only, and the gate/up shrink x A_e reads x's
rows directly (once per token and chosen expert, no k copies of x); outputs stay per slot.

Module layout, so that a dense checkpoint maps onto a block-mode one by inserting ``base_layer``:
``<prefix>.mlp.<linear>.weight`` -> ``<prefix>.mlp.base_layer.<linear>.weight`` and
``<prefix>.self_attn.q_proj.weight`` -> ``<prefix>.self_attn.q_proj.base_layer.weight``.
Adapters: ``<prefix>.mlp.lora_A.<linear>`` [E, d_in, r], ``<prefix>.mlp.lora_B.<linear>``
[E, r, d_out], ``<prefix>.mlp.router.*``, and ``<...>.q_proj.lora_A`` [d_in, r] / ``lora_B``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .moe_lora_layer import (
    RoutingHolder,
    is_linear,
    linear_features,
    site_kind,
    target_matches,
)
from .moe_lora_ops import (
    autocast_off,
    decoding_regime,
    expert_compute_dtype,
    group_by_expert,
    moe_lora_slots_delta,
    shared_cast,
)
from .routing import (
    ROUTERS,
    ParameterBank,
    RouterOutput,
    RoutingSite,
    float32_parameters,
)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class MlpLayout:
    """How one MLP family computes: ``first`` linears feed the activation, ``down`` closes it.

    style: ``gated`` act(gate) * up (Llama, Qwen2, Mistral, Gemma), ``fused`` the same with gate
    and up fused in one ``gate_up_proj`` (Phi-3), ``plain`` act(c_fc) (GPT-2).
    """

    style: str
    first: tuple[str, ...]
    down: str
    act: str


LAYOUTS = (
    MlpLayout("gated", ("gate_proj", "up_proj"), "down_proj", "act_fn"),
    MlpLayout("fused", ("gate_up_proj",), "down_proj", "activation_fn"),
    MlpLayout("plain", ("c_fc",), "c_proj", "act"),
)


def mlp_layout(mlp: nn.Module) -> MlpLayout | None:
    for layout in LAYOUTS:
        names = (*layout.first, layout.down)
        if all(is_linear(getattr(mlp, n, None) or nn.Identity()) for n in names) and hasattr(
            mlp, layout.act
        ):
            return layout
    return None


def make_dropout(config: Any) -> nn.Module:
    return nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()


class LoraLinear(nn.Module):
    """An ordinary (unrouted) LoRA around a frozen linear: y = base(x) + scale * drop(x) A B."""

    def __init__(self, base_layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.scale = config.lora_scale
        self.lora_A = nn.Parameter(torch.empty(self.in_features, config.lora_rank))
        self.lora_B = nn.Parameter(torch.empty(config.lora_rank, self.out_features))
        self.lora_dropout = make_dropout(config)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        # Same precision policy as the experts: 16-bit operands, one shared cast of x.
        dtype = expert_compute_dtype(x, self.lora_A.dtype)
        with autocast_off(x.device):
            shrunk = self.lora_dropout(shared_cast(x, dtype)) @ self.lora_A.to(dtype)
            delta = shrunk @ self.lora_B.to(dtype)
        return result + (delta * self.scale).to(result.dtype)


class MoELoraBlock(nn.Module):
    """A routed MLP block: the frozen MLP is ``base_layer``; each expert adds LoRA to all its
    linears."""

    def __init__(
        self, base_layer: nn.Module, layout: MlpLayout, site: RoutingSite, config: Any,
        routing: RoutingHolder,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.site = site
        self.scale = config.lora_scale
        self.kernel = config.expert_kernel
        self._routing = routing
        experts, rank = config.num_experts, config.lora_rank
        # Read with ``fetch`` (``self.lora_A.fetch(name)``): offloaded banks load only when called.
        self.lora_A = ParameterBank()
        self.lora_B = ParameterBank()
        for name in (*layout.first, layout.down):
            d_in, d_out = linear_features(getattr(base_layer, name))
            self.lora_A[name] = nn.Parameter(torch.empty(experts, d_in, rank))
            self.lora_B[name] = nn.Parameter(torch.empty(experts, rank, d_out))
        self.lora_dropout = make_dropout(config)
        with float32_parameters():  # routers compute in float32 whatever the default dtype
            self.router = ROUTERS[config.router](site, config)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        for name, lora_A in self.lora_A.items():
            bound = 1.0 / math.sqrt(lora_A.shape[1])
            nn.init.uniform_(lora_A, -bound, bound)
            nn.init.zeros_(self.lora_B[name])
        self.router.reset_parameters()

    def input_lora_A(self) -> torch.Tensor:
        """[E, d_in, r] of the linear that reads the block input (routers reuse x A_e)."""
        return self.lora_A.fetch(self.layout.first[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.site.in_features)
        ctx = self._routing.current()

        def step(inputs: torch.Tensor, route: RouterOutput) -> torch.Tensor:
            # The first step reads x itself (one cast shared with the sites that read x).
            return self.mixture(x if inputs is flat else inputs, route)

        route, out = self.router.run(flat, ctx, self, step)
        ctx.record(self.site, route)
        if route.residual is not None:
            out = out + route.residual.to(out.dtype)
        if self.layout.style == "plain" and hasattr(self.base_layer, "dropout"):
            out = self.base_layer.dropout(out)
        return out.view(*x.shape[:-1], out.shape[-1])

    def mixture(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """sum_j g_j MLP_{e_j}(x) for ``x`` [..., d_in] under ``route``: [T, d_out]."""
        base, layout = self.base_layer, self.layout
        flat = x.reshape(-1, self.site.in_features)
        tokens, top_k = route.indices.shape
        experts = self.input_lora_A().shape[0]
        # Every linear of the block applies this one decision: sort the (token, slot) pairs by
        # expert once; each expert's LoRA then runs on its own pairs only (FLOPs scale with k).
        # Decoding skips the sort (fixed shapes, fewer ops: see ``decoding_regime``).
        grouping = (None if decoding_regime(tokens, self.kernel)
                    else group_by_expert(route.indices, experts))
        dtype = expert_compute_dtype(x, self.input_lora_A().dtype)
        expert_x = self.lora_dropout(shared_cast(x, dtype).reshape(-1, self.site.in_features))

        def first(name: str) -> torch.Tensor:
            # The frozen projection once per token; the shrink x A_e once per (token, chosen
            # expert), straight from x's rows; one output row per slot.
            frozen = base.get_submodule(name)(flat)
            delta = self._grouped(name, expert_x, route.indices, None, grouping, rows="token",
                                  per_slot=True)
            return (frozen.unsqueeze(1) + delta.view(tokens, top_k, -1).to(frozen.dtype)
                    ).view(tokens * top_k, -1)

        hidden = self._activate(first)
        weights = route.weights.reshape(-1, 1)
        mixed = (hidden * weights.to(hidden.dtype)).view(tokens, top_k, -1).sum(dim=1)
        down = base.get_submodule(layout.down)
        if getattr(down, "bias", None) is None:
            out = down(mixed)
        else:
            # down(sum g h) carries the bias once; the expert sum carries it sum(g) times (not
            # exactly 1 even when renormalised, in float32): down((sum g h) / sum g) * sum g does.
            # The bias is never read outside down's own call, where an offloaded (device_map)
            # weight exists only.
            total = route.weights.to(mixed.dtype).sum(-1, keepdim=True)
            out = down(mixed / total)
            out = out * total.to(out.dtype)
        down_in = self.lora_dropout(hidden.to(dtype))
        down_delta = self._grouped(layout.down, down_in, route.indices, route.weights, grouping,
                                   rows="slot", per_slot=False)
        return out + down_delta.to(out.dtype)

    def _activate(self, first: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The MLP's hidden activation from ``first(name)``, the output of each first linear."""
        act = getattr(self.base_layer, self.layout.act)
        if self.layout.style == "gated":
            return act(first("gate_proj")) * first("up_proj")
        if self.layout.style == "fused":
            gate, up = first("gate_up_proj").chunk(2, dim=-1)
            return up * act(gate)
        return act(first("c_fc"))

    def frozen_output(self, flat: torch.Tensor) -> torch.Tensor:
        """The frozen MLP alone on ``flat`` [T, d_in] (no experts, no output dropout): the part
        of ``mixture`` that is not the experts' change (GraphMoE's refinement subtracts it)."""
        base = self.base_layer
        hidden = self._activate(lambda name: base.get_submodule(name)(flat))
        return base.get_submodule(self.layout.down)(hidden)

    def _grouped(self, name: str, rows_x: torch.Tensor, indices: torch.Tensor,
                 weights: torch.Tensor | None, grouping: torch.Tensor | None, rows: str,
                 per_slot: bool
                 ) -> torch.Tensor:
        lora_A, lora_B = self.lora_A.fetch(name), self.lora_B.fetch(name)
        return moe_lora_slots_delta(rows_x, lora_A, lora_B, indices, weights, self.scale,
                                    grouping, rows=rows, per_slot=per_slot, kernel=self.kernel)

    def extra_repr(self) -> str:
        return f"site={self.site.index}, style={self.layout.style}"


def _unsupported_mlp(name: str, mlp: nn.Module) -> ValueError:
    children = [child for child, _ in mlp.named_children()]
    return ValueError(
        f"block routing supports Llama-style gated MLPs (gate_proj/up_proj/down_proj + act_fn), "
        f"Phi-3's gate_up_proj and GPT-2's c_fc/c_proj; {name} is a {type(mlp).__name__} with "
        f"children {children}: use --granularity linear for this model"
    )


def inject_moe_lora_blocks(
    model: nn.Module, config: Any, routing: RoutingHolder,
    site_name: Callable[[str], str] = str,
) -> list[RoutingSite]:
    """Route every decoder MLP block of ``model`` and give other targeted linears a plain LoRA.

    An MLP block is routed when ``target_modules`` is None or names one of its linears; its
    experts then carry LoRA on all of its linears (MixLoRA).
    """
    patterns = config.target_modules
    mlps = [
        (name, module) for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "mlp" and _LAYER_INDEX.search(name + ".")
    ]
    if not mlps:
        raise ValueError(
            f"block routing needs decoder layers with an 'mlp' child; {type(model).__name__} has "
            f"none: use --granularity linear"
        )
    sites: list[RoutingSite] = []
    routed: set[str] = set()
    for name, mlp in mlps:
        layout = mlp_layout(mlp)
        if layout is None:
            raise _unsupported_mlp(name, mlp)
        linears = (*layout.first, layout.down)
        if not any(target_matches(f"{name}.{child}", patterns) for child in linears):
            continue
        hidden = linear_features(getattr(mlp, layout.first[0]))[0]
        layer = int(_LAYER_INDEX.search(name + ".").group(1))
        site = RoutingSite(len(sites), layer, site_kind(name, config), site_name(name), hidden,
                           hidden)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                MoELoraBlock(mlp, layout, site, config, routing))
        sites.append(site)
        routed.add(name + ".")
    if not sites:
        raise ValueError(
            f"no MLP block matches the targets {patterns}; with --granularity block name an MLP "
            f"linear (e.g. up_proj) or leave the targets unset"
        )
    plain = [
        name for name, module in model.named_modules()
        if is_linear(module) and _LAYER_INDEX.search(name + ".")
        and not any(name.startswith(prefix) for prefix in routed)
        and target_matches(name, patterns)
    ]
    for name in plain:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(getattr(parent, child), config))
    return sites
