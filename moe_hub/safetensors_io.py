"""Streaming reads and rewrites of safetensors files.

Conversion renames tensors (``q_proj.weight`` -> ``q_proj.base_layer.weight``) without changing
their bytes, so a shard can be rewritten by emitting a new header and copying the data region in
fixed-size chunks: memory stays at one chunk (or one tensor when the dtype changes) whatever the
shard size. The safetensors library has no streaming writer, hence this module; the format is an
8-byte little-endian header length, a JSON header, then the tensors' bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import MoEHubError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header; return (header, offset of the data region).

    Raises MoEHubError for a truncated or corrupt file, so a bad shard is caught before anything
    is written.
    """
    size = path.stat().st_size
    fix = f"re-download or re-save {path.name}"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MoEHubError(f"{path} is not a safetensors file (only {size} bytes): {fix}")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER or 8 + length > size:
            raise MoEHubError(f"{path} is truncated or corrupt (bad header length): {fix}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = err.__class__.__name__
            raise MoEHubError(f"{path} has a corrupt header ({reason}): {fix}") from None
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            _, stop = entry["data_offsets"]
            entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise MoEHubError(f"{path} has a corrupt entry for {name!r}: {fix}") from None
        end = max(end, stop)
    if 8 + length + end != size:
        raise MoEHubError(
            f"{path} is truncated or corrupt (header describes {8 + length + end} bytes, file has "
            f"{size}): {fix}"
        )
    return header, 8 + length


def tensor_names(header: dict[str, Any]) -> list[str]:
    return [name for name in header if name != "__metadata__"]


def _nbytes(shape: list[int], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def rewrite_shard(
    src: Path,
    dst: Path,
    rename: Callable[[str], str | None],
    dtype: torch.dtype | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write ``src``'s tensors to ``dst`` under new names; return {new name: bytes}.

    ``rename`` maps an old name to a new one, or to None to drop the tensor. ``dtype`` converts
    floating-point tensors; others are copied as they are. ``on_bytes`` reports progress.
    """
    header, data_start = read_header(src)
    entries = sorted(
        ((name, header[name]) for name in tensor_names(header)),
        key=lambda item: item[1]["data_offsets"][0],
    )
    plan = []  # (new name, source entry, output dtype code)
    for name, entry in entries:
        new_name = rename(name)
        if new_name is None:
            continue
        code = entry["dtype"]
        if dtype is not None and code in _FLOAT_CODES:
            code = CODES[dtype]
        plan.append((new_name, entry, code))
    out_header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, sizes = 0, {}
    for new_name, entry, code in plan:
        nbytes = _nbytes(entry["shape"], DTYPES[code]) if code in DTYPES else (
            entry["data_offsets"][1] - entry["data_offsets"][0])
        out_header[new_name] = {"dtype": code, "shape": entry["shape"],
                                "data_offsets": [offset, offset + nbytes]}
        sizes[new_name] = nbytes
        offset += nbytes
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data region 8-byte aligned
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(encoded)))
        fout.write(encoded)
        for _, entry, code in plan:
            start, stop = entry["data_offsets"]
            fin.seek(data_start + start)
            if code == entry["dtype"]:
                remaining = stop - start
                while remaining:
                    chunk = fin.read(min(_CHUNK, remaining))
                    fout.write(chunk)
                    remaining -= len(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
            else:
                raw = bytearray(fin.read(stop - start))
                tensor = torch.frombuffer(raw, dtype=DTYPES[entry["dtype"]]) if raw else \
                    torch.empty(0, dtype=DTYPES[entry["dtype"]])
                fout.write(tensor.to(DTYPES[code]).view(torch.uint8).numpy().tobytes())
                if on_bytes:
                    on_bytes(stop - start)
    return sizes
