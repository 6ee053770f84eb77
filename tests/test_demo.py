"""make demo: the synthetic data is regenerated when its settings change, and stages trained before are retrained."""

from __future__ import annotations

import os
import time

from med3dvlm import demo


def test_demo_data_is_reused_only_for_the_same_settings(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(demo, "run", lambda step, args: calls.append(args))
    raw = tmp_path / "raw"
    raw.mkdir()
    made = demo.make_data(raw, 50)
    assert calls[-1][0] == "med3dvlm.synthetic" and "choice_order=fixed" in calls[-1]
    assert demo.make_data(raw, 50) == made and len(calls) == 1
    demo.make_data(raw, 60)
    assert len(calls) == 2
    (raw / "demo_settings.txt").write_text("cases=60 seed=0\n")  # data of an older demo version
    demo.make_data(raw, 60)
    assert len(calls) == 3


def test_a_stage_export_older_than_the_data_is_retrained(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(demo, "run", lambda step, args: calls.append(args))
    export = tmp_path / "old_run" / "export"
    export.mkdir(parents=True)
    monkeypatch.setattr(demo, "latest", lambda kind, experiment, outputs: export)
    now = time.time()
    os.utime(export, (now - 100, now - 100))
    assert demo.train_stage("siglip", tmp_path / "new_run", False, inputs_made=now - 200)[0] == export.parent
    assert calls == []
    assert (
        demo.train_stage("siglip", tmp_path / "new_run", False, inputs_made=now)[0]
        == tmp_path / "new_run" / "siglip"
    )
    assert calls[-1][:2] == ["med3dvlm.train", "experiment=demo"]
    assert (
        demo.train_stage("siglip", tmp_path / "new_run", True, inputs_made=now - 200)[0]
        == tmp_path / "new_run" / "siglip"
    )
