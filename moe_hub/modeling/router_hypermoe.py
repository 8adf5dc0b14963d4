"""HyperMoE router (Zhao et al., ACL 2024, arXiv 2402.12656), ported to LoRA experts.

Implements:
1. Noisy top-k gating (Shazeer et al. 2017, eqs. 3-5): H(x) = x W_g + eps * (softplus(x W_noise)
   + 0.01) in training, eps ~ N(0, 1); W_g and W_noise start at zero; softmax over all E, top-k,
   renormalise. Auxiliary loss cv^2(importance) + cv^2(load) (Shazeer eqs. 6-10, load through the
   smooth P(x, i) estimate), weighted by ``cv_loss_coef``, padding excluded.
2. Per site, expert embeddings (E x ``embed_dim``); a token's UNSELECTED experts' embeddings are
   summed (unweighted) and pass a per-site MLP (embed -> embed, ReLU, -> embed).
3. One hypernetwork shared by all sites (``moe_shared.<router>``): [that vector ; site embedding
   (layer + module kind)] -> Linear -> ReLU -> per (d_in, d_out) shape group heads that emit a
   low-rank module A (d_in x r_h) and B (r_h x d_out); the B head starts at zero, so the model
   starts as the base.
4. Site output += x A B (returned as ``RouterOutput.residual``), on the same input as the experts.

Port choices: the reference generates a bottleneck adapter per TOKEN (d x 64 weights per token);
here the generated module depends only on the token's unselected set, so it is generated once per
UNIQUE set present in the batch (at most C(E, k)) and applied with the expert kernel, treating the
unique sets as "experts" (no d x m matrix per token is ever built). The module is linear (a
generated LoRA, no ReLU or biases between A and B) so that the same kernel serves it. The
unselected set comes from hard indices: that path sends the gate no gradient (as in the paper).

Losses it trains with: the task loss (through the renormalised top-k weights and the generated
module) plus ``hypermoe_cv`` = sum over sites of ``cv_loss_coef`` (0.01) * (cv^2(importance) +
cv^2(load)). Summed, not averaged: the reference adds each layer's loss to the total
(``moe_loss += loss`` over GPT-2's blocks). The Switch load-balancing loss is computed and reported
(``aux_losses["load_balance"]``) but not added (``load_balance = False``): the reference balances
with the cv^2 loss alone, and ``router_aux_loss_coef`` does not apply to this router. The
reference has one routed MLP per layer (``--granularity block`` here); per-linear routing has
several sites per layer, each adding its term: lower ``cv_loss_coef`` to keep a layer's weight.

The supplementary module (``HyperSupplement`` per site + ``HyperNetwork`` shared) is reused by
the RMoE router's ``hyper: true`` composition (which keeps RMoE's Switch loss and has no cv loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .moe_lora_ops import moe_lora_delta
from .routing import (
    ParameterBank,
    Router,
    RouterOutput,
    RoutingContext,
    RoutingSite,
    float32_linear,
    register_router,
)

HYPER_DEFAULTS = {
    "embed_dim": 128,  # expert embedding / hypernetwork width (reference 128)
    "site_embed_dim": 10,  # layer/site embedding width (reference 10)
    "hyper_rank": 4,  # rank r_h of the generated module
    "hyper_scale": 1.0,  # multiplies the generated module's output
}


def _shape_key(site: RoutingSite) -> str:
    return f"{site.in_features}x{site.out_features}"


class HyperNetwork(nn.Module):
    """The trunk shared by every site and one (A, B) head pair per (d_in, d_out) shape group."""

    def __init__(self, sites: list[RoutingSite], options: dict[str, Any]) -> None:
        super().__init__()
        width, site_dim = int(options["embed_dim"]), int(options["site_embed_dim"])
        self.rank = int(options["hyper_rank"])
        # Site identity = layer embedding + module-kind embedding (kinds in first-seen order; a
        # kind is the module's path inside its layer, so GPT-2's attn.c_proj and mlp.c_proj differ).
        self.kinds = list(dict.fromkeys(site.kind for site in sites))
        self.layer_embedding = nn.Parameter(torch.empty(max(s.layer for s in sites) + 1, site_dim))
        self.kind_embedding = nn.Parameter(torch.empty(len(self.kinds), site_dim))
        self.trunk_weight = nn.Parameter(torch.empty(width, width + site_dim))
        self.trunk_bias = nn.Parameter(torch.empty(width))
        # Banks (ParameterDicts read with fetch) so that offloaded heads are loaded when read.
        self.head_a_weight, self.head_a_bias = ParameterBank(), ParameterBank()
        self.head_b_weight, self.head_b_bias = ParameterBank(), ParameterBank()
        self.shapes: dict[str, tuple[int, int]] = {}
        for site in sites:
            key = _shape_key(site)
            if key in self.shapes:
                continue
            self.shapes[key] = (site.in_features, site.out_features)
            a_size, b_size = site.in_features * self.rank, self.rank * site.out_features
            self.head_a_weight[key] = nn.Parameter(torch.empty(a_size, width))
            self.head_a_bias[key] = nn.Parameter(torch.empty(a_size))
            self.head_b_weight[key] = nn.Parameter(torch.empty(b_size, width))
            self.head_b_bias[key] = nn.Parameter(torch.empty(b_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.layer_embedding)
        nn.init.normal_(self.kind_embedding)
        fan_in = self.trunk_weight.shape[1]
        nn.init.uniform_(self.trunk_weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.trunk_bias)
        width = self.trunk_weight.shape[0]
        for key, (d_in, _) in self.shapes.items():
            # Hyperfan-in style: generated A entries get LoRA's kaiming bound 1/sqrt(d_in), split
            # between the bias and the trunk-dependent part.
            bound = 1 / math.sqrt(d_in)
            trunk_bound = bound / math.sqrt(width)
            nn.init.uniform_(self.head_a_weight[key], -trunk_bound, trunk_bound)
            nn.init.uniform_(self.head_a_bias[key], -bound, bound)
            nn.init.zeros_(self.head_b_weight[key])
            nn.init.zeros_(self.head_b_bias[key])

    def forward(
        self, summary: torch.Tensor, site: RoutingSite
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank modules A [n, d_in, r_h], B [n, r_h, d_out] for ``summary`` [n, width], on
        this module's device (called as a module, so that ``device_map`` hooks fire)."""
        kind = self.kinds.index(site.kind)
        site_vec = (self.layer_embedding[site.layer] + self.kind_embedding[kind]).float()
        inputs = torch.cat([summary, site_vec.expand(summary.shape[0], -1)], dim=-1)
        hidden = F.relu(F.linear(inputs, self.trunk_weight.float(), self.trunk_bias.float()))
        key = _shape_key(site)
        heads = (self.head_a_weight, self.head_a_bias, self.head_b_weight, self.head_b_bias)
        a_weight, a_bias, b_weight, b_bias = (head.fetch(key).float() for head in heads)
        a = F.linear(hidden, a_weight, a_bias)
        b = F.linear(hidden, b_weight, b_bias)
        return (a.view(-1, site.in_features, self.rank), b.view(-1, self.rank, site.out_features))


