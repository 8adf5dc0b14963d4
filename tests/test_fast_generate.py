"""The decode path and the packed shrink weight it reads (A and the router weight in one derived
tensor): equal to the generic path in float64 for every router, rebuilt from the parameters,
checkpoints unchanged, static-cache and compiled generate equal to eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_dense
from safetensors import safe_open
from test_routers import CASES, ROUTER_CONFIGS, build, ids, perturb, rel_err
from transformers import AutoModelForCausalLM

from moe_hub.convert import convert
from moe_hub.modeling import moe_lora_fused
from moe_hub.modeling.moe_lora_layer import MoELoraLinear


def _sites(model: torch.nn.Module) -> list[MoELoraLinear]:
    return [m for m in model.modules() if type(m).__name__ == "MoELoraLinear"]


def _count_packed_calls(model: torch.nn.Module) -> list[int]:
    """Counts, per model, the site calls that took the packed path (instance-level wrap)."""
    calls = [0]
    for site in _sites(model):
        inner = site._decode_forward

        def counted(*args, _inner=inner, **kwargs):
            calls[0] += 1
            return _inner(*args, **kwargs)

        site._decode_forward = counted
    return calls


def _assert_packed(site: MoELoraLinear) -> None:
    """The decode path's S is [A_0^T; ...; A_{E-1}^T] of the current A, in a storage of its
    own; the parameters stay contiguous, each in its own storage."""
    experts, d_in, rank = site.lora_A.shape
    packed = site._packed._entry[2]
    assert packed.shape == (experts * rank, d_in)
    for e in range(experts):
        assert torch.equal(packed[e * rank:(e + 1) * rank], site.lora_A[e].t())
    for param in (site.lora_A, site.lora_B, *site.router.parameters()):
        # Dense and alone: fused optimizers update a parameter as one run of memory.
        assert param.is_contiguous()
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size()
        assert param.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()


@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_decode_path_equals_generic_path_float64(router: str, granularity: str) -> None:
    """Without autograd, linear sites take the packed path and blocks the masked-dense slot
    form: the logits equal the training path's (autograd on: grouped / generic op)."""
    model = perturb(build(router, granularity)).double().eval()
    tokens = ids(3, 9, seed=21)
    reference = model(tokens).logits  # autograd on: the generic path
    calls = _count_packed_calls(model)
    with torch.no_grad():
        fast = model(tokens).logits
    if granularity == "block":
        # Blocks: both forms compute in float64 end to end (the router's float32 logits are the
        # same in both): float64 round-off only, but for HyperMoE's float32 module (below).
        assert rel_err(fast, reference) < (1e-6 if router in ("hypermoe", "rmoe-hyper")
                                           else 1e-12)
        return
    assert calls[0] == len(_sites(model))  # every site took the packed path
    for site in _sites(model):
        _assert_packed(site)
    # Both paths route with the router's own float32 logits of the same x: float64 round-off
    # only. HyperMoE's generated module is applied in float32 (router math), where the same
    # inputs give results that differ in the last float32 bits with and without autograd
    # (test_one_token_decode_reads_only_the_chosen_experts_float64): float32 round-off there.
    float32_part = router in ("hypermoe", "rmoe-hyper")
    assert rel_err(fast, reference) < (1e-6 if float32_part else 1e-12)


def test_packed_path_rounds_router_weights_like_the_router() -> None:
    """The routing decision of the packed path is the router's: same experts, weights equal to
    float32 precision, on tokens of a model whose router is large enough to matter."""
    model = build("topk", "linear")
    for site in _sites(model):
        with torch.no_grad():
            site.router.weight.normal_(0, 1.0)
    model = perturb(model).eval()
    tokens = ids(2, 11, seed=4)
    reference = model(tokens, output_router_logits=True)
    with torch.no_grad():
        fast = model(tokens, output_router_logits=True)
    for ref_logits, fast_logits in zip(reference.router_logits, fast.router_logits):
        assert rel_err(fast_logits, ref_logits) < 1e-6
        assert torch.equal(fast_logits.topk(2).indices, ref_logits.topk(2).indices)
    assert rel_err(fast.logits, reference.logits) < 1e-5


