"""The decode path's packed weight is derived state: ``lora_A``, ``lora_B`` and ``router.weight``
are ordinary parameters (contiguous, each in its own storage, live in ``state_dict()``), routers
stay float32 through ``.half()``/``.to()``, and whatever changes the parameters (in place, by
replacement, by copy) is what the next decode step computes with."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_routers import CASES, build, ids, perturb, rel_err

from moe_hub.modeling.moe_lora_layer import MoELoraLinear

ADAPTERS = ("lora_A", "lora_B", "router.weight")


def _sites(model: torch.nn.Module) -> list[MoELoraLinear]:
    return [m for m in model.modules() if isinstance(m, MoELoraLinear)]


def _decode_equals_generic(model: torch.nn.Module, tokens: torch.Tensor,
                           bound: float = 1e-6) -> None:
    """The no-autograd (decode) logits against the autograd path's, which reads the parameters
    directly. float32: the packed matmul rounds the router logits once, the router rounds x W^T
    once, so the routing weights agree to float32 precision, which bounds the logits."""
    reference = model(tokens).logits
    with torch.no_grad():
        fast = model(tokens).logits
    assert rel_err(fast, reference) < bound


def test_adapter_parameters_are_contiguous_and_own_their_storage() -> None:
    model = perturb(build("topk", "linear")).eval()
    with torch.no_grad():
        model(ids(2, 9))  # the decode path ran, its packed weight exists
    for site in _sites(model):
        for name in ADAPTERS:
            param = site.get_parameter(name)
            assert param.is_contiguous(), name
            assert param.untyped_storage().nbytes() == param.numel() * param.element_size()


def test_state_dict_holds_the_live_parameters() -> None:
    """As for any nn.Module: the tensors share the parameters' memory, and an in-place edit of
    ``model.state_dict()[name]`` reaches the model, the decode path included."""
    model = perturb(build("topk", "linear")).eval()
    tokens = ids(2, 9, seed=5)
    with torch.no_grad():
        before = model(tokens).logits
    state = model.state_dict()
    for site_name, site in ((n, m) for n, m in model.named_modules()
                            if isinstance(m, MoELoraLinear)):
        for name in ADAPTERS:
            assert state[f"{site_name}.{name}"].data_ptr() == site.get_parameter(name).data_ptr()
    first = next(n for n, m in model.named_modules() if isinstance(m, MoELoraLinear))
    with torch.no_grad():
        state[f"{first}.lora_A"].mul_(3.0)
        state[f"{first}.router.weight"].normal_(0.0, 1.0)
    assert torch.equal(_sites(model)[0].lora_A, state[f"{first}.lora_A"])
    _decode_equals_generic(model, tokens)
    with torch.no_grad():
        assert not torch.equal(model(tokens).logits, before)


def test_deepcopy_compiles_and_equals_eager() -> None:
    """A deep copy has the parameters' layout in storages of its own: compiling it (no autograd,
    the decode path) must not take them for something they are not."""
    model = perturb(build("topk", "linear")).eval()
    tokens = ids(2, 9, seed=6)
    with torch.no_grad():
        model(tokens)  # the original's packed weight exists and is copied along
        twin = copy.deepcopy(model)
        want = model(tokens).logits
        torch._dynamo.reset()
        got = torch.compile(twin, backend="eager")(tokens).logits
    assert rel_err(got, want) < 1e-6
    assert all(s.lora_A.data_ptr() != t.lora_A.data_ptr()
               for s, t in zip(_sites(model), _sites(twin), strict=True))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float16-to"])
def test_routers_stay_float32_through_16bit_casts(cast: str) -> None:
    """Routers (and the shared router modules) compute in float32 and are stored so; the experts
    and the base follow the cast."""
    for router, granularity in CASES:
        model = perturb(build(router, granularity)).eval()
        model = {"half": lambda m: m.half(), "bfloat16": lambda m: m.to(torch.bfloat16),
                 "float16-to": lambda m: m.to(dtype=torch.float16)}[cast](model)
        want = torch.bfloat16 if cast == "bfloat16" else torch.float16
        for name, param in model.named_parameters():
            routing = ".router." in name or name.startswith("moe_shared.")
            assert param.dtype == (torch.float32 if routing else want), (router, name)
        if cast == "bfloat16":  # runs, the decode path included (CPU has no fp16 matmuls)
            tokens = ids(2, 9, seed=7)
            with torch.no_grad():
                model(tokens)
                model(tokens[:1, :1])


def _cast_like_deepspeed(model: torch.nn.Module) -> torch.nn.Module:
    """What DeepSpeed's bf16 mode does before ZeRO builds its optimizer: every parameter cast
    past ``Module._apply``, then the model moved."""
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model.to("cpu")


def _routing(name: str) -> bool:
    return ".router." in name or name.startswith("moe_shared.")


def test_routers_keep_a_16bit_dtype_set_directly_through_a_move() -> None:
    """DeepSpeed's cast leaves one dtype for ZeRO-3 (which trains one): the routers follow it
    through the move instead of coming back float32 among bfloat16 experts; a cast of the model
    still puts them back in float32."""
    for router, granularity in (("rmoe-hyper", "linear"), ("graphmoe", "block")):
        model = _cast_like_deepspeed(build(router, granularity))
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, router
        model.half()
        for name, param in model.named_parameters():
            assert param.dtype == (torch.float32 if _routing(name) else torch.float16), name


def test_keep_adapters_float32_in_deepspeed_undoes_its_cast_once() -> None:
    model = build("rmoe-hyper", "linear")
    adapters = set(model.adapter_parameter_names())
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapters)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert model.keep_adapters_float32_in_deepspeed() == len(adapters)
    _cast_like_deepspeed(model)
    for name, param in model.named_parameters():
        if name in adapters:  # their own float32 values, not a rounding of them
            assert param.dtype == torch.float32 and torch.equal(param, want[name]), name
        else:
            assert param.dtype == torch.bfloat16, name
    _cast_like_deepspeed(model)  # undone once: the next cast stays
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    # A cast of the model in between is the caller's: nothing comes back afterwards.
    model = build("topk", "linear")
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapters)
    model.keep_adapters_float32_in_deepspeed()
    model.to(torch.bfloat16)
    _cast_like_deepspeed(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_keep_adapters_float32_in_deepspeed_refuses_what_zero3_cannot_train() -> None:
    model = build("topk", "linear")  # the base trains too: ZeRO-3 trains one dtype
    with pytest.raises(ValueError, match=r"trains too.*set_trainable"):
        model.keep_adapters_float32_in_deepspeed()
    model.set_trainable("adapters")
    first = model.get_parameter(model.adapter_parameter_names()[0])
    first.data = first.data.bfloat16()
    with pytest.raises(ValueError, match=r"not float32.*prepare_for_training"):
        model.keep_adapters_float32_in_deepspeed()


def test_decode_follows_in_place_optimizer_steps_without_eval() -> None:
    """No train()/eval() between the steps and the no-grad forwards: the decode path reads what
    the optimizers wrote (SGD, foreach AdamW, fused AdamW)."""
    model = perturb(build("topk", "linear")).train()  # dropout 0: no-grad forwards decode
    tokens = ids(2, 9, seed=8)
    for optimizer_cls, options in ((torch.optim.SGD, {}), (torch.optim.AdamW, {"foreach": True}),
                                   (torch.optim.AdamW, {"fused": True})):
        params = [p for n, p in model.named_parameters() if n.endswith(ADAPTERS)]
        optimizer = optimizer_cls(params, lr=0.05, **options)
        with torch.no_grad():
            model(tokens)  # builds the packed weight from the current values
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _decode_equals_generic(model, tokens)


def test_decode_follows_replaced_parameter_data() -> None:
    """``param.data = ...`` (what loaders and sharding wrappers do) and ``load_state_dict``."""
    model = perturb(build("topk", "linear")).eval()
    tokens = ids(2, 9, seed=9)
    other = perturb(build("topk", "linear", seed=3), seed=4)
    with torch.no_grad():
        model(tokens)
    for mine, theirs in zip(_sites(model), _sites(other), strict=True):
        mine.lora_A.data = theirs.lora_A.data.clone()
    _decode_equals_generic(model, tokens)
    with torch.no_grad():
        model(tokens)
    model.load_state_dict(other.state_dict())
    _decode_equals_generic(model, tokens)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, other.eval()(tokens).logits)


def test_fully_shard_accepts_the_sites_and_trains(tmp_path: Path) -> None:
    """FSDP2 refuses non-contiguous parameters; a one-process gloo group shards every site and
    the model, and a training forward/backward gives the unsharded model's gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    reference = perturb(build("topk", "linear")).train()
    tokens = ids(2, 9, seed=10)
    reference(tokens, labels=tokens).loss.backward()
    want = {n: p.grad.clone() for n, p in reference.named_parameters() if n.endswith(ADAPTERS)}
    with torch.no_grad():
        want_eval = reference.eval()(tokens).logits

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = perturb(build("topk", "linear")).train()
        for site in _sites(model):
            fully_shard(site, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(tokens, labels=tokens).loss.backward()
        got = {n: p.grad for n, p in model.named_parameters() if n.endswith(ADAPTERS)}
        assert set(got) == set(want) and len(want) == 3 * len(_sites(model))
        for name, grad in got.items():
            assert grad is not None, name
            assert rel_err(grad.full_tensor(), want[name]) < 1e-5, name
        model.eval()
        with torch.no_grad():
            for _ in range(2):  # the second forward after FSDP freed and re-gathered A
                assert rel_err(model(tokens).logits, want_eval) < 1e-6
    finally:
        dist.destroy_process_group()
