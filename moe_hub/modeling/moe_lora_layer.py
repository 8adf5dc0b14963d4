"""The MoE-LoRA layer that replaces a targeted linear, and how targets are found in a dense model.

``MoELoraLinear`` keeps the frozen dense linear as its child ``base_layer`` (so transformers'
bitsandbytes quantizer turns it into ``Linear4bit``/``Linear8bitLt`` like any other linear) and
adds E LoRA experts, stacked as ``lora_A`` [E, d_in, r] and ``lora_B`` [E, r, d_out], plus its
router. Experts and routers are plain parameters: never quantized, the only trainable tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .moe_lora_fused import PackedShrink, batched_shrink, gated_expand, gathered_expand
from .moe_lora_ops import (
    HALF_DTYPES,
    expert_compute_dtype,
    moe_lora_delta,
    needs_grouping,
    shared_cast,
)
from .routing import (
    ROUTERS,
    ExpertStep,
    Router,
    RouterOutput,
    RoutingContext,
    RoutingSite,
    context_scope,
    current_context,
    float32_routing,
)

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it
    Conv1D = ()


class RoutingHolder:
    """One model's access to the routing context of the forward in progress.

    Every site of a model holds the same holder. ``begin`` opens a new context for one forward,
    ``join`` reuses the one already open (the backbone called by the causal LM's forward) or
    opens one (the backbone called directly, as TRL does), and ``current`` is what a site reads.
    Contexts are per thread and per forward (see ``routing.py``); gradient checkpointing
    re-installs the forward's own context during recomputation (``checkpoint_context_fn``).
    """

    def __init__(self, shared: nn.ModuleDict) -> None:
        self.shared = shared

    @contextmanager
    def begin(self, token_mask: torch.Tensor | None,
              shared: nn.ModuleDict | None = None) -> Iterator[RoutingContext]:
        """A new context, current for this model in this thread until the block exits.
        ``shared``: the calling model's own shared modules (a DataParallel replica's copies; the
        replica shares this holder with the original, each runs in its own thread)."""
        shared = self.shared if shared is None else shared
        with context_scope(self, RoutingContext(token_mask, shared)) as ctx:
            yield ctx

    @contextmanager
    def join(self, token_mask: torch.Tensor | None) -> Iterator[RoutingContext]:
        """The context of the forward in progress, or a new one when none is."""
        ctx = current_context(self)
        if ctx is not None:
            yield ctx
            return
        with self.begin(token_mask) as ctx:
            yield ctx

    def current(self) -> RoutingContext:
        # A layer called on its own (outside the model's forward) routes with a private context.
        ctx = current_context(self)
        return ctx if ctx is not None else RoutingContext(None, self.shared)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear``, GPT-2's ``Conv1D`` or a bitsandbytes
    linear."""
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def reset_lora_pair(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """LoRA's init for one adapter or a stack of them (A [..., d_in, r], B [..., r, d_out]): A ~
    kaiming-uniform(a=sqrt(5)) over d_in, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)), and B = 0, so the
    adapted layer starts as its base."""
    bound = 1.0 / math.sqrt(lora_A.shape[-2])
    nn.init.uniform_(lora_A, -bound, bound)
    nn.init.zeros_(lora_B)


class MoELoraLinear(nn.Module):
    """y = base(x) + scale * sum_j g_j(x) * (dropout(x) A_{e_j}) B_{e_j}  (+ router residual)."""

    def __init__(
        self, base_layer: nn.Module, site: RoutingSite, config: Any, routing: RoutingHolder
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.site = site
        self.scale = config.lora_scale
        self.kernel = config.expert_kernel
        self._routing = routing
        experts, rank = config.num_experts, config.lora_rank
        self.lora_A = nn.Parameter(torch.empty(experts, site.in_features, rank))
        self.lora_B = nn.Parameter(torch.empty(experts, rank, site.out_features))
        dropout = config.lora_dropout
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.router = float32_routing(ROUTERS[config.router](site, config))
        self._packed = PackedShrink()
        self.reset_adapter_parameters()

    def _apply(self, fn: Any, recurse: bool = True) -> MoELoraLinear:
        super()._apply(fn, recurse)
        self._packed.clear()  # its sources were replaced: free it now, not at the next decode
        return self

    def train(self, mode: bool = True) -> MoELoraLinear:
        super().train(mode)
        self._packed.clear()  # training never reads it, and eval() may follow other changes
        return self

    def reset_adapter_parameters(self) -> None:
        reset_lora_pair(self.lora_A, self.lora_B)
        self.router.reset_parameters()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        ctx = self._routing.current()
        flat = x.reshape(-1, self.site.in_features)
        if self._decodes(x):
            return self._decode_forward(flat, result, ctx)

        def step(inputs: torch.Tensor, route: RouterOutput) -> torch.Tensor:
            # The first step reads x itself (one cast shared with the sites that read x).
            return self.expert_delta(x if inputs is flat else inputs, route)

        return self._routed(flat, ctx, step, result)

    def _routed(self, flat: torch.Tensor, ctx: RoutingContext, step: ExpertStep,
                result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the site's expert part: the router decides and runs ``step``."""
        route, delta = self.router.run(flat, ctx, self, step)
        ctx.record(self.site, route)
        if route.residual is not None:
            delta = delta + route.residual.to(delta.dtype)
        return result + delta.view(result.shape).to(result.dtype)

    def expert_delta(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """The experts' part of the output for ``x`` [..., d_in] under ``route``: [T, d_out]."""
        # The experts' operand dtype (16-bit under autocast or on a 16-bit base); the cast is
        # keyed by x itself, so the sites that read this x share one copy.
        dtype = expert_compute_dtype(x, self.lora_A.dtype)
        flat = shared_cast(x, dtype).reshape(-1, self.site.in_features)
        if self.training:
            flat = self.lora_dropout(flat)
        return moe_lora_delta(
            flat, self.lora_A, self.lora_B, route.indices, route.weights, self.scale,
            kernel=self.kernel,
        )

    def _decodes(self, x: torch.Tensor) -> bool:
        """Whether the decode path applies: no autograd, no dropout, no autocast, masked-dense
        regime, torch kernel."""
        experts, _, rank = self.lora_A.shape
        return not (torch.is_grad_enabled() or (self.training and not isinstance(
            self.lora_dropout, nn.Identity)) or self.kernel == "triton"
            or torch.is_autocast_enabled(x.device.type) or needs_grouping(experts, rank))

    def _decode_forward(self, flat: torch.Tensor, result: torch.Tensor,
                        ctx: RoutingContext) -> torch.Tensor:
        """The decode path (see ``moe_lora_fused``). Many (token, slot) pairs (T * k >= E): one
        matmul over x for every expert's shrink, gating in rank space, one expand into the base
        output. Fewer pairs than experts (decoding one or two sequences): only the chosen
        experts' A and B are read (``gathered_expand``), since there the op is bound by the
        adapter bytes it reads. The router decides in its own call either way."""
        experts = self.lora_A.shape[0]
        # The generic op's operand dtype (autocast is off here).
        compute = flat.dtype if flat.dtype in HALF_DTYPES else self.lora_A.dtype
        shrunk = None
        if flat.shape[0] * self.router.top_k >= experts:
            packed = self._packed.get(self.lora_A)
            shrunk = (flat.to(compute) @ packed.to(compute).t() if packed is not None
                      else batched_shrink(flat.to(compute), self.lora_A.to(compute)))

        def expand(into: torch.Tensor | None, route: RouterOutput) -> torch.Tensor:
            if shrunk is None:
                return gathered_expand(into, flat.to(compute), self.lora_A, self.lora_B,
                                       route.indices, route.weights, self.scale)
            return gated_expand(into, shrunk, self.lora_B, route.indices, route.weights,
                                self.scale)

        if getattr(self.router.run, "__func__", None) is not Router.run:
            # A router that runs the experts itself (GraphMoE re-runs them on a refined input),
            # or an instance override (a test forcing experts, a user's patch): the generic
            # tail, with the decode forms for the step on x itself.
            def step(inputs: torch.Tensor, route: RouterOutput) -> torch.Tensor:
                if inputs is not flat:
                    return self.expert_delta(inputs, route)
                return expand(None, route)

            return self._routed(flat, ctx, step, result)
        # Router.run's decision, with the experts' part added straight into the base output.
        route = self.router(flat, ctx, self)
        ctx.record(self.site, route)
        out = result.reshape(-1, result.shape[-1])
        if route.residual is not None:
            out = out + route.residual.to(out.dtype)
        return expand(out, route).view(result.shape)

    def extra_repr(self) -> str:
        experts, d_in, rank = self.lora_A.shape
        return (f"site={self.site.index}, experts={experts}, rank={rank}, d_in={d_in}, "
                f"d_out={self.site.out_features}")


#: The decoder layer number inside a module name (``layers.3.``, ``h.3.``).
LAYER_INDEX = re.compile(r"\.(\d+)\.")


def target_matches(name: str, patterns: list[str] | None) -> bool:
    """``patterns`` None targets every linear inside the repeated decoder blocks. A pattern is a
    module-name suffix (``q_proj`` or ``self_attn.q_proj``) or ``re:<regex>`` matched in full."""
    if patterns is None:
        return True
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def find_target_linears(model: nn.Module, patterns: list[str] | None) -> list[tuple[str, int]]:
    """(module name, decoder layer index) of every targeted linear, in depth order.

    Only linears inside a numbered block (``layers.3.``, ``h.3.``) are candidates: embeddings and
    the LM head are never routed.
    """
    found = []
    for name, module in model.named_modules():
        match = LAYER_INDEX.search(name + ".")
        if match is None or not is_linear(module) or not target_matches(name, patterns):
            continue
        found.append((name, int(match.group(1))))
    return found


def candidate_linear_names(model: nn.Module) -> list[str]:
    """Distinct short names of the linears a user can target, for error messages."""
    names = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if is_linear(module) and LAYER_INDEX.search(name + ".") and short not in names:
            names.append(short)
    return names


def site_kind(name: str, config: Any) -> str:
    """The kind of the site at module ``name``: its path inside the decoder layer
    (``self_attn.q_proj``, GPT-2's ``attn.c_proj`` vs ``mlp.c_proj``), or its last name for
    checkpoints saved before kinds were paths (``config.site_keys == "name"``)."""
    match = LAYER_INDEX.search(name + ".")
    if getattr(config, "site_keys", "path") == "name" or match is None:
        return name.rsplit(".", 1)[-1]
    return (name + ".")[match.end():-1]


def inject_moe_lora(
    model: nn.Module, config: Any, routing: RoutingHolder,
    site_name: Callable[[str], str] = str,
) -> list[RoutingSite]:
    """Replace every targeted linear of ``model`` in place; return the routing sites in order.
    Targets match ``model``'s module names; ``site_name`` turns one into the name a site shows."""
    targets = find_target_linears(model, config.target_modules)
    if not targets:
        raise ValueError(
            f"no linear layer matches the targets {config.target_modules}; this model's linears "
            f"are {candidate_linear_names(model)}: pass some of them to --targets"
        )
    sites = []
    for index, (name, layer) in enumerate(targets):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        d_in, d_out = linear_features(base)
        site = RoutingSite(index, layer, site_kind(name, config), site_name(name), d_in, d_out)
        setattr(parent, child_name, MoELoraLinear(base, site, config, routing))
        sites.append(site)
    return sites
