"""generate() throughput of a freshly converted checkpoint against its dense base
(PERFORMANCE.md target 4: >= 0.8x the dense tokens/s at batch 1 and 16, KV cache on).

    python benchmarks/bench_generate.py                 # SmolLM2-135M-Instruct, CPU or CUDA
    python benchmarks/bench_generate.py --base DIR --device cuda --dtype bfloat16
    python benchmarks/bench_generate.py --random tinyllama-1.1b --device cuda --dtype bfloat16

Both models run in this one process on the same prompts, timed alternately (medians of
--repeats); the table is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

#: Llama-shaped configurations for --random (SmolLM2-135M; TinyLlama-1.1B, PERFORMANCE.md's).
RANDOM_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def compile_kwargs(device: str) -> dict:
    """generate() arguments for the compiled mode: transformers' static cache, and its
    decode-step compilation (``fullgraph``; CUDA graphs on a GPU via ``reduce-overhead``)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.startswith("cuda")
                           else "default")
    config._compile_all_devices = True  # transformers compiles on accelerators only otherwise
    return dict(cache_implementation="static", compile_config=config)


def generate_seconds(model, input_ids, attention_mask, new_tokens: int,
                     extra: dict | None = None) -> float:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  use_cache=True, attention_mask=attention_mask, **(extra or {}))
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(input_ids, **kwargs)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired_tokens_per_second(models, input_ids, attention_mask, new_tokens: int,
                             repeats: int, extra: dict | None = None) -> list[float]:
    """Median tokens/s of each model, timed alternately so drifting machine load (other
    processes, clock changes) hits every model alike. The warm-up run also compiles."""
    for model in models:
        generate_seconds(model, input_ids, attention_mask, new_tokens, extra)
    timings = [[] for _ in models]
    for _ in range(repeats):
        for model, times in zip(models, timings):
            times.append(generate_seconds(model, input_ids, attention_mask, new_tokens, extra))
    return [input_ids.shape[0] * new_tokens / statistics.median(times) for times in timings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--base", help="dense model dir or .gguf [SmolLM2-135M-Instruct]")
    source.add_argument("--random", choices=sorted(RANDOM_SHAPES),
                        help="random weights in a known model's shape, nothing downloaded "
                             "(throughput does not depend on the weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--router", default="topk")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 on a machine shared with "
                             "other jobs, where spinning OpenMP workers wait on each other")
    parser.add_argument("--modes", default="eager,compiled",
                        help="eager: dynamic cache; compiled: static cache + torch.compile "
                             "(fullgraph) of the decode step")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    from moe_hub.convert import convert
    from moe_hub.default_model import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            base = Path(tmp) / args.random
            config = LlamaConfig(**RANDOM_SHAPES[args.random])
            AutoModelForCausalLM.from_config(config).save_pretrained(base)
        else:
            base = Path(args.base) if args.base else default_model_path()
        converted = convert(base, Path(tmp) / "moe", router=args.router, progress=False)
        load = dict(dtype=dtype)
        if base.suffix == ".gguf":
            dense = AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, **load)
        else:
            dense = AutoModelForCausalLM.from_pretrained(base, **load)
        moe = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, **load)
        dense.to(args.device).eval()
        moe.to(args.device).eval()
        rows = []
        for mode in args.modes.split(","):
            extra = compile_kwargs(args.device) if mode == "compiled" else None
            for batch in (int(b) for b in args.batches.split(",")):
                generator = torch.Generator().manual_seed(batch)
                ids = torch.randint(10, dense.config.vocab_size, (batch, args.prompt_len),
                                    generator=generator).to(args.device)
                mask = torch.ones_like(ids)
                with torch.no_grad():
                    dense_tps, moe_tps = paired_tokens_per_second(
                        [dense, moe], ids, mask, args.new_tokens, args.repeats, extra)
                rows.append((mode, batch, dense_tps, moe_tps))
                print(f"{mode} batch {batch}: dense {dense_tps:.1f}, moe {moe_tps:.1f} tok/s",
                      flush=True)
    name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
            else f"{cpu_name()}, {torch.get_num_threads()} threads")
    print(f"\n{base.name} on {name}, {args.dtype}, router {args.router}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}, "
          f"torch {torch.__version__}")
    print(f"{'mode':>9}{'batch':>6}{'dense tok/s':>14}{'moe tok/s':>12}{'ratio':>8}")
    for mode, batch, dense_tps, moe_tps in rows:
        print(f"{mode:>9}{batch:>6}{dense_tps:>14.1f}{moe_tps:>12.1f}"
              f"{moe_tps / dense_tps:>8.2f}")


if __name__ == "__main__":
    main()
