"""Synthetic M3D generator: raw layout, determinism, splits, voxel-visible attributes, reports, speed."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from med3dvlm.data.corpus import corpus_texts
from med3dvlm.data.releases.m3d import synthetic as syn

SMALL = {"slices": 16, "size": 32}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, syn.GenerationSummary]:
    out = tmp_path_factory.mktemp("raw")
    return out, syn.generate(out, cases=12, seed=3, workers=1, **SMALL)


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, dataset):
    out, _ = dataset
    syn.generate(tmp_path / "again", cases=12, seed=3, workers=2, **SMALL)
    assert tree_bytes(tmp_path / "again") == tree_bytes(out)


def test_different_seed_differs(tmp_path, dataset):
    out, _ = dataset
    syn.generate(tmp_path / "other", cases=12, seed=4, workers=1, **SMALL)
    a, b = tree_bytes(out), tree_bytes(tmp_path / "other")
    assert a["M3D_Cap/ct_case/000000/text.txt"] != b["M3D_Cap/ct_case/000000/text.txt"]
    assert a["M3D-VQA/M3D_VQA_train.csv"] != b["M3D-VQA/M3D_VQA_train.csv"]


def cases_of(out: Path) -> list[Path]:
    return sorted(
        (c for collection in syn.COLLECTIONS for c in (out / "M3D_Cap" / collection).iterdir()),
        key=lambda c: c.name,
    )


def raw_series(out: Path, image_path: str) -> Path:
    """The raw series folder a release path (``M3D_Cap_npy/<collection>/<id>/<folded>.npy``) names."""
    collection, case, folded = image_path.removesuffix(".npy").split("/")[1:]
    return next(
        s
        for s in (out / "M3D_Cap" / collection / case).iterdir()
        if s.is_dir() and syn.fold_series_name(s.name) == folded
    )


def test_rerun_into_smaller_dataset_removes_stale_cases(tmp_path):
    syn.generate(tmp_path, cases=5, seed=0, workers=1, slices=4, size=16)
    syn.generate(tmp_path, cases=3, seed=0, workers=1, slices=4, size=16)
    assert [p.name for p in cases_of(tmp_path)] == ["000000", "000001", "000002"]


def test_raw_layout_is_the_release_s(dataset):
    out, summary = dataset
    cases = cases_of(out)
    assert [c.name for c in cases] == [f"{i:06d}" for i in range(12)]
    assert [c.parent.name for c in cases] == [syn.collection_of(i) for i in range(12)]
    assert {c.parent.name for c in cases} == {"ct_case", "ct_quizze"}
    for index, case in enumerate(cases):
        series = sorted(p for p in case.iterdir() if p.is_dir())
        assert len(series) == (2 if index % 8 == 0 else 1)  # several series per case
        assert re.fullmatch(
            r"(Axial|Coronal|Sagittal)_(non_contrast|arterial_phase|C__portal_venous_phase|"
            r"delayed_phase)(_réformat)?",
            series[0].name,
        )
        names = sorted(p.name for p in series[0].iterdir())
        assert names == sorted(f"{k}.jpeg" for k in range(SMALL["slices"]))
        image = Image.open(series[0] / "7.jpeg")
        assert image.format == "JPEG" and image.mode == "L" and image.size == (32, 32)
        report = (case / "text.txt").read_text(encoding="utf-8")
        assert report.startswith("study_findings: ") and len(report) > 80
    assert any("é" in s.name for s in (out / "M3D_Cap/ct_case/000000").iterdir())  # a diacritic
    split_file = json.loads((out / "M3D_Cap" / "M3D_Cap.json").read_text())
    assert list(split_file) == ["train", "validation", "test", "test100"]
    assert split_file["test100"] == split_file["test"][:100]
    for name in ("train", "validation", "test"):
        entries = split_file[name]
        assert sorted({e["image"].split("/")[2] for e in entries}) == summary.splits[name]
        for entry in entries:
            assert set(entry) == {"image", "text"} and entry["image"].startswith("M3D_Cap_npy/")
            assert entry["image"].endswith(".npy") and entry["image"].isascii()
            series = raw_series(out, entry["image"])
            assert entry["text"] == f"M3D_Cap_npy/{series.parent.parent.name}/{series.parent.name}/text.txt"


def test_vqa_csvs_follow_the_release(dataset):
    out, summary = dataset
    assert sorted(p.name for p in (out / "M3D-VQA").iterdir()) == [
        "M3D_VQA_test.csv",
        "M3D_VQA_test5k.csv",
        "M3D_VQA_train.csv",
        "M3D_VQA_val.csv",
        "M3D_VQA_yn_train.csv",
    ]
    for name in syn.SPLITS:
        ids = set(summary.splits[name])
        columns, rows = read_csv(out / "M3D-VQA" / syn.vqa_csv_name(name))
        assert columns == list(syn.VQA_COLUMNS)
        assert len(rows) == 5 * sum(1 + (int(i) % 8 == 0) for i in ids)  # five per series
        letters = set()
        for row in rows:
            assert row["Image Path"].split("/")[2] in ids
            assert raw_series(out, row["Image Path"]).is_dir()
            choices = [row[f"Choice {c}"] for c in "ABCD"]
            assert len(set(choices)) == 4 and all(choices)
            assert row["Answer"] == row[f"Choice {row['Answer Choice']}"]
            assert 1 <= int(row["Question Type"]) <= len(syn.QUESTION_TYPES)
            assert row["Text"] and row["Question"].endswith("?")
            letters.add(row["Answer Choice"])
        if name == "train":
            assert letters == set("ABCD")
    assert read_csv(out / "M3D-VQA" / "M3D_VQA_test5k.csv") == read_csv(out / "M3D-VQA" / "M3D_VQA_test.csv")
    columns, rows = read_csv(out / "M3D-VQA" / "M3D_VQA_yn_train.csv")
    assert columns == list(syn.VQA_COLUMNS)
    assert len(rows) == len(read_csv(out / "M3D-VQA" / "M3D_VQA_train.csv")[1])
    for row in rows:
        assert row["Answer"] in {"Yes", "No"}
        assert row["Answer Choice"] == "" and all(row[f"Choice {c}"] == "" for c in "ABCD")


def test_vqa_text_is_the_case_findings(dataset):
    out, _ = dataset
    _, rows = read_csv(out / "M3D-VQA" / "M3D_VQA_train.csv")
    row = rows[0]
    report = (raw_series(out, row["Image Path"]).parent / "text.txt").read_text(encoding="utf-8")
    assert report.split("\n")[0] == f"study_findings: {row['Text']}"


def test_splits_are_disjoint_and_cover_all_cases(dataset):
    _, summary = dataset
    seen = [i for ids in summary.splits.values() for i in ids]
    assert sorted(seen) == [f"{i:06d}" for i in range(12)]
    assert all(summary.splits[name] for name in ("train", "validation", "test"))
    big = syn.split_cases(
        [f"{i:06d}" for i in range(1000)], {"train": 0.8, "validation": 0.1, "test": 0.1}, 0
    )
    assert {k: len(v) for k, v in big.items()} == {"train": 800, "validation": 100, "test": 100}


# ---- attributes are visible in the voxels ----------------------------------------------------


def render(seed: int, **changes) -> np.ndarray:
    base = syn.CaseAttributes("axial", "portal venous", "liver", "cyst", "upper right", (30, 25), 10)
    return syn.render_case(np.random.default_rng(seed), dataclasses.replace(base, **changes), 32, 64)


def test_plane_is_the_stacking_axis():
    # The body is a cylinder along z: every axial slice cuts it, only part of the coronal
    # (body depth, y) and sagittal (body width, x) slices do, and the body is deeper than wide.
    for seed in range(6):
        share = {}
        for plane in syn.PLANES:
            volume = render(seed, plane=plane)
            share[plane] = float(((volume > 40).reshape(len(volume), -1).mean(1) > 0.02).mean())
        assert share["axial"] == 1.0
        assert share["coronal"] < 0.85 < share["sagittal"] < 1.0


def test_phase_is_visible_in_the_vessels():
    def window(volume: np.ndarray, center_zyx: tuple[float, float, float], grid) -> float:
        idx = [int(np.argmin(np.abs(g - c))) for g, c in zip(grid, center_zyx)]
        return float(np.median(volume[idx[0], idx[1] - 1 : idx[1] + 2, idx[2] - 1 : idx[2] + 2]))

    for seed in range(5):
        shapes = syn.anatomy(np.random.default_rng(seed))
        grid = syn.plane_grid("axial", 32, 64)
        aorta = (0.3, shapes["aorta"].center[1], shapes["aorta"].center[2])
        ivc = (0.3, shapes["ivc"].center[1], shapes["ivc"].center[2])
        kidney = shapes["left kidney"]
        pelvis = (kidney.center[0], kidney.center[1], kidney.center[2] - 0.04)
        stats = {}
        for phase in syn.PHASES:
            volume = render(seed, phase=phase)
            stats[phase] = [window(volume, c, grid) for c in (aorta, ivc, pelvis)]
        # Aorta brightest in arterial, IVC in portal venous, collecting system in delayed.
        brightest = [syn.PHASES[int(np.argmax([stats[p][k] for p in syn.PHASES]))] for k in range(3)]
        assert brightest == ["arterial", "portal venous", "delayed"]
        assert max(stats["non-contrast"]) < 0.55 * 255


def lesion_voxels(seed: int, **changes) -> tuple[np.ndarray, np.ndarray]:
    """(lesion mask, volume) of a case: the voxels that move when only the lesion's location changes."""
    location = changes.pop("location", "upper right")
    opposite = {
        "upper right": "lower left",
        "upper left": "lower right",
        "lower right": "upper left",
        "lower left": "upper right",
    }[location]
    volume = render(seed, location=location, **changes)
    other = render(seed, location=opposite, **changes)
    moved = volume != other
    organ = syn.anatomy(np.random.default_rng(seed))[changes.get("organ", "liver")]
    z = syn.plane_grid("axial", 32, 64)[0][:, None, None]
    own_half = (z < organ.center[0]) if location.startswith("upper") else (z >= organ.center[0])
    return moved & own_half, volume


