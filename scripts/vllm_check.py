"""vLLM serves moe-hub models: greedy tokens equal to transformers' (issue 24's GPU check).

Three models built from one SmolLM2 (its GGUF when it can be had, else random weights in its
shape, nothing downloaded), each with random expert B so that the experts change the output:

- ``rmoe``: an RMoE checkpoint, served by vLLM's Transformers backend
  (``model_impl="transformers"``, the remote code run through transformers' attention interface);
- ``topk``: a block-routed top-k checkpoint, likewise;
- ``mixtral``: that checkpoint exported by ``moe-hub export``, served by vLLM's native Mixtral.

For each, transformers' greedy continuation of a few prompts (float32, CUDA) is compared with
vLLM's (temperature 0, float32, eager): the JSON report under ``--out`` lists the tokens and
whether they match. Each vLLM engine runs in its own process (an engine does not give its GPU
memory back within a process).

    python scripts/vllm_check.py --random --out gpu-results  # on the device machine
    python scripts/vllm_check.py --out /tmp/x --no-vllm     # here: everything but vLLM
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 11, 2213, 260, 1115, 28, 339], [1, 42, 7]]
NEW_TOKENS = 16
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                     tie_word_embeddings=True)


def smollm2_base(tmp: Path, random: bool) -> tuple[Path, str]:
    """The SmolLM2 GGUF (cached or downloaded) or, with ``random`` or when it cannot be had,
    random weights in its shape."""
    if not random:
        try:
            from moe_hub.default_model import default_model_path

            return default_model_path(), "SmolLM2-135M-Instruct (GGUF)"
        except Exception as err:  # any failure to fetch: fall back, and say so
            print(f"SmolLM2 GGUF unavailable ({err.__class__.__name__}): random weights")
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    base = tmp / "smollm2-random"
    AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(base)
    return base, "random weights in SmolLM2-135M's shape"


def tuned(base: Path, out: Path, **options) -> Path:
    """``base`` converted with ``options``, every expert B random, saved as a checkpoint."""
    import torch

    from moe_hub.checkpoint import copy_code
    from moe_hub.convert import convert
    from moe_hub.modeling import MoELoraForCausalLM

    ckpt = convert(base, out.with_name(out.name + "-converted"), progress=False, **options)
    model = MoELoraForCausalLM.from_pretrained(ckpt)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "head_b" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(out)
    copy_code(out)
    for path in ckpt.iterdir():  # tokenizer and generation config
        if path.suffix != ".safetensors" and not (out / path.name).exists():
            (out / path.name).write_bytes(path.read_bytes())
    return out


def transformers_greedy(path: Path, remote: bool) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote,
                                                 dtype=torch.float32).to(device).eval()
    outs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt], device=device)
            full = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  min_new_tokens=NEW_TOKENS, pad_token_id=0)
            outs.append(full[0, len(prompt):].tolist())
    return outs


def vllm_greedy(path: str, impl: str) -> list[list[int]]:
    """Run in a child process: vLLM's greedy tokens for PROMPTS."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=path, model_impl=impl, trust_remote_code=impl == "transformers",
              dtype="float32", enforce_eager=True, gpu_memory_utilization=0.4,
              max_model_len=256, seed=0, skip_tokenizer_init=True)  # random bases ship none
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                            ignore_eos=True, detokenize=False)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    return [list(r.outputs[0].token_ids) for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--no-vllm", action="store_true", help="build and run transformers only")
    parser.add_argument("--random", action="store_true",
                        help="random SmolLM2-shaped weights (no download: the device machine)")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("TOKENS" + json.dumps(vllm_greedy(*args.child)))
        return 0
    from moe_hub.export import export

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, described = smollm2_base(root, args.random)
        report["base"] = described
        rmoe = tuned(base, root / "rmoe", router="rmoe")
        topk = tuned(base, root / "topk", granularity="block")
        summary = export(topk, root / "mixtral", dtype="float32", progress=False)
        report["export"] = summary.line()
        models = {"rmoe": (rmoe, "transformers", True), "topk": (topk, "transformers", True),
                  "mixtral": (root / "mixtral", "auto", False)}
        for name, (path, impl, remote) in models.items():
            entry = report[name] = {"vllm_impl": impl,
                                    "transformers": transformers_greedy(path, remote)}
            if args.no_vllm:
                continue
            done = subprocess.run([sys.executable, __file__, "--child", str(path), impl],
                                  capture_output=True, text=True)
            if done.returncode != 0 or "TOKENS" not in done.stdout:
                entry["error"] = (done.stderr or done.stdout)[-3000:]
                status = 1
                continue
            entry["vllm"] = json.loads(done.stdout.rsplit("TOKENS", 1)[1])
            entry["match"] = entry["vllm"] == entry["transformers"]
            status |= not entry["match"]
    # The exported model and the checkpoint it came from are the same function.
    report["export_equals_checkpoint"] = report["mixtral"]["transformers"] == \
        report["topk"]["transformers"]
    status |= not report["export_equals_checkpoint"]
    (args.out / "vllm_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: (v if not isinstance(v, dict) else
                          {kk: vv for kk, vv in v.items() if kk in ("match", "error")})
                      for k, v in report.items()}, indent=1))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
