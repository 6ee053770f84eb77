"""Safetensors files a piece at a time, for checkpoints larger than memory.

:func:`read_header` reads and checks a file's header alone: names, dtypes, shapes and where each
tensor's bytes lie (nothing is unpickled, no tensor data is read). :func:`read_pieces` then reads a
tensor in bounded pieces with plain reads: no memory map, whose pages would count in the process's
resident memory until the file is closed. :func:`write_safetensors` writes a file whose tensors
arrive piece by piece, byte for byte as ``safetensors.torch.save_file`` writes it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
"""safetensors' dtype names in the order of its ``Dtype`` enum: a file holds the later ones first."""
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_RANK = {dtype: rank for rank, dtype in enumerate(DTYPES.values())}
MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the header's size."""
PIECE_BYTES = 64 * 2**20
"""Bytes read at once: the memory a tensor of any size takes while it is copied."""


class SafetensorsError(ValueError):
    """A file is not a safetensors file this module reads; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies: its dtype, shape, first byte in the file, size."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _entry(path: Path, key: str, spec: object, data_start: int) -> TensorEntry:
    def bad(why: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: not a safetensors file (tensor {key!r}: {why})")

    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad("expected dtype, shape and data_offsets")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise bad(f"dtype {spec['dtype']!r} is not one of {', '.join(DTYPES)}")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise bad(f"shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise bad(f"data_offsets {offsets!r} is not [start, end]")
    start, end = offsets
    nbytes = math.prod(shape) * _itemsize(dtype)
    if start < 0 or end - start != nbytes:
        raise bad(f"data_offsets {offsets} hold {end - start} bytes, the shape {shape} needs {nbytes}")
    return TensorEntry(dtype, tuple(shape), data_start + start, nbytes)


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors of the safetensors file ``path``, from its header alone, checked as safetensors
    checks them: known dtypes, sizes that fit the shapes, the data region covered exactly once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: not a safetensors file (header length {length} of {size} bytes)")
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsError(f"{path}: not a safetensors file (header: {error})") from error
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: not a safetensors file (__metadata__ is not a map of strings)")
    data_start = 8 + length
    entries = {key: _entry(path, key, spec, data_start) for key, spec in header.items()}
    end = data_start
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if entry.offset != end:
            raise SafetensorsError(
                f"{path}: not a safetensors file (tensor {key!r} starts at byte {entry.offset}, "
                f"the previous one ends at {end})"
            )
        end += entry.nbytes
    if end != size:
        raise SafetensorsError(f"{path}: not a safetensors file (the tensors end at byte {end} of {size})")
    return entries


def read_pieces(
    path: str | os.PathLike, entry: TensorEntry, piece_bytes: int = PIECE_BYTES
) -> Iterator[Tensor]:
    """The tensor at ``entry`` of ``path`` as flat pieces of at most ``piece_bytes`` (whole elements)."""
    itemsize = _itemsize(entry.dtype)
    step = max(1, piece_bytes // itemsize) * itemsize
    with open(path, "rb") as file:
        file.seek(entry.offset)
        for start in range(0, entry.nbytes, step):
            piece = bytearray(min(step, entry.nbytes - start))
            if file.readinto(piece) != len(piece):
                raise SafetensorsError(f"{path}: ends inside a tensor (the file changed while it was read)")
            yield torch.frombuffer(piece, dtype=entry.dtype)


def read_tensor(path: str | os.PathLike, entry: TensorEntry) -> Tensor:
    """The whole tensor at ``entry`` of ``path``."""
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return next(read_pieces(path, entry, entry.nbytes)).reshape(entry.shape)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, tuple[torch.dtype, Sequence[int]]],
    pieces: Callable[[str], Iterable[Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the safetensors file ``path`` holding ``tensors`` (name -> dtype, shape): the bytes of each
    come from ``pieces(name)`` (tensors of its dtype, in order), so one piece is in memory at a time.
    The file is the one ``safetensors.torch.save_file`` writes (same layout, same header)."""
    order = sorted(tensors, key=lambda name: (-_RANK[tensors[name][0]], name))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    sizes, offset = {}, 0
    for name in order:
        dtype, shape = tensors[name]
        sizes[name] = math.prod(shape) * _itemsize(dtype)
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": [int(n) for n in shape],
            "data_offsets": [offset, offset + sizes[name]],
        }
        offset += sizes[name]
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    with open(path, "wb") as file:
        file.write(len(raw).to_bytes(8, "little") + raw)
        for name in order:
            written = 0
            for piece in pieces(name):
                if piece.dtype != tensors[name][0]:
                    raise ValueError(
                        f"{path}: tensor {name!r}: a piece of {piece.dtype}, expected {tensors[name][0]}"
                    )
                data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                file.write(data)
                written += data.nbytes
            if written != sizes[name]:
                raise ValueError(
                    f"{path}: tensor {name!r}: {written} bytes given, its shape needs {sizes[name]}"
                )