@pytest.mark.parametrize("organ", syn.ORGANS)
def test_lesion_sits_in_its_organ_and_quadrant(organ):
    for location in syn.LOCATIONS:
        mask, _ = lesion_voxels(1, organ=organ, location=location, size_mm=(20, 18))
        assert mask.sum() > 5
        z, y, x = (g[i].mean() for g, i in zip(syn.plane_grid("axial", 32, 64), np.nonzero(mask)))
        shape = syn.anatomy(np.random.default_rng(1))[organ]
        (cz, cy, cx), (rz, ry, rx) = shape.center, shape.radii
        assert ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0
        vertical, side = location.split()
        assert (z < cz) == (vertical == "upper")  # superior is z < 0
        assert (x < cx) == (side == "right")  # the patient's right is x < 0


@pytest.mark.parametrize("organ", syn.ORGANS)
def test_largest_lesion_stays_in_its_quadrant_and_organ(organ):
    size = syn.fit_to_quadrant(organ, 1000, 1000)
    assert size[0] < 1000 and size[1] <= size[0]
    z, y, x = np.meshgrid(*syn.plane_grid("axial", 32, 64), indexing="ij")
    shape = syn.anatomy(np.random.default_rng(2))[organ]
    (cz, cy, cx), (rz, ry, rx) = shape.center, shape.radii
    inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    for location in syn.LOCATIONS:
        mask, _ = lesion_voxels(2, organ=organ, location=location, size_mm=size)
        assert mask.sum() > 5 and (mask & inside).sum() >= 0.95 * mask.sum()
        side = location.split()[1]
        assert (((x < cx) == (side == "right")) | ~mask).all()


