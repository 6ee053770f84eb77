"""CT-RATE and RadGenome-ChestCT: a miniature of each version prepares with every volume kept, HU
right, no patient in two splits and the labels carried; the CSVs are read strictly; RadGenome's rows
become questions; the zero-shot scores equal scikit-learn's on the written probabilities; and on CPU
prepare -> siglip -> zero-shot -> retrieval runs end to end."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.commands import run_forked, run_in_process
from sklearn.metrics import roc_auc_score

from med3dvlm.data.errors import DataError
from med3dvlm.data.preparation import prepare_dataset
from med3dvlm.data.releases.ctrate import synthetic as syn
from med3dvlm.data.volume_io import read_volume

REPO = Path(__file__).resolve().parents[1]
SLICES, SIZE = 24, 48
CTCLIP_WINDOW = (-1000.0, 1000.0)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> syn.GenerationSummary:
    return syn.generate(
        tmp_path_factory.mktemp("ctrate") / "raw", 12, seed=0, slices=SLICES, size=SIZE, workers=0
    )


def _prepare(source: Path, out: Path, **options) -> dict:
    return prepare_dataset(
        source / "dataset",
        out,
        spatial_size=(SLICES, SIZE, SIZE),
        workers=0,
        progress=False,
        window=CTCLIP_WINDOW,
        dataset="ctrate",
        options={"validation_fraction": 0.3, **options},
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _patient(name: str) -> str:
    return "_".join(Path(name).name.split("_")[:2])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_each_version_keeps_every_volume_with_hu_right_labels_carried_and_patients_in_one_split(
    release, tmp_path, version
):
    source = release.out
    if version == "v1":  # the v1 tree alone: the version follows from the tree
        source = tmp_path / "v1"
        (source / "dataset").mkdir(parents=True)
        for entry in (release.out / "dataset").iterdir():
            if not entry.name.endswith("_fixed"):
                (source / "dataset" / entry.name).symlink_to(entry)
    out = tmp_path / "prepared"
    manifest = _prepare(source, out)

    volumes = [v for split in ("train", "valid") for v in release.volumes[split]]
    assert manifest["ctrate"]["version"] == version and manifest["ctrate"]["not_like_the_version"] == []
    assert manifest["counts"]["volumes_ok"] == len(volumes) and not manifest["skipped"]
    # Each volume keeps its CT-RATE name, and HU right: the 40 HU block lands at (40 + 1000) / 2000 = 0.52.
    for name in volumes:
        stem = name.removesuffix(".nii.gz")
        relative = Path(_patient(name)) / stem.rsplit("_", 1)[0] / name
        prepared = read_volume(out / "CT-RATE" / relative)
        raw = nib.load(str(release.out / "dataset" / syn.VOLUME_DIRS[version][name.split("_")[0]] / relative))
        x, y, z = syn.calibration_region(raw.shape, raw.header.get_zooms())
        block = prepared[z, y, x]  # prepared (D, H, W) = stored (z, y, x)
        np.testing.assert_allclose(block, 0.52, atol=1e-6, err_msg=name)

    labels = {row["VolumeName"]: row for row in _rows(out / "CT-RATE" / "labels.csv")}
    assert sorted(labels) == sorted(volumes)
    for name, row in labels.items():
        assert tuple(int(row[label]) for label in syn.CTRATE_LABELS) == release.labels[name]
        assert (out / row["Image Path"]).is_file()

    splits = json.loads((out / "CT-RATE.json").read_text())
    patients = {split: {_patient(e["image"]) for e in entries} for split, entries in splits.items()}
    assert all(
        not (patients[a] & patients[b])
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test"))
    )
    assert patients["validation"] and patients["test"] == {
        _patient(v) for v in release.volumes["valid"] if labels[v]["split"] == "test"
    }
    assert {row["split"] for row in labels.values() if row["VolumeName"].startswith("valid_")} == {"test"}


def test_not_given_sections_are_empty_and_reports_join_findings_and_impressions(release, tmp_path):
    out = tmp_path / "prepared"
    _prepare(release.out, out, reconstructions="first")
    reports = {
        row["VolumeName"]: row
        for split in ("train", "validation")
        for row in _rows(release.out / "dataset" / "radiology_text_reports" / f"{split}_reports.csv")
    }
    splits = json.loads((out / "CT-RATE.json").read_text())
    entries = [e for split in ("train", "validation", "test") for e in splits[split]]
    assert entries and all(
        Path(e["image"]).name.endswith("_1.nii.gz") for e in entries
    )  # first reconstruction
    for entry in entries:
        row = reports[Path(entry["image"]).name]
        parts = [row[s] for s in ("Findings_EN", "Impressions_EN") if row[s] != "Not given."]
        assert (out / entry["text"]).read_text() == " ".join(parts)


@pytest.mark.parametrize("stored, named", [("v2", "v1"), ("v1", "v2")])
def test_voxels_that_disagree_with_the_version_are_named(release, tmp_path, caplog, stored, named):
    """One version's files under the other's folder names (renamed by hand): the tree decides the
    rescale, the voxels' air level (shifted by 1024 HU) says it was wrong."""
    source = tmp_path / "renamed"
    (source / "dataset").mkdir(parents=True)
    for entry in (release.out / "dataset").iterdir():
        split = entry.name.removesuffix("_fixed")
        if split in syn.SPLITS:
            if entry.name == syn.VOLUME_DIRS[stored][split]:
                (source / "dataset" / syn.VOLUME_DIRS[named][split]).symlink_to(entry)
        else:
            (source / "dataset" / entry.name).symlink_to(entry)
    with caplog.at_level(logging.WARNING):
        manifest = _prepare(source, tmp_path / "prepared")
    assert manifest["ctrate"]["version"] == named
    assert len(manifest["ctrate"]["not_like_the_version"]) == manifest["counts"]["volumes_ok"]
    assert "check version=" in caplog.text


