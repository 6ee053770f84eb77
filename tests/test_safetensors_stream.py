"""Safetensors a piece at a time: files written piece by piece are the bytes ``save_file`` writes, for
every dtype; headers are read alone and checked as safetensors checks them; tensors come back in
pieces of bounded size."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from med3dvlm.utils.safetensors_stream import (
    DTYPES,
    SafetensorsError,
    read_header,
    read_pieces,
    read_tensor,
    write_safetensors,
)


def every_dtype() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, generator=generator) * 10
    tensors = {
        f"t.{name}": values.to(dtype) if dtype != torch.bool else values > 0 for name, dtype in DTYPES.items()
    }
    return {**tensors, "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5, dtype=torch.float64)}


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_written_piece_by_piece_is_what_save_file_writes(tmp_path, metadata):
    tensors = every_dtype()
    save_file(tensors, str(tmp_path / "whole.safetensors"), metadata=metadata)

    def pieces(name: str) -> list[torch.Tensor]:
        flat = tensors[name].reshape(-1)
        return [flat[:2], flat[2:]]  # any split: the bytes go out in order

    write_safetensors(
        tmp_path / "pieces.safetensors", {k: (v.dtype, v.shape) for k, v in tensors.items()}, pieces, metadata
    )
    assert (tmp_path / "pieces.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_read_back_whole_and_in_pieces(tmp_path):
    tensors = every_dtype()
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    assert header.keys() == tensors.keys()
    for key, value in tensors.items():
        assert header[key].dtype == value.dtype and header[key].shape == tuple(value.shape)
        assert torch.equal(
            read_tensor(path, header[key]).reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        )
    pieces = list(read_pieces(path, header["t.F64"], piece_bytes=32))
    assert [p.numel() for p in pieces] == [4, 4, 4, 3]  # whole elements, at most 32 bytes each
    assert torch.equal(torch.cat(pieces), tensors["t.F64"].reshape(-1))


def test_a_wrong_piece_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'w': 8 bytes given, its shape needs 12"):
        write_safetensors(tmp_path / "x", {"w": (torch.float32, (3,))}, lambda name: [torch.zeros(2)])
    with pytest.raises(ValueError, match="'w': a piece of torch.float64"):
        write_safetensors(
            tmp_path / "x", {"w": (torch.float32, (3,))}, lambda name: [torch.zeros(3).double()]
        )


def _file(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x01\x02", "header length -1"),
        (_file({}, length=10**9), "header length 1000000000"),
        (b"\x04\x00\x00\x00\x00\x00\x00\x00[1] ", "not a JSON object"),
        (b"\x03\x00\x00\x00\x00\x00\x00\x00{{{", "header: "),
        (_file({"w": {"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "dtype 'F4'"),
        (_file({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape [-1]"),
        (
            _file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "the shape [2] needs 8",
        ),
        (
            _file(
                {
                    "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                    "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
                },
                b"\0" * 3,
            ),
            "'b' starts at byte",
        ),
        (_file({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 3), "end at byte"),
        (_file({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 2), "end at byte"),
        (_file({"__metadata__": {"format": 1}}), "__metadata__"),
    ],
)
def test_a_bad_header_is_named(tmp_path: Path, content: bytes, why: str):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(
        SafetensorsError, match=f"{re.escape(str(path))}: not a safetensors file .*{re.escape(why)}"
    ):
        read_header(path)
