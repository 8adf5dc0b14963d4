"""Test helpers for the fine-tuning tests: a character tokenizer with a chat template (tiny random
models ship no tokenizer) and a tiny converted checkpoint that carries it."""

from __future__ import annotations

import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer():
    """A real fast tokenizer: one token per printable ASCII character, ids < 128."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable[:95]))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_checkpoint(root: Path, router: str = "topk", seed: int = 0, **options) -> Path:
    """Convert a tiny random Llama into a moe-hub checkpoint with the character tokenizer."""
    from conftest import save_tiny_dense

    from moe_hub.convert import convert

    dense = save_tiny_dense(root / f"dense-{seed}", seed=seed)
    options.setdefault("experts", 4)
    options.setdefault("rank", 4)
    out = convert(dense, root / f"ckpt-{router}-{seed}", router=router, progress=False, **options)
    char_tokenizer().save_pretrained(out)
    return out


def step_recorder(path: Path | None = None):
    """A Trainer callback recording every training micro-batch the model sees and the adapter
    gradients of the first optimizer step, as the optimizer receives them (after gradient
    accumulation and the DDP all-reduce; run with ``max_grad_norm=0`` so no clipping touches
    them). With ``path`` it also writes both there (``torch.save``) when that step is reached."""
    import torch
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.batches: list[dict[str, torch.Tensor]] = []
            self.grads: dict[str, torch.Tensor] | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def record(module, call_args, call_kwargs):
                if module.training and self.grads is None:
                    self.batches.append({k: call_kwargs[k].detach().cpu().clone() for k in
                                         ("input_ids", "attention_mask", "labels")})

            model.register_forward_pre_hook(record, with_kwargs=True)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.grads is None:
                self.grads = {name: p.grad.detach().cpu().clone()
                              for name, p in model.named_parameters() if p.grad is not None}
                if path is not None:
                    torch.save({"batches": self.batches, "grads": self.grads}, path)

    return StepRecorder()


def load_balance_f64(router_logits: tuple, attention_mask, num_experts: int, top_k: int):
    """Switch load balance E * sum_e f_e P_e over all sites' rows of one micro-batch, padding
    out, in float64 (written here from the definition, not taken from the model code)."""
    import torch
    import torch.nn.functional as F

    keep = attention_mask.reshape(-1).bool()
    logits = torch.cat([site.double()[keep] for site in router_logits])
    chosen = logits.topk(top_k, dim=-1).indices
    fraction = F.one_hot(chosen, num_experts).double().mean(dim=1).mean(dim=0)
    mean_prob = logits.softmax(dim=-1).mean(dim=0)
    return num_experts * (fraction * mean_prob).sum()


def per_step_expected_grads(ckpt: Path, batches: list[dict], coef: float) -> dict:
    """Adapter gradients of one optimizer step over ``batches`` (every micro-batch of every
    process), by the definition
        L = sum_m [ CE_sum_m / N + coef * (n_m / N) * load_balance_m ],
    n_m the micro-batch's label tokens after the causal shift, N their sum over the step; on a
    freshly loaded copy of ``ckpt`` prepared for training as ``finetune`` does."""
    import torch
    import torch.nn.functional as F

    from moe_hub.finetune import FinetuneOptions, load_for_training

    model = load_for_training(ckpt, FinetuneOptions(aux_loss_coef=coef))
    config = model.config
    num_items = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        # No labels: the model adds no loss of its own; the whole of L is computed here.
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True)
        targets = batch["labels"][:, 1:]
        logits = out.logits[:, :-1].double()
        cross_entropy = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                        targets.reshape(-1), ignore_index=-100, reduction="sum")
        tokens = int(targets.ne(-100).sum())
        balance = load_balance_f64(out.router_logits, batch["attention_mask"],
                                   config.num_experts, config.num_experts_per_tok)
        total = total + cross_entropy / num_items + coef * tokens / num_items * balance
    total.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(got: dict, want: dict, bound: float = 1e-4) -> None:
    """Every adapter gradient within ``bound`` relative (float32 forward on both sides, only the
    reduction order differs: measured <= 8e-7); the routers' together first, reporting their
    norm ratio (a wrong aux-loss factor shows as x2, x4...)."""
    import torch

    def rel(a, b) -> float:
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    assert got.keys() == want.keys()
    routers = [n for n in want if ".router." in n]
    assert routers and all(want[n].norm() > 0 for n in routers)
    router_got = torch.cat([got[n].reshape(-1) for n in routers])
    router_want = torch.cat([want[n].reshape(-1) for n in routers])
    ratio = float(router_got.norm() / router_want.norm())
    assert rel(router_got, router_want) < bound, f"router gradient x{ratio:.3f} the expected"
    for name in want:
        assert rel(got[name], want[name]) < bound, name