class HyperSupplement(nn.Module):
    """One site's part: expert embeddings and the MLP over the unselected experts' sum."""

    def __init__(self, site: RoutingSite, num_experts: int, options: dict[str, Any]) -> None:
        super().__init__()
        self.site = site
        self.scale = float(options["hyper_scale"])
        width = int(options["embed_dim"])
        self.expert_embedding = nn.Parameter(torch.empty(num_experts, width))
        self.mlp_in_weight = nn.Parameter(torch.empty(width, width))
        self.mlp_in_bias = nn.Parameter(torch.empty(width))
        self.mlp_out_weight = nn.Parameter(torch.empty(width, width))
        self.mlp_out_bias = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.expert_embedding)
        bound = 1 / math.sqrt(self.mlp_in_weight.shape[1])
        for weight in (self.mlp_in_weight, self.mlp_out_weight):
            nn.init.uniform_(weight, -bound, bound)
        nn.init.zeros_(self.mlp_in_bias)
        nn.init.zeros_(self.mlp_out_bias)

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, hyper: HyperNetwork) -> torch.Tensor:
        # The shared hypernetwork reaches forward as its bound __call__: accelerate's hooks
        # (device_map) move every argument that has a ``to``, which a bound method lacks, and
        # torch.compile traces it like the module call it is (a ModuleRef breaks its guards).
        return super().__call__(x, indices, hyper.__call__)

    def forward(self, x: torch.Tensor, indices: torch.Tensor,
                hyper: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The generated module's output [T, d_out] for tokens ``x`` [T, d_in] routed to
        ``indices`` [T, k]; ``hyper`` calls the shared hypernetwork."""
        num_experts = self.expert_embedding.shape[0]
        chosen = indices.sort(dim=-1).values
        # The module depends only on the token's set: generate it once per distinct set.
        sets, set_of_token = torch.unique(chosen, dim=0, return_inverse=True)
        unselected = torch.ones(sets.shape[0], num_experts, device=x.device)
        unselected = unselected.scatter(1, sets, 0.0)
        # Router math stays in float32 even in a model cast to half precision.
        summary = unselected @ self.expert_embedding.float()
        hidden = F.relu(F.linear(summary, self.mlp_in_weight.float(), self.mlp_in_bias.float()))
        summary = F.linear(hidden, self.mlp_out_weight.float(), self.mlp_out_bias.float())
        # The hypernetwork may sit on another device (device_map): its hook moves the summary
        # there, the generated module comes back to this site's device.
        lora_a, lora_b = (t.to(x.device) for t in hyper(summary, self.site))
        ones = torch.ones(x.shape[0], 1, device=x.device)
        return moe_lora_delta(x.float(), lora_a, lora_b, set_of_token.view(-1, 1), ones,
                              self.scale, kernel="torch")


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (Shazeer eq. 7); 0 for a single expert."""
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var() / (values.mean().square() + 1e-10)


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, top_k: int
                ) -> torch.Tensor:
    """P(expert e stays in the top-k when only its own noise is redrawn), [T, E] (Shazeer eq. 9)."""
    top = noisy.topk(top_k + 1, dim=-1).values
    threshold_if_in = top[:, top_k:top_k + 1]  # the (k+1)-th value: what e must beat if chosen
    threshold_if_out = top[:, top_k - 1:top_k]  # the k-th value: what e must beat otherwise
    normal = torch.distributions.Normal(0.0, 1.0)
    is_in = noisy > threshold_if_in
    prob_in = normal.cdf((clean - threshold_if_in) / std)
    prob_out = normal.cdf((clean - threshold_if_out) / std)
    return torch.where(is_in, prob_in, prob_out)


