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
