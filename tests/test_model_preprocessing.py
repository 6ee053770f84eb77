"""A model carries the preprocessing of its training data: infer, evaluate and the web page give it
the same input for the same scan with no window given, and another window is allowed with a warning."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.vlm import ENCODER_CONFIG, INPUT_SIZE, pretrain
from test_scans import ct_volume, write_nifti

from med3dvlm.artifacts.model_folder import save_pretrained
from med3dvlm.artifacts.record import ArtifactRecord
from med3dvlm.data.preparation import prepare_dataset
from med3dvlm.data.prepared import dataset_preprocessing
from med3dvlm.evaluation.tasks import EvalContext, ReportTask
from med3dvlm.models.generation import GenerationSettings
from med3dvlm.web.session import Models, prompt_for, read_upload, stream_answer

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8


def _prepare(root: Path, name: str, window: str) -> Path:
    scans = [write_nifti(root / f"ct{seed}.nii.gz", ct_volume((40, 36, 20), seed)) for seed in (0, 1)]
    listing = root / "own.csv"
    with open(listing, "w", newline="") as fh:
        csv.writer(fh).writerows(
            [("image", "report"), *((str(s), f"A CT of case {i}.") for i, s in enumerate(scans))]
        )
    # nii.gz stores float32: the prepared volume is exactly what the preprocessing computed
    prepare_dataset(
        listing,
        root / name,
        spatial_size=INPUT_SIZE,
        format="nii.gz",
        workers=0,
        progress=False,
        split={"test": 1.0},
        window=window,
    )
    return root / name


@pytest.fixture(scope="module")
def windowed(tmp_path_factory) -> tuple[Path, Path]:
    """Own CT prepared with the soft-tissue window, and a model folder whose record holds that preprocessing."""
    root = tmp_path_factory.mktemp("windowed")
    data = _prepare(root, "prepared", "soft_tissue")
    stage = pretrain(root)
    record = ArtifactRecord(
        "model_folder",
        "unit",
        INPUT_SIZE,
        dataset_preprocessing(data),
        {"vision_tower": ENCODER_CONFIG, "projector": stage.projector_config},
        prompt_format="m3d",
    )
    return save_pretrained(stage.model, root / "model", record), data


def _infer(model: Path, scan: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "med3dvlm.infer",
            f"model={model}",
            f"image={scan}",
            f"max_new_tokens={NEW_TOKENS}",
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_infer_evaluate_and_the_page_answer_identically_with_the_models_window(windowed, tmp_path, nltk_data):
    model, data = windowed
    ctx = EvalContext(
        out_dir=str(tmp_path / "eval"),
        data_dir=str(data),
        model=str(model),
        batch_size=1,
        progress=False,
        bertscore=None,
        generation=GenerationSettings(max_new_tokens=NEW_TOKENS),
        nltk_data=str(nltk_data),
    )
    with open(ReportTask(limit=None).run(ctx).files["predictions"], newline="") as fh:
        evaluated = {row["Image Path"]: row["pred"] for row in csv.DictReader(fh)}
    assert len(evaluated) == 2
    models = Models(model)
    name = models.names()[0]
    recipe = models.recipe(name, "model")
    assert recipe.window == (-160.0, 240.0) and recipe.orientation == "RAS"
    for image, prediction in evaluated.items():
        scan = (
            data.parent / f"{Path(image).name.removesuffix('.nii.gz')}.nii.gz"
        )  # own/ct0.nii.gz <- ct0.nii.gz
        answered = _infer(model, scan)
        assert answered.returncode == 0, answered.stderr[-2000:]
        assert "Hounsfield" not in answered.stdout + answered.stderr  # the model's window, not min-max
        page_scan = read_upload(scan, INPUT_SIZE, recipe)
        prompt = prompt_for(models.get(name), "report", "")
        page = list(
            stream_answer(
                models.get(name),
                models.lock(name),
                page_scan.volume,
                prompt,
                GenerationSettings(max_new_tokens=NEW_TOKENS),
            )
        )[-1]
        assert answered.stdout.strip() == prediction == page


def test_another_window_is_allowed_and_warns_naming_both(windowed, tmp_path, caplog, nltk_data):
    model, data = windowed
    scan = data.parent / "ct0.nii.gz"
    lung = _infer(model, scan, "intensity.window=lung")
    assert lung.returncode == 0, lung.stderr[-2000:]
    assert (
        "intensity.window=lung differs from the window this model's own data was prepared with ([-160.0, 240.0])"
        in lung.stdout + lung.stderr
    )
    with caplog.at_level(logging.WARNING):
        Models(model).recipe(Path(model).name, "lung")
    assert "differs from the window" in caplog.text
    caplog.clear()
    other = _prepare(tmp_path, "lung", "lung")  # evaluation on data prepared otherwise says so
    ctx = EvalContext(
        out_dir=str(tmp_path / "eval"),
        data_dir=str(other),
        model=str(model),
        batch_size=2,
        progress=False,
        bertscore=None,
        generation=GenerationSettings(max_new_tokens=2),
        nltk_data=str(nltk_data),
    )
    with caplog.at_level(logging.WARNING):
        ReportTask(limit=1).run(ctx)
    assert (
        "was prepared otherwise than the model's training data (source 'own': window: [-160.0, 240.0] vs "
        "[-1350.0, 150.0]" in caplog.text
    )
