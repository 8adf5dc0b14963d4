"""Write checkpoints for loading under other transformers releases (scripts/test.sh --newest and
--oldest run this with the pinned environment first).

    python scripts/make_compat_checkpoints.py OUT

OUT gets a tiny random Llama converted to a full checkpoint (every router, experts and routers
perturbed so that they matter) and an adapter-only one, each with ``expected_logits.safetensors``:
the logits this environment computes, which any other tested transformers must reproduce.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from moe_hub import convert

ROUTERS = ("topk", "rmoe", "hypermoe", "graphmoe")
INPUT_IDS = torch.arange(3, 27).reshape(2, 12)


def _expected(path: Path, perturb: bool) -> None:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for name in model.adapter_parameter_names():
                param = model.get_parameter(name)
                param.add_(torch.randn_like(param) * 0.05)
        model.save_pretrained(path)
    with torch.no_grad():
        logits = model.eval()(INPUT_IDS).logits
    save_file({"input_ids": INPUT_IDS, "logits": logits.contiguous()},
              path / "expected_logits.safetensors")


def main(out: Path) -> None:
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    dense.save_pretrained(out / "dense")
    small = dict(experts=4, top_k=2, rank=4, progress=False, seed=0)
    for router in ROUTERS:
        _expected(convert(out / "dense", out / f"full-{router}", router=router, **small), True)
    _expected(convert(out / "dense", out / "adapter-only", adapter_only=True, **small), False)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/make_compat_checkpoints.py OUT")
    main(Path(sys.argv[1]))
