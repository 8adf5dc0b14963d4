"""Fine-tuning step time of MoE-LoRA variants against PEFT LoRA and the frozen-base floor.

Reproduces PERFORMANCE.md's table side by side in one run: Llama-shaped random model (hidden
2048, intermediate 5632, 16 layers, 32 heads / 4 KV heads, vocab 32000), batch 4 x 2048,
non-reentrant gradient checkpointing, AdamW on the trainable parameters, median step after 3
warm-up steps, adapters (8 experts, top-2, r=16) on all seven decoder linears, bf16 and NF4
bases. Needs a CUDA GPU for real figures; ``--device cpu --tiny`` is a smoke run of every row.

    python benchmarks/bench_train_step.py                    # the full table on a GPU
    python benchmarks/bench_train_step.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if "--tiny" in sys.argv and "cpu" in sys.argv:
    # The Triton row on CPU runs through the interpreter, which must be chosen before the
    # kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MOE_HUB_TRITON_ON_CPU", "1")

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["floor", "peft", "naive", "dense", "moe-torch", "moe-triton"]
LABELS = {
    "floor": "frozen base, grads to inputs only (floor)",
    "peft": "PEFT LoRA r={r}",
    "naive": "naive MoE-LoRA loop, {e} x top-{k} x r={r}",
    "dense": "dense mixture (every expert, softmax-weighted)",
    "moe-torch": "moe-hub, torch path",
    "moe-triton": "moe-hub, triton path",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="2 layers, hidden 64, batch 1 x 16: a CPU smoke run")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bases", default="bf16,nf4", help="comma list of bf16, nf4")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.intermediate = 2, 64, 128
        args.heads, args.kv_heads, args.vocab = 4, 2, 256
        # one timed step: the Triton row runs through the (slow) interpreter on CPU
        args.seq, args.batch, args.warmup, args.steps = 16, 1, 1, 1
    args.bases = args.bases.split(",")
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


# --------------------------------------------------------------------------------------------
# The two baselines that moe-hub does not ship: written here, on the same frozen linears.


class BaselineMoELora(nn.Module):
    """A frozen linear plus E LoRA experts and a softmax top-k router, computed either as a
    python loop over experts (index_select / index_add) or as a dense mixture of all experts."""

    def __init__(self, base: nn.Module, experts: int, top_k: int, rank: int, dense: bool) -> None:
        super().__init__()
        self.base_layer = base
        d_in, d_out = base.in_features, base.out_features
        weight = base.weight
        dtype = torch.bfloat16 if weight.dtype == torch.uint8 else weight.dtype
        make = dict(device=weight.device, dtype=dtype)
        self.router = nn.Parameter(torch.randn(experts, d_in, **make) * 0.02)
        self.lora_A = nn.Parameter(torch.randn(experts, d_in, rank, **make) / d_in**0.5)
        self.lora_B = nn.Parameter(torch.randn(experts, rank, d_out, **make) * 0.01)
        self.top_k, self.scale, self.dense = top_k, 2.0, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        probs = F.linear(flat.float(), self.router.float()).softmax(-1)
        experts, _, rank = self.lora_A.shape
        if self.dense:
            shrunk = (flat @ self.lora_A.permute(1, 0, 2).reshape(flat.shape[1], -1))
            gated = shrunk.view(-1, experts, rank) * probs.to(flat.dtype).unsqueeze(-1)
            delta = gated.reshape(flat.shape[0], -1) @ self.lora_B.reshape(experts * rank, -1)
        else:
            weights, indices = probs.topk(self.top_k, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).to(flat.dtype)
            delta = flat.new_zeros(flat.shape[0], self.lora_B.shape[-1])
            for expert in range(experts):
                tokens, slot = torch.where(indices == expert)
                rows = flat.index_select(0, tokens)
                part = (rows @ self.lora_A[expert]) @ self.lora_B[expert]
                delta = delta.index_add(0, tokens, part * weights[tokens, slot].unsqueeze(-1))
        return out + (delta * self.scale).view(out.shape).to(out.dtype)


def wrap_linears(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> None:
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in LINEARS and ".layers." in f".{name}":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))


# --------------------------------------------------------------------------------------------
# Building every variant


@dataclass
class Setup:
    args: argparse.Namespace
    device: torch.device
    text_config: LlamaConfig
    workdir: Path

    @property
    def dense_dir(self) -> Path:
        return self.workdir / "dense"


def quantization_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def avoid_cpu_repack(model: nn.Module) -> None:
    # bitsandbytes repacks 4-bit weights in place on AVX512-BF16 CPUs and then breaks small
    # layers (ECOSYSTEM.md); it never applies on a GPU.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_dense(setup: Setup, base: str) -> nn.Module:
    if base == "nf4":
        model = AutoModelForCausalLM.from_pretrained(
            setup.dense_dir, quantization_config=quantization_config(), dtype=torch.bfloat16,
            device_map={"": setup.device},
        )
        avoid_cpu_repack(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(setup.dense_dir, dtype=torch.bfloat16)
        model.to(setup.device)
    model.requires_grad_(False)
    return model


def moe_hub_model(setup: Setup, base: str, kernel: str) -> nn.Module:
    args = setup.args
    config = MoELoraConfig(
        text_config=setup.text_config, num_experts=args.experts, num_experts_per_tok=args.top_k,
        lora_rank=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.0,
        target_modules=LINEARS, expert_kernel=kernel, output_router_logits=True,
    )
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = MoELoraForCausalLM(config)
    model.to(torch.bfloat16)
    with torch.no_grad():  # B = 0 at init would make the expert gradients trivial
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.01)
    if base == "nf4":
        # Quantize the frozen linears the way users load a checkpoint: through from_pretrained.
        path = setup.workdir / f"moe-{kernel}"
        model.save_pretrained(path)
        del model
        model = MoELoraForCausalLM.from_pretrained(
            path, quantization_config=quantization_config(), dtype=torch.bfloat16,
            device_map={"": setup.device},
        )
        avoid_cpu_repack(model)
    for name, param in model.named_parameters():
        adapter = ".lora_" in name or ".router." in name or name.startswith("moe_shared")
        param.requires_grad_(adapter)
    return model


def build(setup: Setup, variant: str, base: str) -> nn.Module:
    args = setup.args
    if variant.startswith("moe-"):
        return moe_hub_model(setup, base, variant.removeprefix("moe-"))
    model = load_dense(setup, base)
    if variant == "floor":
        model.enable_input_require_grads()  # the backward still runs through every layer
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                          target_modules=LINEARS)
        # bf16 adapters like every other row (PEFT would otherwise upcast them to fp32)
        model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    else:
        torch.manual_seed(0)
        wrap_linears(model, lambda linear: BaselineMoELora(
            linear, args.experts, args.top_k, args.rank, dense=variant == "dense"))
    return model


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Row:
    variant: str
    base: str
    step_ms: float
    tokens_per_s: float
    peak_gib: float | None
    trainable_m: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(setup: Setup, variant: str, base: str) -> Row:
    args, device = setup.args, setup.device
    model = build(setup, variant, base)
    if device.type == "cuda":  # after the build: the moe-hub rows are initialised in fp32
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)

    def step() -> None:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = []
    for index in range(args.warmup + args.steps):
        synchronize(device)
        begin = time.perf_counter()
        step()
        synchronize(device)
        if index >= args.warmup:
            times.append((time.perf_counter() - begin) * 1e3)
    step_ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = Row(variant, base, step_ms, args.batch * args.seq / step_ms * 1e3, peak,
              sum(p.numel() for p in trainable) / 1e6)
    return row


def skip_reason(variant: str, base: str, device: torch.device) -> str | None:
    if base == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed"
    if variant == "peft":
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed"
    if variant == "moe-triton":
        from moe_hub.kernels.moe_lora_triton import triton_supported

        if not triton_supported(torch.empty(0, device=device)):
            return "triton_supported() is False on this device"
    return None


def print_table(rows: list[Row], args: argparse.Namespace, device: torch.device) -> None:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ndevice {name}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.heads} heads / {args.kv_heads} KV, vocab {args.vocab}; batch {args.batch} x "
          f"{args.seq}; experts {args.experts} top-{args.top_k} r={args.rank}; non-reentrant "
          f"checkpointing, AdamW, median of {args.steps} steps after {args.warmup} warm-ups")
    header = (f"{'variant':<48}{'base':>6}{'step ms':>10}{'tokens/s':>11}{'peak GiB':>10}"
              f"{'trainable M':>13}{'vs PEFT LoRA':>14}")
    print(header)
    print("-" * len(header))
    for row in rows:
        label = LABELS[row.variant].format(r=args.rank, e=args.experts, k=args.top_k)
        peft = next((r for r in rows if r.variant == "peft" and r.base == row.base), None)
        ratio = f"{row.step_ms / peft.step_ms:.2f}x" if peft else "-"
        peak = f"{row.peak_gib:.1f}" if row.peak_gib is not None else "-"
        print(f"{label:<48}{row.base:>6}{row.step_ms:>10.1f}{row.tokens_per_s:>11,.0f}"
              f"{peak:>10}{row.trainable_m:>13.2f}{ratio:>14}")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    text_config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="moe-hub-bench-") as tmp:
        setup = Setup(args, device, text_config, Path(tmp))
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(text_config, dtype=torch.bfloat16).save_pretrained(
            setup.dense_dir
        )
        for base in args.bases:
            for variant in args.variants:
                reason = skip_reason(variant, base, device)
                if reason:
                    print(f"skipped {variant} on {base}: {reason}")
                    continue
                row = time_variant(setup, variant, base)
                gc.collect()  # the model and optimizer of that row are garbage now
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"{variant} on {base}: {row.step_ms:.1f} ms/step", flush=True)
                rows.append(row)
    print_table(rows, args, device)


if __name__ == "__main__":
    main()
