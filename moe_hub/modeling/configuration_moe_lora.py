"""Configuration of a Mixture-of-LoRA-Experts checkpoint.

This file ships inside every checkpoint (copied verbatim by ``moe_hub.convert``) and imports only
transformers, so a checkpoint loads with ``trust_remote_code=True`` and nothing else installed.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

GRANULARITIES = ("linear", "block")
SITE_KEYS = ("path", "name")
#: Layout of the tensor names a model writes: 1 = the whole dense causal LM under ``model.``
#: (``model.model.layers...``, ``model.lm_head...``; moe-hub before 0.2), 2 = the decoder backbone
#: under ``model.`` and the head as ``lm_head`` (transformers' convention).
CHECKPOINT_LAYOUT = 2
#: The moe-hub release this code belongs to (``moe_hub.__version__``; a test keeps them equal).
#: Checkpoints record the release that wrote them as ``moe_hub_version``.
CODE_VERSION = "0.1.0"
KERNEL_CHOICES = ("auto", "triton", "torch")
#: Router options whose default changed after checkpoints were saved without them: router ->
#: option -> (what a config read from a file without it was built with, what a new config gets).
#: Every config records the value in ``router_config``, so a checkpoint computes what it was built
#: with whatever the code's defaults become, and a config built in code and one written by
#: ``moe-hub convert`` mean the same model.
ROUTER_OPTION_DEFAULTS: dict[str, dict[str, tuple[Any, Any]]] = {
    # GraphMoE's reading A (``refine``) came after checkpoints that ran reading B and had no
    # ``mode``; a config built in code without ``mode`` got ``message`` until then as well.
    "graphmoe": {"mode": ("message", "refine")},
}


def _number(name: str, value: Any, kind: type) -> Any:
    """``value`` as an int or float; a string such as "four" (or "8") in config.json, a bool or
    a fractional count is refused naming the field."""
    import numbers

    integral = isinstance(value, numbers.Integral) or \
        (isinstance(value, numbers.Real) and float(value).is_integer())
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            (kind is int and not integral):
        wanted = "an integer" if kind is int else "a number"
        raise ValueError(f"config.json {name} must be {wanted} (got {value!r})")
    return kind(value)


def _release(version: Any) -> tuple[int, ...]:
    """``"0.10.2rc1"`` -> (0, 10, 2): enough to order moe-hub releases (no packaging import in
    the shipped code)."""
    import re

    return tuple(int(part) for part in re.findall(r"\d+", str(version).split("+")[0])[:3])


def _refuse_newer_checkpoint(layout: int, written_by: Any) -> None:
    """A checkpoint written by a newer moe-hub may store what this code cannot read (a newer
    tensor layout, router options it does not know): one line naming the release it needs."""
    newer_layout = layout > CHECKPOINT_LAYOUT
    newer_release = written_by is not None and _release(written_by) > _release(CODE_VERSION)
    if not (newer_layout or newer_release):
        return
    needed = f"moe-hub {written_by} or newer" if written_by else "a newer moe-hub"
    what = (f"checkpoint_layout {layout}; this code reads layouts up to {CHECKPOINT_LAYOUT}"
            if newer_layout else f"moe_hub_version {written_by}; this code is {CODE_VERSION}")
    raise ValueError(f"this checkpoint was written by a newer moe-hub (config.json {what}): "
                     f"it needs {needed}: pip install -U moe-hub, or load it with "
                     f"trust_remote_code=True to run the code it ships")


class MoELoraConfig(PretrainedConfig):
    r"""Dense model config (``text_config``) plus the MoE-LoRA specification.

    The dense config is nested under ``text_config`` because generation utilities look the decoder
    config up by that name (``get_text_config()``); any other name breaks ``generate()``.

    Args:
        text_config: the dense model's config (a dict or a ``PretrainedConfig``).
        router: registered router name (``topk``, ``rmoe``, ``hypermoe``, ``graphmoe``).
        router_config: router-specific options, e.g. ``{"hidden_size": 128}`` for ``rmoe``.
        num_experts: LoRA experts per routing site.
        num_experts_per_tok: experts each token is sent to (top-k). Not called ``top_k``: a config
            field named like a generation setting breaks ``save_pretrained``.
        lora_rank, lora_alpha, lora_dropout: every expert's LoRA pair, scaled by ``alpha / rank``.
        target_modules: names of the targeted linears (module-name suffixes, or ``re:<regex>``).
        routing_granularity: ``linear`` (one router per targeted linear) or ``block`` (one router
            per MLP block, MixLoRA style).
        normalize_expert_weights: renormalise the top-k probabilities to sum to one (Mixtral);
            ``False`` keeps the raw softmax probabilities (Switch), which gives top-1 routers a task
            gradient.
        router_aux_loss_coef: weight of the load-balancing loss added to the LM loss.
        router_z_loss_coef: weight of the router z-loss (0 disables it).
        output_router_logits: return (and add to the loss) the routers' auxiliary losses.
        expert_kernel: ``auto`` (Triton on CUDA when available), ``triton`` or ``torch``.
        base_model_name_or_path, base_model_revision: where the dense weights came from; an
            adapter-only checkpoint loads them from there.
        site_keys: what identifies a routing site's kind (RMoE's chains, HyperMoE's kind
            embedding): ``path`` its module path inside the decoder layer (``attn.c_proj`` and
            ``mlp.c_proj`` are two kinds), ``name`` its last name only (``c_proj``: one kind, the
            behaviour of checkpoints saved before this field existed, kept for them).
        checkpoint_layout: the tensor-name layout of the checkpoint this config belongs to
            (``CHECKPOINT_LAYOUT``); absent from checkpoints of layout 1, which load through a key
            mapping. A model built from the config sets it to the current layout.
        train_base: leave the dense base trainable when ``from_pretrained`` loads the model
            (``False``: only experts and routers require grad, as in a PEFT model; pass
            ``train_base=True`` to ``from_pretrained`` or call ``model.set_trainable("all")``).
    """

    model_type = "moe_lora"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        router: str = "topk",
        router_config: dict[str, Any] | None = None,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.05,
        target_modules: list[str] | None = None,
        routing_granularity: str = "linear",
        normalize_expert_weights: bool = True,
        router_aux_loss_coef: float = 0.001,
        router_z_loss_coef: float = 0.0,
        output_router_logits: bool = False,
        expert_kernel: str = "auto",
        base_model_name_or_path: str | None = None,
        base_model_revision: str | None = None,
        adapter_only: bool = False,
        site_keys: str | None = None,
        checkpoint_layout: int = 1,
        train_base: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", None)
            if model_type is None:
                raise ValueError("text_config needs a 'model_type' naming the dense architecture")
            from transformers import CONFIG_MAPPING

            text_config = CONFIG_MAPPING[model_type](**text_config)
        self.text_config = text_config
        self.router = router
        if router_config is not None and not isinstance(router_config, dict):
            raise ValueError(f"config.json router_config must be a mapping of router options such "
                             f"as {{\"hidden_size\": 128}} (got a {type(router_config).__name__}: "
                             f"{router_config!r})")
        self.router_config = dict(router_config or {})
        # A config read from a file always carries ``transformers_version`` (as for site_keys).
        saved = "transformers_version" in kwargs
        for key, (before, now) in ROUTER_OPTION_DEFAULTS.get(router, {}).items():
            self.router_config.setdefault(key, before if saved else now)
        self.num_experts = _number("num_experts", num_experts, int)
        self.num_experts_per_tok = _number("num_experts_per_tok", num_experts_per_tok, int)
        self.lora_rank = _number("lora_rank", lora_rank, int)
        self.lora_alpha = _number("lora_alpha", lora_alpha, float)
        self.lora_dropout = _number("lora_dropout", lora_dropout, float)
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.routing_granularity = routing_granularity
        self.normalize_expert_weights = bool(normalize_expert_weights)
        self.router_aux_loss_coef = _number("router_aux_loss_coef", router_aux_loss_coef, float)
        self.router_z_loss_coef = _number("router_z_loss_coef", router_z_loss_coef, float)
        self.output_router_logits = bool(output_router_logits)
        self.expert_kernel = expert_kernel
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.adapter_only = bool(adapter_only)
        if site_keys is None:
            # A config read from a file always carries ``transformers_version``; one that lacks
            # ``site_keys`` was saved before sites were keyed by path and must keep its kinds.
            site_keys = "name" if "transformers_version" in kwargs else "path"
        self.site_keys = site_keys
        self.checkpoint_layout = int(checkpoint_layout)
        self.train_base = bool(train_base)
        _refuse_newer_checkpoint(self.checkpoint_layout, kwargs.get("moe_hub_version"))
        if text_config is not None:
            # Generation and the pipelines read these from the top-level config.
            for name in ("vocab_size", "tie_word_embeddings"):
                if name not in kwargs and hasattr(text_config, name):
                    kwargs[name] = getattr(text_config, name)
        super().__init__(**kwargs)
        self.validate_moe()

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def validate_moe(self) -> None:
        """Raise ``ValueError`` with a message naming the fix for an impossible specification."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1 (got {self.num_experts})")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"top-k must be between 1 and the number of experts: got top-k "
                f"{self.num_experts_per_tok} with {self.num_experts} experts; lower --top-k or "
                f"raise --experts"
            )
        if self.lora_rank < 1:
            raise ValueError(
                f"LoRA rank must be >= 1 (got {self.lora_rank}); pass --rank 8 or more"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.routing_granularity not in GRANULARITIES:
            raise ValueError(
                f"routing granularity must be one of {GRANULARITIES} "
                f"(got {self.routing_granularity!r})"
            )
        if self.site_keys not in SITE_KEYS:
            raise ValueError(f"site_keys must be one of {SITE_KEYS} (got {self.site_keys!r})")
        if self.expert_kernel not in KERNEL_CHOICES:
            raise ValueError(
                f"expert_kernel must be one of {KERNEL_CHOICES} (got {self.expert_kernel!r})"
            )
