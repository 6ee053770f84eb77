"""What the web page does, without the page: find and load model folders, read an upload through
``prepare``'s steps, cut the three orthogonal views, build the benchmark's prompts and stream an
answer. No Gradio here, so the tests call every function directly.

Guarantees: a model folder is loaded strictly (:func:`med3dvlm.models.vlm.load_pretrained`, file
hashes checked, no code from the folder runs); an upload is read only through
:mod:`med3dvlm.data.scans` and :func:`med3dvlm.data.preprocess.prepare_scan` (the one code path of
``prepare`` and ``infer``), bounded by its header's voxel count and, for a DICOM zip, by its
uncompressed size and file count; each model answers one request at a time.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from med3dvlm.data import scans
from med3dvlm.data.preprocess import WindowSpec, prepare_scan, window_range
from med3dvlm.data.prompts import (
    CAPTION_SEPARATOR,
    build_prompt,
    caption_question,
    closed_question,
    generation_prompt,
)
from med3dvlm.data.volume_io import is_prepared, read_volume
from med3dvlm.models.vlm import CONFIG_FILE, EXPORT_FORMAT, VisionLanguageModel, load_pretrained

UPLOAD_SUFFIXES: tuple[str, ...] = (*scans.SUFFIXES, ".zip", ".npy")
"""What the page accepts: the scan formats of ``data.scans``, a DICOM series as a zip, a prepared ``.npy``."""
VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
ASK_KINDS: tuple[str, ...] = ("question", "closed", "report")


class UploadError(ValueError):
    """An upload the page cannot use; the message is shown in the page."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one upload: voxels by the header (before anything is decompressed), and for a
    DICOM zip its uncompressed bytes and number of files."""

    max_voxels: int = scans.DEFAULT_MAX_VOXELS
    max_zip_bytes: int = 2 << 30
    max_zip_files: int = 5000


@dataclass(frozen=True)
class Scan:
    """One upload as read (canonical ``(D, H, W)``) and as the model receives it."""

    name: str
    raw: np.ndarray
    volume: np.ndarray
    window: str
    hu_unwindowed: bool


@dataclass(frozen=True)
class GenerationSettings:
    """The page's "advanced" settings; greedy by default, as the benchmark."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict:
        sampled = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "repetition_penalty": self.repetition_penalty, **sampled}


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` holds one of our model folders (``export`` or ``import_weights`` wrote it)."""
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class Models:
    """The model folders the page offers, loaded on first use and kept; one lock per model, held for
    a whole answer, so two requests never run one model at once."""

    def __init__(self, model: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                 device: str = "cpu", dtype: str = "float32", verify_files: bool = True) -> None:
        folders: dict[str, Path] = {}
        if model is not None:
            folders[Path(model).name] = Path(model)
        if models_dir is not None:
            root = Path(models_dir)
            if not root.is_dir():
                raise FileNotFoundError(f"models_dir={root}: not a folder")
            folders |= {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_model_folder(p)}
        if not folders:
            raise FileNotFoundError(f"no model folder found (model={model}, models_dir={models_dir}); write one "
                                    "with python -m med3dvlm.export or python -m med3dvlm.import_weights")
        self.folders = folders
        self.device, self.dtype, self.verify_files = device, dtype, verify_files
        self._loaded: dict[str, VisionLanguageModel] = {}
        self._locks = {name: threading.Lock() for name in folders}
        self._loading = threading.Lock()

    def names(self) -> list[str]:
        return list(self.folders)

    def get(self, name: str) -> VisionLanguageModel:
        """The loaded model ``name`` (loading it the first time)."""
        if name not in self.folders:
            raise KeyError(f"unknown model {name!r}; choose one of {self.names()}")
        with self._loading:
            if name not in self._loaded:
                model = load_pretrained(self.folders[name], dtype=self.dtype, verify_files=self.verify_files)
                self._loaded[name] = model.to(self.device).eval()
        return self._loaded[name]

    def lock(self, name: str) -> threading.Lock:
        return self._locks[name]


def _extract_dicom_zip(path: Path, into: Path, limits: Limits) -> Path:
    """Extract a zipped DICOM series, refusing paths that leave ``into``, links, more than
    ``max_zip_files`` members and more than ``max_zip_bytes`` written (counted as written, not
    trusted from the zip's header)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise UploadError(f"{path.name}: not a readable zip file") from err
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > limits.max_zip_files:
            raise UploadError(f"{path.name}: {len(members)} files, more than the limit of {limits.max_zip_files}")
        written = 0
        for member in members:
            target = (into / member.filename).resolve()
            if not target.is_relative_to(into.resolve()) or (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise UploadError(f"{path.name}: member {member.filename!r} is a link or leaves the archive's folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as out:
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > limits.max_zip_bytes:
                        raise UploadError(f"{path.name}: more than {limits.max_zip_bytes >> 20} MiB uncompressed")
                    out.write(chunk)
    folders = {p.parent for p in into.rglob("*") if p.is_file()}
    if len(folders) != 1:
        raise UploadError(f"{path.name}: expected one DICOM series (one folder of files), found {len(folders)} folders")
    return folders.pop()


def read_upload(path: str | os.PathLike, input_size: tuple[int, int, int], window: WindowSpec = None,
                limits: Limits | None = None) -> Scan:
    """Read an uploaded file for a model of ``input_size``: a scan goes through ``prepare``'s steps
    (``window`` in HU, or min-max), a prepared volume is used as it is (it must have the model's size)."""
    path, limits = Path(path), limits or Limits()
    name = path.name
    if not name.lower().endswith(UPLOAD_SUFFIXES) and not path.is_dir():
        raise UploadError(f"{name}: not a supported upload; use {scans.SUPPORTED}, a DICOM series as .zip, "
                          "or a prepared .npy")
    label = "none" if window_range(window) is None else str(window)
    try:
        if is_prepared(path):
            volume = read_volume(path, shape=input_size)
            return Scan(name, volume, volume, "as prepared", False)
        if name.lower().endswith(".zip"):
            with tempfile.TemporaryDirectory(prefix="med3dvlm-upload-") as tmp:
                series = _extract_dicom_zip(path, Path(tmp), limits)
                prepared = prepare_scan(series, input_size, window_range(window), max_voxels=limits.max_voxels)
        else:
            prepared = prepare_scan(path, input_size, window_range(window), max_voxels=limits.max_voxels)
    except UploadError:
        raise
    except (ValueError, OSError, RuntimeError) as err:
        raise UploadError(str(err).replace(str(path.parent) + os.sep, "")) from err
    return Scan(name, prepared.raw, prepared.volume, label, prepared.hu_unwindowed and window_range(window) is None)


def view(volume: np.ndarray, kind: str, position: float, display: tuple[float, float] | None = None) -> np.ndarray:
    """One orthogonal slice of ``(D, H, W)`` as 8-bit grey: ``kind`` axial / coronal / sagittal,
    ``position`` in [0, 1] along that axis, intensities mapped from ``display`` (default: the
    volume's range). Coronal and sagittal show the slice axis upwards from the last slice."""
    axis = VIEWS.index(kind)
    index = min(round(position * (volume.shape[axis] - 1)), volume.shape[axis] - 1)
    plane = np.take(volume, index, axis=axis)
    if axis > 0:
        plane = plane[::-1]
    low, high = display if display is not None else (float(volume.min()), float(volume.max()))
    scaled = np.clip((plane - low) / max(high - low, 1e-6), 0.0, 1.0)
    return (scaled * 255).astype(np.uint8)


def raw_display_range(scan: Scan) -> tuple[float, float] | None:
    """Show the scan as read through the chosen window (HU), else over its own range."""
    return window_range(scan.window) if scan.window not in ("none", "as prepared") else None


def question_text(kind: str, question: str = "", choices: tuple[str, str, str, str] = ("", "", "", "")) -> str:
    """The question of each kind as the benchmark asks it: a free question, a closed question with
    its four choices (``Choices: A. … D. …``), or the caption question (a report)."""
    if kind == "question":
        if not question.strip():
            raise UploadError("type a question")
        return question.strip()
    if kind == "closed":
        if not question.strip() or not all(c.strip() for c in choices):
            raise UploadError("a closed question needs the question and four choices")
        return closed_question(question.strip(), [c.strip() for c in choices])
    if kind == "report":
        return caption_question()
    raise ValueError(f"unknown question kind {kind!r}; one of {ASK_KINDS}")


def prompt_for(model: VisionLanguageModel, kind: str, text: str) -> str:
    """The prompt sent to the model: the image block then the question (a report's without the
    space, as captions were trained)."""
    if kind == "report":
        return build_prompt(model.image_token, model.num_image_tokens, text, CAPTION_SEPARATOR)
    return generation_prompt(model.image_token, model.num_image_tokens, text)


def shown_prompt(model: VisionLanguageModel, prompt: str) -> str:
    """``prompt`` with its image block written as a count (the block is ``num_image_tokens`` copies)."""
    block = model.image_token * model.num_image_tokens
    return prompt.replace(block, f"{model.image_token} × {model.num_image_tokens}", 1)


def stream_answer(model: VisionLanguageModel, lock: threading.Lock, volume: np.ndarray, prompt: str,
                  settings: GenerationSettings | None = None) -> Iterator[str]:
    """The answer so far, each time a new piece is decoded; holds ``lock`` until the answer is done."""
    from transformers import TextIteratorStreamer

    settings = settings or GenerationSettings()
    device = next(model.parameters()).device
    dtype = next(model.vision_tower.parameters()).dtype
    image = torch.from_numpy(np.ascontiguousarray(volume))[None, None].to(device, dtype)
    encoded = model.tokenizer([prompt], return_tensors="pt")
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=False, skip_special_tokens=True)
    failure: list[Exception] = []

    def generate() -> None:
        try:
            with torch.no_grad():
                model.generate(image, encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                               streamer=streamer, **settings.kwargs())
        except Exception as err:  # noqa: BLE001 (any failure is re-raised in the caller's thread)
            failure.append(err)
            streamer.end()

    with lock:
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        text, shown = "", False
        for piece in streamer:
            text += piece
            shown = True
            yield text.strip()
        worker.join()
        if not shown and not failure:
            yield ""
    if failure:
        raise failure[0]
