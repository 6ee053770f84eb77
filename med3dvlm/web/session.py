"""What the web page does, without the page: find and load model folders, read an upload through
``prepare``'s steps, cut the three orthogonal views, build the benchmark's prompts and stream an
answer. No Gradio here, so the tests call every function directly.

Guarantees: a model folder is loaded strictly (:func:`med3dvlm.artifacts.model_folder.load_pretrained`,
file hashes checked, no code from the folder runs); an upload is read only through
:func:`med3dvlm.data.preprocess.model_input` (what ``infer`` reads, through ``prepare``'s steps),
bounded by its header's voxel count and, for a DICOM zip, by its uncompressed size and file count;
each model answers one request at a time.
"""

from __future__ import annotations

import os
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from med3dvlm.artifacts.model_folder import is_model_folder, load_pretrained
from med3dvlm.data import scans
from med3dvlm.data.preprocess import WindowSpec, model_input, window_range
from med3dvlm.data.prompts import ask_prompt, caption_question, closed_question
from med3dvlm.models.generation import GenerationSettings
from med3dvlm.models.generation import stream_answer as stream_model_answer
from med3dvlm.models.vlm import VisionLanguageModel

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
    try:
        if name.lower().endswith(".zip"):
            with tempfile.TemporaryDirectory(prefix="med3dvlm-upload-") as tmp:
                series = _extract_dicom_zip(path, Path(tmp), limits)
                prepared = model_input(series, input_size, window, limits.max_voxels)
        else:
            prepared = model_input(path, input_size, window, limits.max_voxels)
    except UploadError:
        raise
    except (ValueError, OSError, RuntimeError) as err:
        raise UploadError(str(err).replace(str(path.parent) + os.sep, "")) from err
    if prepared.already_prepared:
        label = "as prepared"
    else:
        label = "none" if window_range(window) is None else str(window)
    return Scan(name, prepared.raw, prepared.volume, label, prepared.hu_unwindowed)


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
    """The prompt sent to the model (:func:`med3dvlm.data.prompts.ask_prompt`): the image block then
    the question, a report asked as captions were trained."""
    return ask_prompt(model.image_token, model.num_image_tokens, None if kind == "report" else text)


def shown_prompt(model: VisionLanguageModel, prompt: str) -> str:
    """``prompt`` with its image block written as a count (the block is ``num_image_tokens`` copies)."""
    block = model.image_token * model.num_image_tokens
    return prompt.replace(block, f"{model.image_token} × {model.num_image_tokens}", 1)


def stream_answer(model: VisionLanguageModel, lock: threading.Lock, volume: np.ndarray, prompt: str,
                  settings: GenerationSettings | None = None) -> Iterator[str]:
    """The answer so far, each time a new piece is decoded; holds ``lock`` until the answer is done."""
    with lock:
        yield from stream_model_answer(model, volume, prompt, settings)
