"""The code every checkpoint carries. Files here are copied verbatim into checkpoints: keep them
flat, importing only torch, transformers and each other through ``from .module import name``."""

from .configuration_moe_lora import MoELoraConfig
from .modeling_moe_lora import MoELoraForCausalLM, MoELoraModel

__all__ = ["MoELoraConfig", "MoELoraForCausalLM", "MoELoraModel"]
