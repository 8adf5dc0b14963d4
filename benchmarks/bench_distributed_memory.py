"""Per-process memory of parameters, gradients and optimizer state under FSDP2, for 1, 2 and 4
processes (a benchmark, not a test; CPU, gloo).

The model is sharded as accelerate's ``fsdp_version: 2`` shards it (``fully_shard`` on every
module of a ``_no_split_modules`` class, innermost first, then the root), the base frozen, the
adapters trained with AdamW for one step. Bytes are counted from each process's own shards
(``DTensor.to_local()``), so they are what that process holds between steps (FSDP2 gathers the
whole of one unit at a time during forward and backward, on top of this). The figure printed is
the largest over the processes, with its fraction of the one-process figure.

    python benchmarks/bench_distributed_memory.py                 # 1, 2 and 4 processes
    python benchmarks/bench_distributed_memory.py --router rmoe --processes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--router", default="topk")
    parser.add_argument("--granularity", default="linear", choices=["linear", "block"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # result file of one launched group
    return parser.parse_args()


def _local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig

    from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    text = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=8, num_key_value_heads=4)
    router_config = {"rmoe": {"hidden_size": 64}, "hypermoe": {"embed_dim": 32},
                     "graphmoe": {"message_size": 32}}.get(args.router, {})
    torch.manual_seed(0)
    model = MoELoraForCausalLM(MoELoraConfig(
        text_config=text.to_dict(), router=args.router, router_config=router_config,
        num_experts=args.experts, num_experts_per_tok=2, lora_rank=args.rank,
        target_modules=LINEARS, routing_granularity=args.granularity,
        output_router_logits=True))
    adapters = set(model.adapter_parameter_names())
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapters)
    mesh = init_device_mesh("cpu", (world,))
    units = set(model._no_split_modules)
    for module in reversed(list(model.modules())):
        if type(module).__name__ in units:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, args.vocab, (1, 32), generator=torch.Generator().manual_seed(rank))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    params = list(model.parameters())
    figures = {
        "frozen parameters": sum(_local_bytes(p) for p in params if not p.requires_grad),
        "trained parameters": sum(_local_bytes(p) for p in params if p.requires_grad),
        "gradients": sum(_local_bytes(p.grad) for p in params),
        "optimizer state": sum(_local_bytes(v) for state in optimizer.state.values()
                               for v in state.values() if torch.is_tensor(v) and v.dim() > 0),
    }
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, figures)
    if rank == 0:
        Path(args.worker).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def launch(args: argparse.Namespace, processes: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        forwarded = [a for a in sys.argv[1:] if a != "--processes" and not a.isdigit()]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run([sys.executable, "-m", "torch.distributed.run",
                        f"--nproc-per-node={processes}", "--standalone", __file__,
                        *forwarded, "--worker", str(out)], check=True, env=env)
        return json.loads(out.read_text())


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    results = {n: launch(args, n) for n in args.processes}
    kinds = list(results[args.processes[0]][0])
    base = {k: max(r[k] for r in results[args.processes[0]]) for k in kinds}
    print(f"\nFSDP2, {args.router} router, {args.granularity} granularity, "
          f"{args.layers} layers x hidden {args.hidden}, {args.experts} experts of rank "
          f"{args.rank}; bytes per process (largest over the processes), fp32, AdamW")
    print("| processes | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for n, figures in results.items():
        cells = []
        for kind in kinds:
            worst = max(r[kind] for r in figures)
            share = worst / base[kind] if base[kind] else 0.0
            cells.append(f"{worst / 2**20:.2f} MiB ({share:.3f})")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
