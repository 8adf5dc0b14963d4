"""GraphMoE-style self-rethinking (arXiv 2501.07890) on MoE-LoRA sites: two readings.

What the paper says, as far as it could be read here. Its abstract: "GraphMoE employs a recurrent
routing strategy to simulate iterative thinking steps, thereby facilitating the flow of
information among expert nodes", built as "a self-rethinking mechanism constructed on Pseudo
GraphMoE networks" and implemented "using Low-Rank Adaptation techniques (LoRA)"; its Figure 1
compares "LoRA+MoE and GraphMoE architectures" (GraphMoE sits on top of a LoRA-MoE such as
MixLoRA or LoRAMoE). A published summary of the paper speaks of "iterative refinement of
representations" with "modest parameter overhead". The method section (exact update rule,
number of steps, losses) and the announced code (github fan2goa1/GraphMoE) could not be read
from here: everything below the level of those sentences is an interpretation: readings A
and B below.

Notation: a site has input x [T, d_in], E LoRA experts, top-k; W_g [E, d_in] is topk's gate
(same name ``weight``, same N(0, 0.02) init), U_g [E, m] per site, N(0, 0.02); one GRU cell
(input r = LoRA rank, hidden m = ``message_size``) is shared by all sites
(``moe_shared.graphmoe``). select() is topk's: softmax over E, top-k, renormalised.

``mode=refine`` (reading A; the default, what ``--router graphmoe`` converts to and what
``MoELoraConfig(router="graphmoe")`` builds). The experts run again, at
every step, on the representation the previous step refined ("iterative thinking steps",
"iterative refinement of representations"); the routing of step t reads that representation and
a recurrent state carried across the steps ("recurrent routing strategy"). With f the site's
frozen part (the base linear; the frozen MLP of a block) and E_t(u) what the routed experts
change at u (linear: scale sum_{e in S_t} g_{t,e} (u A_e) B_e; block: sum_{e in S_t} g_{t,e}
MLP_e(u) - f(u), MLP_e the whole MLP with expert e's LoRA on its linears, as MixLoRA):
    u_0 = x,  m_0 = 0
    for t = 1..T:
        logits_t = u_{t-1} W_g + m_{t-1} U_g           (the m term is absent at t = 1: m_0 = 0)
        S_t, g_t = select(logits_t)
        u_t = u_{t-1} + E_t(u_{t-1})
        c_t = sum_{e in S_t} g_{t,e} (u_{t-1} A_e)     [r], the step's expert intermediates:
                                                       the "information flowing among experts"
        m_t = GRU(c_t, m_{t-1})
    site output = f(x) + (u_T - x) = f(x) + sum_t E_t(u_{t-1})
computed as   linear: base(x) + sum_t E_t(u_{t-1})
              block:  mix_1(x) + sum_{t>=2} E_t(u_{t-1})  (mix_1 = sum g MLP_e(x) = f(x) + E_1(x))
so that T = 1 is topk's output bit for bit. The refinement adds what the experts change, not
whole MLP outputs: every E_t is 0 while lora_B = 0, so a fresh conversion still equals the dense
base (re-adding whole MLP outputs would apply the frozen MLP T times to an untrained model). A
block computes E_t from the experts' own terms (``MoELoraBlock.expert_change``), not as mix_t -
f: the two would round differently (under bf16 autocast, by 2% of |f| after 3 steps), and
E_t is then exactly 0 while lora_B = 0 in any precision.
u_t lives in both the site's input and output space, so refinement needs d_in = d_out: every MLP
block at block granularity, square projections (q_proj, o_proj in most models) at linear
granularity. Other sites run one step (exactly topk) whatever ``steps`` says; ``moe-hub info``
lists them. Compute grows linearly with T (the experts run T times, with a block's frozen MLP
on each refined input); parameters grow by U_g per refining site and the shared cell.

``mode=message`` (reading B; every checkpoint written before ``mode`` existed, whose config has
no ``mode``, is this). The router alone iterates; the experts run once, on x, with the last
step's choice:
    m_0 = 0;  logits_t = x W_g + m_{t-1} U_g;  S_t, g_t = select(logits_t)
    c_t = sum_{e in S_t} g_{t,e} (x A_e);  m_t = GRU(c_t, m_{t-1})   (x A_e computed once)
It works at every site (any widths) and costs one expert pass.

Both modes: ``steps`` T = 1 is exactly the topk router (same parameter names and init: a topk
state dict loads strictly, and the output is topk's); every step's logits enter the load-balance
loss (``logits`` [T * tokens, E] with ``logit_indices``); the recurrent state and the refined
u_t are never detached, so the task gradient reaches every step's gate, the cell and the experts
through every step. Router math runs in float32. The expert counts a model reports are the last
step's choices (``indices``); the balance loss sees every step's (``logit_indices``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_moe_lora import ROUTER_OPTION_DEFAULTS
from .router_rmoe import Float32GRUCell, gru_step
from .routing import (
    ExpertStep,
    Router,
    RouterOutput,
    RoutingContext,
    RoutingSite,
    float32_linear,
    register_router,
    without_autocast,
)

MODES = ("refine", "message")


def site_steps(site: RoutingSite, mode: str, steps: int) -> int:
    """Steps a site runs: refinement adds the experts' output to their input, so it needs equal
    input and output widths; elsewhere it falls back to one step (topk)."""
    if mode == "refine" and site.in_features != site.out_features:
        return 1
    return steps


def steps_summary(config: Any, sites: list[RoutingSite]) -> str:
    """One line for ``moe-hub info``: which sites refine and which run one step."""
    options = {**GraphMoERouter.defaults, **config.router_config}
    mode, steps = str(options["mode"]), int(options["steps"])
    if mode != "refine":
        return f"message: {steps} routing steps at every site, experts run once"
    many = sorted({s.kind for s in sites if site_steps(s, mode, steps) > 1})
    one = sorted({s.kind for s in sites if site_steps(s, mode, steps) == 1})
    parts = []
    if many and steps > 1:
        count = sum(site_steps(s, mode, steps) > 1 for s in sites)
        parts.append(f"refine: {steps} steps at {', '.join(many)} ({count} sites)")
    if one or steps == 1:
        names = one if steps > 1 else sorted({s.kind for s in sites})
        why = " (input width != output width)" if steps > 1 else ""
        parts.append(f"1 step at {', '.join(names)}{why}")
    return "; ".join(parts)


def _caller_precision(device: torch.device) -> Callable[[Callable], Callable]:
    """Wraps a step so that it runs under the autocast in force here, from inside the router's
    autocast-off region."""
    if not torch.is_autocast_enabled(device.type):
        return lambda step: step
    dtype = torch.get_autocast_dtype(device.type)

    def wrap(step: Callable) -> Callable:
        def in_autocast(*args: Any) -> Any:
            with torch.autocast(device.type, dtype=dtype):
                return step(*args)
        return in_autocast

    return wrap


def input_lora_A(experts: Any) -> torch.Tensor:
    """[E, d_in, r]: the LoRA A that reads the site input (a block's first MLP linear)."""
    return experts.input_lora_A() if hasattr(experts, "input_lora_A") else experts.lora_A


@register_router
class GraphMoERouter(Router):
    name = "graphmoe"
    # ``mode`` is always in the config (MoELoraConfig records it; a saved config without it
    # is from before reading A and reads as ``message``): this default only serves a config
    # object whose router_config was replaced after construction.
    defaults: ClassVar[dict[str, Any]] = {
        "mode": ROUTER_OPTION_DEFAULTS["graphmoe"]["mode"][1], "steps": 2, "message_size": 32,
        "init_std": 0.02,
    }

    def __init__(self, site: RoutingSite, config: Any) -> None:
        super().__init__(site, config)
        self.mode = str(self.options["mode"])
        if self.mode not in MODES:
            raise ValueError(f"graphmoe mode must be one of {MODES} (got {self.mode!r}): pass "
                             f"--router-opt mode=refine or mode=message")
        self.steps = int(self.options["steps"])
        if self.steps < 1:
            raise ValueError(f"graphmoe needs router_config steps >= 1 (got {self.steps})")
        self.site_steps = site_steps(site, self.mode, self.steps)
        self.weight = nn.Parameter(torch.empty(self.num_experts, site.in_features))
        # Only a multi-step site has a state path (one step keeps topk's exact parameters).
        self.message_weight = (
            nn.Parameter(torch.empty(self.num_experts, int(self.options["message_size"])))
            if self.site_steps > 1 else None
        )
        self.reset_parameters()

    @property
    def refines(self) -> bool:
        return self.mode == "refine" and self.site_steps > 1

    @classmethod
    def shared_modules(cls, config: Any, sites: list[RoutingSite]) -> nn.Module | None:
        options = {**cls.defaults, **config.router_config}
        mode, steps = str(options["mode"]), int(options["steps"])
        if not any(site_steps(site, mode, steps) > 1 for site in sites):
            return None
        return Float32GRUCell(config.lora_rank, int(options["message_size"]))

    def reset_parameters(self) -> None:
        std = float(self.options["init_std"])
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.message_weight is not None:
            nn.init.normal_(self.message_weight, mean=0.0, std=std)

    def run(self, x: torch.Tensor, ctx: RoutingContext, experts: Any,
            expert_step: ExpertStep) -> tuple[RouterOutput, torch.Tensor]:
        if not self.refines:
            return super().run(x, ctx, experts, expert_step)
        # The router computes with autocast off; the experts keep the caller's precision.
        in_caller_precision = _caller_precision(x.device)
        change_step = getattr(experts, "expert_change", None)
        with without_autocast(x.device):
            route = self(x, ctx, experts, in_caller_precision(expert_step),
                         None if change_step is None else in_caller_precision(change_step))
        return route, route.output

    def forward(self, x: torch.Tensor, ctx: RoutingContext, experts: Any,
                expert_step: ExpertStep | None = None,
                change_step: Callable[..., tuple[torch.Tensor | None, torch.Tensor]] | None
                = None) -> RouterOutput:
        """``change_step(inputs, decision, with_mixture)``: a site whose step output contains
        its frozen part (a block's mixture) gives (that output or None, the experts' change)."""
        if not self.refines:
            return self._message(x, ctx, experts)
        if expert_step is None:
            raise RuntimeError(
                f"graphmoe mode=refine runs the experts of {self.site.name} at every step: call "
                f"the site module (or router.run with its expert step), not the router alone"
            )
        return self._refine(x, ctx, experts, expert_step, change_step)

    def _state_logits(self, state: torch.Tensor) -> torch.Tensor:
        return F.linear(state, self.message_weight.float())

    def _message_input(self, inputs32: torch.Tensor, lora_A: torch.Tensor,
                       indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """c_t = sum_{e in S_t} g_{t,e} (u A_e) [T, r], masked-dense over all E (E * r is small)."""
        gates = inputs32.new_zeros(inputs32.shape[0], self.num_experts)
        gates = gates.scatter(1, indices, weights)
        activations = torch.einsum("td,edr->ter", inputs32, lora_A)
        return torch.einsum("te,ter->tr", gates, activations)

    def _refine(self, x: torch.Tensor, ctx: RoutingContext, experts: Any,
                expert_step: ExpertStep, change_step: Callable | None) -> RouterOutput:
        cell = ctx.shared[self.name]
        lora_A = input_lora_A(experts).float()
        inputs, output, change, state = x, None, None, None
        step_logits, step_indices = [], []
        for step in range(self.site_steps):
            inputs32 = inputs.float()
            logits = float32_linear(inputs, self.weight)
            if state is not None:
                logits = logits + self._state_logits(state)
            indices, weights = self.select(logits)
            decision = RouterOutput(indices=indices, weights=weights, logits=logits)
            if change_step is None:  # a linear's step output is the experts' change only
                routed = changed = expert_step(inputs, decision)
            else:  # a block's contains its frozen MLP: the change comes from the experts' terms
                routed, changed = change_step(inputs, decision, output is None)
            # E_1 enters the output as routed (topk's exact value); later steps as their change.
            output = routed if output is None else output + changed
            change = changed if change is None else change + changed  # u_t - x
            step_logits.append(logits)
            step_indices.append(indices)
            if step + 1 < self.site_steps:
                message = self._message_input(inputs32, lora_A, indices, weights)
                previous = state if state is not None else message.new_zeros(
                    message.shape[0], cell.hidden_size)
                state = gru_step(cell, message, previous)
                inputs = x + change.to(x.dtype)
        return RouterOutput(indices=indices, weights=weights, logits=torch.cat(step_logits),
                            logit_indices=torch.cat(step_indices), output=output)

    def _message(self, x: torch.Tensor, ctx: RoutingContext, experts: Any) -> RouterOutput:
        x32 = x.float()
        base_logits = float32_linear(x, self.weight)
        indices, weights = self.select(base_logits)
        step_logits, step_indices = [base_logits], [indices]
        if self.site_steps > 1:
            lora_A = input_lora_A(experts).float()
            activations = torch.einsum("td,edr->ter", x32, lora_A)  # once, all steps
            cell = ctx.shared[self.name]
            message = x32.new_zeros(x32.shape[0], cell.hidden_size)
            for _ in range(1, self.site_steps):
                gates = torch.zeros_like(base_logits).scatter(1, indices, weights)
                combined = torch.einsum("te,ter->tr", gates, activations)
                message = gru_step(cell, combined, message)
                logits = base_logits + self._state_logits(message)
                indices, weights = self.select(logits)
                step_logits.append(logits)
                step_indices.append(indices)
        return RouterOutput(
            indices=indices, weights=weights, logits=torch.cat(step_logits),
            logit_indices=torch.cat(step_indices) if self.site_steps > 1 else None,
        )
