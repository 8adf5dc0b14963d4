"""Compare plain LoRA and the routers on tasks that conflict inside one shared adapter.

Data: the shipped conflict set (scripts/make_conflict_dataset.py): six tasks over the same kind
of input (a list of words) with answers that differ in skill and format. Every method trains on
conflict.jsonl with an NF4 base (the embedded SmolLM2-135M-Instruct GGUF, dequantized once, then
loaded 4-bit like ``moe-hub finetune --quantize nf4``) and is scored on conflict_eval.jsonl:
held-out LM loss on the answer tokens and per-task exact match of the answer.

Exact match is the teacher-forced argmax of every answer token and of the end-of-sequence token:
that is exactly "greedy decoding from the prompt writes the answer and stops", in one forward.

Methods: plain LoRA (peft, every decoder linear) at the trainable budget of topk at linear
granularity (``lora-budget``) and at the experts' rank (``lora-rank``); topk, rmoe, hypermoe,
graphmoe (mode=refine) and graphmoe-message (mode=message), each at ``linear`` and ``block``
granularity, each router's rank matched to topk's adapter count at that granularity. Same data,
order (per seed), steps, batch, learning rate and schedule for all; several seeds, mean and
standard deviation; training-loss curves as a PNG.

    python scripts/compare_routers.py --out runs/compare --quick     # every method, a check
    python scripts/compare_routers.py --out runs/compare             # the full run
    python scripts/compare_routers.py --out runs/compare --methods topk/linear graphmoe/block \\
        --seeds 0 1 2 --steps 150                                    # a subset, longer
    python scripts/compare_routers.py --out runs/compare --report    # table + plot from results

Results go to <out>/compare_routers.json after every run (an interrupted run keeps what
finished; a rerun skips methods and seeds already there), the table to compare_routers.md and
the curves to compare_routers.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROUTERS: dict[str, tuple[str, dict[str, Any]]] = {
    # Router widths sized for a 576-wide model so routers stay a small part of the budget.
    "topk": ("topk", {}),
    "rmoe": ("rmoe", {"hidden_size": 32}),
    "hypermoe": ("hypermoe", {"embed_dim": 32, "hyper_rank": 4}),
    "graphmoe": ("graphmoe", {"mode": "refine", "steps": 2, "message_size": 16}),
    "graphmoe-message": ("graphmoe", {"mode": "message", "steps": 2, "message_size": 16}),
}
GRANULARITIES = ("linear", "block")
LORA_METHODS = ("lora-budget", "lora-rank")
METHODS = [*LORA_METHODS, *(f"{r}/{g}" for r in ROUTERS for g in GRANULARITIES)]
# Sized from measured training steps on the NF4 base, one thread, quiet machine: 2.3 CPU s
# (topk/linear, plain LoRA) to 6.5 (graphmoe/block, which re-runs the frozen MLP each step), plus
# 25-50 CPU s a run for conversion, 4-bit loading and scoring. 80 steps at lr 1e-3 flatten the
# training loss (~0.15 from 3.5); the 36 full runs take about 100 minutes on two cores.
QUICK = {"steps": 8, "seeds": [0], "eval_per_task": 5}
FULL = {"steps": 80, "seeds": [0, 1, 2], "eval_per_task": 30}


def moe_adapter_count(text_config: Any, method: str, rank: int, args: argparse.Namespace) -> int:
    """Trainable parameters of a MoE-LoRA model, counted on the meta device (no memory)."""
    from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM

    router, granularity = method.split("/")
    name, options = ROUTERS[router]
    config = MoELoraConfig(
        text_config=text_config.to_dict(), router=name, router_config=options,
        num_experts=args.experts, num_experts_per_tok=args.top_k, lora_rank=rank,
        routing_granularity=granularity,
    )
    with torch.device("meta"):
        model = MoELoraForCausalLM(config)
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in model.adapter_parameter_names())


def lora_count_per_rank(text_config: Any) -> int:
    """Trainable parameters per unit of rank of a plain LoRA on every decoder linear."""
    from transformers import AutoModelForCausalLM

    from moe_hub.modeling.moe_lora_layer import find_target_linears, linear_features

    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(text_config)
    return sum(sum(linear_features(dense.get_submodule(name)))
               for name, _ in find_target_linears(dense, None))


def matched_ranks(text_config: Any, methods: list[str],
                  args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(rank, trainable parameters) of every method: routers match topk at their granularity,
    lora-budget matches topk/linear, lora-rank uses the experts' rank."""
    ranks: dict[str, tuple[int, int]] = {}
    budgets = {g: moe_adapter_count(text_config, f"topk/{g}", args.rank, args)
               for g in GRANULARITIES}
    for method in methods:
        if method in LORA_METHODS:
            per_rank = lora_count_per_rank(text_config)
            rank = (max(1, round(budgets["linear"] / per_rank)) if method == "lora-budget"
                    else args.rank)
            ranks[method] = (rank, rank * per_rank)
            continue
        budget = budgets[method.split("/")[1]]
        # The count is affine in the rank (experts scale with it, routers barely or not).
        one, two = (moe_adapter_count(text_config, method, r, args) for r in (1, 2))
        best = max(1, round((budget - one) / (two - one)) + 1)
        ranks[method] = (best, moe_adapter_count(text_config, method, best, args))
    return ranks


