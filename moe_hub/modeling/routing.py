"""What every router shares: routing sites, the router interface, the per-forward context and the
load-balancing losses.

A *routing site* is one place where tokens are sent to experts: a targeted linear (granularity
``linear``) or a decoder layer's MLP block (granularity ``block``). Every site owns a router; a
router returns, per token, the chosen experts, their weights and the logits the auxiliary losses
need. Routers never touch the frozen base. Their math runs in float32 whatever the model dtype,
and under ``torch.autocast`` too: the sites call their router with autocast disabled.

Routers whose decision depends on an earlier site (RMoE's GRU state across depth) read and write
that state through the :class:`RoutingContext` created at every forward of the model. Values are
stored per site index so that gradient checkpointing, which re-runs a decoder layer during
backward, reads exactly the state it read the first time, and counts each site's losses once.

A context belongs to one forward. It is current only while that forward runs, and only in the
thread that runs it: the current contexts are thread-local (a ``threading.local``, which
torch.compile traces, where a ``ContextVar`` would break the graph). Gradient
checkpointing recomputes layers during backward, after the forward has returned and possibly on
another thread; :func:`checkpoint_context_fn` captures the contexts current when a checkpointed
layer first runs and installs exactly those while it is recomputed. So two forwards before one
backward, or two threads, never read each other's routing state. What it keeps for that is the
routing state only (:meth:`RoutingContext.for_recomputation`): the recorded decisions carry
per-site activations, dropped when the forward's scope ends (:func:`context_scope`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RoutingSite:
    """Where a router sits. ``index`` orders all sites by depth; ``kind`` is the module's path
    inside its decoder layer (``self_attn.q_proj``, ``mlp``, GPT-2's ``attn.c_proj`` and
    ``mlp.c_proj``), so that routers can chain sites of one kind across layers."""

    index: int
    layer: int
    kind: str
    name: str
    in_features: int
    out_features: int


#: The default of ``RouterOutput.losses``: one shared value, so read-only.
_NO_LOSSES: Mapping[str, torch.Tensor] = MappingProxyType({})


class RouterOutput(NamedTuple):
    """One routing decision for ``T`` tokens.

    A named tuple, not a dataclass: DeepSpeed ZeRO-3 finds a module's output tensors by walking
    tuples, lists and dicts, and hooks the router's re-gathering for backward onto them; a
    dataclass hides them, and the router's backward then met its partitioned (empty) weight.

    ``indices`` [T, k] (int64) and ``weights`` [T, k] (float32) select and weigh the experts.
    ``logits`` are the [T, E] router logits the load-balancing loss sees; routers that decide in
    several steps (GraphMoE) return one [T, E] tensor per step, concatenated along dim 0, with the
    matching top-k choices of every step in ``logit_indices`` ([steps * T, k]).
    ``losses`` holds router-specific auxiliary losses of this site (scalars, already weighted by
    the router's own coefficient); the model sums each over all sites and adds it to the loss.
    ``residual`` is an extra [T, d_out] term added to the site's output (HyperMoE's generated
    module), or ``None``.
    ``output`` is the site's expert output when the router ran the experts itself (GraphMoE's
    refinement steps), else ``None``.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    losses: Mapping[str, torch.Tensor] = _NO_LOSSES
    residual: torch.Tensor | None = None
    logit_indices: torch.Tensor | None = None
    output: torch.Tensor | None = None

    @property
    def balance_indices(self) -> torch.Tensor:
        return self.indices if self.logit_indices is None else self.logit_indices


