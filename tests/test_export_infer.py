"""Merged export: one folder, reload in one call, same outputs as the training-time model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.commands import run_in_process
from helpers.vlm import INPUT_SIZE
from helpers.vlm import finetuned as finetune_handoff

from med3dvlm.artifacts.model_folder import load_pretrained, write_merged_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A trained finetune stage and its hand-off folder."""
    root = tmp_path_factory.mktemp("export")
    stage, handoff, batches = finetune_handoff(root)
    return stage.model.eval(), handoff, batches, root


def test_export_reload_gives_identical_outputs(finetuned, tmp_path):
    trained, handoff, batches, _ = finetuned
    folder = write_merged_model(handoff, tmp_path / "model")
    assert {p.name for p in folder.iterdir()} >= {
        "record.json",
        "llm",
        "vision_tower.safetensors",
        "projector.safetensors",
    }
    loaded = load_pretrained(folder)
    reloaded = loaded.model
    assert loaded.record.input_size == INPUT_SIZE and reloaded.num_image_tokens == trained.num_image_tokens
    assert loaded.record.parent("adapter").record.kind == "adapter_handoff"
    for batch in batches[:2]:
        with torch.no_grad():
            want = trained(batch["input_ids"], batch["attention_mask"], images=batch["image"]).logits
            got = reloaded(batch["input_ids"], batch["attention_mask"], images=batch["image"]).logits
        assert (want - got).abs().max() < 1e-5


def test_export_of_a_damaged_handoff_names_the_file(finetuned, tmp_path):
    _, handoff, _, _ = finetuned
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(handoff), str(broken)], check=True)
    (broken / "projector.safetensors").write_bytes((handoff / "vision_tower.safetensors").read_bytes())
    with pytest.raises(ValueError, match="projector.safetensors: does not fit MixerProjector"):
        write_merged_model(broken, tmp_path / "model")


def run_module(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_export_cli_finds_latest_finetune_export(finetuned, tmp_path, monkeypatch, capfd):
    _, _, _, root = finetuned
    done = run_module(
        [
            "med3dvlm.export",
            f"paths.log_dir={root}",
            "experiment_name=unit",
            f"out={tmp_path / 'model'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model" / "record.json").is_file()
    assert "Not evaluated" in (tmp_path / "model" / "README.md").read_text()  # its model card
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit):
        run_in_process(
            monkeypatch,
            "export",
            f"paths.log_dir={root}",
            "experiment_name=nothing",
            f"hydra.run.dir={tmp_path / 'run2'}",
        )
    assert "python -m med3dvlm.train stage=finetune" in capfd.readouterr().err


def infer(monkeypatch: pytest.MonkeyPatch, *arguments: str) -> None:
    """``python -m med3dvlm.infer <arguments>`` in this process (a user error exits 2)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    run_in_process(monkeypatch, "infer", *arguments)


def test_infer_cli_answers_for_a_nifti_of_any_size(finetuned, tmp_path, monkeypatch, capfd):
    import nibabel as nib
    import numpy as np

    _, handoff, _, _ = finetuned
    folder = write_merged_model(handoff, tmp_path / "model")
    volume = np.random.default_rng(0).normal(100, 30, size=(50, 41, 23)).astype(np.int16)  # (x, y, z)
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0])), str(tmp_path / "scan.nii.gz"))
    question = "Is there a large lesion in the liver?"
    infer(
        monkeypatch,
        f"model={folder}",
        f"image={tmp_path / 'scan.nii.gz'}",
        f"question={question}",
        "max_new_tokens=4",
    )
    printed = capfd.readouterr()
    assert question in printed.err and printed.out.strip()  # what it asked, then the answer
    with pytest.raises(SystemExit) as stopped:
        infer(monkeypatch, f"model={folder}", f"image={tmp_path / 'nope.nii.gz'}")
    assert stopped.value.code == 2 and "nope.nii.gz: file not found" in capfd.readouterr().err


def test_infer_cli_answers_for_a_dicom_series_with_a_ct_window(
    finetuned, tmp_path, monkeypatch, capfd, caplog
):
    from test_scans import ct_volume, write_dicom_series, write_nifti

    _, handoff, _, _ = finetuned
    folder = write_merged_model(handoff, tmp_path / "model")
    for scan in (
        write_dicom_series(tmp_path / "series", ct_volume()),
        write_nifti(tmp_path / "ct.nii.gz", ct_volume()),
    ):
        caplog.clear()
        infer(
            monkeypatch,
            f"model={folder}",
            f"image={scan}",
            "intensity.window=soft_tissue",
            "question=Is there a large lesion in the liver?",
            "max_new_tokens=4",
        )
        assert capfd.readouterr().out.strip() and "Hounsfield" not in caplog.text
    infer(monkeypatch, f"model={folder}", f"image={tmp_path / 'ct.nii.gz'}", "max_new_tokens=2")
    assert "intensity.window=soft_tissue" in caplog.text  # says what to set