def eval_examples(tokenizer: Any, per_task: int, max_length: int) -> list[tuple[str, dict]]:
    """The first ``per_task`` held-out rows of every task, tokenized as training tokenizes."""
    from moe_hub.data import tokenize_row

    rows = [json.loads(line) for line in conflict_path("conflict_eval.jsonl").open()]
    taken: dict[str, int] = {}
    examples = []
    for index, row in enumerate(rows):
        if taken.get(row["task"], 0) >= per_task:
            continue
        taken[row["task"]] = taken.get(row["task"], 0) + 1
        example = tokenize_row(row, index, tokenizer, "prompt_completion", True, max_length)
        examples.append((row["task"], example))
    return examples


def conflict_path(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("moe_hub.datasets").joinpath(name)))


@torch.no_grad()
def evaluate(model: Any, examples: list[tuple[str, dict]], collator: Any,
             batch_size: int) -> dict[str, Any]:
    """Held-out loss per answer token, exact match per task, expert-load entropy (MoE)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens, counts = 0.0, 0, None
    hits: dict[str, list[bool]] = {}
    is_moe = hasattr(model, "routing_sites")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collator([example for _, example in chunk])
        kwargs = {"output_router_logits": True} if is_moe else {}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    **kwargs)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        scored = labels != -100
        total_loss += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
            reduction="sum").item()
        total_tokens += int(scored.sum())
        right = (logits.argmax(-1) == labels) | ~scored
        for (task, _), row_right in zip(chunk, right.all(dim=1).tolist(), strict=True):
            hits.setdefault(task, []).append(row_right)
        if is_moe and out.expert_counts is not None:
            step = out.expert_counts.double()
            counts = step if counts is None else counts + step
    model.train(was_training)
    accuracy = {task: sum(v) / len(v) for task, v in sorted(hits.items())}
    result: dict[str, Any] = {
        "eval_loss": total_loss / max(total_tokens, 1), "eval_tokens": total_tokens,
        "accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy),
    }
    if counts is not None:
        load = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -(load * load.clamp_min(1e-12).log()).sum(dim=1) / math.log(load.shape[1])
        result["load_entropy"] = float(entropy.mean())
    return result


def recorder(examples: list[tuple[str, dict]], collator: Any, batch_size: int) -> Any:
    """A Trainer callback keeping the loss curve, the step time and the final evaluation."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.curve: list[tuple[int, float]] = []
            self.metrics: dict[str, Any] = {}
            self.started = self.cpu_started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.curve.append((state.global_step, float(logs["loss"])))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            steps = max(state.global_step, 1)
            seconds = time.perf_counter() - self.started
            # CPU seconds of every thread: what a step costs with the cores to itself (wall time
            # on a shared machine measures the other jobs as much as this one).
            cpu = time.process_time() - self.cpu_started
            self.metrics = evaluate(model, examples, collator, batch_size)
            self.metrics["seconds_per_step"] = round(seconds / steps, 3)
            self.metrics["cpu_seconds_per_step"] = round(cpu / steps, 3)

    return Recorder()


