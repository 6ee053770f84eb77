"""How the commands talk to a user: an error of theirs (a missing file, a bad or missing setting) is
found before a model loads and printed as one paragraph, the traceback kept for ``--verbose`` and
``HYDRA_FULL_ERROR=1``; ``infer`` says what it asked and when the answer is empty."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.commands import OFFLINE, run_in_process
from helpers.vlm import INPUT_SIZE, model_folder

from med3dvlm import infer
from med3dvlm.data.errors import DataError
from med3dvlm.data.volume_io import write_volume

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("commands"))


@pytest.fixture
def record_only(model, tmp_path) -> Path:
    """A model folder holding its record and no weights: a command that loads the model fails on it."""
    folder = tmp_path / "record_only"
    folder.mkdir()
    shutil.copy(model / "record.json", folder / "record.json")
    return folder


def test_a_missing_image_is_one_paragraph_before_the_model_loads(record_only, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    done = subprocess.run(
        [sys.executable, "-m", "med3dvlm.infer", f"model={record_only}", f"image={missing}"],
        cwd=REPO,
        env={**os.environ, **OFFLINE, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert f"{missing}: file not found" in done.stderr  # the image, not the absent weights
    assert "Traceback" not in done.stderr and "\n\n" not in done.stderr.strip()
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr


@pytest.mark.parametrize("verbose", ["--verbose", "HYDRA_FULL_ERROR=1"])
def test_the_traceback_stays_on_request(record_only, tmp_path, monkeypatch, verbose):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1" if verbose == "HYDRA_FULL_ERROR=1" else "0")
    flags = ["--verbose"] if verbose == "--verbose" else []
    with pytest.raises(DataError, match="nope.nii.gz: file not found"):  # Python prints its traceback
        run_in_process(
            monkeypatch, "infer", f"model={record_only}", f"image={tmp_path / 'nope.nii.gz'}", *flags
        )


def test_an_unset_setting_or_a_folder_that_is_no_model_is_one_paragraph(
    record_only, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as stopped:
        run_in_process(monkeypatch, "infer", f"model={record_only}")
    assert stopped.value.code == 2
    assert "med3dvlm.infer: image= is required" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        run_in_process(monkeypatch, "infer", f"model={tmp_path}", f"image={tmp_path / 'scan.npy'}")
    assert f"{tmp_path}: no artifact here" in capfd.readouterr().err


def test_infer_echoes_the_question_and_says_when_the_answer_is_empty(model, tmp_path, monkeypatch, capfd):
    image = tmp_path / "volume.npy"
    write_volume(image, np.random.default_rng(0).random(INPUT_SIZE, dtype=np.float32))
    common = (f"model={model}", f"image={image}", "max_new_tokens=2")
    run_in_process(monkeypatch, "infer", *common, "question=Is there a lesion in the liver?")
    out, err = capfd.readouterr()
    assert re.search(r"asked: <im_patch> × \d+ Is there a lesion in the liver\?", err) and "empty" not in err
    monkeypatch.setattr(infer, "answer", lambda *args, **kwargs: "")
    run_in_process(monkeypatch, "infer", *common)  # no question: a report, asked as reports are
    out, err = capfd.readouterr()
    assert re.search(r"asked: <im_patch> × \d+ ?Can you provide a caption", err)
    assert "the answer is empty" in err and out == ""


def test_evaluate_names_a_missing_data_folder_before_loading_the_model(record_only, tmp_path):
    """The model folder holds only its record: a model load would fail on missing weights first."""
    result = subprocess.run(
        [sys.executable, "-m", "med3dvlm.evaluate", "task=vqa_closed", f"model={record_only}",
         f"data_dir={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env={**os.environ, **OFFLINE}, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"data_dir={tmp_path / 'nowhere'}: no such folder" in result.stderr