def test_16bit_packed_path_matches_float64() -> None:
    model = perturb(build("topk", "linear")).eval()
    reference = model.double()(ids(2, 9, seed=5)).logits
    model = model.to(torch.bfloat16)  # routers stay float32: S holds the bf16 A alone
    with torch.no_grad():
        fast = model(ids(2, 9, seed=5)).logits
    for site in _sites(model):
        _assert_packed(site)
    # bf16 weights and activations through 2 layers: a few bf16 epsilons (2^-8) of the logits.
    assert rel_err(fast, reference) < 0.05


def test_training_step_reaches_the_packed_weight() -> None:
    """The optimizer steps A and W in place: the packed tensor (what the decode path reads) is
    rebuilt from them, and the generic and packed paths still agree after the step."""
    model = perturb(build("topk", "linear", lora_dropout=0.0)).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tokens = ids(2, 9, seed=6)
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    model.eval()
    reference = model.double()(tokens).logits
    with torch.no_grad():
        fast = model(tokens).logits
    for site in _sites(model):
        _assert_packed(site)
    assert rel_err(fast, reference) < 1e-6


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
@pytest.mark.parametrize("batch", [1, 2])
def test_static_cache_generate_equals_uncached(router: str, batch: int) -> None:
    """Batch 1 decodes through the gathered form (2 pairs < 4 experts), batch 2 through the
    packed matmul (4 pairs)."""
    model = perturb(build(router, "linear")).eval()
    prompt = ids(batch, 7, seed=12)
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        uncached = model.generate(prompt, attention_mask=mask, max_new_tokens=5,
                                  do_sample=False, use_cache=False)
        dynamic = model.generate(prompt, attention_mask=mask, max_new_tokens=5,
                                 do_sample=False)
        static = model.generate(prompt, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                cache_implementation="static")
    assert dynamic.tolist() == uncached.tolist()
    assert static.tolist() == uncached.tolist()


def test_checkpoint_in_todays_layout_loads_packed_and_saves_it(tmp_path: Path) -> None:
    """Tensor names and shapes are unchanged (lora_A [E, d_in, r], router.weight [E, d_in]): a
    checkpoint written before packing loads, is packed, and is written back the same way."""
    dense = save_tiny_dense(tmp_path / "dense")
    checkpoint = convert(dense, tmp_path / "moe", router="topk", progress=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    sites = _sites(model)
    perturb(model)
    tokens = ids(2, 8, seed=7)
    reference = model(tokens).logits
    with torch.no_grad():
        fast = model(tokens).logits
    for site in sites:
        _assert_packed(site)
    assert rel_err(fast, reference) < 1e-5
    model.save_pretrained(tmp_path / "saved")
    adapters = {}
    for shard in (tmp_path / "saved").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            adapters.update({k: f.get_tensor(k) for k in f.keys() if "lora_A" in k
                             or "router.weight" in k})
    names = dict(model.named_parameters())
    assert len(adapters) == 2 * len(sites)
    for name, tensor in adapters.items():
        assert torch.equal(tensor, names[name].detach())  # [E, d_in, r] and [E, d_in] as before
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, fast)


@pytest.mark.parametrize(("router", "granularity", "backend"),
                         [(r, g, "eager") for r, g in CASES]
                         + [("topk", "linear", "inductor"), ("rmoe", "block", "inductor")])