def test_a_missing_column_or_a_misplaced_volume_names_the_file(release, tmp_path):
    source = tmp_path / "copy"
    shutil.copytree(release.out, source, symlinks=True)
    metadata = source / "dataset" / "metadata" / "train_metadata.csv"
    text = metadata.read_text()
    metadata.write_text(text.replace("ZSpacing", "Z_Spacing", 1))
    with pytest.raises(DataError, match=r"train_metadata\.csv.*ZSpacing"):
        _prepare(source, tmp_path / "a")
    metadata.write_text(text)
    stray = source / "dataset" / "train_fixed" / "train_1" / "train_1_a" / "train_2_a_1.nii.gz"
    shutil.copy(next((source / "dataset" / "train_fixed" / "train_1" / "train_1_a").iterdir()), stray)
    with pytest.raises(DataError, match="train_2_a_1.nii.gz.*not a CT-RATE train volume name in its place"):
        _prepare(source, tmp_path / "b")


def test_radgenome_rows_become_questions_about_the_prepared_volumes(release, tmp_path):
    from med3dvlm.data.releases.ctrate.samples import read_radgenome, vqa_text

    out = tmp_path / "prepared"
    _prepare(release.out, out, radgenome=str(release.out / "radgenome"))
    images = {
        e["image"] for entries in json.loads((out / "CT-RATE.json").read_text()).values() for e in entries
    }
    presence = read_radgenome(out, "test", "vqa_presence")
    source = [r for r in _rows(release.out / "radgenome" / "validation_vqa_presence.csv")]
    assert len(presence) == len(source) and {r["Image Path"] for r in presence} <= images | {
        str(p.relative_to(out)) for p in (out / "CT-RATE").rglob("*.nii.gz")
    }
    row = presence[0]
    assert vqa_text("presence", row) == (
        f"Is there {row['Finding']} in the {row['Anatomy']}?",
        row["Presence"],
    )
    assert vqa_text("abnormality", {"Anatomy": "", "Abnormality": ""}) == (
        "What abnormality is seen in the whole?",
        "No Findings",
    )


