"""The MoE-LoRA layer that replaces a targeted linear, and how targets are found in a dense model.

``MoELoraLinear`` keeps the frozen dense linear as its child ``base_layer`` (so transformers'
bitsandbytes quantizer turns it into ``Linear4bit``/``Linear8bitLt`` like any other linear) and
adds E LoRA experts, stacked as ``lora_A`` [E, d_in, r] and ``lora_B`` [E, r, d_out], plus its
router. Experts and routers are plain parameters: never quantized, the only trainable tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .moe_lora_ops import expert_compute_dtype, moe_lora_delta, shared_cast
from .routing import (
    ROUTERS,
    RoutingContext,
    RoutingSite,
    context_scope,
    current_context,
    float32_parameters,
    without_autocast,
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
    def begin(self, token_mask: torch.Tensor | None) -> Iterator[RoutingContext]:
        """A new context, current for this model in this thread until the block exits."""
        with context_scope(self, RoutingContext(token_mask, self.shared)) as ctx:
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
        with float32_parameters():  # routers compute in float32 whatever the default dtype
            self.router = ROUTERS[config.router](site, config)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """LoRA init: A ~ kaiming-uniform(a=sqrt(5)) over d_in, B = 0 (starts as the base)."""
        bound = 1.0 / math.sqrt(self.site.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)
        self.router.reset_parameters()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        ctx = self._routing.current()
        flat = x.reshape(-1, self.site.in_features)
        with without_autocast(flat.device):
            route = self.router(flat, ctx, self)
        ctx.record(self.site, route)
        # The experts' operand dtype (16-bit under autocast or on a 16-bit base); the cast is
        # keyed by x itself, so the sites that read this x share one copy.
        dtype = expert_compute_dtype(x, self.lora_A.dtype)
        flat = shared_cast(x, dtype).reshape(-1, self.site.in_features)
        if self.training:
            flat = self.lora_dropout(flat)
        delta = moe_lora_delta(
            flat, self.lora_A, self.lora_B, route.indices, route.weights, self.scale,
            kernel=self.kernel,
        )
        if route.residual is not None:
            delta = delta + route.residual.to(delta.dtype)
        return result + delta.view(result.shape).to(result.dtype)

    def extra_repr(self) -> str:
        experts, d_in, rank = self.lora_A.shape
        return (f"site={self.site.index}, experts={experts}, rank={rank}, d_in={d_in}, "
                f"d_out={self.site.out_features}")


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


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
        match = _LAYER_INDEX.search(name + ".")
        if match is None or not is_linear(module) or not target_matches(name, patterns):
            continue
        found.append((name, int(match.group(1))))
    return found


def candidate_linear_names(model: nn.Module) -> list[str]:
    """Distinct short names of the linears a user can target, for error messages."""
    names = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if is_linear(module) and _LAYER_INDEX.search(name + ".") and short not in names:
            names.append(short)
    return names


def site_kind(name: str, config: Any) -> str:
    """The kind of the site at module ``name``: its path inside the decoder layer
    (``self_attn.q_proj``, GPT-2's ``attn.c_proj`` vs ``mlp.c_proj``), or its last name for
    checkpoints saved before kinds were paths (``config.site_keys == "name"``)."""
    match = _LAYER_INDEX.search(name + ".")
    if getattr(config, "site_keys", "path") == "name" or match is None:
        return name.rsplit(".", 1)[-1]
    return (name + ".")[match.end():-1]


def inject_moe_lora(model: nn.Module, config: Any, routing: RoutingHolder) -> list[RoutingSite]:
    """Replace every targeted linear of ``model`` in place; return the routing sites in order."""
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
        site = RoutingSite(index, layer, site_kind(name, config), name, d_in, d_out)
        setattr(parent, child_name, MoELoraLinear(base, site, config, routing))
        sites.append(site)
    return sites
