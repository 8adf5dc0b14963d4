"""The routing heatmap: one panel per module kind, layers x experts, readable for a real model."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_hub.routing_stats import RoutingStats

KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _smollm2_sites() -> list[str]:
    # SmolLM2-135M's 210 routing sites (30 layers x 7 linears), in the model's order.
    return [f"model.layers.{layer}.{kind}" for layer in range(30) for kind in KINDS]


def test_sites_are_laid_out_by_kind_and_layer() -> None:
    from moe_hub.routing_stats import site_grid

    names = _smollm2_sites()
    kinds, layers, cells = site_grid(names)
    assert kinds == [k.rsplit(".", 1)[1] for k in KINDS]
    assert layers == list(range(30))
    assert cells["model.layers.17.mlp.up_proj"] == (5, 17)
    block = site_grid([f"model.layers.{i}.mlp" for i in range(4)] + ["model.shared.router"])
    assert block[0] == ["mlp", "router"] and block[1] == [0, 1, 2, 3, 4]
    assert block[2]["model.shared.router"] == (1, 4)


def test_heatmap_of_a_real_sized_model_fits_a_screen(tmp_path: Path) -> None:
    import matplotlib.image

    names = _smollm2_sites()
    stats = RoutingStats(names, num_experts=8)
    torch.manual_seed(0)
    stats.add(torch.randint(0, 50, (len(names), 8)))
    _, heatmap = stats.write(tmp_path)
    pixels = matplotlib.image.imread(heatmap)
    height, width = pixels.shape[:2]
    # One row per layer (30), not per site (210): the old layout was 700 x 3980 px.
    assert height <= 900 and width <= 2200, (width, height)
    assert pixels[..., :3].std() > 0.1  # something was drawn