def test_abnormality_kind_sets_lesion_density_and_size_sets_extent():
    means = {}
    for kind in ("cyst", "round hypodense mass", "round hyperdense mass", "calcified nodule"):
        mask, volume = lesion_voxels(2, abnormality=kind, size_mm=(16, 16))
        means[kind] = float(volume[mask].mean())
    assert (
        means["cyst"]
        < means["round hypodense mass"]
        < means["round hyperdense mass"]
        < means["calcified nodule"]
    )
    small, _ = lesion_voxels(2, size_mm=(14, 14))
    large, _ = lesion_voxels(2, size_mm=(40, 40))
    assert large.sum() > 4 * small.sum()


def test_irregular_lesions_are_not_ellipsoids():
    round_mask, _ = lesion_voxels(3, abnormality="round hypodense mass", size_mm=(44, 44))
    irregular_mask, _ = lesion_voxels(3, abnormality="irregular hypodense mass", size_mm=(44, 44))
    assert round_mask.sum() > 50
    assert (round_mask ^ irregular_mask).sum() > 0.2 * round_mask.sum()


# ---- reports, questions, defects, corpus -------------------------------------------------------


def test_reports_are_varied_and_state_the_attributes():
    findings = []
    for i in range(300):
        rng = np.random.default_rng([0, i])
        attrs = syn.sample_attributes(rng)
        report, text = syn.write_report(rng, attrs)
        assert report.startswith(f"study_findings: {text}\n")
        assert attrs.organ.split()[-1] in text
        assert str(attrs.size_mm[0]) in text or f"{attrs.size_mm[0] / 10:.1f} cm" in text
        findings.append(text)
    assert len(set(findings)) / len(findings) > 0.97
    assert len({len(t.split(". ")) for t in findings}) >= 4
    assert any("discussion:" in syn.write_report(np.random.default_rng(i), attrs)[0] for i in range(20))


