"""Experts from existing LoRA adapters, end to end on the embedded SmolLM2-135M-Instruct.

1. Trains one PEFT LoRA adapter per task on two tasks of the shipped dataset
   (``moe_hub/datasets/default.jsonl``), with different ranks and target modules, and saves each
   with PEFT's ``save_pretrained``.
2. Composes them with ``convert(..., from_adapters=[...])`` (``moe-hub convert --from-adapters``):
   adapter i becomes expert i, topk router, top-2 of 2.
3. Trains only the routers on both tasks (``finetune(..., train="routers")``, i.e.
   ``moe-hub finetune --train routers``): the adapters stay exactly as trained.
4. Prints the exact-match accuracy of the greedy answer on held-out rows of each task: base model,
   each adapter alone (PEFT), and the composed model before and after router training.

    python scripts/train_task_adapters.py --workdir runs/task-adapters
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

# Different ranks and target modules on purpose: conversion pads ranks and fills untargeted sites.
# LoRA on the upper 12 of the 30 decoder layers only: backward then stops there, which halves the
# cost of a step on a CPU.
UPPER_LAYERS = list(range(18, 30))
ADAPTER_SHAPES = [
    {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
     "layers_to_transform": UPPER_LAYERS},
    {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"],
     "layers_to_transform": UPPER_LAYERS},
]


def dense_smollm2(target: Path) -> Path:
    """The embedded GGUF dequantised once into a safetensors directory (the adapters' base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_hub.default_model import default_model_path

    if (target / "config.json").is_file():
        return target
    gguf = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None  # transformers refuses to save a model still marked GGUF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def split_tasks(tasks: list[str], heldout: int, seed: int, data_dir: Path
                ) -> tuple[dict[str, Path], Path, dict[str, list[dict[str, Any]]]]:
    """Per task: a training file and ``heldout`` evaluation rows; plus a file mixing both
    tasks' training rows (for the routers)."""
    from moe_hub.data import default_dataset_path

    rows = [json.loads(line) for line in default_dataset_path().read_text().splitlines() if line]
    data_dir.mkdir(parents=True, exist_ok=True)
    train_files, evaluation, mixed = {}, {}, []
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        if len(mine) <= heldout:
            known = sorted({r["task"] for r in rows})
            raise SystemExit(f"task {task!r} has {len(mine)} rows; tasks: {known}")
        random.Random(seed).shuffle(mine)
        evaluation[task], train = mine[:heldout], mine[heldout:]
        train_files[task] = data_dir / f"{task}-train.jsonl"
        train_files[task].write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                                             for r in train))
        mixed += train
    random.Random(seed).shuffle(mixed)
    both = data_dir / "mixed-train.jsonl"
    both.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in mixed))
    return train_files, both, evaluation


