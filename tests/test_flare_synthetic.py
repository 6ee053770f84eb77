"""Synthetic FLARE-Task5-MLLM-3D: layout, JSON schema, edge cases, determinism, HU values, learnability."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from med3dvlm.data.releases.flare import synthetic as syn
from med3dvlm.data.releases.m3d.synthetic import HOST_ORGANS, MM_PER_UNIT, plane_grid

SMALL = {"slices": 8, "size": 16}
# The release's annotation files and the folder each one's volumes are in (datasets.md §1.1).
IMAGES = {
    "train/CT-AMOS-Tr.json": "train/CT-AMOS-1290",
    "train/CT-RATE-Tr.json": "train/CT-RATE-2000",
    "validation/val.json": "validation/images",
}
JSONS = tuple(IMAGES)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, syn.GenerationSummary]:
    out = tmp_path_factory.mktemp("flare")
    return out, syn.generate(out, workers=0)  # the defaults: 24 cases of 32 x 64 x 64


def records(out: Path) -> dict[str, list[dict]]:
    return {name: json.loads((out / name).read_text(encoding="utf-8")) for name in JSONS}


def by_case(out: Path) -> dict[str, tuple[str, dict]]:
    return {r["case_id"]: (name, r) for name, items in records(out).items() for r in items}


def load(out: Path, case: str) -> nib.Nifti1Image:
    name, _ = by_case(out)[case]
    return nib.load(out / IMAGES[name] / case)


def test_layout_has_exactly_the_release_names(release):
    out, summary = release
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    volumes = {n for n in names if n.endswith(".nii.gz")}
    assert names - volumes == {*JSONS, "README.md"}
    assert "synthetic" in (out / "README.md").read_text(encoding="utf-8")
    patterns = {
        "train/CT-AMOS-1290": r"amos_\d{4}\.nii\.gz",
        "train/CT-RATE-2000": r"train_\d+_[a-z]_\d+\.nii\.gz",
        "validation/images": r"(amos_\d{4}|valid_\d+_[a-z]_\d+)\.nii\.gz",
    }
    for name in volumes:
        folder, file = name.rsplit("/", 1)
        assert re.fullmatch(patterns[folder], file), name
    listed = {f"{syn.volume_dir(i)}/{syn.case_id(i)}" for i in range(24)}
    assert volumes == listed
    validation = summary.annotations[syn.VALIDATION_JSON]
    assert len(validation) == 7 and {c.split("_")[0] for c in validation} == {"amos", "valid"}
    assert all(c.startswith("amos_") for c in summary.annotations["train/CT-AMOS-Tr.json"])
    assert all(c.startswith("train_") for c in summary.annotations["train/CT-RATE-Tr.json"])


def test_alternate_spelling_is_an_identical_copy_and_removed_when_not_asked(tmp_path):
    syn.generate(tmp_path, cases=8, workers=0, alt_spelling=True, **SMALL)
    assert (tmp_path / syn.ALT_CHEST_JSON).read_bytes() == (tmp_path / "train/CT-RATE-Tr.json").read_bytes()
    syn.generate(tmp_path, cases=8, workers=0, **SMALL)
    assert not (tmp_path / syn.ALT_CHEST_JSON).exists()


def test_rerun_with_fewer_cases_removes_stale_volumes(tmp_path):
    syn.generate(tmp_path, cases=12, workers=0, **SMALL)
    syn.generate(tmp_path, cases=8, workers=0, **SMALL)
    volumes = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.nii.gz")}
    assert volumes == {f"{syn.volume_dir(i)}/{syn.case_id(i)}" for i in range(8)}


def test_every_record_has_the_schema(release):
    out, _ = release
    for name, items in records(out).items():
        training = name != syn.VALIDATION_JSON
        assert isinstance(items, list) and items
        for r in items:
            assert list(r) == ["case_id", "findings", "global_vqa", "local_vqa"]
            assert isinstance(r["case_id"], str) and r["case_id"].endswith(".nii.gz")
            assert set(r["findings"]) <= set(syn.REGIONS)
            assert all(isinstance(t, str) and t for t in r["findings"].values())
            (question,) = r["global_vqa"]
            assert isinstance(question["question"], str)
            assert set(question["answer"]) <= set(question["choices"])
            chest = not r["case_id"].startswith("amos_")
            assert len(question["choices"]) == (18 if chest else 22)
            items_by_id = {q["id"]: q for q in r["local_vqa"]}
            assert len(items_by_id) == len(r["local_vqa"])
            for q in r["local_vqa"]:
                assert (
                    isinstance(q["id"], int) and isinstance(q["question"], str) and isinstance(q["type"], str)
                )
                assert isinstance(q["answer"], str)
                if q["follow_up"] == -1:
                    assert q["answer"] in ("Yes", "No") and "choices" not in q
                    continue
                root = items_by_id[q["follow_up"]]
                assert root["follow_up"] == -1  # chains are one level deep
                assert q["answer"] in q["choices"]
                if training:
                    assert q["choices"][-1] == syn.NONE_OF_THE_ABOVE
                    assert (q["answer"] == syn.NONE_OF_THE_ABOVE) == (root["answer"] == "No")
                else:
                    assert syn.NONE_OF_THE_ABOVE not in q["choices"] and root["answer"] == "Yes"


def test_edge_cases_are_where_the_docstring_says(release):
    out, summary = release
    cases = by_case(out)
    edge = {name: cases[case] for name, case in summary.edge_cases.items()}
    assert edge["four_d"][0] == "train/CT-AMOS-Tr.json"
    assert edge["empty_local_vqa"][1]["local_vqa"] == []
    assert edge["empty_global_answer"][1]["global_vqa"][0]["answer"] == []
    assert any(q["answer"] == syn.NONE_OF_THE_ABOVE for q in edge["none_of_the_above"][1]["local_vqa"])
    ids = [(q["id"], q["follow_up"]) for q in edge["children_out_of_order"][1]["local_vqa"]]
    at = ids.index((5, -1))
    assert ids[at + 1 : at + 3] == [(7, 5), (6, 5)]
    assert "-" in edge["hyphen_in_finding"][1]["findings"]["liver"]
    assert "\n" in edge["newline_in_finding"][1]["findings"]["lungs and pleura"]
    assert edge["empty_findings"][1]["findings"] == {}
    assert edge["validation_chest"][0] == edge["validation_abdomen"][0] == syn.VALIDATION_JSON
    assert edge["validation_chest"][1]["case_id"].startswith("valid_")
    assert edge["validation_abdomen"][1]["case_id"].startswith("amos_")


def test_one_volume_is_4d_and_its_second_frame_differs(release):
    out, summary = release
    shapes = {case: load(out, case).shape for case in by_case(out)}
    assert [c for c, s in shapes.items() if len(s) == 4] == [summary.edge_cases["four_d"]]
    frames = np.asarray(load(out, summary.edge_cases["four_d"]).dataobj).astype(np.int32)
    assert frames.shape == (64, 64, 32, 2)
    unclipped = frames[..., 1] < 3071
    assert np.all((frames[..., 1] - frames[..., 0])[unclipped] == syn.FOUR_D_OFFSET_HU)


def test_same_arguments_same_bytes_whatever_the_workers(tmp_path):
    syn.generate(tmp_path / "a", cases=10, seed=5, workers=0, alt_spelling=True, **SMALL)
    syn.generate(tmp_path / "b", cases=10, seed=5, workers=2, alt_spelling=True, **SMALL)
    syn.generate(tmp_path / "c", cases=10, seed=6, workers=0, alt_spelling=True, **SMALL)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["train/CT-AMOS-Tr.json"] != c["train/CT-AMOS-Tr.json"]
    assert a["train/CT-AMOS-1290/amos_0001.nii.gz"] != c["train/CT-AMOS-1290/amos_0001.nii.gz"]


def test_volumes_are_int16_hounsfield_units_with_an_lps_affine(release):
    out, _ = release
    step = 2 * MM_PER_UNIT
    for case in by_case(out):
        image = load(out, case)
        assert image.get_data_dtype() == np.int16
        assert "".join(nib.aff2axcodes(image.affine)) == "LPS"
        assert np.allclose(image.header.get_zooms()[:3], (step / 63, step / 63, step / 31))
        volume = syn.from_disk(np.asarray(image.dataobj))
        volume = volume[..., 0] if volume.ndim == 4 else volume
        assert volume.min() >= -1024 and volume.max() <= 3071
        assert -1010 < volume[:4, :4, :4].mean() < -990  # air outside the body
        assert np.percentile(volume, 99.9) > 400  # bone
        body = volume[volume > -500]
        assert np.any((body > -130) & (body < -70))  # fat
        if case.startswith("amos_"):
            center = [round((c + 1) / 2 * (n - 1)) for c, n in zip(HOST_ORGANS["liver"][0], volume.shape)]
            liver = volume[
                center[0] - 1 : center[0] + 2, center[1] - 1 : center[1] + 2, center[2] - 1 : center[2] + 2
            ]
            assert 30 < np.median(liver) < 90
        else:
            assert np.median(volume[(volume < -500) & (volume > -990)]) < -800  # lungs


# ----------------------------------------------------------------------------------------------
# Learnability: a fixed threshold rule on the voxels, with nominal (not per-case) anatomy, recovers
# every label the JSON states.


def inside(grid, center, radii, scale: float = 1.0) -> np.ndarray:
    z, y, x = (((g - c) / (r * scale)) ** 2 for g, c, r in zip(grid, center, radii))
    return z[:, None, None] + y[None, :, None] + x[None, None, :] <= 1.0


def read_abdomen(volume: np.ndarray, grid) -> dict[str, tuple[str, ...] | None]:
    z, y, x = grid
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    liver_center, liver_radii = HOST_ORGANS["liver"]
    low = (volume < 20) & inside(grid, liver_center, liver_radii, 0.75)
    lesion = low.sum() >= 3
    lobe = ("Right lobe" if xx[low].mean() < liver_center[2] else "Left lobe") if lesion else None
    stones = [
        f"{side.capitalize()} kidney"
        for side in ("right", "left")
        if volume[inside(grid, *HOST_ORGANS[f"{side} kidney"], 1.15)].max() > 300
    ]
    (sy, sx) = HOST_ORGANS["spleen"][0][1:]
    iy, ix = int(np.abs(y - sy).argmin()), int(np.abs(x - sx).argmin())
    column = np.median(volume[:, iy - 1 : iy + 2, ix - 1 : ix + 2].reshape(len(z), -1), axis=1)
    spleen_mm = ((column > 20) & (column < 90)).sum() * (z[1] - z[0]) * MM_PER_UNIT
    pelvis = (zz > 0.55) & (zz < 0.8) & (yy > -0.3) & (yy < 0.05) & (np.abs(xx) < 0.3)
    fluid = ((volume[pelvis] > -30) & (volume[pelvis] < 50)).mean()
    return {
        "Liver lesion": (lobe, "Hypodense") if lesion else None,
        "Kidney stone": tuple(stones) or None,
        "Splenomegaly": ("More than 15 cm",) if spleen_mm > 140 else None,
        "Ascites": ("Around the liver and spleen and in the pelvis",) if fluid > 0.5 else None,
    }


def read_chest(volume: np.ndarray, grid) -> dict[str, tuple[str, ...] | None]:
    z, y, x = grid
    zz, yy, _ = np.meshgrid(z, y, x, indexing="ij")
    organs = syn.CHEST_ORGANS
    effusion, nodules, upper, lower = [], [], [], []
    for side in ("right", "left"):
        center, radii = organs[f"{side} lung"]
        posterior = inside(grid, center, radii, 0.85) & (yy > center[1] + 0.6 * radii[1])
        if (volume[posterior] > -300).mean() > 0.5:
            effusion.append(side.capitalize())
        apex = inside(grid, center, radii, 0.8) & (zz < -0.15) & (yy < center[1] + 0.1)
        if (volume[apex] > -400).any():
            nodules.append(f"{side.capitalize()} lung")
        core = inside(grid, center, radii, 0.7) & (volume < -500)
        upper.append(volume[core & (zz < -0.15)])
        lower.append(volume[core & (zz > 0.15) & (yy < center[1])])
    heart_center, heart_radii = organs["heart"]
    tissue = (volume > -20) & (volume < 100) & inside(grid, heart_center, heart_radii, 1.6) & (yy < 0.15)
    ratio = tissue.sum() / inside(grid, heart_center, heart_radii).sum()
    emphysema = np.median(np.concatenate(upper)) < -900
    diffuse = np.median(np.concatenate(lower)) < -900
    return {
        "Pleural effusion": (("Bilateral",) if len(effusion) == 2 else tuple(effusion)) or None,
        "Lung nodule": tuple(nodules) or None,
        "Cardiomegaly": (("Marked",) if ratio > 2.6 else ("Mild",)) if ratio > 1.4 else None,
        "Emphysema": (("Diffuse",) if diffuse else ("Upper zone predominant",)) if emphysema else None,
    }


def stated(record: dict) -> dict[str, tuple[str, ...] | None]:
    """Label -> follow-up answers (from the chains; ``()`` where the case has none) or ``None``."""
    present = set(record["global_vqa"][0]["answer"])
    source = "abdomen" if record["case_id"].startswith("amos_") else "chest"
    chains = {q["question"]: q["answer"] for q in record["local_vqa"]}
    return {
        a.label: tuple(chains[f.question] for f in a.follow_ups if f.question in chains)
        if a.label in present
        else None
        for a in syn.ABNORMALITIES[source]
    }


def test_every_label_is_recovered_from_the_voxels_by_a_threshold_rule(release):
    out, _ = release
    grid = plane_grid("axial", 32, 64)
    hits: dict[str, list[bool]] = {}
    for case, (_, record) in by_case(out).items():
        volume = syn.from_disk(np.asarray(load(out, case).dataobj))
        volume = volume[..., 0] if volume.ndim == 4 else volume
        read = (read_abdomen if case.startswith("amos_") else read_chest)(volume, grid)
        for label, answers in stated(record).items():
            got = read[label]
            hits.setdefault(label, []).append(
                (got is None) == (answers is None) and (not answers or got[: len(answers)] == answers)
            )
    assert all(sum(h) >= 0.9 * len(h) for h in hits.values()), {
        k: f"{sum(h)}/{len(h)}" for k, h in hits.items()
    }
    # Every label is both present and absent somewhere, so the rules are tested both ways.
    labels = [stated(r) for _, r in by_case(out).values()]
    for label in hits:
        values = [s[label] is None for s in labels if label in s]
        assert any(values) and not all(values), label