def test_closed_questions_have_one_right_and_three_plausible_wrong_choices():
    rng = np.random.default_rng(0)
    attrs = syn.CaseAttributes("coronal", "delayed", "spleen", "cyst", "lower left", (20, 18), 5)
    rows = syn.closed_questions(rng, attrs, "ct_case/000000/Coronal_delayed_phase.npy", "text")
    assert [r["Answer"] for r in rows] == [
        "coronal",
        "delayed phase",
        "spleen",
        "cyst",
        "lower left part of the spleen",
    ]
    wrong = [{r[f"Choice {c}"] for c in "ABCD"} - {r["Answer"]} for r in rows]
    assert wrong[0] <= {"axial", "sagittal", "oblique"}
    assert wrong[1] == {"non-contrast phase", "arterial phase", "portal venous phase"}
    assert wrong[2] <= {"liver", "left kidney", "right kidney", "pancreas"}
    assert wrong[3] <= set(syn.ABNORMALITIES) - {"cyst"}
    assert all(choice.endswith("part of the spleen") for choice in wrong[4])


def test_fixed_choice_order_lists_options_in_pool_order_and_keeps_the_case():
    attrs = syn.CaseAttributes(
        "sagittal", "arterial", "right kidney", "calcified nodule", "upper right", (14, 12), 400
    )
    shuffled = syn.closed_questions(np.random.default_rng(5), attrs, "p", "t")
    fixed = syn.closed_questions(np.random.default_rng(5), attrs, "p", "t", choice_order="fixed")
    pools = [
        [*syn.PLANES, "oblique"],
        [f"{p} phase" for p in syn.PHASES],
        [*syn.ORGANS, "pancreas"],
        list(syn.ABNORMALITIES),
        [f"{loc} part of the right kidney" for loc in syn.LOCATIONS],
    ]
    for row, same, pool in zip(fixed, shuffled, pools):
        choices = [row[f"Choice {c}"] for c in "ABCD"]
        assert choices == sorted(choices, key=pool.index)
        assert set(choices) == {same[f"Choice {c}"] for c in "ABCD"}
        assert row["Answer"] == same["Answer"] == row[f"Choice {row['Answer Choice']}"]
        assert row["Question"] == same["Question"]
    assert [r["Answer Choice"] for r in fixed[1::3]] == ["B", "A"]  # arterial phase; upper right comes first
    with pytest.raises(ValueError, match="choice_order"):
        syn.closed_questions(np.random.default_rng(5), attrs, "p", "t", choice_order="sorted")


