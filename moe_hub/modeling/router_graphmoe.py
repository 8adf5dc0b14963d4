"""GraphMoE-style self-rethinking router (arXiv 2501.07890), reading B of ROUTERS.md.

The paper's code could not be read here; ROUTERS.md's reading B is implemented: a router-only
recurrence with a message state, which works at every routing site (any d_in, d_out) and reuses
the rank-r activations x A_e, computed once, across all steps:
    m_0 = 0
    logits_t = x W_g + m_{t-1} U_g          W_g: E x d_in (topk's weight, N(0, 0.02)),
                                            U_g: E x m per site, N(0, 0.02)
    S_t, w_t = top-k(softmax(logits_t))      renormalised over the k (the base router's select)
    c_t = sum_{e in S_t} w_{t,e} (x A_e)     [r], the step's expert intermediates ("messages
                                            between expert nodes")
    m_t = GRU(c_t, m_{t-1})                  one GRU cell (input r, hidden m) shared by all sites
The experts run once, on the last step's choice. ``steps`` = 1 is exactly the topk router (same
parameter names and init: a topk checkpoint loads into it). Every step's logits enter the load
balance (``logits`` [steps * T, E] with ``logit_indices``); the message state is never detached,
so the last step's task gradient reaches earlier steps' gates and the experts' A through c_t.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .router_rmoe import gru_step
from .routing import (
    Router,
    RouterOutput,
    RoutingContext,
    RoutingSite,
    float32_linear,
    register_router,
)


@register_router
class GraphMoERouter(Router):
    name = "graphmoe"
    defaults: ClassVar[dict[str, Any]] = {"steps": 2, "message_size": 32, "init_std": 0.02}

    def __init__(self, site: RoutingSite, config: Any) -> None:
        super().__init__(site, config)
        self.steps = int(self.options["steps"])
        if self.steps < 1:
            raise ValueError(f"graphmoe needs router_config steps >= 1 (got {self.steps})")
        self.weight = nn.Parameter(torch.empty(self.num_experts, site.in_features))
        # Only a multi-step router has a message path (steps = 1 keeps topk's exact parameters).
        self.message_weight = (
            nn.Parameter(torch.empty(self.num_experts, int(self.options["message_size"])))
            if self.steps > 1 else None
        )
        self.reset_parameters()

    @classmethod
    def shared_modules(cls, config: Any, sites: list[RoutingSite]) -> nn.Module | None:
        options = {**cls.defaults, **config.router_config}
        if int(options["steps"]) <= 1:
            return None
        return nn.GRUCell(config.lora_rank, int(options["message_size"]))

    def reset_parameters(self) -> None:
        std = float(self.options["init_std"])
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.message_weight is not None:
            nn.init.normal_(self.message_weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, ctx: RoutingContext, experts: Any) -> RouterOutput:
        base_logits = float32_linear(x, self.weight)
        indices, weights = self.select(base_logits)
        step_logits, step_indices = [base_logits], [indices]
        if self.steps > 1:
            lora_A = experts.input_lora_A() if hasattr(experts, "input_lora_A") else experts.lora_A
            activations = torch.einsum("td,edr->ter", x.float(), lora_A.float())  # once, all steps
            cell = ctx.shared[self.name]
            message = base_logits.new_zeros(x.shape[0], cell.hidden_size)
            for _ in range(1, self.steps):
                gates = torch.zeros_like(base_logits).scatter(1, indices, weights)
                combined = torch.einsum("te,ter->tr", gates, activations)
                message = gru_step(cell, combined, message)
                logits = base_logits + F.linear(message, self.message_weight.float())
                indices, weights = self.select(logits)
                step_logits.append(logits)
                step_indices.append(indices)
        return RouterOutput(
            indices=indices, weights=weights, logits=torch.cat(step_logits),
            logit_indices=torch.cat(step_indices) if self.steps > 1 else None,
        )