class RoutingContext:
    """Per-forward scratch space shared by all sites of one model call.

    Created by the model at the start of every forward (so recurrent routing state never leaks
    across calls or generated tokens) and dropped at its end.
    """

    def __init__(self, token_mask: torch.Tensor | None, shared: nn.ModuleDict) -> None:
        # token_mask: [batch, seq] bool, True for real tokens; None when there is no padding.
        self.token_mask = token_mask
        self.shared = shared
        self.state: dict[Any, torch.Tensor] = {}
        self.outputs: dict[int, RouterOutput] = {}
        self.recording = True

    def for_recomputation(self) -> RoutingContext:
        """What a checkpointed layer's recomputation needs of this context: the same mask, shared
        modules and routing state (the very dict: a recomputed site reads the state an earlier
        site wrote in the first pass), but no decisions. The recorded outputs hold [T, d_out]
        tensors (HyperMoE's residual, GraphMoE's refined output) that checkpointing exists to
        drop, and the losses were already taken from the first pass: the recomputation records
        nothing, and the checkpoint that keeps this view keeps none of them alive."""
        view = RoutingContext(self.token_mask, self.shared)
        view.state = self.state
        view.recording = False
        return view

    def flat_mask(self, num_tokens: int) -> torch.Tensor | None:
        """The padding mask of the ``num_tokens`` rows a site sees, flattened, or ``None`` when
        there is no mask or it does not describe those rows.

        ``token_mask`` covers the tokens of this call (see :func:`call_token_mask`), which is what
        every decoder site sees, with or without a KV cache. A site that sees other rows (a
        cross-attention projection of encoder states, a module that selects tokens) is not
        described by it: its rows are matched by count, never by guessing a slice."""
        if self.token_mask is None or self.token_mask.numel() != num_tokens:
            return None
        return self.token_mask.reshape(-1)

    def site_mask(self, num_tokens: int) -> torch.Tensor | None:
        """Like :meth:`flat_mask`, but all-True for a site the mask does not describe, so that
        one such site never drops the padding mask of the others (``None`` without a mask)."""
        mask = self.flat_mask(num_tokens)
        if mask is None and self.token_mask is not None:
            return torch.ones(num_tokens, dtype=torch.bool, device=self.token_mask.device)
        return mask

    def record(self, site: RoutingSite, output: RouterOutput) -> None:
        if self.recording:
            self.outputs[site.index] = output


