"""Streaming reads and rewrites of safetensors files.

Conversion renames tensors (``q_proj.weight`` -> ``q_proj.base_layer.weight``) without changing
their bytes, so a shard can be rewritten by emitting a new header and copying the data region in
fixed-size chunks: memory stays at one chunk (or one tensor when the dtype changes) whatever the
shard size. The safetensors library has no streaming writer, hence this module; the format is an
8-byte little-endian header length, a JSON header, then the tensors' bytes.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
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
_CHUNK = 64 * 1024 * 1024
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
    _check_entries(path, header, size - 8 - length, fix)
    return header, 8 + length


# Bits per element of every dtype the safetensors format defines.
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
               "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64,
               "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _check_entries(path: Path, header: Any, data_size: int, fix: str) -> None:
    """Every tensor entry agrees with itself and the file: a known dtype, whole non-negative
    dimensions, offsets whose span is exactly shape x dtype size, tensors packed one after the
    other without overlap (as the safetensors library itself demands) and a data region the file
    holds exactly. A shard that fails any of this would only fail (or load garbage) later."""
    if not isinstance(header, dict):
        raise MoEHubError(f"{path} has a corrupt header (not a JSON object): {fix}")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path} tensor {name!r}"
        try:
            code, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MoEHubError(f"{where} has a corrupt header entry: {fix}") from None
        if code not in _DTYPE_BITS:
            raise MoEHubError(f"{where} has unknown dtype {code!r}: {fix}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise MoEHubError(f"{where} has shape {shape!r}, not a list of whole numbers >= 0: "
                              f"{fix}")
        if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0
                   for o in (start, stop)) or stop < start:
            raise MoEHubError(f"{where} has data offsets {[start, stop]!r}, not an increasing "
                              f"pair of whole numbers: {fix}")
        count = 1
        for dim in shape:
            count *= dim
        if count * _DTYPE_BITS[code] != 8 * (stop - start):
            need = count * _DTYPE_BITS[code] / 8
            raise MoEHubError(f"{where} has shape {shape} of {code} ({need:g} bytes) but data "
                              f"offsets {[start, stop]} ({stop - start} bytes): {fix}")
        spans.append((start, stop, name))
    position, gap = 0, None
    for start, stop, name in sorted(spans):
        if start < position:
            raise MoEHubError(f"{path} tensor {name!r} overlaps the tensor before it (data "
                              f"offsets {[start, stop]}): {fix}")
        if start > position and gap is None:
            gap = (f"{path} tensor {name!r} leaves a gap of {start - position} bytes before it "
                   f"(data offsets {[start, stop]}): {fix}")
        position = stop
    if gap:
        raise MoEHubError(gap)
    if position != data_size:
        raise MoEHubError(
            f"{path} is truncated or corrupt (header describes {position} bytes of data, the "
            f"file holds {data_size}): {fix}"
        )


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
    report = on_bytes or (lambda n: None)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        _write_all(fout.fileno(), struct.pack("<Q", len(encoded)) + encoded)
        for start, stop, converted in _runs(plan):
            if converted is None:
                copy_bytes(fin.fileno(), fout.fileno(), data_start + start, stop - start, report)
                continue
            raw = bytearray(os.pread(fin.fileno(), stop - start, data_start + start))
            source_dtype, target_dtype = converted
            tensor = torch.frombuffer(raw, dtype=source_dtype) if raw else torch.empty(
                0, dtype=source_dtype)
            _write_all(fout.fileno(), tensor.to(target_dtype).view(torch.uint8).numpy())
            report(stop - start)
    return sizes


def write_tensors(
    dst: Path,
    batches: Iterable[dict[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Write every tensor of ``batches`` to the safetensors file ``dst``; return {name: bytes}.

    A batch is computed only when the previous one has been written, so memory holds one batch:
    data goes to a scratch file first because the header, which needs every shape, comes first.
    ``dtype`` converts floating-point tensors, as in :func:`rewrite_shard`.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    sizes: dict[str, int] = {}
    body = dst.with_name(dst.name + ".body")
    offset = 0
    try:
        with open(body, "wb", buffering=0) as fbody:
            for batch in batches:
                for name, tensor in batch.items():
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    tensor = tensor.detach().contiguous().cpu()
                    raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
                    header[name] = {"dtype": CODES[tensor.dtype], "shape": list(tensor.shape),
                                    "data_offsets": [offset, offset + len(raw)]}
                    _write_all(fbody.fileno(), raw)
                    sizes[name] = len(raw)
                    offset += len(raw)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(body, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
            _write_all(fout.fileno(), struct.pack("<Q", len(encoded)) + encoded)
            copy_bytes(fin.fileno(), fout.fileno(), 0, offset, lambda n: None)
    finally:
        body.unlink(missing_ok=True)
    return sizes


def _runs(plan: list[tuple[str, dict[str, Any], str]]
          ) -> Iterator[tuple[int, int, tuple[torch.dtype, torch.dtype] | None]]:
    """(start, stop, dtype conversion or None) of the source data to emit, in output order.

    Tensors copied as they are and adjacent in the source merge into one run, so an unchanged
    shard body is a single kernel-side copy."""
    pending: list[int] | None = None
    for _, entry, code in plan:
        start, stop = entry["data_offsets"]
        if code != entry["dtype"]:
            if pending:
                yield pending[0], pending[1], None
                pending = None
            yield start, stop, (DTYPES[entry["dtype"]], DTYPES[code])
        elif pending and pending[1] == start:
            pending[1] = stop
        else:
            if pending:
                yield pending[0], pending[1], None
            pending = [start, stop]
    if pending:
        yield pending[0], pending[1], None


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def copy_bytes(src_fd: int, dst_fd: int, offset: int, length: int,
               on_bytes: Callable[[int], None]) -> None:
    """Append ``length`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``, chunk by chunk.

    The kernel copies (copy_file_range, then sendfile) when it can, as ``cp`` does: the bytes
    never pass through Python, and the page cache is the only memory they occupy."""
    while length:
        count = min(length, _CHUNK)
        copied = _kernel_copy(src_fd, dst_fd, offset, count)
        if copied is None:
            chunk = os.pread(src_fd, count, offset)
            _write_all(dst_fd, chunk)
            copied = len(chunk)
        if copied == 0:
            raise MoEHubError("a shard ended while it was being copied: was it modified meanwhile?")
        offset += copied
        length -= copied
        on_bytes(copied)


_KERNEL_COPIES = [
    lambda src, dst, offset, count: os.copy_file_range(src, dst, count, offset),
    lambda src, dst, offset, count: os.sendfile(dst, src, offset, count),
]
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSOCK}


def _kernel_copy(src_fd: int, dst_fd: int, offset: int, count: int) -> int | None:
    """Bytes copied by the first kernel-side copy that works here, or None if none does.

    A method that fails as unsupported (other filesystem, old kernel, not Linux) is dropped for
    the rest of the process."""
    while _KERNEL_COPIES:
        try:
            return _KERNEL_COPIES[0](src_fd, dst_fd, offset, count)
        except AttributeError:
            pass
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
        _KERNEL_COPIES.pop(0)
    return None
