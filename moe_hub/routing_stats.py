"""Expert-load statistics of a training run: a JSON summary and a heatmap (sites x experts).

The model returns ``expert_counts`` [sites, experts] at every forward with router outputs
(padding excluded); summing them over training tells whether routers collapsed onto a few experts.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

STATS_FILE = "routing_stats.json"
HEATMAP_FILE = "routing_heatmap.png"


class RoutingStats:
    """Accumulates per-site expert counts over many forwards."""

    def __init__(self, site_names: list[str], num_experts: int) -> None:
        self.site_names = list(site_names)
        self.num_experts = num_experts
        self._counts = torch.zeros(len(site_names), num_experts, dtype=torch.float64)
        # Summed where the model runs: copying to the CPU at every step would stall a GPU.
        self._pending: torch.Tensor | None = None

    def add(self, counts: torch.Tensor | None) -> None:
        if counts is None or counts.numel() == 0:
            return
        counts = counts.detach().to(torch.float64)
        self._pending = counts if self._pending is None else self._pending + counts

    @property
    def counts(self) -> torch.Tensor:
        """[sites, experts] routed slots so far."""
        if self._pending is not None:
            self._counts = self._counts + self._pending.cpu()
            self._pending = None
        return self._counts

    def all_reduce(self) -> None:
        """Sum the counts of every process of a distributed run (no-op otherwise)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # gloo reduces CPU tensors, nccl device tensors: reduce where the pending sum lives.
            device = self._pending.device if self._pending is not None else "cpu"
            counts = self.counts.to(device)
            dist.all_reduce(counts)
            self._counts = counts.cpu()

    def loads(self) -> torch.Tensor:
        """Fraction of each site's routed slots given to each expert ([sites, experts])."""
        counts = self.counts
        return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)

    def summary(self) -> dict[str, Any]:
        """Per-site and overall load figures. ``balance`` is the normalised entropy of the load
        (1 = perfectly even, 0 = one expert takes everything)."""
        loads = self.loads()
        experts = self.num_experts
        sites = []
        for name, counts, load in zip(self.site_names, self.counts, loads):
            sites.append({
                "site": name,
                "routed": int(counts.sum().item()),
                "load": [round(v, 6) for v in load.tolist()],
                "balance": round(_balance(load, experts), 6),
                "max_load": round(float(load.max()), 6),
            })
        overall = self.counts.sum(dim=0)
        overall_load = overall / overall.sum().clamp_min(1.0)
        balances = [s["balance"] for s in sites]
        return {
            "num_experts": experts,
            "num_sites": len(sites),
            "routed_slots": int(overall.sum().item()),
            "overall_load": [round(v, 6) for v in overall_load.tolist()],
            "mean_balance": round(sum(balances) / len(balances), 6) if balances else None,
            "min_balance": round(min(balances), 6) if balances else None,
            "sites": sites,
        }

    def write(self, directory: str | os.PathLike) -> tuple[Path, Path | None]:
        """Write the JSON summary and the heatmap into ``directory``; return their paths."""
        directory = Path(directory)
        stats_path = directory / STATS_FILE
        stats_path.write_text(json.dumps(self.summary(), indent=2) + "\n")
        heatmap = write_heatmap(self.loads(), self.site_names, directory / HEATMAP_FILE)
        return stats_path, heatmap


def _balance(load: torch.Tensor, experts: int) -> float:
    if experts < 2 or float(load.sum()) == 0.0:
        return 1.0
    p = load[load > 0]
    return float(-(p * p.log()).sum()) / math.log(experts)


def site_grid(site_names: list[str]) -> tuple[list[str], list[int], dict[str, tuple[int, int]]]:
    """Lay routing sites out as (kind, layer): kinds are the last name component (``q_proj``,
    ``mlp``, ...) in first-seen order, layers the first integer component. Returns (kinds,
    layers, site name -> (kind index, layer row)); a site without a layer number gets its own
    row after the numbered layers."""
    kinds: list[str] = []
    numbered: dict[str, int | None] = {}
    for name in site_names:
        kind = name.rsplit(".", 1)[-1]
        if kind not in kinds:
            kinds.append(kind)
        layer = next((int(part) for part in name.split(".") if part.isdigit()), None)
        numbered[name] = layer
    layers = sorted({layer for layer in numbered.values() if layer is not None})
    extra = max(layers, default=-1) + 1
    row_of = {layer: row for row, layer in enumerate(layers)}
    cells = {}
    for name, layer in numbered.items():
        if layer is None:
            layer, extra = extra, extra + 1
            row_of[layer] = len(layers)
            layers.append(layer)
        cells[name] = (kinds.index(name.rsplit(".", 1)[-1]), row_of[layer])
    return kinds, layers, cells


def write_heatmap(loads: torch.Tensor, site_names: list[str], path: Path) -> Path | None:
    """A PNG of the [sites, experts] loads: one panel per module kind (layers down, experts
    across) coloured by load relative to an even share (1 = balanced, red = over-used, blue =
    under-used), and a last panel with each layer's balance (normalised entropy) per kind.
    None when there is nothing to draw."""
    if loads.numel() == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    sites, experts = loads.shape
    kinds, layers, cells = site_grid(site_names)
    grid = torch.full((len(kinds), len(layers), experts), float("nan"), dtype=torch.float64)
    balance = torch.full((len(kinds), len(layers)), float("nan"), dtype=torch.float64)
    for name, load in zip(site_names, loads.to(torch.float64)):
        kind, row = cells[name]
        grid[kind, row] = load * experts
        balance[kind, row] = _balance(load, experts)
    top = max(2.0, float(torch.nan_to_num(grid, nan=0.0).max()))

    panel_height = min(max(2.5, 0.16 * len(layers) + 1.2), 12.0)
    panel_width = max(1.4, 0.22 * experts + 0.6)
    fig, axes = plt.subplots(
        1, len(kinds) + 1, figsize=(panel_width * (len(kinds) + 1.4) + 1.0, panel_height),
        sharey=True, squeeze=False, gridspec_kw={"width_ratios": [1] * len(kinds) + [1.4]})
    axes = axes[0]
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)
    image = None
    for index, kind in enumerate(kinds):
        ax = axes[index]
        image = ax.imshow(grid[index].numpy(), aspect="auto", cmap="RdBu_r", norm=norm,
                          interpolation="nearest")
        ax.set_title(kind, fontsize=10)
        ax.set_xticks(range(experts))
        ax.set_xticklabels([str(e) if experts <= 16 or e % 4 == 0 else "" for e in
                            range(experts)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
    step = max(1, math.ceil(len(layers) / 16))
    axes[0].set_yticks(range(0, len(layers), step))
    axes[0].set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
    axes[0].set_ylabel("layer")

    ax = axes[-1]
    rows = torch.arange(len(layers)).numpy()
    for index, kind in enumerate(kinds):
        ax.plot(balance[index].numpy(), rows, marker="o", markersize=2.5, linewidth=1,
                label=kind)
    ax.set_xlim(0.0, 1.02)
    ax.set_xlabel("balance (entropy / log E)", fontsize=8)
    ax.set_title("balance per layer", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=6, loc="lower left", frameon=False)

    mean_balance = float(torch.nanmean(balance))
    fig.suptitle(f"Routed tokens per expert relative to an even share (1 = balanced); "
                 f"{sites} sites, {experts} experts, mean balance {mean_balance:.2f}",
                 fontsize=10)
    fig.colorbar(image, ax=list(axes[:-1]), label="load / even share", fraction=0.04, pad=0.02)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["HEATMAP_FILE", "STATS_FILE", "RoutingStats", "site_grid", "write_heatmap"]
