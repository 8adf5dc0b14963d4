"""Conversion streams: peak memory stays near one shard, never the whole model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from transformers import AutoModelForCausalLM, LlamaConfig


def test_sharded_conversion_peak_rss(tmp_path: Path) -> None:
    dense = tmp_path / "dense"
    config = LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(dense, max_shard_size="40MB")
    shards = sorted(dense.glob("*.safetensors"))
    assert len(shards) >= 4
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)

    # Measured in a fresh process: RSS after imports and after building the meta model once is
    # the baseline; the conversion's peak RSS (VmHWM, reset at the baseline) must stay under 2x
    # the largest shard + the adapters.
    script = textwrap.dedent(rf"""
        import json, re, psutil, torch
        from moe_hub.convert import convert
        from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        text = AutoConfig.from_pretrained({str(dense)!r})
        with torch.device("meta"):
            MoELoraForCausalLM(MoELoraConfig(text_config=text))
        baseline = psutil.Process().memory_info().rss
        # Reset the kernel's high-water mark (VmHWM) so start-up transients are not counted.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = convert({str(dense)!r}, {str(tmp_path / "moe")!r}, progress=False)
        status = open("/proc/self/status").read()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
        print(json.dumps({{"baseline": baseline, "peak": peak}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    adapters = (tmp_path / "moe" / "moe_adapters.safetensors").stat().st_size
    growth = figures["peak"] - figures["baseline"]
    print(f"shards {len(shards)}, largest {largest / 2**20:.1f} MiB, total {total / 2**20:.1f} MiB,"
          f" adapters {adapters / 2**20:.1f} MiB, RSS growth {growth / 2**20:.1f} MiB")
    assert growth < 2 * largest + adapters
    assert growth < total / 2  # far from holding the whole model