def test_lesion_scale_grows_the_lesion_and_its_reported_size(tmp_path):
    base = [syn.sample_attributes(np.random.default_rng(i)) for i in range(30)]
    big = [syn.sample_attributes(np.random.default_rng(i), lesion_scale=2.0) for i in range(30)]
    for a, b in zip(base, big):
        assert dataclasses.replace(a, size_mm=b.size_mm) == b
        doubled = syn.fit_to_quadrant(a.organ, *(round(2 * v) for v in a.size_mm))
        assert all(abs(y - d) <= 1 for y, d in zip(b.size_mm, doubled))
    assert any(b.size_mm[0] >= 2 * a.size_mm[0] - 1 for a, b in zip(base, big))
    syn.generate(tmp_path, cases=2, seed=1, workers=1, lesion_scale=2.0, **SMALL)
    report = (tmp_path / "M3D_Cap" / "ct_case" / "000000" / "text.txt").read_text()
    attrs = syn.sample_attributes(np.random.default_rng([1, 0]), lesion_scale=2.0)
    assert str(attrs.size_mm[0]) in report or f"{attrs.size_mm[0] / 10:.1f} cm" in report
    with pytest.raises(ValueError, match="lesion_scale"):
        syn.generate(tmp_path, cases=1, lesion_scale=0.0, **SMALL)


def test_defects_damage_the_case_as_named(tmp_path):
    syn.generate(tmp_path, cases=3, seed=0, workers=1, slices=6, size=16)
    cases = cases_of(tmp_path)
    for case, defect in zip(cases, syn.DEFECTS):
        syn.corrupt_case(case, defect)
    stray_series = next(p for p in cases[0].iterdir() if p.is_dir())
    assert min(Image.open(p).size for p in stray_series.iterdir()) == (16, 8)
    truncated_series = next(p for p in cases[1].iterdir() if p.is_dir())
    with pytest.raises(OSError):
        Image.open(truncated_series / "3.jpeg").load()
    assert (cases[2] / "text.txt").read_text() == ""
    with pytest.raises(ValueError, match="unknown defect"):
        syn.corrupt_case(cases[0], "melted")


def test_defect_rate_injects_defects_and_leaves_other_cases_alone(tmp_path):
    clean = syn.generate(tmp_path / "clean", cases=10, seed=5, workers=1, slices=4, size=16)
    dirty = syn.generate(tmp_path / "dirty", cases=10, seed=5, workers=1, slices=4, size=16, defect_rate=0.5)
    assert clean.defects == {} and 0 < len(dirty.defects) < 10
    assert set(dirty.defects.values()) <= set(syn.DEFECTS)
    for index in range(10):
        case = f"M3D_Cap/{syn.collection_of(index)}/{index:06d}"
        if f"{index:06d}" not in dirty.defects:
            assert tree_bytes(tmp_path / "clean" / case) == tree_bytes(tmp_path / "dirty" / case)


def test_corpus_texts_gathers_reports_and_questions(dataset):
    out, _ = dataset
    texts = corpus_texts(out)
    report = (out / "M3D_Cap" / "ct_case" / "000004" / "text.txt").read_text(encoding="utf-8").strip()
    assert report in texts
    assert "portal venous phase" in texts and "Yes" in texts
    assert any(t.endswith("?") for t in texts)
    assert len(texts) == len(set(texts))


def test_speed_and_entry_point(tmp_path):
    start = time.perf_counter()
    syn.generate(tmp_path / "speed", cases=24, seed=0, workers=2)
    elapsed = time.perf_counter() - start
    # 24 full-size cases (64 x 128 x 128) in well under the 1,000-cases-a-minute budget's share
    assert elapsed < 12, f"{elapsed:.1f} s for 24 cases"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = tmp_path / "cli"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "med3dvlm.synthetic",
            f"out={out}",
            "cases=3",
            "seed=1",
            "slices=4",
            "size=16",
            "workers=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    assert len(cases_of(out)) == 3
    assert (out / "M3D-VQA" / "M3D_VQA_yn_train.csv").is_file()
