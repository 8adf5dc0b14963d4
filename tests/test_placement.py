"""Every router and granularity under accelerate's ``device_map`` with CPU and disk offload.

On a CPU-only machine accelerate executes everything on the CPU; a module mapped to "disk" keeps
its weights on the meta device and an AlignDevicesHook loads them from the offload folder only
while that module is being called. Reading a parameter of such a module outside its own call
(the shared GRU or hypernetwork read through raw parameters, a ParameterDict indexed directly), or
handing a module to another module's call (the hook moves every argument that has ``.to``),
crashes. The offloaded model must give the in-memory model's logits and greedy generations
exactly: the same float32 operations run on the same values, only loaded at another time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import compute_module_sizes
from conftest import save_tiny_dense
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moe_hub.convert import convert
from moe_hub.modeling import MoELoraForCausalLM
from moe_hub.modeling.moe_lora_layer import MoELoraLinear
from moe_hub.modeling.router_rmoe import Float32GRUCell
from moe_hub.modeling.routing import ROUTERS, RouterOutput, RoutingContext

ROUTER_OPTIONS = {"rmoe": {"hidden_size": 16, "hyper": True, "embed_dim": 16},
                  "hypermoe": {"embed_dim": 16}, "graphmoe": {"steps": 2, "message_size": 8}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return save_tiny_dense(tmp_path_factory.mktemp("dense") / "llama")


def trained_checkpoint(dense: Path, out: Path, router: str, granularity: str) -> Path:
    """A converted checkpoint whose experts and generated modules are non-zero (B = 0 at
    conversion would make the experts invisible in the output)."""
    ckpt = convert(dense, out, router=router, granularity=granularity, experts=4, rank=4,
                   dropout=0.0, router_config=ROUTER_OPTIONS.get(router, {}), progress=False)
    generator = torch.Generator().manual_seed(5)
    for path in ckpt.glob("*.safetensors"):
        tensors = load_file(path)
        for name, value in tensors.items():
            if name.endswith("lora_B") or ".lora_B." in name or "head_b_" in name:
                tensors[name] = 0.3 * torch.randn(value.shape, generator=generator)
        save_file(tensors, path, metadata={"format": "pt"})
    return ckpt


def decoder_layers(model) -> list[str]:
    """Names of the decoder layers (the dense backbone's no-split blocks), in depth order."""
    kinds = set(model.get_decoder()._no_split_modules)
    return [name for name, module in model.named_modules() if type(module).__name__ in kinds]


def offload_map(model) -> dict[str, str]:
    """The last decoder layer and the shared routing modules on disk, the rest on the CPU."""
    on_disk = [decoder_layers(model)[-1], *(["moe_shared"] if len(model.moe_shared) else [])]
    device_map = dict.fromkeys(on_disk, "disk")
    for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if not any(name.startswith(prefix + ".") for prefix in on_disk):
            device_map[name.rpartition(".")[0]] = "cpu"
    return device_map


def assert_offloaded(model, name: str) -> None:
    module = model.get_submodule(name)
    params = list(module.parameters())
    assert params and all(p.device.type == "meta" for p in params), name
    hooks = [m._hf_hook for m in module.modules() if hasattr(m, "_hf_hook")]
    assert any(getattr(hook, "offload", False) for hook in hooks), name


def assert_same_outputs(reference, placed) -> None:
    ids = torch.randint(4, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the padding mask travels too
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, output_router_logits=True)
        got = placed(ids, attention_mask=mask, output_router_logits=True)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.aux_loss, want.aux_loss)
    assert torch.equal(got.expert_counts, want.expert_counts)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(placed.generate(ids, attention_mask=mask, **kwargs),
                       reference.generate(ids, attention_mask=mask, **kwargs))


