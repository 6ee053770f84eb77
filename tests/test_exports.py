"""Encoder exports and the record every artifact ends with: round trip, strict loading, atomic
replacement, latest-export lookup."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from med3dvlm.artifacts.encoder_export import (
    SIGLIP_BEST_EXPORT,
    SIGLIP_EXPORT,
    WEIGHTS_FILE,
    load_encoder_export,
    write_encoder_export,
)
from med3dvlm.artifacts.latest import latest
from med3dvlm.artifacts.record import RECORD_FILE, ArtifactRecord, RecordError, read_record
from med3dvlm.data.preprocess import Preprocessing, SourcePreprocessing
from med3dvlm.models.dcformer import DCFormer

NANO = {"_target_": "med3dvlm.models.dcformer.DCFormer", "variant": "nano"}
WINDOWED = Preprocessing(
    "own",
    {"own": SourcePreprocessing(window="soft_tissue", scale="window", orientation="RAS")},
    {"format": "npy"},
)


def _export(folder, experiment="unit", which="final", seed=0):
    torch.manual_seed(seed)
    encoder = DCFormer(variant="nano")
    record = ArtifactRecord(
        "encoder_export", experiment, (32, 64, 64), WINDOWED, {"encoder": NANO}, stage="siglip", which=which
    )
    write_encoder_export(folder, encoder, record)
    return encoder


def test_round_trip_gives_identical_outputs_and_the_record(tmp_path):
    encoder = _export(tmp_path / "export").eval()
    loaded, record = load_encoder_export(tmp_path / "export")
    loaded.eval()
    assert record.components["encoder"] == NANO and record.input_size == (32, 64, 64)
    assert record.preprocessing == WINDOWED and not record.preprocessing.inferred
    assert (
        set(record.files) == {WEIGHTS_FILE} and read_record(tmp_path / "export", verify_files=True) == record
    )
    assert load_encoder_export(tmp_path / "export" / WEIGHTS_FILE)[1] == record
    x = torch.rand(1, 1, 32, 64, 64)
    with torch.no_grad():
        for a, b in zip(encoder(x), loaded(x)):
            assert torch.equal(a, b)


def test_missing_export_names_the_command(tmp_path):
    with pytest.raises(
        RecordError, match=r"nothing: no artifact here \(record.json missing\).*python -m med3dvlm.train"
    ):
        load_encoder_export(tmp_path / "nothing")


def test_missing_weights_file(tmp_path):
    _export(tmp_path / "export")
    (tmp_path / "export" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_encoder_export(tmp_path / "export")


def test_mismatched_config_is_a_clear_error(tmp_path):
    _export(tmp_path / "export")
    meta_file = tmp_path / "export" / RECORD_FILE
    meta = json.loads(meta_file.read_text())
    meta["components"]["encoder"]["variant"] = "tiny"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE}.*(missing|shape)"):
        load_encoder_export(tmp_path / "export")


def test_dropped_key_is_a_clear_error(tmp_path):
    _export(tmp_path / "export")
    weights = tmp_path / "export" / WEIGHTS_FILE
    state = load_file(str(weights))
    state.pop(min(state))
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="missing keys"):
        load_encoder_export(tmp_path / "export")


def test_a_record_of_another_kind_or_shape_is_refused_naming_the_file(tmp_path):
    _export(tmp_path / "export")
    with pytest.raises(RecordError, match=r"record.json: a encoder export, expected a model folder"):
        read_record(tmp_path / "export", "model_folder")
    record = json.loads((tmp_path / "export" / RECORD_FILE).read_text())
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / RECORD_FILE).write_text(json.dumps({**record, "surprise": 1}))
    with pytest.raises(RecordError, match=r"x/record.json: not a med3dvlm artifact record .*surprise"):
        read_record(tmp_path / "x")
    (tmp_path / "x" / RECORD_FILE).write_text("{")
    with pytest.raises(RecordError, match=r"x/record.json: not valid JSON"):
        read_record(tmp_path / "x")


def test_rewrite_replaces_the_folder_and_leaves_no_temporaries(tmp_path):
    _export(tmp_path / "export", seed=0)
    second = _export(tmp_path / "export", seed=1)
    loaded, _ = load_encoder_export(tmp_path / "export")
    for a, b in zip(second.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_latest_export_by_stage_experiment_and_kind(tmp_path):
    _export(tmp_path / "run1" / "export", experiment="a")
    _export(tmp_path / "run2" / "export", experiment="b")
    _export(tmp_path / "run3" / "export", experiment="a")
    _export(tmp_path / "run3" / "export_best", experiment="a", which="best")
    # a half-written staging folder must never be picked up
    staging = tmp_path / "run4" / ".tmp-export-x"
    staging.mkdir(parents=True)
    (staging / RECORD_FILE).write_text((tmp_path / "run1" / "export" / RECORD_FILE).read_text())
    assert latest(SIGLIP_EXPORT, "a", tmp_path) == tmp_path / "run3" / "export"
    assert latest(SIGLIP_BEST_EXPORT, "a", tmp_path) == tmp_path / "run3" / "export_best"
    assert latest(SIGLIP_EXPORT, "b", tmp_path) == tmp_path / "run2" / "export"
    assert latest(SIGLIP_EXPORT, "c", tmp_path) is None
    assert (
        latest(
            replace(SIGLIP_EXPORT, identity={**SIGLIP_EXPORT.identity, "stage": "pretrain"}), "a", tmp_path
        )
        is None
    )


def test_an_export_never_replaces_a_folder_of_something_else(tmp_path):
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(
        FileExistsError, match=r"results: exists and is not a folder this writes \(no record.json\)"
    ):
        _export(other)
    assert (other / "notes.txt").read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == [
        "results"
    ]
