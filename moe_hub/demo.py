"""The end-to-end job on the embedded default model, as one function (behind `moe-hub demo`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console


def default_workdir() -> Path:
    """Where the demo writes unless told otherwise: the moe-hub cache, not the current folder
    (which is often a clone of this repository)."""
    from .default_model import cache_dir

    return cache_dir() / "demo"


def run_demo(workdir: str | os.PathLike | None = None, router: str = "topk", steps: int = 30,
             quantize: str = "nf4") -> dict:
    """Convert SmolLM2-135M-Instruct, fine-tune it, reload it with AutoModel and generate.

    Returns the figures it printed (times, losses, the model's answer).
    """
    from .convert import ConvertOptions
    from .default_model import DEFAULT_ALIAS, default_model_path
    from .finetune import FinetuneOptions
    from .progress import quiet_library_notices

    # Every option is checked before anything is downloaded or any folder is made.
    ConvertOptions(router=router).validate()
    FinetuneOptions(quantize=quantize, max_steps=steps).validate()
    quiet_library_notices()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .convert import convert
    from .finetune import finetune

    console = Console(stderr=True)
    workdir = Path(workdir) if workdir is not None else default_workdir()
    console.print(f"The demo writes its two checkpoints into {workdir}")
    workdir.mkdir(parents=True, exist_ok=True)
    figures: dict = {}

    gguf = default_model_path()
    console.rule(f"1/3 convert {gguf.name} -> MoE-LoRA ({router})")
    start = time.perf_counter()
    converted = convert(DEFAULT_ALIAS, workdir / f"smollm2-moe-{router}", router=router,
                        overwrite=True)
    figures["convert_s"] = round(time.perf_counter() - start, 1)

    console.rule(f"2/3 fine-tune {steps} steps on a {quantize} base")
    tuned = workdir / f"smollm2-moe-{router}-tuned"
    metrics = finetune(converted, "default", tuned, quantize=quantize, max_steps=steps,
                       overwrite=True)
    # The duration finetune's own summary line printed, not a second measurement of it.
    figures["finetune_s"] = round(metrics["wall_seconds"], 1)
    figures["metrics"] = metrics

    console.rule("3/3 load with AutoModelForCausalLM(trust_remote_code=True) and chat")
    model = AutoModelForCausalLM.from_pretrained(tuned, trust_remote_code=True)
    # The tokenizer needs no custom code, but AutoTokenizer resolves the config first.
    tokenizer = AutoTokenizer.from_pretrained(tuned, trust_remote_code=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:],
                              skip_special_tokens=True)
    figures["answer"] = answer
    console.print(f"[bold]user:[/bold] {messages[0]['content']}\n[bold]model:[/bold] {answer}")
    console.print(f"checkpoints: {converted} (converted), {tuned} (fine-tuned)")
    console.print(f"convert {figures['convert_s']} s, fine-tune {figures['finetune_s']} s")
    console.print(what_next(tuned), markup=False, highlight=False)
    return figures


def what_next(checkpoint: str | os.PathLike) -> str:
    """The commands a user runs next on the demo's checkpoint: chat, evaluate, publish."""
    import shlex

    path = shlex.quote(str(checkpoint))
    return "\n".join([
        "What next:",
        f"  chat:     moe-hub chat {path}",
        f"  evaluate: lm_eval --model hf --model_args pretrained={path},trust_remote_code=True "
        f"--tasks arc_easy --limit 100   (README: Evaluate)",
        f"  publish:  moe-hub push {path} YOUR_NAME/smollm2-moe",
    ])
