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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .moe_lora_layer import (
    LAYER_INDEX,
    RoutingHolder,
    is_linear,
    linear_features,
    reset_lora_pair,
    site_kind,
    target_matches,
)
from .moe_lora_ops import (
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
    float32_routing,
    without_autocast,
)


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
        reset_lora_pair(self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        # Same precision policy as the experts: 16-bit operands, one shared cast of x.
        dtype = expert_compute_dtype(x, self.lora_A.dtype)
        with without_autocast(x.device):
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
        self.router = float32_routing(ROUTERS[config.router](site, config))
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        for name, lora_A in self.lora_A.items():
            reset_lora_pair(lora_A, self.lora_B[name])
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
        return self._mix(x, route, mixture=True, change=False)[0]

    def expert_change(self, x: torch.Tensor, route: RouterOutput, with_mixture: bool = False
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What the routed experts change at ``x`` [T, d_in], E(x) = sum_j g_j MLP_{e_j}(x) -
        f(x) (f the frozen MLP), [T, d_out]; with the mixture itself first when
        ``with_mixture`` (one pass for both), else None.

        E is computed from the experts' own terms, never as the difference of two MLP outputs:
        the frozen down projection is linear, so E(x) = down_W(sum_j g_j (h_j - h_0)) +
        sum_j g_j LoRA_down_j(h_j), h_j the slot's hidden activation and h_0 the frozen one
        (plus (sum_j g_j - 1) f(x) when the weights are not renormalised). While B = 0, h_j is
        h_0 bit for bit and E is exactly 0 in any precision: a difference of outputs would leave
        the rounding of f (under bf16 autocast 2% of |f| after 3 GraphMoE steps) in the refined
        input and the output."""
        return self._mix(x, route, mixture=with_mixture, change=True)

    def _mix(self, x: torch.Tensor, route: RouterOutput, mixture: bool, change: bool
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
        frozen_slots: dict[str, torch.Tensor] = {}

        def first(name: str) -> torch.Tensor:
            # The frozen projection once per token; the shrink x A_e once per (token, chosen
            # expert), straight from x's rows; one output row per slot.
            frozen = base.get_submodule(name)(flat)
            delta = self._grouped(name, expert_x, route.indices, None, grouping, rows="token",
                                  per_slot=True)
            slots = frozen.unsqueeze(1) + delta.view(tokens, top_k, -1).to(frozen.dtype)
            if change:
                # The frozen pre-activation in the slots' very layout: the activation then runs
                # the same kernel path on both, element for element, and h_j - h_0 is exactly 0
                # where the expert adds nothing.
                frozen_slots[name] = frozen.unsqueeze(1).expand_as(slots).contiguous().view(
                    tokens * top_k, -1)
            return slots.view(tokens * top_k, -1)

        hidden = self._activate(first)
        weights = route.weights.reshape(-1, 1)
        down = base.get_submodule(layout.down)
        down_in = self.lora_dropout(hidden.to(dtype))
        down_delta = self._grouped(layout.down, down_in, route.indices, route.weights, grouping,
                                   rows="slot", per_slot=False)
        mixed_out = changed = None
        if mixture:
            mixed = (hidden * weights.to(hidden.dtype)).view(tokens, top_k, -1).sum(dim=1)
            if getattr(down, "bias", None) is None:
                out = down(mixed)
            else:
                # down(sum g h) carries the bias once; the expert sum carries it sum(g) times
                # (not exactly 1 even when renormalised, in float32): down((sum g h) / sum g) *
                # sum g does. The bias is never read outside down's own call, where an
                # offloaded (device_map) weight exists only.
                total = route.weights.to(mixed.dtype).sum(-1, keepdim=True)
                out = down(mixed / total)
                out = out * total.to(out.dtype)
            mixed_out = out + down_delta.to(out.dtype)
        if change:
            frozen_hidden = self._activate(frozen_slots.__getitem__)
            moved = ((hidden - frozen_hidden) * weights.to(hidden.dtype)).view(
                tokens, top_k, -1).sum(dim=1)
            out = down(moved)
            if getattr(down, "bias", None) is not None:
                out = out - down(moved.new_zeros(1, moved.shape[-1]))  # the bias is f's
            if not self.router.normalize:
                # Raw softmax weights scale the whole MLP: sum_j g_j f(x) - f(x).
                # Summed as the mixture sums them (its weights' dtype), at least in float32.
                summed = weights.to(torch.promote_types(hidden.dtype, torch.float32))
                surplus = summed.view(tokens, top_k).sum(-1, keepdim=True) - 1
                frozen_out = down(frozen_hidden.view(tokens, top_k, -1)[:, 0])
                out = out + surplus.to(out.dtype) * frozen_out
            changed = out + down_delta.to(out.dtype)
        return mixed_out, changed

    def _activate(self, first: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The MLP's hidden activation from ``first(name)``, the output of each first linear."""
        act = getattr(self.base_layer, self.layout.act)
        if self.layout.style == "gated":
            return act(first("gate_proj")) * first("up_proj")
        if self.layout.style == "fused":
            gate, up = first("gate_up_proj").chunk(2, dim=-1)
            return up * act(gate)
        return act(first("c_fc"))

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
        if name.rsplit(".", 1)[-1] == "mlp" and LAYER_INDEX.search(name + ".")
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
        layer = int(LAYER_INDEX.search(name + ".").group(1))
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
        if is_linear(module) and LAYER_INDEX.search(name + ".")
        and not any(name.startswith(prefix) for prefix in routed)
        and target_matches(name, patterns)
    ]
    for name in plain:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(getattr(parent, child), config))
    return sites
