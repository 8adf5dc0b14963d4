"""The router losses are defined per optimizer step, whatever grad_accum and the process count.

transformers' Trainer passes ``num_items_in_batch`` to our forward (it accepts ``**kwargs``), then
neither divides the loss by the gradient-accumulation steps nor lets the world size dilute it.
The model weighs each micro-batch's aux loss by its share of the step's label tokens, so the
gradient of one optimizer step is that of
    L = sum_m [ CE_sum_m / N + coef * (n_m / N) * load_balance_m ]
over every micro-batch m of every process (n_m its label tokens after the shift, N their sum).

Each run trains one real optimizer step through ``moe_hub.finetune`` (NF4 base, Trainer) and
records the micro-batches and the gradients the optimizer receives; the expected gradients come
from an independent float64 computation of L from the router logits of a freshly loaded copy of
the same checkpoint (``helpers_finetune.per_step_expected_grads``; two gloo processes are checked
the same way in test_finetune.py). Top-1 routing with renormalisation gives the router weight
exactly 1, so the router's gradient is the aux loss's alone; with the coefficient at 1 the check
is sharp: before the fix grad_accum 4 gave 4.2x the expected router gradient, grad_accum 2 2.2x.
Tolerance: see ``assert_grads_match``.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers_finetune import (
    assert_grads_match,
    per_step_expected_grads,
    step_recorder,
    tiny_checkpoint,
)
from safetensors.torch import load_file, save_file

from moe_hub.finetune import finetune

COEF = 1.0
# Four distinct rows of different lengths: micro-batches carry different label-token counts.
ROWS = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "12+30=", "completion": "42"},
        {"prompt": "7+8=", "completion": "15"}, {"prompt": "100+250=", "completion": "350"}]
STEP = dict(max_steps=1, save_steps=100, max_length=16, lr=1e-3, warmup=0, scheduler="constant",
            logging_steps=1, progress=False, aux_loss_coef=COEF,
            training_args={"max_grad_norm": 0.0})  # the optimizer sees unclipped gradients


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("aux")
    ckpt = tiny_checkpoint(root, dropout=0.0, top_k=1)
    # Non-zero B: the experts change the output, so every adapter gets an LM gradient too.
    path = ckpt / "moe_adapters.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(3)
    for name, value in tensors.items():
        if name.endswith("lora_B"):
            tensors[name] = 0.1 * torch.randn(value.shape, generator=generator)
    save_file(tensors, path, metadata={"format": "pt"})
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root, ckpt, data


@pytest.mark.parametrize("batch_size, grad_accum", [(4, 1), (1, 4), (2, 2)])
def test_one_step_gradient_is_the_token_weighted_mean_of_micro_batch_losses(
        setup, batch_size, grad_accum):
    root, ckpt, data = setup
    recorder = step_recorder()
    finetune(ckpt, data, root / f"out-{batch_size}-{grad_accum}", batch_size=batch_size,
             grad_accum=grad_accum, callbacks=[recorder], **STEP)
    assert len(recorder.batches) == grad_accum
    assert sum(b["input_ids"].shape[0] for b in recorder.batches) == len(ROWS)
    assert_grads_match(recorder.grads, per_step_expected_grads(ckpt, recorder.batches,
                                                               COEF))
