"""What the web page does, without the page: find and load model folders, read an upload through
``prepare``'s steps, cut the three orthogonal views, build the benchmark's prompts and stream an
answer. No Gradio here, so the tests call every function directly.

Guarantees: a model folder is loaded strictly (:func:`med3dvlm.artifacts.model_folder.load_pretrained`,
file hashes checked, no code from the folder runs); an upload is read only through
:func:`med3dvlm.data.preprocess.model_input` with the preprocessing of the model's training data
(its record: voxel order, window, crop, resize; what ``infer`` does), bounded by its header's voxel
count and, for a DICOM zip, by its uncompressed size and file count; each model answers one request
at a time. Views are shown as a radiologist reads them (axial: anterior up, the patient's right on
the left; coronal: superior up, right on the left; sagittal: superior up, anterior on the left),
labelled, with their true aspect.
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

from med3dvlm.artifacts.hub import cached_model_folder
from med3dvlm.artifacts.model_folder import Pretrained, is_model_folder, load_pretrained
from med3dvlm.artifacts.record import read_record
from med3dvlm.data import scans
from med3dvlm.data.preprocess import (
    SourcePreprocessing,
    WindowSpec,
    foreground_box,
    model_input,
    scale_intensity,
)
from med3dvlm.data.prompts import ask_prompt, caption_question, closed_question
from med3dvlm.models.generation import GenerationSettings
from med3dvlm.models.generation import stream_answer as stream_model_answer
from med3dvlm.models.vlm import VisionLanguageModel

UPLOAD_SUFFIXES: tuple[str, ...] = (*scans.SUFFIXES, ".zip", ".npy")
"""What the page accepts: the scan formats of ``data.scans``, a DICOM series as a zip, a prepared ``.npy``."""
VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
# Per view: the volume axis cut, then (rows' axis, top label), (columns' axis, left label), axes as
# indices of (D, H, W); the labels are the radiological display convention.
_VIEW_AXES: dict[str, tuple[int, tuple[int, str], tuple[int, str]]] = {
    "axial": (0, (1, "A"), (2, "R")),
    "coronal": (1, (0, "S"), (2, "R")),
    "sagittal": (2, (0, "S"), (1, "A")),
}
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
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
    """One upload as read (``(D, H, W)`` in the model's voxel order, as stored) and as the model
    receives it, with the voxel spacing (mm) of each and the recipe it went through."""

    name: str
    raw: np.ndarray
    volume: np.ndarray
    recipe: SourcePreprocessing
    hu_unwindowed: bool
    raw_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unlike_ct: bool = False
    """A CT window was applied to intensities that do not look like CT (:func:`~med3dvlm.data.preprocess.looks_like_ct`)."""

    @property
    def window(self) -> str:
        """How the page names the intensity mapping."""
        return (
            f"[{self.recipe.window[0]:g}, {self.recipe.window[1]:g}] HU"
            if self.recipe.window
            else "none (min-max)"
        )


class Models:
    """The model folders the page offers, loaded on first use and kept; one lock per model, held for
    a whole answer, so two requests never run one model at once."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        models_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        verify_files: bool = True,
    ) -> None:
        folders: dict[str, Path] = {}
        if model is not None:
            folder = cached_model_folder(model)  # a folder, or a Hub id from the local cache
            read_record(folder, "model_folder", quiet=True)  # a wrong path fails now, not at the first upload
            folders[Path(model).name] = folder
        if models_dir is not None:
            root = Path(models_dir)
            if not root.is_dir():
                raise FileNotFoundError(f"models_dir={root}: not a folder")
            folders |= {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_model_folder(p)}
        if not folders:
            raise FileNotFoundError(
                f"no model folder found (model={model}, models_dir={models_dir}); write one "
                "with python -m med3dvlm.export or python -m med3dvlm.import_weights"
            )
        self.folders = folders
        self.device, self.dtype, self.verify_files = device, dtype, verify_files
        self._loaded: dict[str, Pretrained] = {}
        self._locks = {name: threading.Lock() for name in folders}
        self._loading = threading.Lock()

    def names(self) -> list[str]:
        return list(self.folders)

    def loaded(self, name: str) -> Pretrained:
        """The loaded model folder ``name`` (loading it the first time): the model and its record."""
        if name not in self.folders:
            raise KeyError(f"unknown model {name!r}; choose one of {self.names()}")
        with self._loading:
            if name not in self._loaded:
                found = load_pretrained(self.folders[name], dtype=self.dtype, verify_files=self.verify_files)
                found.model.to(self.device).eval()
                self._loaded[name] = found
        return self._loaded[name]

    def get(self, name: str) -> VisionLanguageModel:
        """The model ``name`` (loading it the first time)."""
        return self.loaded(name).model

    def recipe(
        self, name: str, window: WindowSpec = "model", source: str | None = None
    ) -> SourcePreprocessing:
        """What an upload goes through for model ``name``: its record's recipe of ``source``, with
        ``window`` instead of its own unless ``"model"``."""
        preprocessing = self.loaded(name).record.preprocessing
        return preprocessing.for_input(source, None if window == "model" else window)

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
            raise UploadError(
                f"{path.name}: {len(members)} files, more than the limit of {limits.max_zip_files}"
            )
        written = 0
        for member in members:
            target = (into / member.filename).resolve()
            if (
                not target.is_relative_to(into.resolve())
                or (member.external_attr >> 16) & 0o170000 == 0o120000
            ):
                raise UploadError(
                    f"{path.name}: member {member.filename!r} is a link or leaves the archive's folder"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as out:
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > limits.max_zip_bytes:
                        raise UploadError(
                            f"{path.name}: more than {limits.max_zip_bytes >> 20} MiB uncompressed"
                        )
                    out.write(chunk)
    folders = {p.parent for p in into.rglob("*") if p.is_file()}
    if len(folders) != 1:
        raise UploadError(
            f"{path.name}: expected one DICOM series (one folder of files), found {len(folders)} folders"
        )
    return folders.pop()


def read_upload(
    path: str | os.PathLike,
    input_size: tuple[int, int, int],
    recipe: SourcePreprocessing,
    limits: Limits | None = None,
) -> Scan:
    """Read an uploaded file for a model of ``input_size``: a scan goes through ``recipe`` (the model's
    training data's preprocessing), a prepared volume is used as it is (it must have the model's size)."""
    path, limits = Path(path), limits or Limits()
    name = path.name
    if not name.lower().endswith(UPLOAD_SUFFIXES) and not path.is_dir():
        raise UploadError(
            f"{name}: not a supported upload; use {scans.SUPPORTED}, a DICOM series as .zip, "
            "or a prepared .npy"
        )
    try:
        if name.lower().endswith(".zip"):
            with tempfile.TemporaryDirectory(prefix="med3dvlm-upload-") as tmp:
                series = _extract_dicom_zip(path, Path(tmp), limits)
                prepared = model_input(series, input_size, recipe, limits.max_voxels)
        else:
            prepared = model_input(path, input_size, recipe, limits.max_voxels)
    except UploadError:
        raise
    except (ValueError, OSError, RuntimeError) as err:
        raise UploadError(str(err).replace(str(path.parent) + os.sep, "")) from err
    if prepared.already_prepared:
        return Scan(
            name, prepared.raw, prepared.volume, SourcePreprocessing(orientation=recipe.orientation), False
        )
    return Scan(
        name,
        prepared.raw,
        prepared.volume,
        recipe,
        prepared.hu_unwindowed,
        prepared.spacing,
        model_spacing(prepared.raw, prepared.spacing, recipe, input_size),
        prepared.unlike_ct,
    )


def model_spacing(
    raw: np.ndarray,
    spacing: tuple[float, float, float],
    recipe: SourcePreprocessing,
    input_size: tuple[int, int, int],
) -> tuple[float, float, float]:
    """The voxel spacing (mm) of what the model receives: the extent of the region it sees (the
    foreground box when the recipe crops) over its input size."""
    extent = [n * s for n, s in zip(raw.shape, spacing)]
    if recipe.foreground_threshold is not None and recipe.spacing is None:
        box = foreground_box(scale_intensity(raw, recipe), recipe.foreground_threshold)
        extent = [(b.stop - b.start) * s for b, s in zip(box, spacing)]
    return tuple(e / n for e, n in zip(extent, input_size))


def view_labels(kind: str, orientation: str | None) -> tuple[str, str]:
    """(top, left) of a view as :func:`view` shows it; unknown (``?``) for a volume of unknown order."""
    if orientation is None:
        return "?", "?"
    _, (_, top), (_, left) = _VIEW_AXES[kind]
    return top, left


def view(
    volume: np.ndarray,
    kind: str,
    position: float,
    display: tuple[float, float] | None = None,
    orientation: str | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """One orthogonal slice of ``(D, H, W)`` as 8-bit grey: ``kind`` axial / coronal / sagittal,
    ``position`` in [0, 1] along that axis, intensities mapped from ``display`` (default: the
    volume's range). With the volume's ``orientation`` (axis codes of (W, H, D)) the slice is turned
    to the radiological display (:func:`view_labels`); with its ``spacing`` (mm, (D, H, W)) it is
    stretched to its true aspect."""
    axis, (rows_axis, top), (cols_axis, left) = _VIEW_AXES[kind]
    index = min(round(position * (volume.shape[axis] - 1)), volume.shape[axis] - 1)
    plane = np.take(volume, index, axis=axis)
    if orientation is not None:
        codes = {2: orientation[0], 1: orientation[1], 0: orientation[2]}  # (W, H, D) -> axis index
        if codes[rows_axis] == top:
            plane = plane[::-1]
        if codes[cols_axis] == left:
            plane = plane[:, ::-1]
    low, high = display if display is not None else (float(volume.min()), float(volume.max()))
    scaled = np.clip((plane - low) / max(high - low, 1e-6), 0.0, 1.0)
    image = (scaled * 255).astype(np.uint8)
    if spacing is not None:
        image = _true_aspect(image, spacing[rows_axis], spacing[cols_axis])
    return image


def _true_aspect(image: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """``image`` resampled (nearest) so that a pixel is as tall as it is wide in millimetres."""
    finest = min(row_mm, col_mm)
    rows = max(1, round(image.shape[0] * row_mm / finest))
    cols = max(1, round(image.shape[1] * col_mm / finest))
    if (rows, cols) == image.shape:
        return image
    row_index = np.minimum((np.arange(rows) * image.shape[0] / rows).astype(int), image.shape[0] - 1)
    col_index = np.minimum((np.arange(cols) * image.shape[1] / cols).astype(int), image.shape[1] - 1)
    return image[row_index][:, col_index]


def raw_display_range(scan: Scan) -> tuple[float, float] | None:
    """Show the scan as read through the model's window (HU), else over its own range."""
    return scan.recipe.window


def question_text(
    kind: str, question: str = "", choices: tuple[str, str, str, str] = ("", "", "", "")
) -> str:
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


def prompt_for(model: VisionLanguageModel, kind: str, text: str, prompt_format: str | None = "m3d") -> str:
    """The prompt sent to the model (:func:`med3dvlm.data.prompts.ask_prompt`) in its prompt format: the
    question, or a report asked as reports were trained."""
    return ask_prompt(
        model.tokenizer,
        model.image_token,
        model.num_image_tokens,
        None if kind == "report" else text,
        prompt_format,
    )


def shown_prompt(model: VisionLanguageModel, prompt: str) -> str:
    """``prompt`` with its image block written as a count (the block is ``num_image_tokens`` copies)."""
    block = model.image_token * model.num_image_tokens
    return prompt.replace(block, f"{model.image_token} × {model.num_image_tokens}", 1)


def stream_answer(
    model: VisionLanguageModel,
    lock: threading.Lock,
    volume: np.ndarray,
    prompt: str,
    settings: GenerationSettings | None = None,
) -> Iterator[str]:
    """The answer so far, each time a new piece is decoded; holds ``lock`` until the answer is done."""
    with lock:
        yield from stream_model_answer(model, volume, prompt, settings)
