"""Conversion cost against a plain copy of the same shards (PERFORMANCE.md target 5).

Writes a sharded random Llama-shaped checkpoint, then, each in a fresh process so peak RSS is its
own and after an `os.sync()`: a copy of the shards (shutil.copytree, which copies in the kernel
as `cp` does) and `moe_hub.convert`, interleaved `--repeats` times. Prints median wall time, peak
RSS growth and the ratios.
Runs on the CPU; `--layers/--hidden` scale it (defaults: ~0.9 GB in 8 shards).

    python benchmarks/bench_convert.py [--hidden 1024 --layers 16 --shard 128MB]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

_MEASURE = textwrap.dedent("""
    import json, re, sys, time, psutil
    {imports}
    base = psutil.Process().memory_info().rss
    open("/proc/self/clear_refs", "w").write("5")
    start = time.perf_counter()
    {work}
    wall = time.perf_counter() - start
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    print(json.dumps({{"wall_s": wall, "rss_growth": peak - base}}))
""")


def measure(imports: str, work: str) -> dict:
    # Flush the previous run's dirty pages first: otherwise the kernel throttles this run's
    # writes to pay for them, and whichever step runs second looks slower.
    os.sync()
    code = _MEASURE.format(imports=imports, work=work)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda run: run["wall_s"])
    return {**ordered[len(ordered) // 2], "all_wall_s": [run["wall_s"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard", default="128MB")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; medians reported")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        dense = work / "dense"
        config = LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden,
            intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=4,
        )
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(dense, max_shard_size=args.shard)
        del model
        shards = sorted(dense.glob("*.safetensors"))
        sizes = [p.stat().st_size for p in shards]
        copies, conversions = [], []
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            shutil.rmtree(work / "copy", ignore_errors=True)
            shutil.rmtree(work / "moe", ignore_errors=True)
            copies.append(measure("import shutil",
                                  f"shutil.copytree({str(dense)!r}, {str(work / 'copy')!r})"))
            conversions.append(measure(
                "from moe_hub.convert import convert",
                f"convert({str(dense)!r}, {str(work / 'moe')!r}, experts={args.experts}, "
                f"rank={args.rank}, progress=False)",
            ))
        copy, conv = median_of(copies), median_of(conversions)
        adapters = (work / "moe" / "moe_adapters.safetensors").stat().st_size
        mib = 2**20
        print(f"\nshards: {len(shards)}, total {sum(sizes) / mib:.0f} MiB, largest "
              f"{max(sizes) / mib:.0f} MiB; adapters {adapters / mib:.0f} MiB "
              f"(E={args.experts}, r={args.rank})")
        print(f"{'step':<10}{'median wall s':>14}{'RSS growth MiB':>16}  all runs (s)")
        for label, run in (("copy", copy), ("convert", conv)):
            runs = " ".join(f"{t:.2f}" for t in run["all_wall_s"])
            print(f"{label:<10}{run['wall_s']:>14.2f}{run['rss_growth'] / mib:>16.0f}  {runs}")
        budget = 2 * max(sizes) + adapters
        print(f"convert / copy wall: {conv['wall_s'] / copy['wall_s']:.2f}x (target <= 1.5x); "
              f"RSS growth / (2 x largest shard + adapters): "
              f"{conv['rss_growth'] / budget:.2f} (target <= 1.0)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
