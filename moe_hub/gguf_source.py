"""A GGUF base: where it comes from (the model card's ``base_model`` and ``license`` metadata),
and reading it once per conversion.

A GGUF file is a quantised copy of some model; the Hub links a derived model to the original
repository, not to a local file. GGUF metadata may name it (``general.source.*`` for a converted
model, ``general.base_model.0.*`` for a fine-tune) and may carry ``general.license``; for the
embedded default the origin is known.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Config attributes written at conversion (read by the model card).
ORIGIN_KEY = "base_model_origin"
LICENSE_KEY = "base_model_license"

_HF_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+)/?$")

# GGUF metadata value types (the GGUF spec's gguf_metadata_value_type): fixed sizes in bytes,
# then the two variable-length ones.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _read_fields(path: Path) -> dict[str, Any]:
    """The ``general.*`` string fields of a GGUF header ({} when the file cannot be parsed).

    Read from the key-value section alone, stepping over every array (the vocabulary and the
    merges: ~100k strings for SmolLM2) instead of decoding it as gguf's GGUFReader does, which
    costs seconds per file: milliseconds, whichever reader transformers uses for the rest."""
    try:
        with open(path, "rb") as file, \
                mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _general_strings(data)
    except (OSError, ValueError, struct.error):  # the reason is reported when transformers reads it
        return {}


def _general_strings(data: mmap.mmap) -> dict[str, str]:
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    # A file written on a big-endian machine is big-endian throughout: its version reads as
    # a huge number in little-endian.
    order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
    (version,) = struct.unpack_from(order + "I", data, 4)
    if version not in (2, 3):  # v1 stored its counts and lengths in 32 bits
        raise ValueError(f"GGUF version {version}")
    (count,) = struct.unpack_from(order + "Q", data, 16)
    position, values = 24, {}
    for _ in range(count):
        key, position = _string(data, position, order)
        (kind,) = struct.unpack_from(order + "I", data, position)
        position += 4
        if kind == _STRING and key.startswith(b"general."):
            value, position = _string(data, position, order)
            try:
                values.setdefault(key.decode("utf-8"), value.decode("utf-8"))
            except UnicodeDecodeError:
                continue
        else:
            position = _skip(data, position, kind, order)
    return values


def _string(data: mmap.mmap, position: int, order: str) -> tuple[bytes, int]:
    (length,) = struct.unpack_from(order + "Q", data, position)
    end = position + 8 + length
    if end > len(data):
        raise ValueError("truncated GGUF header")
    return data[position + 8:end], end


def _skip(data: mmap.mmap, position: int, kind: int, order: str) -> int:
    """The position just past a value of type ``kind`` at ``position``, read no further than
    its lengths."""
    if kind in _FIXED_SIZES:
        return position + _FIXED_SIZES[kind]
    if kind == _STRING:
        return _string(data, position, order)[1]
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    element, count = struct.unpack_from(order + "IQ", data, position)
    position += 12
    if element in _FIXED_SIZES:
        position += count * _FIXED_SIZES[element]
    elif element == _STRING:
        length = struct.Struct(order + "Q").unpack_from
        for _ in range(count):
            position += 8 + length(data, position)[0]
    else:
        for _ in range(count):
            position = _skip(data, position, element, order)
    if position > len(data):
        raise ValueError("truncated GGUF header")
    return position


def _hub_repo(fields: dict[str, str], prefix: str) -> str | None:
    """An "owner/name" from ``<prefix>.repo_url`` or ``<prefix>.huggingface.repository``."""
    repository = fields.get(f"{prefix}.huggingface.repository")
    if repository and re.fullmatch(r"[\w.-]+/[\w.-]+", repository):
        return repository
    match = _HF_URL.match(fields.get(f"{prefix}.repo_url") or fields.get(f"{prefix}.url") or "")
    return match.group(1) if match else None


def gguf_provenance(path: Path, default_model: bool = False) -> dict[str, str]:
    """``{ORIGIN_KEY: hub id, LICENSE_KEY: license}``, each only when known."""
    fields = _read_fields(path)
    origin = _hub_repo(fields, "general.source") or _hub_repo(fields, "general.base_model.0")
    license_ = fields.get("general.license")
    if default_model:
        from .default_model import DEFAULT_LICENSE, DEFAULT_ORIGIN

        origin, license_ = origin or DEFAULT_ORIGIN, license_ or DEFAULT_LICENSE
    found = {ORIGIN_KEY: origin, LICENSE_KEY: license_}
    return {key: value for key, value in found.items() if value}


@contextmanager
def parsed_once(path: Path) -> Iterator[None]:
    """While active, every ``gguf.GGUFReader`` of ``path`` is one reader, parsed on first use.

    transformers reads a GGUF whose architecture its own fast reader does not cover (llama, so
    SmolLM2) with gguf's GGUFReader, which decodes every field, the whole vocabulary included
    (3-4 s for SmolLM2 on two cores), and it does so once for the config, once for the tensors
    and once more for the tokenizer's config. The reader is only read from, so one serves all
    three; transformers' own dequantisation and name mapping still do the work. It also builds
    gguf's tensor-name map (a pure function of architecture and layer count) once per module
    of the model, 397 times for SmolLM2 (4-6 s in all): one map serves them all.

    transformers imports both names from ``gguf`` when it uses them, which is what this
    replaces; where it did otherwise, the file would just be parsed again. Not for conversions
    running side by side in threads of one process."""
    try:
        import gguf
    except ImportError:  # transformers reports the missing package when it reads the file
        yield
        return
    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    target = os.path.realpath(path)
    readers: list[Any] = []
    name_maps: dict[tuple[Any, int], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        if mode != "r" or os.path.realpath(path) != target:
            return original_reader(path, mode)
        if not readers:
            readers.append(original_reader(path, mode))
        return readers[0]

    def shared_name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = original_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


__all__ = ["LICENSE_KEY", "ORIGIN_KEY", "gguf_provenance", "parsed_once"]
