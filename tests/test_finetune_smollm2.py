"""End to end on the real SmolLM2-135M-Instruct: convert, fine-tune on an NF4 base with the shipped
dataset, reload with plain transformers.

To fit a few dozen steps into the time budget of a shared 2-core CPU, the experts sit on the MLPs
of the last two decoder layers only (backward then stops there); the forward still runs the whole
NF4-quantized model.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_hub.convert import convert
from moe_hub.data import PadCollator, load_rows, pad_token_id, prepare_data
from moe_hub.finetune import FinetuneOptions, finetune, load_for_training

pytestmark = pytest.mark.slow
STEPS = 32
MAX_LENGTH = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: extra threads only add contention
    yield
    torch.set_num_threads(threads)


def held_out_loss(model, tokenizer, path) -> float:
    prepared = prepare_data(path, tokenizer, max_length=MAX_LENGTH)
    batch = PadCollator(pad_token_id(tokenizer))(list(prepared.train))
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_smollm2_nf4_finetune_lowers_held_out_loss_and_reloads(tmp_path, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = convert(smollm2_gguf, tmp_path / "smol-moe", experts=4, rank=8, progress=False,
                   targets=[r"re:.*layers\.(28|29)\.mlp\.(gate|up|down)_proj"])
    rows = list(load_rows("default"))
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-12]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[-12:]))  # two rows of each task
    tokenizer = AutoTokenizer.from_pretrained(ckpt)

    before_model = load_for_training(ckpt, FinetuneOptions(quantize="nf4"))
    before = held_out_loss(before_model, tokenizer, held)
    del before_model

    out = tmp_path / "smol-moe-ft"
    metrics = finetune(ckpt, train, out, quantize="nf4", max_steps=STEPS, batch_size=2, lr=1e-3,
                       max_length=MAX_LENGTH, warmup=0, scheduler="constant", logging_steps=4,
                       save_steps=STEPS, progress=False)
    assert metrics["global_step"] == STEPS and metrics["train_rows"] == 288

    after_nf4 = held_out_loss(load_for_training(out, FinetuneOptions(quantize="nf4")),
                              tokenizer, held)
    # Measured 3.91 -> 2.59: the answers' formats are learnt within a few dozen steps.
    assert after_nf4 < 0.85 * before, (before, after_nf4)

    full = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    after_full = held_out_loss(full, tokenizer, held)
    # The adapters were trained against the NF4 base; on the original-precision base they keep
    # their gain (measured 2.46 against 2.59 with NF4, 5% apart).
    assert abs(after_full - after_nf4) < 0.15 * after_nf4, (after_full, after_nf4)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    generated = full.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]

    record = json.loads((out / "moe_hub_training.json").read_text())
    assert record["steps"] == STEPS and record["data_format"] == "messages"
    stats = json.loads((out / "routing_stats.json").read_text())
    assert stats["num_sites"] == 6 and stats["routed_slots"] > 0
    assert (out / "routing_heatmap.png").is_file() and "routing_heatmap.png" in \
        (out / "README.md").read_text()
