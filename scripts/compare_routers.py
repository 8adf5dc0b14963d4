"""Compare routers on the real SmolLM2-135M-Instruct and the shipped multi-task dataset.

Every method gets the same trainable-parameter budget (the topk model's adapter count: each other
router's LoRA rank, and the plain LoRA's rank, is the one whose count comes closest), the same
data split, steps, batch size, learning rate and seed. Reported per method: held-out LM loss
(router auxiliary losses excluded, padding and prompt tokens excluded) and the expert-load
entropy on the held-out set (normalised: 1 = every expert equally used, 0 = collapse), mean over
routing sites.

    python scripts/compare_routers.py --out runs/compare --steps 200
    python scripts/compare_routers.py --out /tmp/smoke --steps 2 --eval-rows 8   # a smoke run

Plain LoRA is peft's ``LoraConfig`` on the same linears; MoE-LoRA models are made with
``moe_hub.convert`` and trained with ``moe_hub.finetune`` (unquantized base by default so that all
methods see the same base; pass ``--quantize nf4`` for the QLoRA-style setting).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

ROUTER_OPTIONS = {
    # Router widths sized for a 576-wide model so routers stay a small part of the budget.
    "topk": {},
    "rmoe": {"hidden_size": 32},
    "hypermoe": {"embed_dim": 32, "hyper_rank": 4},
    "graphmoe": {"steps": 2, "message_size": 16},
}
METHODS = ["base", "lora", *ROUTER_OPTIONS]


def moe_adapter_count(text_config: Any, router: str, rank: int, args: argparse.Namespace) -> int:
    """Trainable parameters of a MoE-LoRA model, counted on the meta device (no memory)."""
    from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM

    config = MoELoraConfig(
        text_config=text_config.to_dict(), router=router, router_config=ROUTER_OPTIONS[router],
        num_experts=args.experts, num_experts_per_tok=args.top_k, lora_rank=rank,
        routing_granularity=args.granularity,
    )
    with torch.device("meta"):
        model = MoELoraForCausalLM(config)
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in model.adapter_parameter_names())


def lora_rank_for(text_config: Any, budget: int) -> tuple[int, int]:
    """Rank (and count) of a plain LoRA on every decoder linear closest to ``budget``."""
    from transformers import AutoModelForCausalLM

    from moe_hub.modeling.moe_lora_layer import find_target_linears, linear_features

    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(text_config)
    per_rank = sum(sum(linear_features(dense.get_submodule(name)))
                   for name, _ in find_target_linears(dense, None))
    rank = max(1, round(budget / per_rank))
    return rank, rank * per_rank


def matched_ranks(text_config: Any, args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    budget = moe_adapter_count(text_config, "topk", args.rank, args)
    ranks = {"topk": (args.rank, budget)}
    for router in ROUTER_OPTIONS:
        if router == "topk":
            continue
        # The count is affine in the rank (experts scale with it, routers barely or not).
        one, two = (moe_adapter_count(text_config, router, r, args) for r in (1, 2))
        best = max(1, round((budget - one) / (two - one)) + 1)
        ranks[router] = (best, moe_adapter_count(text_config, router, best, args))
    ranks["lora"] = lora_rank_for(text_config, budget)
    ranks["base"] = (0, 0)
    return ranks


@torch.no_grad()
def evaluate(model: Any, dataset: Any, collator: Any, batch_size: int) -> dict[str, float]:
    """Mean LM loss per supervised token and the mean normalised expert-load entropy."""
    model.eval()
    total_loss, total_tokens, counts = 0.0, 0, None
    rows = list(dataset)
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start:start + batch_size])
        is_moe = hasattr(model, "routing_sites")
        kwargs = {"output_router_logits": True} if is_moe else {}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    **kwargs)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
            reduction="sum")
        total_loss += loss.item()
        total_tokens += int((labels != -100).sum())
        if is_moe:
            step = out.expert_counts.double()
            counts = step if counts is None else counts + step
    result = {"eval_loss": total_loss / max(total_tokens, 1), "eval_tokens": total_tokens}
    if counts is not None:
        load = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -(load * load.clamp_min(1e-12).log()).sum(dim=1) / math.log(load.shape[1])
        result["load_entropy"] = float(entropy.mean())
        result["min_site_entropy"] = float(entropy.min())
    return result


def load_dense(dense: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)


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


def train_lora(dense: Path, rank: int, prepared: Any, collator: Any, args: argparse.Namespace,
               out: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from moe_hub.modeling.moe_lora_layer import find_target_linears

    model = load_dense(dense)
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in find_target_linears(model, None)})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    training = TrainingArguments(
        output_dir=str(out / "lora-run"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.03, seed=args.seed, data_seed=args.seed,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
    )
    Trainer(model=model, args=training, train_dataset=prepared.train,
            data_collator=collator).train()
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from moe_hub.convert import convert
    from moe_hub.data import PadCollator, default_dataset_path, pad_token_id, prepare_data
    from moe_hub.default_model import default_model_path
    from moe_hub.finetune import finetune
    from moe_hub.modeling import MoELoraForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = dequantize_once(default_model_path(), out / "dense")
    text_config = AutoConfig.from_pretrained(dense).get_text_config()
    tokenizer = AutoTokenizer.from_pretrained(dense)
    data = args.data or str(default_dataset_path())
    prepared = prepare_data(data, tokenizer, max_length=args.max_length, eval_split=args.eval_split,
                            seed=args.seed)
    eval_set = prepared.eval.select(range(min(args.eval_rows, len(prepared.eval))))
    collator = PadCollator(pad_token_id(tokenizer))
    ranks = matched_ranks(text_config, args)
    results: dict[str, Any] = {"settings": vars(args), "methods": {}}
    for method in args.methods:
        rank, params = ranks[method]
        started = time.perf_counter()
        torch.manual_seed(args.seed)
        if method == "base":  # the untrained dense model, for reference
            model = load_dense(dense)
        elif method == "lora":
            model = train_lora(dense, rank, prepared, collator, args, out)
        else:
            checkpoint = convert(dense, out / f"{method}-init", router=method,
                                 router_config=ROUTER_OPTIONS[method], experts=args.experts,
                                 top_k=args.top_k, rank=rank, granularity=args.granularity,
                                 seed=args.seed, overwrite=True, progress=False)
            trained = out / f"{method}-trained"
            finetune(checkpoint, data, trained, quantize=args.quantize, max_steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     max_length=args.max_length, eval_split=args.eval_split, overwrite=True,
                     progress=False)
            model = MoELoraForCausalLM.from_pretrained(trained, dtype=torch.float32)
        metrics = evaluate(model, eval_set, collator, args.batch_size)
        metrics.update(rank=rank, trainable_params=params,
                       seconds=round(time.perf_counter() - started, 1))
        results["methods"][method] = metrics
        print(json.dumps({method: metrics}), flush=True)
        del model
    if not args.keep:
        for method in args.methods:
            for suffix in ("init", "trained"):
                shutil.rmtree(out / f"{method}-{suffix}", ignore_errors=True)
        shutil.rmtree(out / "lora-run", ignore_errors=True)
    (out / "compare_routers.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{'method':<10} {'rank':>4} {'params':>10} {'eval loss':>10} {'entropy':>8} "
          f"{'seconds':>8}")
    for method, m in results["methods"].items():
        entropy = f"{m['load_entropy']:.3f}" if "load_entropy" in m else "-"
        print(f"{method:<10} {m['rank']:>4} {m['trainable_params']:>10} {m['eval_loss']:>10.4f} "
              f"{entropy:>8} {m['seconds']:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working directory for checkpoints/results")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--data", default=None, help="dataset (default: the shipped one)")
    parser.add_argument("--granularity", default="linear", choices=["linear", "block"])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="topk's LoRA rank (sets the budget)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-split", type=float, default=0.1)
    parser.add_argument("--eval-rows", type=int, default=10_000)
    parser.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4", "int8"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    print_table(run(parser.parse_args()))


if __name__ == "__main__":
    main()
