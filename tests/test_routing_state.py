"""Routing state belongs to one forward: under gradient checkpointing, a layer recomputed during
backward reads the RMoE / GraphMoE state of its own forward, whatever forward ran since and
whichever thread runs it; the backbone called on its own routes in its own context.

Bound: the interleaved and the separate runs compute the same float32 operations; only the order
in which the two batches' gradients are added differs, so they agree to float32 rounding
(relative 1e-5). Reading the other batch's state changes the recomputed tensors by O(1)."""

from __future__ import annotations

import gc
import re
import threading
import weakref
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from test_routers import build, ids, perturb, rel_err

from moe_hub.modeling import MoELoraModel
from moe_hub.modeling.routing import Router

ROUTERS = ["rmoe", "graphmoe"]


def _model(router: str, **checkpointing) -> torch.nn.Module:
    model = perturb(build(router)).train()  # train(): transformers checkpoints only in training
    model.activation_checkpointing_enable(checkpointing or None)
    return model


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # A parameter the loss does not reach has gradient 0, compared like any other.
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    routed = [n for n in want if ".router." in n or n.startswith("moe_shared.")]
    assert routed and all(want[n].abs().sum() > 0 for n in routed)
    for name, grad in want.items():
        if grad.abs().sum() > 0:
            assert rel_err(got[name], grad) < 1e-5, name
        else:  # no relative error of a zero: where none is expected, none may appear
            assert not got[name].any(), name


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens, labels=tokens).loss


# GraphMoE's message state lives inside one site's router call (never in the context), so
# sequential interleaving never affected it: only RMoE's state crosses sites. Threads affect both
# (a forward in one thread recorded its decisions into the other's context).
@pytest.mark.parametrize("router", ["rmoe", "rmoe-hyper"])
def test_two_forwards_then_one_backward_give_each_forwards_gradients(router: str) -> None:
    model = _model(router)
    first, second = ids(seed=3), ids(seed=4)
    separate = _grads(model, _loss(model, first))
    for name, grad in _grads(model, _loss(model, second)).items():
        separate[name] = separate[name] + grad if name in separate else grad
    loss_1 = _loss(model, first)
    loss_2 = _loss(model, second)  # before loss_1's backward: R-Drop, an eval forward, ...
    _assert_same(_grads(model, loss_1 + loss_2), separate)


@pytest.mark.parametrize("router", ROUTERS)
def test_two_threads_each_get_their_own_forwards_gradients(router: str) -> None:
    model = _model(router)
    batches = [ids(seed=5), ids(seed=6)]
    expected = [_grads(model, _loss(model, tokens)) for tokens in batches]
    both_forwards_done = threading.Barrier(2)
    results: list = [None, None]

    def run(i: int) -> None:
        try:
            loss = _loss(model, batches[i])
            both_forwards_done.wait(timeout=120)  # the other thread's forward ran before backward
            results[i] = _grads(model, loss)
        except BaseException as err:  # reported by the main thread
            both_forwards_done.abort()
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        if isinstance(got, BaseException):
            raise got
        _assert_same(got, want)


@pytest.mark.parametrize("router", ROUTERS)
def test_backbone_called_directly_routes_like_the_causal_lm(router: str) -> None:
    """TRL's fused LM head calls model.base_model(...) and applies the head itself."""
    model = _model(router)
    tokens = ids(seed=7)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    full = model(tokens, attention_mask=mask, output_hidden_states=True)
    hidden = model.base_model(tokens, attention_mask=mask).last_hidden_state
    assert rel_err(hidden, full.hidden_states[-1]) < 1e-6
    head = model.get_output_embeddings()
    assert rel_err(head(hidden), full.logits) < 1e-6
    # The same gradients through the backbone as through the whole model (checkpointed).
    probe = torch.randn(full.logits.shape, generator=torch.Generator().manual_seed(0))
    via_model = _grads(model, (model(tokens, attention_mask=mask).logits * probe).sum())
    via_backbone = _grads(model, (head(model.base_model(tokens, attention_mask=mask)
                                       .last_hidden_state) * probe).sum())
    _assert_same(via_backbone, via_model)