def dequantize_once(gguf: Path, target: Path) -> Path:
    """Read the GGUF once (the slow part) into a safetensors directory every method starts from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (target / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # GGUF weights load dequantized; drop the GGUF marker so the model can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def train_lora(dense: Path, rank: int, seed: int, args: argparse.Namespace, callback: Any,
               workdir: Path) -> None:
    """peft LoRA on every decoder linear of the (NF4) base, trained as finetune trains."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from moe_hub.data import PadCollator, pad_token_id, prepare_data
    from moe_hub.finetune import _training_arguments, quantization_config
    from moe_hub.modeling.moe_lora_layer import find_target_linears

    options = training_options(args, seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(
        dense, dtype=torch.float32, quantization_config=quantization_config(options))
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):  # as finetune: no in-place CPU repacking
            module.support_avx512bf16_for_cpu = False
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in find_target_linears(model, None)})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(dense)
    prepared = prepare_data(str(conflict_path("conflict.jsonl")), tokenizer,
                            max_length=args.max_length, seed=seed)
    training = _training_arguments(options, workdir / "lora-run", False, False)
    Trainer(model=model, args=training, train_dataset=prepared.train,
            data_collator=PadCollator(pad_token_id(tokenizer)), callbacks=[callback]).train()


def training_options(args: argparse.Namespace, seed: int) -> Any:
    from moe_hub.finetune import FinetuneOptions

    return FinetuneOptions(quantize=args.quantize, max_steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, seed=seed, max_length=args.max_length,
                           logging_steps=args.log_every, save_steps=10 ** 9, overwrite=True)


def train_moe(dense: Path, method: str, rank: int, seed: int, args: argparse.Namespace,
              callback: Any, workdir: Path) -> None:
    from dataclasses import asdict

    from moe_hub.convert import convert
    from moe_hub.finetune import finetune

    router, granularity = method.split("/")
    name, options = ROUTERS[router]
    init = convert(dense, workdir / "init", router=name, router_config=options,
                   experts=args.experts, top_k=args.top_k, rank=rank, granularity=granularity,
                   seed=seed, overwrite=True, progress=False)
    finetune(init, str(conflict_path("conflict.jsonl")), workdir / "trained",
             callbacks=[callback], progress=False, **asdict(training_options(args, seed)))


def run_one(args: argparse.Namespace, method: str, seed: int, rank: int, params: int,
            dense: Path, threads: int) -> dict[str, Any]:
    """Train and score one (method, seed) in this process; its own working folder."""
    from transformers import AutoTokenizer

    from moe_hub.data import PadCollator, pad_token_id
    from moe_hub.progress import quiet_library_notices, third_party_progress

    torch.set_num_threads(threads)
    quiet_library_notices()
    tokenizer = AutoTokenizer.from_pretrained(dense)
    examples = eval_examples(tokenizer, args.eval_per_task, args.max_length)
    collator = PadCollator(pad_token_id(tokenizer))
    workdir = Path(args.out) / "work" / f"{method.replace('/', '-')}@{seed}"
    started, cpu_started = time.perf_counter(), time.process_time()
    callback = recorder(examples, collator, args.eval_batch_size)
    # Several runs share one terminal: each prints its result line, not its loading bars.
    with third_party_progress(False, data=True):
        if method in LORA_METHODS:
            train_lora(dense, rank, seed, args, callback, workdir)
        else:
            train_moe(dense, method, rank, seed, args, callback, workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return {"method": method, "seed": seed, "rank": rank, "trainable_params": params,
            "steps": args.steps, "curve": callback.curve, **callback.metrics,
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1)}