def call_token_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None,
                    inputs_embeds: torch.Tensor | None) -> torch.Tensor | None:
    """[batch, new tokens] bool, True for real tokens, of one model call; ``None`` without a 2-D
    padding mask (4-D custom masks route every token).

    With a KV cache the mask covers past + new tokens while the decoder sees the new ones only:
    keep the mask's last columns, as many as the call's input has tokens."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    inputs = input_ids if input_ids is not None else inputs_embeds
    mask = attention_mask.bool()
    if inputs is not None and inputs.dim() >= 2 and inputs.shape[0] == mask.shape[0] \
            and inputs.shape[1] <= mask.shape[1]:
        mask = mask[:, mask.shape[1] - inputs.shape[1]:]
    return mask


class _Float32Linear(torch.autograd.Function):
    """x W^T in float32 that keeps x for backward in its OWN dtype: the 16-bit hidden states a
    router reads are also kept by the base linear, so they cost nothing extra, while an fp32 copy
    would cost twice their size at every site. Upcasting a 16-bit x is exact."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x.float() @ weight.float().t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.float()
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = (grad @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (grad.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def without_autocast(device: torch.device) -> AbstractContextManager:
    """Autocast off on ``device`` for the block (nothing to do when it is not on). Where routers
    run: ``F.linear(x.float(), w.float())`` inside an autocast region still computes in the
    autocast dtype, so sites call their router with autocast switched off; the expert ops run
    their matmuls in the dtype they chose themselves."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits ``x W^T`` computed in float32 (the caller disables autocast)."""
    return _Float32Linear.apply(x, weight)


# The contexts current in this thread, one per model (keyed by the model's holder object, so
# that a model called inside another model's forward never reads the outer model's state). The
# mapping is never mutated in place: every change installs a new dict, and leaving a scope puts
# the previous one back.
_LOCAL = threading.local()


def _current() -> dict[object, RoutingContext]:
    return getattr(_LOCAL, "contexts", None) or {}


def current_context(owner: object) -> RoutingContext | None:
    """The context ``owner``'s forward in progress (or recomputation) uses in this thread."""
    return _current().get(owner)


@contextmanager
def _installed(contexts: dict[object, RoutingContext]) -> Iterator[None]:
    previous = _current()
    _LOCAL.contexts = contexts
    try:
        yield
    finally:
        _LOCAL.contexts = previous


@contextmanager
def context_scope(owner: object, ctx: RoutingContext) -> Iterator[RoutingContext]:
    """Make ``ctx`` current for ``owner`` in this thread until the block exits, then drop its
    recorded decisions: they belong to this forward, whichever entry point opened the scope
    (the causal LM, the backbone called directly, ``MoELoraModel``), and read inside it."""
    try:
        with _installed({**_current(), owner: ctx}):
            yield ctx
    finally:
        ctx.outputs.clear()


ContextFn = Callable[[], tuple[AbstractContextManager, AbstractContextManager]]


def checkpoint_context_fn(user_fn: ContextFn | None = None) -> ContextFn:
    """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): the recomputation of a
    checkpointed layer runs with the routing contexts that were current when the layer first ran,
    whatever forward ran since and whichever thread runs the backward. ``user_fn``, a caller's own
    ``context_fn``, is composed with it (its contexts are entered inside ours)."""

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        captured = {owner: ctx.for_recomputation() for owner, ctx in _current().items()}
        forward_cm, recompute_cm = user_fn() if user_fn is not None else (nullcontext(),
                                                                          nullcontext())
        return forward_cm, _stacked(_installed(captured), recompute_cm)

    context_fn.moe_hub_routing = True  # marks it so that enabling twice does not wrap twice
    return context_fn


@contextmanager
def _stacked(outer: AbstractContextManager, inner: AbstractContextManager) -> Iterator[None]:
    with outer, inner:
        yield


class ModuleRef:
    """A module passed as a call argument to another module (a site's experts to its router, the
    shared hypernetwork to a site's part of it).

    accelerate's hooks (``device_map``) move every call argument that has a ``to`` method to the
    called module's execution device: a module argument would be moved whole, in place, and an
    offloaded one (meta tensors) can't be moved at all. The reference forwards attribute access
    and calls to the module and has no ``to``.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __getattr__(self, name: str) -> Any:
        # "module" unset (copy, pickle) must not recurse into itself.
        if name in ("to", "module"):
            raise AttributeError(f"ModuleRef has no {name!r}: it is never moved")
        return getattr(self.module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def module_ref(value: Any) -> Any:
    return ModuleRef(value) if isinstance(value, nn.Module) else value


class ParameterBank(nn.ParameterDict):
    """A ParameterDict read through ``bank.fetch(key)`` in forward code.

    With CPU or disk offload, accelerate keeps a module's weights on the meta device and loads
    them only while that module is being called; a ParameterDict is never called, so ``bank[key]``
    would read a meta tensor. ``fetch`` calls the bank when accelerate hooked it (the tensor
    returned stays valid after the hook offloads the bank again) and indexes it otherwise (a
    module call costs ~5 us). State-dict names are those of a ParameterDict.

    Under DeepSpeed ZeRO-3 the bank's entries are partitioned like any parameter: indexing one
    during the engine's forward gathers it and registers it as an external parameter of the module
    then running (the hypernetwork), which gathers it again for every later call and for backward
    (tests/test_deepspeed.py: one step equals one process's).
    """

    __call__ = nn.Module.__call__  # ParameterDict refuses calls

    def forward(self, key: str) -> torch.Tensor:
        return self[key]

    def fetch(self, key: str) -> torch.Tensor:
        return self(key) if getattr(self, "_hf_hook", None) is not None else self[key]


_HALF = (torch.float16, torch.bfloat16)


def _float32_cast(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor],
                                                                           torch.Tensor]:
    """``fn`` (what ``Module._apply`` applies: ``.half()``, ``.to(dtype)``, a device move) with
    the 16-bit results it cast to put back in float32.

    A tensor that already was 16-bit keeps its dtype through a move: someone set it directly
    (``p.data = p.data.to(torch.bfloat16)``), as DeepSpeed's bf16 and fp16 modes do with every
    parameter just before they move the model, because their ZeRO-3 optimizer holds one dtype
    for all trained parameters. Putting the routers back in float32 there made ZeRO-3's start
    fail (an ``AssertionError`` in its ``defragment``), while the values had been rounded anyway;
    following DeepSpeed, the routers read 16-bit weights, its optimizer keeps their float32
    master copies, and the router math still runs in float32 (``float32_linear``).
    ``keep_adapters_float32_in_deepspeed()`` of the model keeps them float32 there instead."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        out = fn(tensor)
        if out.dtype in _HALF and out.dtype != tensor.dtype:
            return out.float()
        return out

    return cast


class Float32Modules(nn.ModuleDict):
    """The modules all sites of a model share (``moe_shared``): float32 through ``.half()`` and
    ``.to(dtype)``, like the routers that read them."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any,
               **kwargs: Any) -> Float32Modules:
        return super()._apply(_float32_cast(fn), *args, **kwargs)


#: ``expert_step(inputs, decision)``: a site's expert part (its output minus the frozen base) on
#: ``inputs`` [T, d_in] under one routing decision, [T, d_out].
ExpertStep = Callable[[torch.Tensor, RouterOutput], torch.Tensor]


class Router(nn.Module):
    """Base class of the routers. A subclass sets ``name`` and implements :meth:`forward`.

    Routers hold their weights as plain ``nn.Parameter`` and never as ``nn.Linear``:
    transformers' bitsandbytes quantizer replaces every ``nn.Linear`` it finds, and a quantized
    router cannot train.

    ``shared_modules`` builds the modules all sites of a model share (RMoE's GRU cell, HyperMoE's
    hypernetwork); the model stores them once under ``moe_shared.<router name>`` and routers reach
    them through ``ctx.shared``.
    """

    name: ClassVar[str]
    #: Whether the model adds the Switch load-balancing loss (``router_aux_loss_coef``) to the
    #: training loss for this router; a router with its own balancing loss sets False.
    load_balance: ClassVar[bool] = True
    #: Router-specific options (``router_config`` keys) with their defaults.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, site: RoutingSite, config: Any) -> None:
        super().__init__()
        self.site = site
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.normalize = config.normalize_expert_weights
        type(self).validate_options(config.router_config)
        self.options = {**self.defaults, **config.router_config}

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Raise ``ValueError`` (one line naming the fix) for an option this router does not
        have or a value of the wrong type; ``defaults`` declares the options and their types."""
        unknown = sorted(set(options) - set(cls.defaults))
        if unknown:
            raise ValueError(
                f"router {cls.name!r} has no option {', '.join(map(repr, unknown))}; its options "
                f"are {', '.join(sorted(cls.defaults)) or 'none'} (--router-opt KEY=VALUE)"
            )
        for key, value in options.items():
            wanted = _OPTION_TYPES[type(cls.defaults[key])]
            if not wanted[0](value):
                raise ValueError(
                    f"router option {key!r} of {cls.name!r} takes {wanted[1]}, got {value!r}: "
                    f"pass --router-opt {key}=<{wanted[2]}>"
                )

    @classmethod
    def shared_modules(cls, config: Any, sites: list[RoutingSite]) -> nn.Module | None:
        return None

    def connect(self, sites: list[RoutingSite]) -> None:
        """Called once the model has placed every site (routers that read other sites' state
        find their neighbours here, once, instead of per forward)."""

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any,
               **kwargs: Any) -> Router:
        # Routers compute in float32 (a 16-bit weight would round the logits before they are
        # upcast), so they are stored in it whatever a 16-bit cast of the model asks for, as
        # from_pretrained keeps them (_keep_in_fp32_modules_strict). float64 passes: reference
        # computations use it. Parameters already 16-bit (DeepSpeed's cast) stay so when moved:
        # see _float32_cast.
        return super()._apply(_float32_cast(fn), *args, **kwargs)

    def __call__(self, x: torch.Tensor, ctx: RoutingContext, experts: Any = None,
                 *args: Any, **kwargs: Any) -> RouterOutput:
        # The experts module reaches forward as a ModuleRef, untouched by accelerate's hooks.
        return super().__call__(x, ctx, module_ref(experts), *args, **kwargs)

    def forward(self, x: torch.Tensor, ctx: RoutingContext, experts: Any) -> RouterOutput:
        """Route ``x`` [T, d_in]. ``experts`` is the site's expert module (its ``lora_A``,
        ``lora_B`` and ``scale``), for routers that look at what the experts compute, behind a
        :class:`ModuleRef`."""
        raise NotImplementedError

    def run(self, x: torch.Tensor, ctx: RoutingContext, experts: Any,
            expert_step: ExpertStep) -> tuple[RouterOutput, torch.Tensor]:
        """Route ``x`` and compute the site's expert part: one decision, experts run once on
        ``x``. Routers that re-run the experts on a refined input (GraphMoE) override this."""
        with without_autocast(x.device):
            route = self(x, ctx, experts)
        return route, expert_step(x, route)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over all experts, top-k, optional renormalisation over the chosen k."""
        if self.normalize:
            # Softmax probabilities renormalised over the chosen k equal a softmax over their k
            # logits (the partition function cancels): same values and gradients, two ops fewer.
            top_logits, indices = logits.float().topk(self.top_k, dim=-1)
            return indices, top_logits.softmax(dim=-1)
        weights, indices = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        return indices, weights


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Option type (from its default) -> (accepts a value?, what it takes, placeholder).
_OPTION_TYPES: dict[type, tuple[Any, str, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", "true|false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", "integer"),
    float: (_is_number, "a number", "number"),
    str: (lambda v: isinstance(v, str), "a string", "text"),
}

ROUTERS: dict[str, type[Router]] = {}
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def float32_routing(module: ModuleT) -> ModuleT:
    """``module`` (a router, a shared routing module) with float32 parameters, initialised in
    float32: routers compute in float32 whatever torch's default dtype, so a model built under
    ``torch.set_default_dtype(torch.bfloat16)`` still gets float32 routers. Cast after
    construction, never by switching the default dtype around it: that is process-wide, and
    every other thread would create float32 tensors meanwhile. Values drawn in 16 bits are drawn
    again once in float32 (each submodule's ``reset_parameters``); built in float32 already, the
    module is returned untouched."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    module.float()
    for part in module.modules():
        if hasattr(part, "reset_parameters"):
            part.reset_parameters()
    return module


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make a router available under ``cls.name``."""
    if cls.name in ROUTERS and ROUTERS[cls.name] is not cls:
        raise ValueError(f"router name {cls.name!r} is registered twice")
    ROUTERS[cls.name] = cls
    return cls


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of ``values`` [N, ...] whose ``mask`` [N] is True."""
    if mask is None:
        return values.mean(dim=0)
    weights = mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / weights.sum().clamp_min(1.0)


def load_balancing_loss(
    logits: torch.Tensor, indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch/Mixtral load balance, E * sum_e f_e * P_e, over the unpadded rows.

    ``logits`` [N, E] and ``indices`` [N, k] are every site's rows concatenated; f_e is the
    fraction of token-slots sent to expert e, P_e the mean router probability of e.
    """
    probs = logits.float().softmax(dim=-1)
    slots = F.one_hot(indices, num_experts).float().mean(dim=1)  # [N, E], rows sum to 1
    fraction = masked_mean(slots, mask)
    mean_prob = masked_mean(probs, mask)
    return num_experts * (fraction * mean_prob).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition function, over unpadded rows."""
    return masked_mean(torch.logsumexp(logits.float(), dim=-1).square(), mask)
