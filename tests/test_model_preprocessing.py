"""A model carries the preprocessing of its training data: infer, evaluate and the web page give it
the same input for the same scan with no window given, and another window is allowed with a warning."""

from __future__ import annotations

import csv
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers.commands import run_in_process
from helpers.vlm import ENCODER_CONFIG, INPUT_SIZE, model_folder, pretrain
from test_scans import ct_volume, write_nifti

from med3dvlm.artifacts.model_folder import save_pretrained
from med3dvlm.artifacts.record import ArtifactRecord
from med3dvlm.data.preparation import prepare_dataset
from med3dvlm.data.prepared import dataset_preprocessing
from med3dvlm.data.preprocess import Preprocessing, SourcePreprocessing, looks_like_ct
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


def _infer(monkeypatch, capfd, caplog, model: Path, scan: Path, *extra: str) -> tuple[str, str]:
    """``python -m med3dvlm.infer`` in this process: (what it printed, what it logged and told)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_in_process(
            monkeypatch, "infer", f"model={model}", f"image={scan}", f"max_new_tokens={NEW_TOKENS}", *extra
        )
    printed = capfd.readouterr()
    return printed.out, printed.err + caplog.text


def test_infer_evaluate_and_the_page_answer_identically_with_the_models_window(
    windowed, tmp_path, nltk_data, monkeypatch, capfd, caplog
):
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
        answer, told = _infer(monkeypatch, capfd, caplog, model, scan)
        assert "Hounsfield" not in told  # the model's window, not min-max
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
        assert answer.strip() == prediction == page


def test_another_window_is_allowed_and_warns_naming_both(
    windowed, tmp_path, caplog, nltk_data, monkeypatch, capfd
):
    model, data = windowed
    scan = data.parent / "ct0.nii.gz"
    _, told = _infer(monkeypatch, capfd, caplog, model, scan, "intensity.window=lung")
    assert (
        "intensity.window=lung differs from the window this model's own data was prepared with ([-160.0, 240.0])"
        in told
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


def mri_volume(shape: tuple[int, int, int] = (14, 12, 10), seed: int = 0) -> np.ndarray:
    """An (x, y, z) int16 MRI in the scanner's arbitrary units: a dark background around a body of
    300-900 (no air near -1000, as a CT in HU has)."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    volume = np.where(x**2 + y**2 < 0.8, 600.0, 0.0) + rng.normal(0, 100, shape) * (x**2 + y**2 < 0.8)
    return np.round(np.clip(volume, 0, None)).astype(np.int16)


def test_intensities_that_are_not_ct_are_told_apart():
    ct = ct_volume()
    assert looks_like_ct(ct)
    assert not looks_like_ct(mri_volume())
    assert not looks_like_ct(ct + 1024)  # a CT stored without its rescale: air at 0


def test_a_ct_window_on_a_scan_that_is_not_ct_warns_in_infer_and_the_page(tmp_path, monkeypatch, caplog):
    from med3dvlm.web.page import _describe

    ct_window = SourcePreprocessing(window="soft_tissue", scale="window", orientation="RAS")
    mri = write_nifti(tmp_path / "mri.nii.gz", mri_volume())
    page_scan = read_upload(mri, INPUT_SIZE, ct_window)
    assert page_scan.unlike_ct and "does not look like CT" in _describe(page_scan)
    assert not read_upload(mri, INPUT_SIZE, replace(ct_window, window=None, scale="minmax")).unlike_ct
    ct = read_upload(write_nifti(tmp_path / "ct.nii.gz", ct_volume()), INPUT_SIZE, ct_window)
    assert not ct.unlike_ct and "does not look like CT" not in _describe(ct)

    model = model_folder(tmp_path, Preprocessing("own", {"own": ct_window}))  # trained on windowed CT
    for window, warned in (("null", True), ("lung", True), ("none", False)):
        caplog.clear()
        run_in_process(
            monkeypatch,
            "infer",
            f"model={model}",
            f"image={mri}",
            "max_new_tokens=1",
            f"intensity.window={window}",
        )
        assert ("mri.nii.gz does not look like CT" in caplog.text) == warned, (window, caplog.text)


def test_prepare_warns_when_scans_under_a_ct_window_do_not_look_like_ct(tmp_path, caplog):
    rows = [("ct.nii.gz", ct_volume()), ("mri.nii.gz", mri_volume())]
    for name, volume in rows:
        write_nifti(tmp_path / name, volume)
    listing = tmp_path / "scans.csv"
    with open(listing, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(
            [("image", "report"), *((name, f"report of {name}") for name, _ in rows)]
        )
    with caplog.at_level(logging.WARNING):
        manifest = prepare_dataset(
            listing, tmp_path / "out", spatial_size=(8, 8, 8), workers=0, progress=False, window="soft_tissue"
        )
    flags = {
        Path(output).name.split(".")[0]: entry["looks_like_ct"]
        for output, entry in manifest["volumes"].items()
    }
    assert flags == {"ct": True, "mri": False}
    assert "1 of 2 scans do not look like CT" in caplog.text and "intensity.window=none" in caplog.text