# Relative cost of a training step (measured on the NF4 base): the pool starts the slow runs
# first so the last worker does not finish alone.
STEP_COST = {"graphmoe/block": 3.0, "graphmoe/linear": 1.4, "hypermoe/block": 1.3,
             "hypermoe/linear": 1.3}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every (method, seed) not yet in the results, ``args.jobs`` at a time in worker processes
    of ``args.threads`` threads each (on a CPU, two one-thread runs finish sooner than two
    two-thread runs one after the other)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from transformers import AutoConfig

    from moe_hub.default_model import default_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "compare_routers.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    dense = dequantize_once(default_model_path(), out / "dense")
    text_config = AutoConfig.from_pretrained(dense).get_text_config()
    ranks = matched_ranks(text_config, args.methods, args)
    results["settings"] = {k: v for k, v in vars(args).items() if k != "report"}
    todo = [(method, seed) for seed in args.seeds
            for method in sorted(args.methods, key=lambda m: -STEP_COST.get(m, 1.0))
            if f"{method}@{seed}" not in results["runs"]]
    started = time.perf_counter()
    # spawn: a forked child would inherit this process's torch thread pool and locks.
    with ProcessPoolExecutor(max_workers=args.jobs,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, args, method, seed, *ranks[method], dense, args.threads)
                   for method, seed in todo]
        for future in as_completed(futures):
            entry = future.result()
            results["runs"][f"{entry['method']}@{entry['seed']}"] = entry
            results["wall_seconds"] = round(results.get("wall_seconds", 0.0)
                                            + time.perf_counter() - started, 1)
            started = time.perf_counter()
            results_file.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps({k: v for k, v in entry.items() if k != "curve"}), flush=True)
    return results


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: mean and standard deviation over its seeds."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for entry in results["runs"].values():
        by_method.setdefault(entry["method"], []).append(entry)
    rows = []
    for method in [m for m in METHODS if m in by_method]:
        runs = by_method[method]
        tasks = sorted(runs[0]["accuracy"])

        def stat(values: list[float]) -> tuple[float, float]:
            return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1
                                              else float("nan"))

        rows.append({
            "method": method, "rank": runs[0]["rank"], "params": runs[0]["trainable_params"],
            "seeds": len(runs), "steps": runs[0]["steps"],
            "loss": stat([r["eval_loss"] for r in runs]),
            "accuracy": stat([r["mean_accuracy"] for r in runs]),
            "tasks": {t: statistics.fmean(r["accuracy"][t] for r in runs) for t in tasks},
            "entropy": (statistics.fmean(r["load_entropy"] for r in runs)
                        if "load_entropy" in runs[0] else None),
            "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in runs),
            "cpu_seconds_per_step": statistics.fmean(r["cpu_seconds_per_step"] for r in runs),
            "cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in runs),
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    tasks = list(rows[0]["tasks"]) if rows else []
    head = ["method", "rank", "trainable params", "seeds", "held-out loss", "exact match",
            *tasks, "load entropy", "CPU s/step", "CPU s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pm(pair: tuple[float, float], digits: int) -> str:
        mean, std = pair
        return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")

    for r in rows:
        cells = [r["method"], str(r["rank"]), f"{r['params']:,}", str(r["seeds"]),
                 pm(r["loss"], 3), pm(r["accuracy"], 3),
                 *(f"{r['tasks'][t]:.2f}" for t in tasks),
                 "-" if r["entropy"] is None else f"{r['entropy']:.2f}",
                 f"{r['cpu_seconds_per_step']:.1f}", f"{r['cpu_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Training loss against step, mean over seeds, one line per method (saved to ``path``)."""
    import matplotlib.pyplot as plt

    fig = curve_figure(results)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_figure(results: dict[str, Any]) -> Any:
    """The figure ``plot_curves`` saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, list[float]]] = {}
    for entry in results["runs"].values():
        points = curves.setdefault(entry["method"], {})
        for step, loss in entry["curve"]:
            points.setdefault(step, []).append(loss)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, granularity in zip(axes, GRANULARITIES, strict=True):
        for method in METHODS:
            if method not in curves or not (method in LORA_METHODS
                                            or method.endswith("/" + granularity)):
                continue
            steps = sorted(curves[method])
            style = "--" if method in LORA_METHODS else "-"
            # Markers: a --quick run logs one point per method, which a bare line never draws.
            ax.plot(steps, [statistics.fmean(curves[method][s]) for s in steps], style,
                    marker="o", markersize=3, label=method.split("/")[0])
        ax.set_title(f"routers at {granularity} granularity (plain LoRA dashed)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss (mean over seeds)")
    fig.tight_layout()
    return fig


def report(out: Path) -> None:
    results = json.loads((out / "compare_routers.json").read_text())
    table = markdown_table(summarise(results))
    (out / "compare_routers.md").write_text(table)
    plot_curves(results, out / "compare_routers.png")
    print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working directory for results")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--quick", action="store_true",
                        help=f"every method, {QUICK['steps']} steps, one seed, "
                             f"{QUICK['eval_per_task']} held-out rows per task (a check)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-per-task", type=int, default=None)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="the experts' rank (sets the budget)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "none"],
                        help="the frozen base of every method (none: float32, faster on CPU)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per curve point")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="runs at once, each in its own process (default: one per core)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: the cores shared among the jobs)")
    parser.add_argument("--report", action="store_true",
                        help="only write the table and plot from the results already there")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    preset = QUICK if args.quick else FULL
    for name in ("steps", "seeds", "eval_per_task"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    return args


def main() -> None:
    args = parse_args()
    if not args.report:
        run(args)
    report(Path(args.out))


if __name__ == "__main__":
    main()