def test_our_resampled_windowed_volume_is_ctclips_up_to_the_crop(release):
    """Where our steps are CT-CLIP's (rescale, trilinear resample to a spacing, [-1000, 1000] window),
    the volumes agree: ours = (CT-CLIP's + 1) / 2, in our (z, y, x) order."""
    from med3dvlm.benchmarks.ctrate import ctclip_resampled
    from med3dvlm.data.preprocess import SourcePreprocessing, resample_to_spacing, scale_intensity
    from med3dvlm.data.scans import load_scan

    name = release.volumes["train"][0]
    path = next((release.out / "dataset" / "train").glob(f"*/*/{name}"))
    row = next(
        r
        for r in _rows(release.out / "dataset" / "metadata" / "train_metadata.csv")
        if r["VolumeName"] == name
    )
    slope, intercept = float(row["RescaleSlope"]), float(row["RescaleIntercept"])
    z_mm, xy_mm = float(row["ZSpacing"]), float(row["XYSpacing"].strip("[]").split(",")[0])
    target = (6.0, 3.0, 3.0)
    theirs = ctclip_resampled(path, slope, intercept, z_mm, xy_mm, target)
    scan = load_scan(path, orientation=None)
    hu = scan.array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    ours = scale_intensity(
        resample_to_spacing(hu, (z_mm, xy_mm, xy_mm), target),
        SourcePreprocessing(window=CTCLIP_WINDOW, scale="window"),
    )
    # float32 here, float64 there: equal within 5e-6 of the window, 0.01 HU
    np.testing.assert_allclose(ours, (theirs.transpose(2, 1, 0) + 1) / 2, atol=5e-6)


def test_stage_3_mixes_reports_with_radgenome_when_the_folder_has_it(release, tmp_path):
    from helpers.data import make_tokenizer

    from med3dvlm.data.datamodule import M3DDataModule

    def tasks(out: Path) -> dict[str, int]:
        datamodule = M3DDataModule(out, "finetune", make_tokenizer(), num_image_tokens=4, spatial_size=None)
        dataset = datamodule.build("train", train=True)
        parts = getattr(dataset, "datasets", [dataset])
        return {part.task: len(part) for part in parts}

    _prepare(release.out, tmp_path / "plain")
    assert set(tasks(tmp_path / "plain")) == {"caption"}
    _prepare(release.out, tmp_path / "radgenome", radgenome=str(release.out / "radgenome"))
    mixed = tasks(tmp_path / "radgenome")
    assert set(mixed) == {"caption", "radgenome_vqa", "radgenome_region"} and min(mixed.values()) > 0


def test_radgenome_scores_per_row_and_per_kind():
    from med3dvlm.evaluation.ctrate import RadGenomeVQATask
    from med3dvlm.evaluation.tasks import EvalContext

    rows = [
        {"Question Type": "location", "Pred": "lung/right lung", "Answer": "lung/left lung"},
        {"Question Type": "presence", "Pred": "Yes.", "Answer": "yes"},
        {"Question Type": "presence", "Pred": "No", "Answer": "Yes"},
        {"Question Type": "size", "Pred": "1.2 x 0.8 cm", "Answer": "10x8 mm"},
    ]
    metrics, _ = RadGenomeVQATask().score(rows, EvalContext(out_dir=".", data_dir="."))
    assert [r["Score"] for r in rows] == [
        "0.5000",
        "1.0000",
        "0.0000",
        "1.0000",
    ]  # |12-10| + |8-8| over 2 dims
    assert (
        metrics["metrics"]["presence"]["accuracy"] == 0.5 and metrics["metrics"]["size"]["mean_l1_mm"] == 1.0
    )


@pytest.mark.slow
def test_prepare_siglip_zero_shot_and_retrieval_on_cpu(tmp_path, monkeypatch):
    """The chain at demo size: synthetic CT-RATE -> prepare -> stage 1 (ctrate_demo) -> zero-shot (its
    AUROC equal to scikit-learn's on predictions_zero_shot.csv) -> linear probe -> retrieval with
    CT-CLIP's recall. Training runs as a process of its own; the other commands run in this
    process."""
    work = tmp_path
    monkeypatch.chdir(work)
    run_in_process(
        monkeypatch,
        "synthetic",
        "dataset=ctrate",
        f"out={work / 'raw'}",
        "cases=24",
        "slices=24",
        "size=48",
        "workers=0",
        f"hydra.run.dir={work / 'outputs/synthetic'}",
    )
    data = work / "data" / "ctrate_demo" / "prepared"
    run_in_process(
        monkeypatch,
        "prepare",
        "dataset=ctrate",
        f"source={work / 'raw' / 'dataset'}",
        f"out={data}",
        "format=npy",
        "workers=0",
        "progress=false",
        "spatial_size=[16,32,32]",
        "validation_fraction=0.2",
        f"hydra.run.dir={work / 'outputs/prepare'}",
    )
    run_forked(
        "train",
        "stage=siglip",
        "experiment=ctrate_demo",
        "logger=none",
        "trainer.max_epochs=3",
        "test=false",
        f"paths.root_dir={work}",
        f"hydra.run.dir={work / 'outputs' / 'siglip'}",
        cwd=work,
        output=work / "outputs" / "console",
    )
    model = work / "outputs" / "siglip" / "export"
    common = ["context.batch_size=8", "context.progress=false", f"model={model}", f"data_dir={data}"]
    run_in_process(
        monkeypatch,
        "evaluate",
        "task=zero_shot",
        "task.bootstrap=50",
        *common,
        f"hydra.run.dir={work / 'outputs/zero_shot'}",
    )
    metrics = json.loads((work / "outputs/zero_shot/metrics_zero_shot.json").read_text())
    written = _rows(work / "outputs/zero_shot/predictions_zero_shot.csv")
    labels = {row["VolumeName"]: row for row in _rows(data / "CT-RATE" / "labels.csv")}
    assert len(written) == metrics["num_volumes"] == sum(r["split"] == "test" for r in labels.values())
    compared = 0
    for label in syn.CTRATE_LABELS:
        truth = [int(labels[r["VolumeName"]][label]) for r in written]
        if len(set(truth)) == 2:
            expected = roc_auc_score(truth, [float(r[label]) for r in written])
            assert metrics["metrics"][label]["auroc"] == pytest.approx(expected, abs=1e-12)
            compared += 1
    assert compared >= 3 and metrics["bootstrap"]["resamples"] > 0
    lower, upper = metrics["bootstrap"]["lower"]["mean/auroc"], metrics["bootstrap"]["upper"]["mean/auroc"]
    assert lower < upper  # the resamples differ (CT-CLIP's do not)

    run_in_process(
        monkeypatch, "evaluate", "task=linear_probe", *common, f"hydra.run.dir={work / 'outputs/probe'}"
    )
    probe = json.loads((work / "outputs/probe/metrics_linear_probe.json").read_text())
    assert probe["num_test"] == metrics["num_volumes"] and set(probe["metrics"]["auroc"]) | set(
        probe["skipped"]
    ) == set(syn.CTRATE_LABELS)

    run_in_process(
        monkeypatch,
        "evaluate",
        "task=retrieval",
        "task.sizes=[4]",
        *common,
        f"hydra.run.dir={work / 'outputs/retrieval'}",
    )
    retrieval = json.loads((work / "outputs/retrieval/metrics_retrieval.json").read_text())["metrics"]
    assert {f"ctclip_report_to_volume/R@{k}" for k in (5, 10, 50, 100)} <= set(retrieval)
    assert retrieval["ctclip_report_to_volume/R@100"] == 1.0  # fewer than 100 pairs
