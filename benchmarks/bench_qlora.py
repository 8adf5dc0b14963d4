"""Fine-tuning throughput and peak memory: moe-hub MoE-LoRA on an NF4 base vs PEFT QLoRA.

Runs, in one process on one device, the same model, batch and optimizer for:

- floor: the NF4 base with no adapters, gradients to the input embeddings only;
- PEFT QLoRA: LoRA r on the same linears (PEFT's bitsandbytes layers);
- moe-hub: E experts, top-k, rank r on the same linears, loaded exactly as ``moe-hub finetune``
  loads it (``load_for_training``), router losses included in the loss.

and prints step time, tokens/s, peak memory, trainable parameters and the ratio to PEFT QLoRA
(PERFORMANCE.md, target 1). The model is random (shape only matters): TinyLlama-1.1B's shape by
default, or ``--model`` a local dense directory / Hub id.

    python benchmarks/bench_qlora.py                      # GPU, TinyLlama shape, batch 4 x 2048
    python benchmarks/bench_qlora.py --device cpu --tiny  # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dense_config(tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=4096)


def write_dense(directory: Path, args: argparse.Namespace) -> Path:
    from transformers import AutoModelForCausalLM

    if args.model:
        return Path(args.model) if Path(args.model).exists() else _download(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(dense_config(args.tiny), dtype=torch.bfloat16)
    model.save_pretrained(directory / "dense")
    del model
    return directory / "dense"


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"]))


def nf4_config(compute: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def _disable_cpu_repack(model: torch.nn.Module) -> None:
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def build_floor(dense: Path, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=nf4_config(args.dtype),
                                                 dtype=args.dtype, device_map=args.device_map)
    for param in model.parameters():
        param.requires_grad_(False)
    _disable_cpu_repack(model)
    model.enable_input_require_grads()  # the floor: backward runs, but only into the inputs
    return model.train()


def build_peft(dense: Path, args: argparse.Namespace) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=nf4_config(args.dtype),
                                                 dtype=args.dtype, device_map=args.device_map)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    _disable_cpu_repack(model)
    return model.train()


def build_moe(dense: Path, args: argparse.Namespace, workdir: Path) -> torch.nn.Module:
    from moe_hub.convert import convert
    from moe_hub.finetune import FinetuneOptions, load_for_training

    ckpt = workdir / "moe"
    if not ckpt.exists():
        convert(dense, ckpt, experts=args.experts, top_k=args.top_k, rank=args.rank,
                dropout=0.0, targets=TARGETS, router=args.router, progress=False)
    options = FinetuneOptions(quantize="nf4", compute_dtype=_dtype_name(args.dtype))
    model = load_for_training(ckpt, options)
    return model.to(args.device) if args.device_map is None else model


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30  # CPU: resident set after the steps


def measure(name: str, build: Callable[[], torch.nn.Module], args: argparse.Namespace,
            vocab: int) -> dict[str, Any]:
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(args.device)
    times = []
    for step in range(args.warmup + args.steps):
        _sync(args.device)
        start = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=args.dtype,
                            enabled=args.dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    result = {
        "variant": name,
        "step_ms": round(step_s * 1000, 1),
        "tokens_per_s": round(args.batch * args.seq / step_s, 1),
        "peak_gib": round(_peak_gib(args.device), 3),
        "trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 3),
        "final_loss": round(float(loss.detach()), 4),
    }
    del model, optimizer, trainable, loss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama (smoke test)")
    parser.add_argument("--model", help="dense model directory or Hub id instead of random")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--router", default="topk")
    parser.add_argument("--dtype", default=None, help="compute dtype [bfloat16 on GPU]")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing",
                        action="store_false")
    parser.add_argument("--variants", default="floor,peft,moe")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (add --tiny for a quick run)")
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 2048)
    args.steps = args.steps or (3 if args.tiny else 10)
    if args.tiny and args.warmup == 3:
        args.warmup = 1
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    args.dtype = names[args.dtype or ("float32" if cpu else "bfloat16")]
    args.device_map = None if cpu else {"": 0}
    if not cpu:
        args.device = "cuda:0"

    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        workdir = Path(tmp)
        dense = write_dense(workdir, args)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(dense).vocab_size
        builders = {
            "floor": ("frozen NF4 base (floor)", lambda: build_floor(dense, args)),
            "peft": (f"PEFT QLoRA r={args.rank}", lambda: build_peft(dense, args)),
            "moe": (f"moe-hub {args.experts}x top-{args.top_k} r={args.rank} ({args.router})",
                    lambda: build_moe(dense, args, workdir)),
        }
        results = [measure(builders[v][0], builders[v][1], args, vocab)
                   for v in args.variants.split(",")]
    peft = next((r for r in results if r["variant"].startswith("PEFT")), None)
    for r in results:
        r["vs_peft"] = round(r["step_ms"] / peft["step_ms"], 2) if peft else None
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"setup": setup(args), "results": results}, indent=2))


def setup(args: argparse.Namespace) -> dict[str, Any]:
    import bitsandbytes
    import peft
    import transformers

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        platform.processor() or platform.machine()
    return {
        "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
        "model": args.model or ("tiny random Llama" if args.tiny
                                else "random TinyLlama-1.1B shape"),
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
        "dtype": str(args.dtype).removeprefix("torch."),
        "gradient_checkpointing": args.gradient_checkpointing, "targets": TARGETS,
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    info = setup(args)
    memory = "peak GiB" if args.device.startswith("cuda") else "RSS GiB"
    table = Table(title=f"NF4 fine-tuning step on {info['device']}, batch {args.batch} x "
                        f"{args.seq}, {info['model']}")
    for column in ("variant", "step ms", "tokens/s", memory, "trainable M", "vs PEFT QLoRA"):
        table.add_column(column)
    for r in results:
        table.add_row(r["variant"], f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['peak_gib']:.2f}", f"{r['trainable_m']:.2f}",
                      f"{r['vs_peft']:.2f}x" if r["vs_peft"] is not None else "-")
    console = Console()
    console.print(table)
    console.print(", ".join(f"{k}={v}" for k, v in info.items() if k != "targets"))


if __name__ == "__main__":
    main()
