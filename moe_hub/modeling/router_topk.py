"""Softmax top-k router (Switch Transformer / Mixtral / MixLoRA).

logits = x W_g (W_g: E x d_in, N(0, 0.02) init); softmax over all E experts, keep the k largest,
renormalise them to sum to one (``normalize_expert_weights``). Trained by the task loss through the
routing weights and by the load-balancing loss E * sum_e f_e P_e (Fedus et al. 2021, eq. 4;
Jiang et al. 2024). With top-1 and renormalisation the weight is exactly 1, so only the auxiliary
loss trains the router.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .routing import (
    Router,
    RouterOutput,
    RoutingContext,
    RoutingSite,
    float32_linear,
    register_router,
)


@register_router
class TopKRouter(Router):
    name = "topk"
    defaults = {"init_std": 0.02}

    def __init__(self, site: RoutingSite, config: Any) -> None:
        super().__init__(site, config)
        self.weight = nn.Parameter(torch.empty(self.num_experts, site.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=float(self.options["init_std"]))

    def forward(self, x: torch.Tensor, ctx: RoutingContext, experts: Any) -> RouterOutput:
        logits = float32_linear(x, self.weight)
        indices, weights = self.select(logits)
        return RouterOutput(indices=indices, weights=weights, logits=logits)