def test_a_users_context_fn_is_composed_with_the_routing_one() -> None:
    entered = {"forward": 0, "recompute": 0}

    @contextmanager
    def counting(phase: str):
        entered[phase] += 1
        yield

    model = _model("rmoe", context_fn=lambda: (counting("forward"), counting("recompute")))
    first, second = ids(seed=3), ids(seed=4)
    separate = _grads(model, _loss(model, first))
    for name, grad in _grads(model, _loss(model, second)).items():
        separate[name] = separate[name] + grad
    _assert_same(_grads(model, _loss(model, first) + _loss(model, second)), separate)
    layers = model.config.text_config.num_hidden_layers
    assert entered == {"forward": 4 * layers, "recompute": 4 * layers}


# Router outputs that carry [T, d_out] tensors: HyperMoE's residual at every site, GraphMoE
# refine's output at its square sites. Gradient checkpointing exists to drop such activations, so
# nothing may keep them once the forward that made them has returned: not the routing context the
# checkpoint captures for recomputation, whatever the entry point (the causal LM, the backbone
# called directly as TRL's fused head does, MoELoraModel), and not during backward either.
ENTRY_POINTS = ["causal_lm", "backbone", "moe_lora_model"]


def _entry_forward(model: torch.nn.Module, entry: str, tokens: torch.Tensor) -> torch.Tensor:
    if entry == "causal_lm":
        return model(tokens, labels=tokens).loss
    if entry == "backbone":
        return model.base_model(tokens).last_hidden_state.square().mean()
    return model(tokens).last_hidden_state.square().mean()


def _model_for(entry: str, router: str) -> torch.nn.Module:
    model = _model(router)
    if entry != "moe_lora_model":
        return model
    bare = MoELoraModel(model.config)
    bare.load_state_dict(model.state_dict(), strict=False)
    bare.train().activation_checkpointing_enable()
    return bare


def _watch_router_tensors(model: torch.nn.Module, phase: dict) -> list:
    """(phase, layer, weakref) of every [T, d_out] tensor a router returns."""
    seen: list = []

    def hook(router: torch.nn.Module, args: tuple, out: Any) -> None:
        for tensor in (out.output, out.residual):
            if tensor is not None:
                seen.append((phase["now"], router.site.layer, weakref.ref(tensor)))

    for module in model.modules():
        if isinstance(module, Router):
            module.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("router", ["hypermoe", "graphmoe"])
def test_router_outputs_are_released_when_the_forward_returns(router: str, entry: str) -> None:
    model = _model_for(entry, router)
    phase = {"now": "forward"}
    seen = _watch_router_tensors(model, phase)
    loss = _entry_forward(model, entry, ids(seed=8))
    gc.collect()
    assert seen
    alive = [ref for _, _, ref in seen if ref() is not None]
    assert not alive, f"{len(alive)} of {len(seen)} router outputs outlive the forward"
    del loss


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_recomputed_router_outputs_are_released_layer_by_layer(entry: str) -> None:
    """During backward each checkpointed layer is recomputed, last first: by the time a layer
    recomputes, what the later layers' recomputation routed is gone."""
    model = _model_for(entry, "hypermoe")
    phase = {"now": "forward"}
    seen = _watch_router_tensors(model, phase)
    kept_at_recompute: list[int] = []

    def check(router: torch.nn.Module, args: tuple) -> None:
        if phase["now"] == "backward":
            layer = router.site.layer
            kept_at_recompute.append(sum(1 for p, lay, ref in seen if p == "backward"
                                         and lay > layer and ref() is not None))

    for module in model.modules():
        if isinstance(module, Router):
            module.register_forward_pre_hook(check)
    loss = _entry_forward(model, entry, ids(seed=8))
    phase["now"] = "backward"
    loss.backward()
    assert any(p == "backward" for p, _, _ in seen)  # the layers were recomputed
    assert kept_at_recompute and max(kept_at_recompute) == 0, kept_at_recompute


def test_the_gradient_comparison_rejects_a_gradient_where_none_is_expected() -> None:
    model = _model("rmoe")
    want = _grads(model, _loss(model, ids(seed=3)))
    got = {name: grad.clone() for name, grad in want.items()}
    _assert_same(got, want)
    name = next(n for n in want if ".lora_A" in n)
    want[name] = torch.zeros(want[name].shape)
    got[name] = torch.zeros(want[name].shape)
    got[name][(0,) * got[name].dim()] = 1e-3  # spurious: the expected gradient is exactly 0
    with pytest.raises(AssertionError, match=re.escape(name)):
        _assert_same(got, want)
