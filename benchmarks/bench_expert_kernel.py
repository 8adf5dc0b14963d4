"""Time the MoE-LoRA expert computation of one linear, forward + backward (dx, dA, dB, dw).

Compares the Triton kernel with the two torch forms of ``moe_lora_ops`` (masked-dense and
grouped) and reports the bandwidth each achieves on the bytes the op must move (x, grad-out,
y, grad-x, A and B once each) against the bandwidth of a plain device copy measured in the same
run. Default shapes are PERFORMANCE.md's target 3 (T=8192, d_in=2048, d_out=5632, E=8, k=2,
r=16, bf16). Needs a CUDA GPU; ``--device cpu --tiny`` only checks that the script runs (set
TRITON_INTERPRET=1 MOE_HUB_TRITON_ON_CPU=1 to include the Triton row there).

    python benchmarks/bench_expert_kernel.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moe_hub.kernels.moe_lora_triton import triton_moe_lora_delta, triton_supported
from moe_hub.modeling.moe_lora_ops import group_by_expert, grouped_slots_delta, masked_dense_delta

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--d-out", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke run")
    args = parser.parse_args()
    if args.tiny:
        args.tokens, args.d_in, args.d_out, args.iters, args.warmup = 64, 64, 96, 3, 1
    return args


def timed_ms(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn``: CUDA events on a GPU (warm-up excluded), wall clock on CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(device: torch.device, iters: int, warmup: int) -> float:
    """Read + write GB/s of a 1 GiB device-to-device copy (64 MiB on CPU)."""
    numel = (1 << 30 if device.type == "cuda" else 1 << 26) // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), iters, warmup, device)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    T, E, k, r = args.tokens, args.experts, args.top_k, args.rank
    x = torch.randn(T, args.d_in, device=device, dtype=dtype, requires_grad=True)
    lora_A = (torch.randn(E, args.d_in, r, device=device) / args.d_in**0.5).to(dtype)
    lora_B = (torch.randn(E, r, args.d_out, device=device) / r**0.5).to(dtype)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    logits = torch.randn(T, E, device=device)
    probs, indices = logits.softmax(-1).topk(k, dim=-1)
    weights = (probs / probs.sum(-1, keepdim=True)).requires_grad_()
    grad_y = torch.randn(T, args.d_out, device=device, dtype=dtype)
    scale = 2.0
    leaves = (x, lora_A, lora_B, weights)

    variants: dict[str, Callable] = {
        "torch masked-dense": masked_dense_delta,
        "torch grouped (loop over experts)": lambda x, a, b, i, w, c: grouped_slots_delta(
            x, a, b, group_by_expert(i, a.shape[0]), w, i.shape[1], c),
    }
    if triton_supported(x):
        variants = {"moe-hub triton": triton_moe_lora_delta, **variants}
    else:
        print("triton row skipped: triton_supported(x) is False on this device")

    reference = None
    rows = []
    # PERFORMANCE.md target 3: x, grad-out, y, grad-x, A and B, each once
    bytes_moved = (
        x.numel() * x.element_size() * 2  # x (read), grad-x (written)
        + grad_y.numel() * grad_y.element_size() * 2  # grad-out (read), y (written)
        + lora_A.numel() * lora_A.element_size()
        + lora_B.numel() * lora_B.element_size()
    )
    bandwidth = copy_bandwidth_gbs(device, args.iters, args.warmup)
    for name, fn in variants.items():

        def step(fn=fn):
            for leaf in leaves:
                leaf.grad = None
            fn(x, lora_A, lora_B, indices, weights, scale).backward(grad_y)

        step()
        grads = [leaf.grad.float() for leaf in leaves]
        if reference is None:
            reference = grads
            error = 0.0
        else:
            error = max(
                ((g - ref).norm() / ref.norm()).item() for g, ref in zip(grads, reference)
            )
        ms = timed_ms(step, args.iters, args.warmup, device)
        forward_ms = timed_ms(
            lambda fn=fn: fn(x.detach(), lora_A.detach(), lora_B.detach(), indices,
                             weights.detach(), scale),
            args.iters, args.warmup, device,
        )
        rows.append((name, forward_ms, ms, bytes_moved / ms / 1e6, error))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, T={T} d_in={args.d_in} "
          f"d_out={args.d_out} E={E} k={k} r={r} {args.dtype}")
    print(f"bytes the op must move: {bytes_moved / 1e6:.1f} MB; copy bandwidth {bandwidth:.0f} "
          f"GB/s (ideal fwd+bwd {bytes_moved / bandwidth / 1e6:.3f} ms)")
    print(f"{'variant':<36}{'fwd ms':>9}{'fwd+bwd ms':>12}{'GB/s':>9}{'% copy bw':>11}"
          f"{'grad err vs row 1':>19}")
    for name, forward_ms, ms, gbs, error in rows:
        print(f"{name:<36}{forward_ms:>9.3f}{ms:>12.3f}{gbs:>9.1f}{100 * gbs / bandwidth:>10.1f}%"
              f"{error:>19.2e}")


if __name__ == "__main__":
    main()
