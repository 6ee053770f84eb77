"""The M3D release's layout: folder names, split file, VQA CSVs, and how an entry names a series.

The raw M3D-Cap download (``GoodBaiBai88/M3D-Cap``, unpacked) is ``M3D_Cap/<collection>/<case
id>/<series>/<k>.jpeg|png`` with one ``<case id>/text.txt`` per case; the collections are
``ct_case`` and ``ct_quizze`` (any other folder of the same shape is one too). A case holds several
series (planes, phases, windows) that share its report. The split file ``M3D_Cap.json`` (in
``M3D_Cap/`` in the release) maps list names (``train``, ``validation``, ``test`` and subsets such
as ``test100``, ``test1k``) to ``{"image", "text"}`` entries that name volumes the way the
original's prepare writes them: ``M3D_Cap_npy/<collection>/<case id>/<series>.npy`` with the series
folder's name folded to ASCII (``unidecode``: "Pöschl" -> "Poschl"). The M3D-VQA CSVs
(``M3D_VQA_train.csv``, ``_val``, ``_test``, ``_test5k``, ``M3D_VQA_yn_train.csv``) name volumes in
the same way in their ``Image Path`` column.

A prepared folder (``python -m med3dvlm.prepare``) keeps the shape: ``M3D_Cap/<collection>/<case
id>/<folded series>.npy|.nii.gz`` and ``text.txt``, ``M3D_Cap.json`` with every list of the
release, ``M3D-VQA/`` with every CSV rewritten to the prepared paths.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from text_unidecode import unidecode

from med3dvlm.data.errors import DataError
from med3dvlm.data.prepared import SPLITS, VOLUME_SUFFIXES, subfolders

log = logging.getLogger(__name__)

CAP_DIR = "M3D_Cap"
VQA_DIR = "M3D-VQA"
SPLIT_FILE = "M3D_Cap.json"
REPORT_FILE = "text.txt"
IMAGE_COLUMN = "Image Path"
"""The VQA CSV column that names a row's volume."""
VQA_COLUMNS: tuple[str, ...] = (
    IMAGE_COLUMN,
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
)
CORPUS_COLUMNS: tuple[str, ...] = ("Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer")
"""The VQA columns whose texts a tokenizer trained on a dataset sees (:func:`corpus_texts`)."""
CSV_SPLIT = {"train": "train", "validation": "val", "test": "test"}
TEST5K_CSV = "M3D_VQA_test5k.csv"
"""The release's 5,000-question subset of the test CSV (what later papers score on)."""


def vqa_csv_name(split: str, yes_no: bool = False) -> str:
    """``M3D_VQA[_yn]_{train,val,test}.csv``: the release's name of a split's VQA CSV."""
    if split not in CSV_SPLIT:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"M3D_VQA{'_yn' if yes_no else ''}_{CSV_SPLIT[split]}.csv"


def fold_series_name(name: str) -> str:
    """A series folder's name as the original's prepare writes it: folded to ASCII with the
    Text::Unidecode tables (the original uses ``unidecode``; ``text_unidecode`` ports the same
    tables under a permissive licence), so "Pöschl" -> "Poschl", "Straße" -> "Strasse"."""
    return unidecode(name)


def series_key(image_path: str) -> str | None:
    """``<collection>/<case id>/<series>`` of an image path however the release or a prepared
    folder writes it (``M3D_Cap_npy/ct_quizze/000006/Axial_non_contrast.npy``,
    ``ct_case/000001/Axial.npy``, ``M3D_Cap/ct_case/000001/Axial.nii.gz``); ``None`` for a path
    with fewer than three parts."""
    path = image_path.strip().replace("\\", "/")
    for suffix in VOLUME_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    parts = PurePosixPath(path).parts
    return "/".join(parts[-3:]) if len(parts) >= 3 and all(parts[-3:]) else None


