"""``torch.inference_mode()`` at every router and granularity (with and without autocast, and
with 16-bit adapters on a float32 base), and one model used from several threads at once."""

from __future__ import annotations

import threading

import pytest
import torch
from test_routers import CASES, ROUTER_CONFIGS, build, ids, perturb

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def _half_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """float32 base and routers, bf16 experts: the expert op casts the float32 x itself."""
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("setting", ["bf16-autocast", "fp32", "bf16-adapters"])
@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_inference_mode_equals_no_grad(router: str, granularity: str, setting: str,
                                       one_thread) -> None:
    """Same kernels, same inputs: the logits are bitwise those of ``torch.no_grad()``."""
    model = perturb(build(router, granularity)).eval()
    if setting == "bf16-adapters":
        model = _half_adapters(model)
    tokens = ids(2, 9, seed=31)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "bf16-autocast")
    with torch.no_grad(), amp:
        want = model(tokens).logits
    with torch.inference_mode(), amp:
        got = model(tokens).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_generate_under_inference_mode_equals_no_grad(router: str, granularity: str,
                                                      autocast: bool, one_thread) -> None:
    """Batch 1 (the gathered decode form at linear sites) and batch 2 (the packed matmul)."""
    model = perturb(build(router, granularity)).eval()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    for batch in (1, 2):
        prompt = ids(batch, 6, seed=32)
        kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                      output_scores=True, return_dict_in_generate=True)
        with torch.no_grad(), amp:
            want = model.generate(prompt, **kwargs)
        with torch.inference_mode(), amp:
            got = model.generate(prompt, **kwargs)
        assert got.sequences.tolist() == want.sequences.tolist()
        for got_scores, want_scores in zip(got.scores, want.scores, strict=True):
            assert torch.equal(got_scores, want_scores)


def _run_threads(jobs: list) -> list:
    """Run every job in its own thread, all started together; their results in order."""
    results: list = [None] * len(jobs)
    errors: list = []
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = jobs[i]()
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
def test_threads_generating_on_one_model_match_sequential_runs(router: str, one_thread) -> None:
    """Four threads, each its own prompt and mode (no_grad or inference_mode, fp32 or bf16
    autocast), generating at once on one model: the same tokens and scores as one by one."""
    model = perturb(build(router, "linear")).eval()
    settings = [(1, False, False), (2, True, False), (1, True, True), (2, False, True)]

    def job(i: int):
        batch, inference, autocast = settings[i]
        prompt = ids(batch, 6, seed=40 + i)
        grad_off = torch.inference_mode() if inference else torch.no_grad()
        with grad_off, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=6, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        return out.sequences.tolist(), [s.clone() for s in out.scores]

    sequential = [job(i) for i in range(len(settings))]
    for _ in range(2):
        concurrent = _run_threads([lambda i=i: job(i) for i in range(len(settings))])
        for (tokens, scores), (want_tokens, want_scores) in zip(concurrent, sequential,
                                                                 strict=True):
            assert tokens == want_tokens
            assert all(torch.equal(s, w) for s, w in zip(scores, want_scores, strict=True))


@pytest.mark.parametrize("granularity", ["linear", "block"])
def test_threads_training_on_one_model_match_sequential_runs(granularity: str,
                                                             one_thread) -> None:
    """The shared 16-bit cast of x is kept for backward: threads computing gradients at once
    under bf16 autocast (each its own batch) get exactly the gradients of sequential runs."""
    model = perturb(build("topk", granularity)).train()
    params = [p for n, p in model.named_parameters() if ".lora_" in n or ".router." in n]

    def job(i: int) -> list[torch.Tensor]:
        tokens = ids(2, 7, seed=50 + i)
        with BF16:
            loss = model(tokens, labels=tokens).loss
        return list(torch.autograd.grad(loss, params))

    sequential = [job(i) for i in range(4)]
    concurrent = _run_threads([lambda i=i: job(i) for i in range(4)])
    for grads, want in zip(concurrent, sequential, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(grads, want, strict=True))
