"""Reading sharded checkpoint folders (``torch.distributed.checkpoint``) as data, never as code.

torch's own reader unpickles a folder's ``.metadata`` with plain ``pickle`` and its default load
planner reads the non-tensor items of the shards (optimizer hyper-parameters, ...) with
``torch.load(weights_only=False)``: a checkpoint folder from elsewhere could run anything on
``resume=`` or ``consolidate``. Here ``.metadata`` goes through an unpickler that only knows the
checkpoint's own metadata classes (everything else is refused before it is built), and the
non-tensor items through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

_METADATA_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(dcp_metadata.__name__, name): getattr(dcp_metadata, name) for name in _METADATA_CLASSES},
    (_StorageInfo.__module__, "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # the folder the checkpoint was written to
}


class RefusedCheckpointData(pickle.UnpicklingError):
    """A checkpoint folder holds an object that is not plain checkpoint data."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise RefusedCheckpointData(f"global {module}.{name} is not checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` can only describe shards."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise RefusedCheckpointData(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _safe_bytes(value: io.BytesIO) -> io.BytesIO:
    """The item re-serialised after a ``weights_only`` load (only plain data survives that load)."""
    try:
        item = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as error:
        raise RefusedCheckpointData(f"a non-tensor item is not plain data ({error})") from error
    clean = io.BytesIO()
    torch.save(item, clean)
    clean.seek(0)
    return clean


class SafeLoadPlanner(DefaultLoadPlanner):
    """Fills a given state dict; non-tensor items are read with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        super().load_bytes(read_item, _safe_bytes(value))


class SafeEmptyLoadPlanner(_EmptyStateDictLoadPlanner):
    """Builds the whole state dict from the metadata; non-tensor items read with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        super().load_bytes(read_item, _safe_bytes(value))


def read_metadata(folder: str | Path) -> dcp_metadata.Metadata:
    return SafeFileSystemReader(str(folder)).read_metadata()


def _load(
    state: dict[str, Any], folder: str | Path, planner: DefaultLoadPlanner, whole: bool = False
) -> None:
    reader = SafeFileSystemReader(str(folder))
    try:
        if whole:  # the public load() keeps only keys the caller's dict already has (here: none)
            _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
        else:
            dcp_load(state, storage_reader=reader, planner=planner)
    except CheckpointException as error:
        # torch wraps each rank's exception with its traceback; a refusal is reported as one.
        refused = [exc for exc, _ in error.failures.values() if isinstance(exc, RefusedCheckpointData)]
        if refused:
            raise RefusedCheckpointData(f"{folder}: {refused[0]}") from error
        raise


def load_into(state: dict[str, Any], folder: str | Path) -> None:
    """Fill ``state`` (tensors, possibly sharded DTensors, in place) from the checkpoint ``folder``;
    collective under a process group, like ``torch.distributed.checkpoint.load``."""
    _load(state, folder, SafeLoadPlanner())


def load_whole(folder: str | Path) -> dict[str, Any]:
    """Every entry of the checkpoint ``folder`` as full tensors in this process (CPU memory)."""
    state: dict[str, Any] = {}
    _load(state, folder, SafeEmptyLoadPlanner(), whole=True)
    return state
