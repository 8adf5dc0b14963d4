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


def write_heatmap(loads: torch.Tensor, site_names: list[str], path: Path) -> Path | None:
    """A PNG of the [sites, experts] load fractions; None when there is nothing to draw."""
    if loads.numel() == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    sites, experts = loads.shape
    height = min(2.0 + 0.18 * sites, 40.0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * experts + 3.0), height))
    image = ax.imshow(loads.numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                      vmax=max(float(loads.max()), 1.0 / experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("routing site")
    ax.set_xticks(range(experts))
    # Label at most ~40 sites so that big models stay readable.
    step = max(1, math.ceil(sites / 40))
    ax.set_yticks(range(0, sites, step))
    ax.set_yticklabels([site_names[i] for i in range(0, sites, step)], fontsize=6)
    ax.set_title("Share of routed tokens per expert")
    fig.colorbar(image, ax=ax, label="load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["HEATMAP_FILE", "STATS_FILE", "RoutingStats", "write_heatmap"]
