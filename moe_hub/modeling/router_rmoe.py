"""Layerwise Recurrent Router (RMoE; Qiu et al., ICLR 2025), ported to MoE-LoRA sites.

Implements, at routing site i of a chain:
    u_i = x_i P_i                P_i: d_in x p, per site, no bias, N(0, 0.02)
    h_i = GRU(u_i, h_{i-1})      one GRU cell (input = hidden = p) shared by every site,
                                 h_0 = 0 at every forward call
    logits_i = h_i R_i           R_i: p x E, per site, no bias, N(0, 0.02)
then softmax over all E -> top-k -> renormalise; the experts still process x_i.

The recurrence runs across DEPTH, per token (never across the tokens of a sequence, so KV-cached
generation is unaffected). Chains follow the site kind, the module's path inside its decoder layer:
with per-linear routing the self_attn.q_proj sites of all layers form one chain, the
self_attn.k_proj sites another, ... (never q -> k -> v inside a layer: same input, arbitrary
order; GPT-2's attn.c_proj and mlp.c_proj are two chains); with block routing the one MLP site
per layer forms the chain (the paper's layout). The carried state is never detached. It is
stored in the per-forward ``RoutingContext`` under this site's index, and read from the
previous site of the chain, so a layer recomputed by (non-reentrant) gradient checkpointing reads
exactly the h_{i-1} it read the first time.

Losses it trains with: the task loss through the renormalised top-k weights, the Switch
load-balancing loss over all sites' logits (``router_aux_loss_coef``, 0.001 as in the RMoE
config) and, when ``router_z_loss_coef`` > 0, the z-loss. Gradients of a site's losses reach every
earlier site of its chain through the carried state.

Options (``router_config``): ``hidden_size`` p (128, the paper's main pretraining run),
``recurrent`` (False: h_{i-1} = 0 everywhere, the paper's "NP" ablation), ``init_std``, and
``hyper`` (True: add HyperMoE's generated module from the unselected experts, the composition
``--router rmoe --hyper``; its options are HyperMoE's).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .router_hypermoe import HYPER_DEFAULTS, HyperNetwork, HyperSupplement
from .routing import (
    Router,
    RouterOutput,
    RoutingContext,
    RoutingSite,
    float32_linear,
    register_router,
)


class Float32GRUCell(nn.GRUCell):
    """torch's GRU cell (same parameters and state-dict names: weight_ih, weight_hh, bias_ih,
    bias_hh) computing in float32 whatever dtype it was cast to and whatever autocast is active
    (reset r, update z, candidate n, as torch's GRUCell).

    Shared by every site, so it is always reached through a module call (``gru_step``): under
    ``device_map`` accelerate's hook then moves the inputs to the cell's device, and with CPU or
    disk offload loads its weights, which are meta tensors outside the call.
    """

    def forward(self, inputs: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        if state is None:
            state = inputs.new_zeros(inputs.shape[0], self.hidden_size, dtype=torch.float32)
        with torch.autocast(inputs.device.type, enabled=False):
            inputs, state = inputs.float(), state.float()
            gi = F.linear(inputs, self.weight_ih.float(), self.bias_ih.float())
            gh = F.linear(state, self.weight_hh.float(), self.bias_hh.float())
            i_r, i_z, i_n = gi.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            reset = torch.sigmoid(i_r + h_r)
            update = torch.sigmoid(i_z + h_z)
            candidate = torch.tanh(i_n + reset * h_n)
            return (1 - update) * candidate + update * state


def gru_step(cell: nn.Module, inputs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One step of the shared ``cell`` (a :class:`Float32GRUCell`), returned on ``inputs``'s
    device (the calling site's: the cell may sit on another one)."""
    return cell(inputs, state).to(inputs.device)


@register_router
class RecurrentRouter(Router):
    name = "rmoe"
    defaults: ClassVar[dict[str, Any]] = {
        "hidden_size": 128, "recurrent": True, "init_std": 0.02, "hyper": False, **HYPER_DEFAULTS
    }

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        super().validate_options(options)
        idle = sorted(set(options) & set(HYPER_DEFAULTS)) if not options.get("hyper") else []
        if idle:
            raise ValueError(
                f"router option {', '.join(map(repr, idle))} of 'rmoe' applies only with "
                f"hyper=true: add --hyper (or --router-opt hyper=true), or drop the option"
            )

    def __init__(self, site: RoutingSite, config: Any) -> None:
        super().__init__(site, config)
        hidden = int(self.options["hidden_size"])
        self.recurrent = bool(self.options["recurrent"])
        #: The site before this one in its chain (same kind, one layer up); set by connect().
        self.previous_site: int | None = None
        self.input_proj = nn.Parameter(torch.empty(hidden, site.in_features))
        self.output_proj = nn.Parameter(torch.empty(self.num_experts, hidden))
        self.hyper = (HyperSupplement(site, self.num_experts, self.options)
                      if self.options["hyper"] else None)
        self.reset_parameters()

    @classmethod
    def shared_modules(cls, config: Any, sites: list[RoutingSite]) -> nn.Module:
        options = {**cls.defaults, **config.router_config}
        hidden = int(options["hidden_size"])
        shared = nn.ModuleDict({"gru": Float32GRUCell(hidden, hidden)})
        if options["hyper"]:
            shared["hyper"] = HyperNetwork(sites, options)
        return shared

    def reset_parameters(self) -> None:
        std = float(self.options["init_std"])
        nn.init.normal_(self.input_proj, std=std)
        nn.init.normal_(self.output_proj, std=std)
        if self.hyper is not None:
            self.hyper.reset_parameters()

    def connect(self, sites: list[RoutingSite]) -> None:
        earlier = [s.index for s in sites if s.kind == self.site.kind and s.index < self.site.index]
        self.previous_site = max(earlier, default=None)

    def state_key(self, index: int) -> tuple:
        return (self.name, self.site.kind, index)

    def previous_state(self, ctx: RoutingContext, like: torch.Tensor) -> torch.Tensor:
        """h of the previous site of this chain in this forward, or h_0 = 0 (the first site, the
        recurrence switched off, or a layer called on its own)."""
        previous = self.previous_site
        state = None if previous is None else ctx.state.get(self.state_key(previous))
        if not self.recurrent or state is None:
            return torch.zeros_like(like)
        if state.shape != like.shape:
            raise RuntimeError(
                f"rmoe: site {self.site.name} sees {like.shape[0]} tokens but the previous site "
                f"of its chain saw {state.shape[0]}; every site must see the same tokens"
            )
        return state.to(like.device)

    def forward(self, x: torch.Tensor, ctx: RoutingContext, experts: Any) -> RouterOutput:
        shared = ctx.shared[self.name]
        projected = float32_linear(x, self.input_proj)
        state = gru_step(shared["gru"], projected, self.previous_state(ctx, projected))
        ctx.state[self.state_key(self.site.index)] = state
        logits = F.linear(state, self.output_proj.float())
        indices, weights = self.select(logits)
        residual = None
        if self.hyper is not None:
            residual = self.hyper(x.float(), indices, shared["hyper"])
        return RouterOutput(indices=indices, weights=weights, logits=logits, residual=residual)