@pytest.mark.parametrize("granularity", ["linear", "block"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_disk_offloaded_layers_and_shared_modules_give_the_in_memory_outputs(
        tmp_path, dense, router, granularity):
    ckpt = trained_checkpoint(dense, tmp_path / "ckpt", router, granularity)
    reference = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    device_map = offload_map(reference)
    placed = AutoModelForCausalLM.from_pretrained(
        ckpt, trust_remote_code=True, device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert_offloaded(placed, decoder_layers(placed)[-1])
    if len(placed.moe_shared):
        assert_offloaded(placed, "moe_shared")
    assert_same_outputs(reference, placed)


def test_gpt2_block_with_biased_conv1d_mlp_offloaded_gives_the_in_memory_outputs(tmp_path):
    """GPT-2's MLP is Conv1D with biases: the block's bias correction must not read the down
    projection's bias outside that module's call (offloaded, it is a meta tensor there)."""
    dense = save_tiny_dense(tmp_path / "gpt2", arch="gpt2")
    ckpt = trained_checkpoint(dense, tmp_path / "ckpt", "topk", "block")
    reference = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    placed = AutoModelForCausalLM.from_pretrained(
        ckpt, trust_remote_code=True, device_map=offload_map(reference),
        offload_folder=str(tmp_path / "off"))
    assert_offloaded(placed, decoder_layers(placed)[-1])
    assert_same_outputs(reference, placed)


@pytest.mark.parametrize("router, granularity", [("rmoe", "linear"), ("hypermoe", "block")])
def test_bf16_model_with_disk_offload_keeps_float32_routers_and_matches(
        tmp_path, dense, router, granularity):
    ckpt = trained_checkpoint(dense, tmp_path / "ckpt", router, granularity)
    reference = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True,
                                                     dtype=torch.bfloat16)
    placed = AutoModelForCausalLM.from_pretrained(
        ckpt, trust_remote_code=True, dtype=torch.bfloat16, device_map=offload_map(reference),
        offload_folder=str(tmp_path / "off"))
    assert_offloaded(placed, decoder_layers(placed)[-1])
    assert_offloaded(placed, "moe_shared")
    # Offloaded weights come back from disk in the dtype they were stored in: the routers and
    # the shared GRU / hypernetwork stay float32 in a bf16 model.
    placed_dtypes = {}
    hooks = [m._hf_hook for m in placed.modules() if getattr(m, "_hf_hook", None) is not None
             and getattr(m._hf_hook, "weights_map", None) is not None]
    for hook in hooks:
        for name in hook.weights_map:  # full names; the dataset is the whole offloaded map
            placed_dtypes[name] = hook.weights_map.dataset[name].dtype
    routing = {n: d for n, d in placed_dtypes.items() if ".router." in n or "moe_shared" in n}
    assert routing and set(routing.values()) == {torch.float32}
    assert_same_outputs(reference, placed)


def test_device_map_auto_with_small_cpu_memory_offloads_and_matches(tmp_path, dense):
    ckpt = trained_checkpoint(dense, tmp_path / "ckpt", "rmoe", "linear")
    reference = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    # accelerate fills the CPU in module order and, once something must be offloaded, reserves
    # room for loading the largest offloaded layer. A budget above everything before the last
    # decoder layer plus that reserve, but below the whole model, offloads the last layer (and
    # what follows it) and nothing before it.
    last = decoder_layers(reference)[-1]
    sizes = compute_module_sizes(reference)
    layer = sizes[last]
    before = 0
    for name, tensor in [*reference.named_parameters(), *reference.named_buffers()]:
        if name.startswith(last + "."):
            break
        before += tensor.numel() * tensor.element_size()
    budget = (before + layer + sizes[""]) // 2
    assert before + layer < budget < sizes[""]
    placed = AutoModelForCausalLM.from_pretrained(
        ckpt, trust_remote_code=True, device_map="auto", max_memory={"cpu": budget},
        offload_folder=str(tmp_path / "off"))
    layers = decoder_layers(placed)
    on_disk = [name for name in layers
               if any(name == k or name.startswith(k + ".") for k, v in
                      placed.hf_device_map.items() if v == "disk")]
    assert on_disk and len(on_disk) < len(layers), placed.hf_device_map
    for name in on_disk:
        assert_offloaded(placed, name)
    assert_same_outputs(reference, placed)


@pytest.mark.parametrize("router", ["topk", "graphmoe", "hypermoe"])
def test_router_summary_brings_every_site_to_the_loss_device(tmp_path, dense, router):
    """Under a device_map across GPUs each site's decisions live on its layer's device. Without a
    second device here, the meta device stands in for one (torch.cat and masking refuse mixed
    devices alike): every other site's outputs are moved there, and the summary asked for on
    that device must bring every per-site tensor (logits of every GraphMoE step, indices, the
    padding mask, HyperMoE's own losses) to it, without a host synchronisation (meta tensors
    have no values to synchronise on)."""
    ckpt = trained_checkpoint(dense, tmp_path / "ckpt", router, "linear")
    model = MoELoraForCausalLM.from_pretrained(ckpt).train()  # HyperMoE's noisy gate, its loss
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False
    ctx = RoutingContext(mask, model.moe_shared)
    sites = [m for m in model.modules() if isinstance(m, MoELoraLinear)]
    generator = torch.Generator().manual_seed(2)
    for i, module in enumerate(sites):
        x = torch.randn(10, module.site.in_features, generator=generator)
        # Through run(): GraphMoE's refine mode re-runs the site's experts at every step.
        out, _ = module.router.run(x, ctx, module, module.expert_delta)
        if i % 2:
            out = RouterOutput(**{name: move_to(getattr(out, name), "meta")
                                  for name in out._fields})
        ctx.record(module.site, out)
    losses, counts, logits = model._router_summary(ctx, torch.device("meta"))
    assert {t.device.type for t in [*losses.values(), counts]} == {"meta"}
    assert counts.shape == (len(sites), model.config.num_experts)
    assert len(logits) == len(sites)
    if router == "hypermoe":
        assert "hypermoe_cv" in losses


def move_to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def test_shared_gru_cell_is_torchs_cell_in_float32_even_under_autocast():
    """The module call path keeps nn.GRUCell's parameters (old checkpoints load strictly) and its
    equations; under bf16 autocast it still computes in float32 (bound: float32 rounding of
    a 16-wide cell, ~1e-6 relative, against float64)."""
    torch.manual_seed(0)
    plain = torch.nn.GRUCell(16, 8)
    cell = Float32GRUCell(16, 8)
    cell.load_state_dict(plain.state_dict(), strict=True)
    assert list(cell.state_dict()) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    inputs, state = torch.randn(5, 16), torch.randn(5, 8)
    want = plain.double()(inputs.double(), state.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cell(inputs, state)
    assert got.dtype == torch.float32
    assert float((got.double() - want).norm() / want.norm()) < 1e-5