@register_router
class HyperMoERouter(Router):
    name = "hypermoe"
    load_balance = False  # balanced by its own cv^2 loss, as in the reference
    defaults: ClassVar[dict[str, Any]] = {
        **HYPER_DEFAULTS, "noise_epsilon": 0.01, "cv_loss_coef": 0.01
    }

    def __init__(self, site: RoutingSite, config: Any) -> None:
        super().__init__(site, config)
        self.weight = nn.Parameter(torch.empty(self.num_experts, site.in_features))
        self.noise_weight = nn.Parameter(torch.empty(self.num_experts, site.in_features))
        self.hyper = HyperSupplement(site, self.num_experts, self.options)
        self.reset_parameters()

    @classmethod
    def shared_modules(cls, config: Any, sites: list[RoutingSite]) -> nn.Module:
        return HyperNetwork(sites, {**cls.defaults, **config.router_config})

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.noise_weight)
        self.hyper.reset_parameters()

    def forward(self, x: torch.Tensor, ctx: RoutingContext, experts: Any) -> RouterOutput:
        clean = float32_linear(x, self.weight)
        noisy_training = self.training and self.top_k < self.num_experts
        if noisy_training:
            std = F.softplus(float32_linear(x, self.noise_weight)) + float(
                self.options["noise_epsilon"])
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        indices, weights = self.select(logits)
        mask = ctx.site_mask(x.shape[0])
        gates = torch.zeros_like(logits).scatter(1, indices, weights)
        keep = torch.ones(x.shape[0], 1, device=x.device) if mask is None else \
            mask.to(x.device, torch.float32).unsqueeze(-1)
        importance = (gates * keep).sum(0)
        if noisy_training:
            load = (smooth_load(clean, logits, std, self.top_k) * keep).sum(0)
        else:
            load = ((gates > 0).float() * keep).sum(0)
        losses = {"hypermoe_cv": float(self.options["cv_loss_coef"])
                  * (cv_squared(importance) + cv_squared(load))}
        residual = self.hyper(x.float(), indices, ctx.shared[self.name])
        return RouterOutput(indices=indices, weights=weights, logits=logits, losses=losses,
                            residual=residual)