def find_collections(cap_dir: Path) -> list[Path]:
    """The collection folders of ``M3D_Cap/``: those whose case folders hold a ``text.txt``.

    A folder with only ``.zip`` archives (the release as downloaded) or with its cases one level
    too deep is an error that says what to do; any other folder is ignored with a warning.
    """
    found = []
    for folder in subfolders(cap_dir):
        children = subfolders(folder)
        if any((child / REPORT_FILE).is_file() for child in children):
            found.append(folder)
            continue
        archives = sorted(folder.glob("*.zip"))
        if archives:
            raise DataError(
                folder,
                f"holds {len(archives)} .zip archive(s) ({archives[0].name}, ...) and no case "
                "folders: unpack them so that the case folders (<id>/text.txt) sit directly here",
            )
        nested = [child for child in children if any((g / REPORT_FILE).is_file() for g in subfolders(child))]
        if nested:
            raise DataError(
                folder,
                f"its case folders sit one level too deep ({nested[0].name}/<id>/text.txt): "
                f"move them up into {folder}",
            )
        log.warning("%s: no case folders (<id>/%s) inside; not a collection, ignored", folder, REPORT_FILE)
    if not found:
        raise DataError(
            cap_dir, f"no collection folders (ct_case/, ct_quizze/, ... holding <id>/{REPORT_FILE})"
        )
    return found


def split_file_path(raw_root: Path) -> Path | None:
    """The release's ``M3D_Cap/M3D_Cap.json`` (or ``M3D_Cap.json`` beside ``M3D_Cap/``), if any."""
    for path in (raw_root / CAP_DIR / SPLIT_FILE, raw_root / SPLIT_FILE):
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class SplitFile:
    """A split file's lists in its order: list name -> series keys (one per entry)."""

    path: Path | None
    lists: dict[str, list[str]]

    def split_of(self) -> dict[str, str]:
        """Series key -> its split (``train``, ``validation``, ``test``); other lists are subsets."""
        splits: dict[str, str] = {}
        for name in SPLITS:
            for key in self.lists.get(name, []):
                if splits.setdefault(key, name) != name:
                    raise DataError(self.path, f"{key} is listed in both {splits[key]!r} and {name!r}")
        return splits


def read_split_file(path: Path | None) -> SplitFile:
    """Every list of an original-format ``M3D_Cap.json`` as series keys; ``None`` -> no lists."""
    if path is None:
        return SplitFile(None, {})
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"unreadable split file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(content, dict) or not all(isinstance(v, list) for v in content.values()):
        raise DataError(path, "expected a JSON object of lists ('train', 'validation', 'test', ...)")
    lists: dict[str, list[str]] = {}
    for name, entries in content.items():
        keys = []
        for i, entry in enumerate(entries):
            image = entry.get("image") if isinstance(entry, dict) else None
            key = series_key(image) if isinstance(image, str) else None
            if key is None:
                raise DataError(
                    path,
                    f"{name}[{i}] {entry!r} has no 'image' of the form "
                    "[M3D_Cap_npy/]<collection>/<case id>/<series>.npy",
                )
            keys.append(key)
        lists[name] = keys
    return SplitFile(path, lists)


def vqa_csvs(vqa_dir: Path) -> list[Path]:
    """Every CSV of the M3D-VQA release folder (train, val, test, test5k, yn_train, ...)."""
    return sorted(vqa_dir.glob("*.csv")) if vqa_dir.is_dir() else []


def is_test_csv(name: str) -> str | None:
    """For a test CSV of the release (``M3D_VQA[_yn]_test*.csv``), the name of its train CSV."""
    match = re.fullmatch(r"M3D_VQA(_yn)?_test\w*\.csv", name)
    return f"M3D_VQA{match.group(1) or ''}_train.csv" if match else None


def corpus_texts(root: str | os.PathLike) -> list[str]:
    """All report texts and VQA question/choice/answer texts under a raw or prepared M3D root, deduplicated.

    For training tokenizers: reports come from every ``text.txt`` of a case under ``M3D_Cap``, the
    rest from every CSV under ``M3D-VQA``; order is deterministic.
    """
    root = Path(root)
    texts: dict[str, None] = {}
    for path in sorted((root / CAP_DIR).glob(f"*/*/{REPORT_FILE}")):
        text = path.read_text(encoding="utf-8").strip()
        if text:
            texts[text] = None
    for path in sorted((root / VQA_DIR).glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for column in CORPUS_COLUMNS:
                    value = (row.get(column) or "").strip()
                    if value:
                        texts[value] = None
    return list(texts)