def train_adapter(dense: Path, data: Path, shape: dict[str, Any], out: Path,
                  args: argparse.Namespace) -> Path:
    """A plain PEFT LoRA training loop (completion-only loss) and PEFT's save_pretrained; an
    adapter already saved at ``out`` by an earlier run with the same settings is reused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_hub.data import PadCollator, pad_token_id, prepare_data

    stamp = out / "train_task_adapters.json"
    settings = {"shape": shape, "data": str(data), **{k: getattr(args, k) for k in (
        "adapter_steps", "adapter_lr", "batch_size", "max_length", "seed")}}
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return out
    tokenizer = AutoTokenizer.from_pretrained(dense)
    prepared = prepare_data(data, tokenizer, max_length=args.max_length, seed=args.seed)
    collate = PadCollator(pad_token_id(tokenizer))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **shape))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.adapter_lr)
    order = list(range(len(prepared.train)))
    rng = random.Random(args.seed)
    model.train()
    for step in range(args.adapter_steps):
        if step * args.batch_size % len(order) < args.batch_size:
            rng.shuffle(order)
        start = step * args.batch_size % len(order)
        batch = collate([prepared.train[i] for i in (order * 2)[start:start + args.batch_size]])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 4 == 0 or step == args.adapter_steps - 1:
            print(f"  {out.name} step {step + 1}/{args.adapter_steps} loss {loss.item():.3f}",
                  flush=True)
    model.save_pretrained(out)
    stamp.write_text(json.dumps(settings))
    return out


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]], args: argparse.Namespace
             ) -> float:
    """Exact match of greedy decoding, scored in one teacher-forced pass: an answer counts when
    every answer token and the end-of-turn token after it is the argmax given the tokens before
    it, which is exactly when greedy decoding from the prompt reproduces the answer and stops
    (the scored tokens are the training labels: the assistant turn as the chat template renders
    it)."""
    from moe_hub.data import PadCollator, pad_token_id, tokenize_row

    collate = PadCollator(pad_token_id(tokenizer))
    examples = [tokenize_row({"messages": r["messages"]}, i, tokenizer, "messages",
                             completion_only=True, max_length=args.max_length)
                for i, r in enumerate(rows)]
    model.eval()
    hits = 0
    for start in range(0, len(examples), args.batch_size):
        batch = collate(examples[start:start + args.batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        scored = target != -100
        hits += int(((predicted == target) | ~scored).all(-1).sum())
    return hits / len(rows)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_hub.convert import convert
    from moe_hub.finetune import finetune

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tasks = [t.strip() for t in args.tasks.split(",")]
    if len(tasks) != len(ADAPTER_SHAPES):
        raise SystemExit(f"--tasks takes {len(ADAPTER_SHAPES)} tasks")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    dense = dense_smollm2(work / "smollm2-dense")
    train_files, mixed, evaluation = split_tasks(tasks, args.heldout, args.seed, work / "data")
    adapters = []
    for task, shape in zip(tasks, ADAPTER_SHAPES, strict=True):
        print(f"training the {task} adapter (r={shape['r']})", flush=True)
        adapters.append(train_adapter(dense, train_files[task], shape,
                                      work / f"adapter-{task}", args))
    timings["adapters"] = time.perf_counter() - clock
    clock = time.perf_counter()
    composed = convert(dense, work / "composed", from_adapters=[str(a) for a in adapters],
                       router="topk", overwrite=True, progress=False)
    routed = work / "composed-routers"
    stamp = routed / "train_task_adapters.json"
    settings = {"adapters": [json.loads((a / "train_task_adapters.json").read_text())
                             for a in adapters],
                **{k: getattr(args, k) for k in ("router_steps", "router_lr", "batch_size")}}
    if stamp.is_file() and json.loads(stamp.read_text())["settings"] == settings:
        metrics = json.loads(stamp.read_text())["metrics"]
    else:
        metrics = finetune(composed, mixed, routed, quantize="none", train="routers",
                       max_steps=args.router_steps, batch_size=args.batch_size,
                       lr=args.router_lr, warmup=0, max_length=args.max_length,
                       logging_steps=max(1, args.router_steps // 5), seed=args.seed,
                       overwrite=True, progress=False)
        stamp.write_text(json.dumps({"settings": settings, "metrics": {
            k: v for k, v in metrics.items() if isinstance(v, int | float | str)}}))
    timings["compose + router training"] = time.perf_counter() - clock
    clock = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(dense)

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)

    models = {"base (no adapter)": base}
    for task, adapter in zip(tasks, adapters, strict=True):
        models[f"{task} adapter alone (PEFT)"] = lambda a=adapter: PeftModel.from_pretrained(
            base(), a)
    for label, path in (("composed, routers untrained", composed),
                        ("composed, routers trained", routed)):
        models[label] = lambda p=path: AutoModelForCausalLM.from_pretrained(
            p, trust_remote_code=True, dtype=torch.float32)
    table = []
    for label, load in models.items():
        model = load()
        row = {"model": label}
        for task in tasks:
            row[task] = accuracy(model, tokenizer, evaluation[task], args)
        table.append(row)
        print(f"  {label}: " + ", ".join(f"{t} {row[t]:.0%}" for t in tasks), flush=True)
    timings["evaluation"] = time.perf_counter() - clock

    print(f"\n{args.heldout} held-out rows per task, greedy exact match; adapters "
          f"{args.adapter_steps} steps each, routers {args.router_steps} steps "
          f"(router loss {metrics.get('first_loss')} -> {metrics.get('final_loss')})\n")
    print("| model | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for row in table:
        print(f"| {row['model']} | " + " | ".join(f"{row[t]:.0%}" for t in tasks) + " |")
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    (work / "results.json").write_text(json.dumps(
        {"tasks": tasks, "table": table, "timings_s": timings, "args": vars(args),
         "router_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}},
        indent=2) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/task-adapters")
    parser.add_argument("--tasks", default="arithmetic,uppercase",
                        help="two tasks of the shipped dataset, comma-separated")
    parser.add_argument("--heldout", type=int, default=10, help="evaluation rows per task")
    parser.add_argument("--adapter-steps", type=int, default=12)
    parser.add_argument("--adapter-lr", type=float, default=4e-3)
    parser.add_argument("--router-steps", type=int, default=4)
    parser.add_argument("--router-lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
