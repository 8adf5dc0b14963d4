"""vLLM's Transformers-backend contract, checked on CPU for every router.

vLLM runs a remote-code model through transformers when its base model class sets
``_supports_attention_backend``, passes ``**kwargs`` down to attention, calls attention through
``ALL_ATTENTION_FUNCTIONS`` (vLLM registers its paged attention under a name of its own) and
gets each batch as one flattened row of tokens with restarting ``position_ids`` and no padding.
(a) an attention function registered with ``AttentionInterface`` and chosen by
``attn_implementation`` runs at every layer, receives the caller's keyword arguments and gives
sdpa's logits; (b) sequences packed into one row compute, token for token, what they compute
alone. Without a 2-D mask and without a cache, transformers (5.x) derives the block-diagonal
mask from the restarting ``position_ids`` (``find_packed_sequence_indices``); the routers must
then keep their per-token state per token (RMoE's GRU across depth, HyperMoE's embedding of the
unselected experts, GraphMoE's refinement steps), never across the row.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_dense
from transformers import AttentionInterface, AutoModel, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from moe_hub.convert import convert

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTERS = ["topk", "rmoe", "hypermoe", "graphmoe"]
CALLS: list[tuple[int, dict]] = []


def counting_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, recording which layer called it and with which keyword arguments."""
    CALLS.append((module.layer_idx, dict(kwargs)))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def varlen_attention(module, query, key, value, attention_mask, *, cu_seq_lens_q,
                     cu_seq_lens_k, scaling=None, **kwargs):
    """Flash-attention's packed form on CPU: causal sdpa within each segment that
    ``cu_seq_lens`` delimits, the mask ignored (as vLLM's own attention does)."""
    assert torch.equal(cu_seq_lens_q, cu_seq_lens_k) and query.shape[0] == 1
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    bounds = cu_seq_lens_q.tolist()
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
        for a, b in pairwise(bounds)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register("moe_hub_counting", counting_attention)
AttentionInterface.register("moe_hub_varlen", varlen_attention)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "head_b" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every router at both granularities, experts perturbed, saved as a checkpoint."""
    from moe_hub.checkpoint import copy_code
    from moe_hub.modeling import MoELoraForCausalLM

    root = tmp_path_factory.mktemp("backend")
    dense = save_tiny_dense(root / "dense")
    out = {}
    for router in ROUTERS:
        for granularity in ("linear", "block"):
            ckpt = convert(dense, root / f"{router}-{granularity}", router=router, experts=4,
                           top_k=2, rank=4, dropout=0.0, granularity=granularity,
                           adapter_only=True, progress=False)
            tuned = root / f"tuned-{router}-{granularity}"
            perturb(MoELoraForCausalLM.from_pretrained(ckpt)).save_pretrained(tuned)
            copy_code(tuned)  # loaded below as remote code, as vLLM loads it
            out[router, granularity] = tuned
    return out


def load(path: Path, auto: type = AutoModelForCausalLM, **kwargs):
    return auto.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                                **kwargs).eval()


@pytest.mark.parametrize("router", ROUTERS)
def test_registered_attention_runs_at_every_layer(checkpoints: dict, router: str) -> None:
    path = checkpoints[router, "block"]
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    sdpa = load(path, attn_implementation="sdpa")
    with torch.no_grad():
        want = sdpa(ids).logits
    layers = sdpa.config.text_config.num_hidden_layers
    for auto in (AutoModelForCausalLM, AutoModel):  # vLLM builds the base model (AutoModel)
        model = load(path, auto, attn_implementation="moe_hub_counting")
        assert type(model)._supports_attention_backend is True
        CALLS.clear()
        with torch.no_grad():
            out = model(ids, backend_marker="from vllm")
        assert [layer for layer, _ in CALLS] == list(range(layers))
        assert all(kwargs.get("backend_marker") == "from vllm" for _, kwargs in CALLS)
        if auto is AutoModelForCausalLM:
            assert torch.equal(out.logits, want)


@pytest.mark.parametrize("granularity", ["linear", "block"])
@pytest.mark.parametrize("router", ROUTERS)
def test_packed_row_equals_separate_sequences(checkpoints: dict, router: str,
                                              granularity: str) -> None:
    model = load(checkpoints[router, granularity])
    generator = torch.Generator().manual_seed(4)
    sequences = [torch.randint(3, 256, (n,), generator=generator) for n in (5, 8, 3)]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    with torch.no_grad():
        alone = torch.cat([model(s[None]).logits[0] for s in sequences])
        packed = model(torch.cat(sequences)[None], position_ids=positions,
                       use_cache=False).logits[0]
        # Without restarting positions the row is one long sequence: the test can fail.
        joined = model(torch.cat(sequences)[None], use_cache=False).logits[0]
    scale = alone.abs().max()
    # float32, same ops on differently shaped batches: a few ulps of the logits' scale.
    assert (packed - alone).abs().max() <= 1e-5 * scale
    assert (joined - alone).abs().max() > 1e-2 * scale


@pytest.mark.parametrize("router", ROUTERS)
def test_flash_style_packed_kwargs_reach_attention(checkpoints: dict, router: str) -> None:
    """vLLM's flattened batch with flash-attention's ``cu_seq_lens`` keyword arguments (which
    transformers' flash path takes instead of a mask): the model passes them down to the
    attention function, and each sequence gets the logits it gets alone."""
    path = checkpoints[router, "block"]
    alone_model = load(path)
    packed_model = load(path, attn_implementation="moe_hub_varlen")
    generator = torch.Generator().manual_seed(6)
    sequences = [torch.randint(3, 256, (n,), generator=generator) for n in (4, 9, 6)]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    bounds = torch.tensor([0, 4, 13, 19], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([alone_model(s[None]).logits[0] for s in sequences])
        packed = packed_model(torch.cat(sequences)[None], position_ids=positions,
                              cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=9,
                              max_length_k=9, use_cache=False).logits[0]
    assert (packed - alone).abs().max() <= 1e-5 * alone.abs().max()
