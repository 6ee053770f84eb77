"""make demo: the synthetic data is regenerated exactly when its settings change."""

from __future__ import annotations

from med3dvlm import demo


def test_demo_data_is_reused_only_for_the_same_settings(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(demo, "run", lambda step, args: calls.append(args))
    raw = tmp_path / "raw"
    raw.mkdir()
    assert demo.make_data(raw, 50) is True
    assert calls[-1][0] == "med3dvlm.synthetic" and "choice_order=fixed" in calls[-1]
    assert demo.make_data(raw, 50) is False and len(calls) == 1
    assert demo.make_data(raw, 60) is True and len(calls) == 2
    (raw / "demo_settings.txt").write_text("cases=60 seed=0\n")  # data of an older demo version
    assert demo.make_data(raw, 60) is True and len(calls) == 3
