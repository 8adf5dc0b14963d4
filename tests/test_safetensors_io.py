"""Streaming shard rewrites: renamed, dropped and converted tensors keep their exact values."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_hub import safetensors_io


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=generator),
        "b.weight": torch.randn(5, generator=generator).to(torch.bfloat16),
        "dropped": torch.randn(7, 3, generator=generator),
        "c.index": torch.randint(0, 1000, (11,), generator=generator),
        "d.weight": torch.randn(2, 2, 2, generator=generator).to(torch.float16),
    }


def _rename(name: str) -> str | None:
    return None if name == "dropped" else "new." + name


@pytest.fixture(params=["kernel copy", "userspace copy"])
def copy_path(request, monkeypatch):
    if request.param == "userspace copy":
        monkeypatch.setattr(safetensors_io, "_KERNEL_COPIES", [])
    return request.param


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
def test_rewrite_shard_keeps_values(tmp_path, copy_path, dtype):
    tensors = _tensors()
    save_file(tensors, tmp_path / "in.safetensors")
    seen = []
    sizes = safetensors_io.rewrite_shard(tmp_path / "in.safetensors", tmp_path / "out.safetensors",
                                         _rename, dtype, on_bytes=seen.append)
    out = load_file(tmp_path / "out.safetensors")
    expected = {_rename(n): t for n, t in tensors.items() if _rename(n)}
    assert set(out) == set(expected) == set(sizes)
    for name, tensor in expected.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        assert out[name].dtype == tensor.dtype, name
        assert torch.equal(out[name], tensor), name
        assert sizes[name] == tensor.numel() * tensor.element_size()
    dropped = tensors["dropped"].numel() * 4
    source_bytes = sum(t.numel() * t.element_size() for t in tensors.values()) - dropped
    assert sum(seen) == source_bytes


def test_unchanged_runs_merge_into_one_copy():
    header = {
        "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        "gap": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]},
        "z": {"dtype": "F16", "shape": [2], "data_offsets": [20, 24]},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [24, 28]},
    }
    keep = [(n, header[n], header[n]["dtype"]) for n in ("x", "y", "z", "w")]
    assert list(safetensors_io._runs(keep)) == [(0, 16, None), (20, 28, None)]
    converted = [(n, e, "BF16" if n == "z" else c) for n, e, c in keep]
    assert list(safetensors_io._runs(converted)) == [
        (0, 16, None), (20, 24, (torch.float16, torch.bfloat16)), (24, 28, None)]