def test_compiled_static_cache_generate_equals_eager(router: str, granularity: str,
                                                     backend: str) -> None:
    """Decode steps compiled whole (fullgraph: any graph break raises) through transformers'
    own compile path, equal tokens to eager. One decoder layer keeps the trace short; the
    eager backend checks the trace for every router, inductor (what generate() uses) also
    generates and runs the code for two of them."""
    from transformers import CompileConfig
    from transformers import LlamaConfig as Config

    from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM

    name, router_config = ROUTER_CONFIGS[router]
    text = Config(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    model = perturb(MoELoraForCausalLM(MoELoraConfig(
        text_config=text.to_dict(), router=name, router_config=router_config, num_experts=4,
        num_experts_per_tok=2, lora_rank=4, lora_alpha=8, lora_dropout=0.0,
        routing_granularity=granularity))).eval()
    prompt = ids(2, 7, seed=13)
    mask = torch.ones_like(prompt)
    compile_config = CompileConfig(fullgraph=True, backend=backend)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        eager = model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
        compiled = model.generate(prompt, attention_mask=mask, max_new_tokens=4,
                                  do_sample=False, cache_implementation="static",
                                  compile_config=compile_config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert compiled.tolist() == eager.tolist()


@pytest.mark.parametrize(("rows", "per_slot", "weighted"),
                         [("token", True, False), ("slot", False, True), ("slot", True, True),
                          ("token", False, True)])
def test_masked_dense_slot_form_equals_grouped_float64(rows: str, per_slot: bool,
                                                       weighted: bool) -> None:
    """The block's decoding form against the grouped form it replaces, on random A, B, x and
    routing (every expert chosen by some slot, some by none at all in the second half)."""
    from moe_hub.kernels.moe_lora_triton import group_by_expert
    from moe_hub.modeling.moe_lora_ops import grouped_slots_delta, masked_dense_slots_delta

    g = torch.Generator().manual_seed(31)
    tokens, top_k, experts, d_in, rank, d_out = 7, 2, 5, 12, 3, 10
    lora_A = torch.randn(experts, d_in, rank, generator=g, dtype=torch.float64)
    lora_B = torch.randn(experts, rank, d_out, generator=g, dtype=torch.float64)
    x = torch.randn(tokens * (top_k if rows == "slot" else 1), d_in, generator=g,
                    dtype=torch.float64)
    indices = torch.stack([torch.randperm(experts - 2, generator=g)[:top_k]
                           for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g, dtype=torch.float64) if weighted else None
    with torch.no_grad():
        reference = grouped_slots_delta(x, lora_A, lora_B, group_by_expert(indices, experts),
                                        weights, top_k, 0.5, rows=rows, per_slot=per_slot)
        dense = masked_dense_slots_delta(x, lora_A, lora_B, indices, weights, 0.5, rows=rows,
                                         per_slot=per_slot)
    assert dense.shape == reference.shape
    assert rel_err(dense, reference) < 1e-12


@pytest.mark.parametrize("router", list(ROUTER_CONFIGS))
def test_one_token_decode_reads_only_the_chosen_experts_float64(
        router: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One token, top-2 of 4 experts: every site takes the gathered form (router first, then the
    chosen experts' A and B only) and gives the training path's logits."""
    from moe_hub.modeling import moe_lora_layer

    model = perturb(build(router, "linear")).double().eval()
    token = ids(1, 1, seed=22)
    reference = model(token).logits
    gathered = []

    def counted(*args, **kwargs):
        gathered.append(args[4].shape)  # indices [T, k]
        return moe_lora_fused.gathered_expand(*args, **kwargs)

    monkeypatch.setattr(moe_lora_layer, "gathered_expand", counted)
    with torch.no_grad():
        fast = model(token).logits
    assert gathered == [torch.Size([1, 2])] * len(_sites(model))
    # topk: the router columns are read in float32 like the router reads its weight, so the
    # routing is the router's. HyperMoE's generated module is applied in float32 (router
    # math), where the same one-token inputs give results that differ in the last float32 bits
    # with and without autograd (measured 2e-7): float32 round-off there, float64 elsewhere.
    float32_part = router in ("topk", "hypermoe", "rmoe-hyper")
    assert rel_err(fast, reference) < (1e-6 if float32_part else 1e-12)


def test_gathered_form_equals_masked_dense_float64() -> None:
    """The gathered form against the packed form on random operands: several tokens, repeated
    and distinct experts, with and without a result to add into."""
    g = torch.Generator().manual_seed(41)
    tokens, top_k, experts, d_in, rank, d_out = 3, 2, 6, 10, 4, 7
    lora_A = torch.randn(experts, d_in, rank, generator=g, dtype=torch.float64)
    lora_B = torch.randn(experts, rank, d_out, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64)
    indices = torch.tensor([[0, 5], [5, 0], [2, 3]])
    weights = torch.rand(tokens, top_k, generator=g, dtype=torch.float64)
    base = torch.randn(tokens, d_out, generator=g, dtype=torch.float64)
    shrunk = x @ lora_A.permute(1, 0, 2).reshape(d_in, experts * rank)
    want = moe_lora_fused.gated_expand(base.clone(), shrunk, lora_B, indices, weights, 0.5)
    got = moe_lora_fused.gathered_expand(base.clone(), x, lora_A, lora_B, indices, weights, 0.5)
    assert rel_err(got, want) < 1e-12
    alone = moe_lora_fused.gathered_expand(None, x, lora_A, lora_B, indices, weights, 0.5)
    assert rel_err(alone, want - base) < 1e-12


def test_fused_adamw_steps_the_parameters_like_separate_copies() -> None:
    """transformers' default optimizer (fused AdamW) updates each parameter as one flat run of
    memory, which is right only for dense parameters, and without bumping their version
    counters: two steps, with decode forwards in between, equal two steps on fresh copies of
    the parameters, for A (--train experts), the router (--train routers) and both, and the
    decode path reads the stepped values."""
    for trained in (("lora_A",), ("router.weight",), ("lora_A", "router.weight", "lora_B")):
        stepped = perturb(build("topk", "linear")).train()
        plain = perturb(build("topk", "linear")).train()
        for site in _sites(plain):  # separate tensors, same values
            for param in (site.lora_A, site.lora_B, site.router.weight):
                param.data = param.data.clone()
        for model in (stepped, plain):
            for name, param in model.named_parameters():
                param.requires_grad_(name.endswith(trained))
        optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05,
                                        fused=True) for m in (stepped, plain)]
        tokens = ids(2, 9, seed=8)
        for _ in range(2):
            with torch.no_grad():
                stepped(tokens)  # builds S: the steps must neither write into it nor miss it
            for model, optimizer in zip((stepped, plain), optimizers, strict=True):
                model(tokens, labels=tokens).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        want = dict(plain.named_parameters())
        for name, param in stepped.named_parameters():
            assert torch.equal(param, want[name]), (trained, name)
        reference = stepped(tokens).logits
        with torch.no_grad():
            fast = stepped(tokens).logits
        for site in _sites(stepped):
            _assert_packed(site)
        assert rel_err(fast, reference) < 1e-6


def test_a_sharded_placeholder_is_left_alone() -> None:
    """DeepSpeed ZeRO-3 and FSDP swap a parameter's data for an empty placeholder between uses:
    train()/eval() must not fail on it, and the gathered parameter decodes from its own
    values."""
    model = perturb(build("topk", "linear")).eval()
    tokens = ids(2, 5, seed=9)
    with torch.no_grad():
        model(tokens)
    site = _sites(model)[0]
    full = site.lora_A.data
    site.lora_A.data = torch.empty(0)
    model.train()
    model.eval()
    site.lora_A.data = full.clone()  # gathered back, into new memory
    calls = _count_packed_calls(model)
    reference = model(tokens).logits
    with torch.no_grad():
        fast = model(tokens).logits
    assert calls[0] == len(_sites(model))
    _assert_packed(site)
    assert rel_err(fast, reference) < 1e-6


@pytest.mark.parametrize(("router", "granularity"), CASES)
def test_generate_calls_every_router_through_its_module(router: str, granularity: str) -> None:
    """Forward hooks on the routers (accelerate's among them) see every routing decision of
    generate(), in both decode forms, as many per forward as with autograd."""
    from moe_hub.modeling.routing import Router

    model = perturb(build(router, granularity)).eval()
    routers = [m for m in model.modules() if isinstance(m, Router)]
    calls, forwards = [0], [0]

    def count(counter: list[int]):
        def hook(module, args, output) -> None:
            counter[0] += 1
        return hook

    for module in routers:
        module.register_forward_hook(count(calls))
    model.register_forward_hook(count(forwards))
    model(ids(1, 5, seed=23))  # autograd on: the generic path
    per_forward = calls[0]
    assert per_forward >= len(routers)
    for batch in (1, 2):  # the gathered form, then the packed matmul
        prompt = ids(batch, 5, seed=24)
        calls[0] = forwards[0] = 0
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                           min_new_tokens=4, do_sample=False)
        assert forwards[0] == 4
        assert calls[0] == per_forward * forwards[0], (batch, calls[0], forwards[0])
