"""Activation memory of one training forward: moe-hub against PEFT LoRA (a benchmark, not a test).

Counts the bytes autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, each
storage once however many tensors view it; parameters are excluded because they exist anyway,
but a 16-bit copy of a parameter made during the forward counts). Llama-shaped random model
(2 layers, hidden 1024, intermediate 2816, 16 heads / 4 KV heads, vocab 4096 so that the LM head
does not drown the decoder layers), batch 4 x 512 tokens, bf16 base, fp32 adapters (what
``moe-hub finetune`` and PEFT both train), adapters on all seven decoder linears, dropout 0, no
gradient checkpointing. Each variant runs with and without ``torch.autocast(bfloat16)``.

    python benchmarks/bench_memory.py              # the table, printed last
    python benchmarks/bench_memory.py --tokens 64  # a quick smoke run
"""

from __future__ import annotations

import argparse
import gc
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per row")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--router", default="topk")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def text_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.tokens),
    )


def dense_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(text_config(args), attn_implementation="sdpa")
    return model.to(args.device, torch.bfloat16).requires_grad_(False)


def build(args: argparse.Namespace, variant: str) -> nn.Module:
    if variant == "floor":
        model = dense_model(args)
        model.enable_input_require_grads()  # backward still runs through every layer
        return model
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                          target_modules=LINEARS)
        return get_peft_model(dense_model(args), lora)  # PEFT makes the adapters fp32
    granularity = variant.removeprefix("moe-")
    config = MoELoraConfig(
        text_config=text_config(args), num_experts=args.experts,
        num_experts_per_tok=args.top_k, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
        lora_dropout=0.0, target_modules=LINEARS, router=args.router, expert_kernel="torch",
        routing_granularity=granularity, output_router_logits=True,
    )
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MoELoraForCausalLM(config).to(args.device, torch.bfloat16)
    adapters = set(model.adapter_parameter_names())
    for name, param in model.named_parameters():
        if name in adapters:  # what finetune's prepare_for_training does
            param.data = param.data.float()
            if name.endswith("lora_B") or ".lora_B." in name:
                param.data.normal_(0.0, 0.01)
        param.requires_grad_(name in adapters)
    return model


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor], autocast: bool) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    amp = torch.autocast(model.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        out = model(**batch)
    assert out.loss.requires_grad
    del out
    return sum(seen.values())


@dataclass
class Row:
    variant: str
    autocast: bool
    mib: float


LABELS = {
    "floor": "frozen base, grads to inputs (floor)",
    "peft": "PEFT LoRA r={r}",
    "moe-linear": "moe-hub {e} x top-{k} r={r}, linear",
    "moe-block": "moe-hub {e} x top-{k} r={r}, block",
}


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=gen).to(args.device)
    batch = {"input_ids": ids, "labels": ids}
    rows = []
    for variant in LABELS:
        model = build(args, variant)
        for autocast in (True, False):
            mib = saved_bytes(model, batch, autocast) / 2**20
            rows.append(Row(variant, autocast, mib))
            print(f"{variant:12s} autocast={autocast!s:5s} {mib:9.1f} MiB", flush=True)
        del model
        gc.collect()

    def find(variant: str, autocast: bool) -> Row:
        return next(r for r in rows if r.variant == variant and r.autocast == autocast)

    print(f"\nSaved for backward by one training forward: {args.layers} layers, hidden "
          f"{args.hidden}, intermediate {args.intermediate}, {args.batch} x {args.tokens} tokens, "
          f"bf16 base, fp32 adapters on {len(LINEARS)} linears, router {args.router}, "
          f"torch {torch.__version__}, {args.device}\n")
    print("| variant | autocast bf16 | saved MiB | vs PEFT LoRA | over floor vs PEFT's |")
    print("|---|---|---|---|---|")
    for row in rows:
        peft, floor = find("peft", row.autocast), find("floor", row.autocast)
        extra = (row.mib - floor.mib) / max(peft.mib - floor.mib, 1e-9)
        label = LABELS[row.variant].format(e=args.experts, k=args.top_k, r=args.rank)
        print(f"| {label} | {'yes' if row.autocast else 'no'} | {row.mib:.1f} | "
              f"{row.mib / peft.mib:.2f}x | {extra:.2f}x |")


if __name__ == "__main__":
    main()
