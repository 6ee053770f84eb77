"""Builders for the data tests: a tiny prepared M3D folder and a tiny locally trained tokenizer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from med3dvlm.data.volume_io import write_volume
from med3dvlm.models.tiny_qwen import train_tokenizer

SHAPE = (8, 16, 16)
IMAGE_TOKEN = "<im_patch>"
VQA_COLUMNS = [
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
]
ORGANS = ("liver", "spleen", "kidney", "pancreas")
CASES = {
    "train": ["000001", "000002", "000003", "000004"],
    "validation": ["000005", "000006"],
    "test": ["000007", "000008", "000009"],
}
CSV_SPLIT = {"train": "train", "validation": "val", "test": "test"}


def report(case: str) -> str:
    organ = ORGANS[int(case) % len(ORGANS)]
    return f"A hypodense lesion of {int(case) * 3} mm in the {organ}. No ascites."


def closed_row(case: str, image: str) -> dict[str, str]:
    organ = ORGANS[int(case) % len(ORGANS)]
    letter = "ABCD"[int(case) % 4]
    choices = {
        f"Choice {c}": ("Liver" if c != letter else organ.title()) + (f" {c}" if c != letter else "")
        for c in "ABCD"
    }
    return {
        "Image Path": image,
        "Text": report(case),
        "Question Type": "3",
        "Question": "Which organ holds the lesion?",
        **choices,
        "Answer": organ.title(),
        "Answer Choice": letter,
    }


def yes_no_row(case: str, image: str) -> dict[str, str]:
    answer = "Yes" if int(case) % 2 else "No"
    return {
        "Image Path": image,
        "Text": report(case),
        "Question Type": "4",
        "Question": "Is there a lesion in the liver?",
        "Choice A": "",
        "Choice B": "",
        "Choice C": "",
        "Choice D": "",
        "Answer": answer,
        "Answer Choice": "",
    }


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] = VQA_COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{c: r.get(c, "") for c in columns} for r in rows])


def volume(case: str, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(int(case)).random(shape, dtype=np.float32)


def make_prepared(root: Path, fmt: str = "npy", shape: tuple[int, int, int] = SHAPE) -> Path:
    """A prepared folder: 4/2/3 cases (train/validation/test), one series each, reports, VQA CSVs."""
    splits: dict[str, list[dict[str, str]]] = {}
    for split, cases in CASES.items():
        entries, closed, yes_no = [], [], []
        for case in cases:
            case_dir = root / "M3D_Cap" / "ct_case" / case
            case_dir.mkdir(parents=True, exist_ok=True)
            image = f"M3D_Cap/ct_case/{case}/Axial_C__portal_venous_phase.{fmt}"
            write_volume(root / image, volume(case, shape))
            (case_dir / "text.txt").write_text(report(case), encoding="utf-8")
            entries.append({"image": image, "text": f"M3D_Cap/ct_case/{case}/text.txt"})
            closed.append(closed_row(case, image))
            yes_no.append(yes_no_row(case, image))
        splits[split] = entries
        write_csv(root / "M3D-VQA" / f"M3D_VQA_{CSV_SPLIT[split]}.csv", closed)
        write_csv(root / "M3D-VQA" / f"M3D_VQA_yn_{CSV_SPLIT[split]}.csv", yes_no)
    (root / "M3D_Cap.json").write_text(json.dumps(splits), encoding="utf-8")
    return root


def make_tokenizer(extra_corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The project's byte-level BPE trained on the test texts, plus ``<im_patch>``."""
    corpus = [report(c) for cases in CASES.values() for c in cases] + [
        "Which organ holds the lesion? Choices: A. Liver B. Spleen C. Kidney D. Pancreas",
        "Is there a lesion in the liver? Yes No",
        *(extra_corpus or []),
    ]
    tok = train_tokenizer(corpus, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok
