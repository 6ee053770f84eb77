"""FLARE 2025 Task 5 end to end on a miniature of the release in its real layout: prepare keeps every
case and writes what the original's flare_preprocess.py computes; the JSONs are read strictly; then on
CPU stage 1 -> 2 -> 3 with the demo's tiny models, export, and both evaluations (GREEN with a tiny
local judge)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.commands import run_forked, run_in_process
from skimage.transform import resize

from med3dvlm.artifacts.record import read_record
from med3dvlm.data.errors import DataError
from med3dvlm.data.preparation import prepare_dataset
from med3dvlm.data.releases.flare.synthetic import generate
from med3dvlm.data.volume_io import read_volume
from med3dvlm.models.tiny_qwen import build_tiny_qwen

REPO = Path(__file__).resolve().parents[1]
SIZE = (32, 64, 64)
CHAIN_SIZE = (16, 32, 32)
WINDOWS = {"abdomen": (-160.0, 240.0), "chest": (-1350, 150)}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flare")
    generate(root / "raw", cases=16, seed=0, slices=40, size=72, workers=0, alt_spelling=True)
    (root / "raw" / "train" / "CT-RATE-Tr.json").unlink()  # the chest JSON under its other spelling only
    return root / "raw"


@pytest.fixture(scope="module")
def prepared(release) -> tuple[Path, dict]:
    out = release.parent / "prepared"
    manifest = prepare_dataset(
        release, out, spatial_size=SIZE, format="nii.gz", workers=0, progress=False, dataset="flare"
    )
    return out, manifest


def _reference(path: Path) -> np.ndarray:
    """The original's steps, written from its description (datasets.md §1.4): the array in stored order
    (z, y, x), the first volume of a 4-D series, its source's window by the original's rule ("amos" in
    the path), min-max over the clipped volume, scikit-image's anti-aliased resize."""
    data = np.asanyarray(nib.load(str(path)).dataobj)
    volume = data.transpose(*range(data.ndim)[::-1])  # SimpleITK's (t, z, y, x)
    if volume.ndim == 4:
        volume = volume[0]
    low, high = WINDOWS["abdomen" if "amos" in str(path) else "chest"]
    volume = np.clip(volume, low, high)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    return resize(volume, SIZE, anti_aliasing=True)


def test_every_case_is_kept_and_prepared_as_the_reference_does(release, prepared):
    out, manifest = prepared
    listed = {
        path.name: json.loads(path.read_text())
        for path in (
            release / "train" / "CT-AMOS-Tr.json",
            release / "train" / "CT-RATE-Tr .json",
            release / "validation" / "val.json",
        )
    }
    total = sum(len(records) for records in listed.values())
    assert (
        manifest["counts"]["volumes_ok"] == manifest["counts"]["cases_kept"] == total
        and not manifest["skipped"]
    )
    assert {k: v["kept"] for k, v in manifest["flare"]["records"].items()} == {
        "CT-AMOS-Tr": len(listed["CT-AMOS-Tr.json"]),
        "CT-RATE-Tr": len(listed["CT-RATE-Tr .json"]),
        "val": len(listed["val.json"]),
    }
    differences = []
    for stem in ("CT-AMOS-Tr", "CT-RATE-Tr", "val"):
        for record in json.loads((out / "FLARE" / f"{stem}.json").read_text()):
            source = release / Path(manifest["volumes"][record["image"]]["source"])
            assert record["source"] == ("abdomen" if record["case_id"].startswith("amos") else "chest")
            ours = read_volume(out / record["image"], SIZE)
            differences.append(np.abs(ours - _reference(source)))
    worst, mean = max(float(d.max()) for d in differences), float(np.mean([d.mean() for d in differences]))
    assert worst <= 2e-2 and mean <= 2e-3, (worst, mean)
    assert worst <= 1e-5  # in fact the same to float32 rounding
    recipe = manifest["preprocessing"]["sources"]
    assert recipe["abdomen"]["window"] == [-160.0, 240.0] and recipe["chest"]["window"] == [-1350.0, 150.0]
    assert recipe["chest"]["orientation"] == "LPS" and recipe["chest"]["foreground_threshold"] is None


def test_the_first_volume_of_a_4d_series_is_the_one_prepared(release, prepared):
    out, _ = prepared
    four_d = release / "train" / "CT-AMOS-1290" / "amos_0001.nii.gz"
    assert nib.load(str(four_d)).ndim == 4
    ours = read_volume(out / "FLARE" / "train" / "CT-AMOS-1290" / "amos_0001.nii.gz", SIZE)
    np.testing.assert_allclose(ours, _reference(four_d), atol=1e-5)


def test_a_record_that_does_not_fit_names_the_file_the_record_and_the_key(release, tmp_path):
    broken = tmp_path / "raw"
    (broken / "validation").mkdir(parents=True)
    (broken / "validation" / "images").symlink_to(release / "validation" / "images")
    records = json.loads((release / "validation" / "val.json").read_text())
    records[2]["local_vqa"][0]["follow_up"] = "root"
    (broken / "validation" / "val.json").write_text(json.dumps(records))
    with pytest.raises(
        DataError, match=rf"val.json \(record 2, {records[2]['case_id']}\).*local_vqa\[0\].follow_up"
    ):
        prepare_dataset(
            broken, tmp_path / "out", spatial_size=SIZE, workers=0, progress=False, dataset="flare"
        )
    with pytest.raises(ValueError, match="each source has the reference's window"):
        prepare_dataset(release, tmp_path / "out", window="lung", dataset="flare")


def _pretrain_handoff(work: Path, data: Path) -> None:
    """Stage 2's hand-off in place of stages 1-2 (their runs are tested on M3D): an encoder export of
    DCFormer-nano and an untrained projector on the tiny Qwen flare_demo builds from the data."""
    import torch

    from med3dvlm.artifacts.encoder_export import write_encoder_export
    from med3dvlm.artifacts.record import ArtifactRecord
    from med3dvlm.data.corpus import corpus_texts
    from med3dvlm.data.prepared import dataset_preprocessing
    from med3dvlm.models.dcformer import DCFormer
    from med3dvlm.stages.pretrain import PretrainStage

    llm = build_tiny_qwen(
        work / "data" / "assets" / "tiny_qwen_flare",
        corpus_texts(data),
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
    )
    encoder = ArtifactRecord(
        "encoder_export",
        "flare_demo",
        CHAIN_SIZE,
        dataset_preprocessing(data),
        {"encoder": {"_target_": "med3dvlm.models.dcformer.DCFormer", "variant": "nano"}},
        stage="siglip",
        which="final",
    )
    torch.manual_seed(0)
    write_encoder_export(work / "siglip", DCFormer("nano"), encoder)
    projector = {
        "_target_": "med3dvlm.models.projectors.MixerProjector",
        "low_tokens": [16, 16],
        "high_tokens": [8, 16],
        "depth": 2,
        "mlp_depth": 2,
    }
    stage = PretrainStage(
        str(work / "siglip"),
        projector,
        {"_target_": "med3dvlm.models.llm.LanguageModel", "name_or_path": str(llm)},
        CHAIN_SIZE,
        {"_target_": "torch.optim.AdamW", "_partial_": True},
        {"_target_": "med3dvlm.training.optim.constant", "_partial_": True},
        experiment="flare_demo",
    )
    stage.write_export(work / "outputs" / "pretrain" / "export")


@pytest.mark.slow
def test_prepare_finetune_export_and_evaluate_on_cpu(release, tmp_path, monkeypatch, caplog):
    """The chain at demo size: prepare -> finetune (every case once as a report and once as a VQA
    sample, FLARE's chat prompts) -> export -> flare_vqa (predictions.csv, the original's scores) and
    flare_report (region scores; GREEN with a tiny local judge, resumed without asking it again).
    Training runs as a process of its own; the other commands run in this process."""
    work = tmp_path
    monkeypatch.chdir(work)
    data = work / "data" / "flare_demo" / "prepared"
    run_in_process(
        monkeypatch,
        "prepare",
        "dataset=flare",
        f"source={release}",
        f"out={data}",
        "format=npy",
        "workers=0",
        "progress=false",
        f"spatial_size=[{','.join(map(str, CHAIN_SIZE))}]",
        f"hydra.run.dir={work / 'outputs/prepare'}",
    )
    _pretrain_handoff(work, data)
    run_forked(
        "train",
        "stage=finetune",
        "experiment=flare_demo",
        "logger=none",
        "trainer.max_epochs=1",
        "test=false",
        f"paths.root_dir={work}",
        "+trainer.limit_train_batches=4",
        "+trainer.limit_val_batches=1",
        f"hydra.run.dir={work / 'outputs' / 'finetune'}",
        cwd=work,
        output=work / "outputs" / "console",
    )
    handoff = read_record(work / "outputs" / "finetune" / "export")
    assert handoff.prompt_format == "flare" and set(handoff.preprocessing.sources) == {"abdomen", "chest"}
    model = work / "model"
    run_in_process(
        monkeypatch,
        "export",
        "experiment_name=flare_demo",
        f"out={model}",
        f"paths.root_dir={work}",
        f"hydra.run.dir={work / 'outputs/export'}",
    )

    evaluation = ["context.batch_size=8", "context.progress=false", f"model={model}", f"data_dir={data}"]
    vqa = work / "outputs" / "vqa"
    run_in_process(
        monkeypatch,
        "evaluate",
        "task=flare_vqa",
        "task.global_tokens=6",
        "task.chain_tokens=6",
        *evaluation,
        f"hydra.run.dir={vqa}",
    )
    scores = json.loads((vqa / "metrics_flare_vqa.json").read_text())
    assert 0.0 <= scores["global_accuracy"] <= 1.0 and 0.0 <= scores["local_accuracy"] <= 1.0
    header = (vqa / "predictions.csv").read_text().splitlines()[0]
    assert header == "case_id,scope,question_id,question,prediction"
    # the same file scored without a model gives the same numbers
    rescored = work / "outputs" / "rescored"
    run_in_process(
        monkeypatch,
        "evaluate",
        "task=flare_vqa",
        f"task.predictions={vqa / 'predictions.csv'}",
        f"task.gt={data / 'FLARE' / 'val.json'}",
        f"hydra.run.dir={rescored}",
    )
    again = json.loads((rescored / "metrics_flare_vqa.json").read_text())
    assert (again["global_accuracy"], again["local_accuracy"]) == (
        scores["global_accuracy"],
        scores["local_accuracy"],
    )

    judge = build_tiny_qwen(
        work / "judge",
        ["[Matched Findings]: 1. liver", "(a) False report: 0."],
        vocab_size=300,
        hidden_size=32,
    )
    report = work / "outputs" / "report"
    args = (
        "evaluate",
        "task=flare_report",
        "task.max_new_tokens=10",
        f"task.judge={judge}",
        *evaluation,
        f"hydra.run.dir={report}",
    )
    run_in_process(monkeypatch, *args)
    metrics = json.loads((report / "metrics_flare_report.json").read_text())
    assert set(metrics["region_text"]["means"]) == {"bleu", "rouge1", "meteor"}
    assert {"summary", "all_cases"} <= set(metrics["green"])
    judged = (report / "green_judgements.csv").read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="med3dvlm"):
        run_in_process(monkeypatch, *args)
    assert (report / "green_judgements.csv").read_text() == judged  # nothing asked twice
    assert "GREEN judged 0 region pairs" in caplog.text
