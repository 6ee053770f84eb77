"""FLARE 2025 Task 5 scoring against hand-computed values: VQA (reference scorer and strict
variant) and region-structured reports (parsing, judge pairs, both GREEN aggregations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from med3dvlm.data.releases.flare.layout import serialise_findings
from med3dvlm.metrics import nltk_setup
from med3dvlm.metrics.flare_vqa import (
    CSV_COLUMNS,
    PANDAS_NA_VALUES,
    PredictionRow,
    UnknownCaseError,
    canonical_case_id,
    format_chain_prediction,
    global_accuracy,
    local_accuracy,
    normalise,
    question_chains,
    read_predictions,
    score_predictions,
    strict_scores,
    write_predictions,
)
from med3dvlm.metrics.region_report import (
    EVAL_REPORT_REGIONS,
    FLARE_REGIONS,
    CaseRegionScores,
    all_case_means,
    case_score,
    judge_regions,
    parse_regions,
    region_pairs,
    region_text_scores,
    score_case,
    summary_means,
)
from med3dvlm.metrics.text import meteor

# Ground truth in val.json's schema. Case A has a two-level chain whose children are listed out of
# id order (12 before 11; 13 follows up 12) and a second global question; B has an empty global
# answer and no local questions; C's follow-up is answered "None of the above".
CASE_A = {
    "case_id": "amos_0001.nii.gz",
    "findings": {"liver": "Normal.", "kidneys": "Left renal stone."},
    "global_vqa": [
        {
            "question": "Which abnormalities?",
            "choices": ["Kidney stone", "Ascites", "Splenomegaly"],
            "answer": ["Kidney stone", "Ascites"],
        },
        {"question": "Which spleen abnormalities?", "choices": ["Splenomegaly"], "answer": ["Splenomegaly"]},
    ],
    "local_vqa": [
        {"id": 10, "follow_up": -1, "question": "Is there a kidney stone?", "answer": "Yes"},
        {"id": 12, "follow_up": 10, "question": "Which side?", "answer": "Left"},
        {"id": 11, "follow_up": 10, "question": "Where in the kidney?", "answer": "Renal pelvis"},
        {"id": 13, "follow_up": 12, "question": "How large?", "answer": "6 mm"},
        {"id": 20, "follow_up": -1, "question": "Is there ascites?", "answer": "No"},
    ],
}
CASE_B = {
    "case_id": "valid_1_a_1.nii.gz",
    "global_vqa": [{"question": "Which?", "answer": []}],
    "local_vqa": [],
}
CASE_C = {
    "case_id": "amos_0002.nii.gz",
    "global_vqa": [{"question": "Which?", "answer": ["Hepatic cyst"]}],
    "local_vqa": [
        {"id": 1, "follow_up": -1, "question": "Is there a liver mass?", "answer": "No"},
        {
            "id": 2,
            "follow_up": 1,
            "question": "Which lobe?",
            "choices": ["Left", "None of the above"],
            "answer": "None of the above",
        },
    ],
}
GT = [CASE_A, CASE_B, CASE_C]


def glob(case: str, prediction: str | None) -> PredictionRow:
    return PredictionRow(case, "global", None, "Which?", prediction)


def loc(case: str, root: int | None, prediction: str | None) -> PredictionRow:
    return PredictionRow(case, "local", root, "1. q", prediction)


def test_canonical_case_id_and_normalise():
    assert canonical_case_id("amos_0001.npy") == "amos_0001"
    assert canonical_case_id("data/validation/amos_0001.nii.gz") == "amos_0001"
    assert canonical_case_id("amos_0001") == "amos_0001"
    assert canonical_case_id("a.b.nii") == "a.b"  # only the last suffix goes
    assert normalise(None) == "" and normalise(float("nan")) == ""
    assert normalise("  Kidney Stone \n") == "kidney stone"
    assert normalise(3) == "3"


def test_format_chain_prediction():
    assert format_chain_prediction("1. Yes\n\n2.Renal pelvis \n  10.   Left") == "Yes|Renal pelvis|Left"
    # One unnumbered line keeps the raw text (then scored as a single chain item).
    assert format_chain_prediction("1. Yes\nRenal pelvis") == "1. Yes\nRenal pelvis"
    assert format_chain_prediction("1) Yes") == "1) Yes"
    assert format_chain_prediction("Yes") == "Yes"
    assert format_chain_prediction("") == ""


@pytest.mark.parametrize(
    ("case", "prediction", "expected"),
    [
        ("amos_0001.npy", "Kidney stone, Ascites", 1.0),  # 2 hits / max(2, 2)
        ("amos_0001.npy", " KIDNEY STONE ,ascites, ", 1.0),  # stripped, lower-cased, empty item dropped
        ("amos_0001.npy", "Kidney stone, Splenomegaly, Ascites", 2 / 3),  # 2 hits / max(3, 2)
        ("amos_0001.npy", "Kidney stone", 0.5),  # 1 hit / max(1, 2)
        ("amos_0001.npy", "Kidney stone, Kidney stone", 1.0),  # duplicates count: 2 hits / max(2, 2)
        ("amos_0002.npy", "Hepatic cyst, hepatic cyst", 1.0),  # 2 hits / max(2, 1): no penalty either
        ("amos_0002.npy", None, 0.0),  # missing cell -> "nan": 0 hits / max(1, 1)
        ("amos_0002.npy", "None", 0.0),  # what vqa.py writes for an empty generation: read as NaN too
        ("valid_1_a_1.npy", None, 0.0),  # empty truth, missing cell: "nan" vs [] -> 0 / max(1, 0)
        ("valid_1_a_1.npy", " , ", 1.0),  # no item left and no truth -> 1.0
        ("valid_1_a_1.npy", "Ascites", 0.0),  # 0 / max(1, 0)
    ],
)
def test_global_accuracy_per_row(case, prediction, expected):
    assert global_accuracy([glob(case, prediction)], GT) == round(expected, 6)


def test_global_accuracy_quirks():
    # Every global row is compared with global_vqa[0], even one answering global_vqa[1];
    # rows are the unit: (1 + 0) / 2; case C has no row and is not penalised.
    rows = [glob("amos_0001.npy", "Kidney stone, Ascites"), glob("amos_0001.npy", "Splenomegaly")]
    assert global_accuracy(rows, GT) == 0.5
    # A label containing a comma can never match: "Cyst" and "simple" against ["cyst, simple"].
    comma = [{"case_id": "x.nii.gz", "global_vqa": [{"answer": ["Cyst, simple"]}], "local_vqa": []}]
    assert global_accuracy([glob("x.npy", "Cyst, simple")], comma) == 0.0
    # A string answer is iterated by character: "ab" -> ["a", "b"], so "a,b" scores 2 / 2.
    text = [{"case_id": "x.nii.gz", "global_vqa": [{"answer": "ab"}], "local_vqa": []}]
    assert global_accuracy([glob("x.npy", "a,b")], text) == 1.0
    # (1 + 2/3 + 0) / 3 = 0.5555555... rounded to 6 decimals.
    rows = [
        glob("amos_0001.npy", "Kidney stone, Ascites"),
        glob("amos_0001.npy", "Kidney stone, Ascites, x"),
        glob("amos_0002.npy", None),
    ]
    assert global_accuracy(rows, GT) == 0.555556
    assert global_accuracy([], GT) == 0.0


def test_question_chains_walk_follow_ups_and_sort_ids():
    # 13 follows up 12, which follows up 10: all in chain 10, non-root ids ascending.
    assert question_chains(CASE_A["local_vqa"]) == {10: [10, 11, 12, 13], 20: [20]}
    with pytest.raises(ValueError, match="broken or cyclic"):
        question_chains([{"id": 1, "follow_up": 2}, {"id": 2, "follow_up": 1}])
    with pytest.raises(ValueError, match="broken or cyclic"):
        question_chains([{"id": 1, "follow_up": 7}])


@pytest.mark.parametrize(
    ("root", "prediction", "expected"),
    [
        (10, "Yes|Renal pelvis|Left|6 mm", 1.0),  # chain [10, 11, 12, 13]: 4 / 4
        (10, "yes | renal pelvis|LEFT|6 mm ", 1.0),  # per-item strip + lower case
        (10, "Yes|Left|Renal pelvis|6 mm", 0.5),  # JSON order of children, not id order: 2 / 4
        (10, "No|Renal pelvis|Left|6 mm", 0.0),  # wrong root: 0 whatever follows
        (10, "Yes", 0.25),  # missing positions compare as "": only the root, 1 / 4
        (10, "Yes|Renal pelvis|Left|6 mm|extra", 1.0),  # extra items are ignored
        (10, "Yes, Renal pelvis, Left, 6 mm", 0.0),  # commas are not separators: root "yes, renal..."
        (20, None, 0.0),  # missing cell -> "nan" != "no"
        (20, "no", 1.0),
        (1, "No|None of the above", 1.0),  # case C: 2 / 2
    ],
)
def test_local_accuracy_per_row(root, prediction, expected):
    case = "amos_0002.npy" if root == 1 else "amos_0001.npy"
    assert local_accuracy([loc(case, root, prediction)], GT) == expected


def test_local_accuracy_quirks():
    # Duplicates count twice; a non-root id (12) and an unknown id (99) are skipped; chain 20 and
    # case C's chain have no row and are not penalised: (1 + 0.25) / 2 = 0.625.
    rows = [
        loc("amos_0001.npy", 10, "Yes|Renal pelvis|Left|6 mm"),
        loc("amos_0001.npy", 10, "Yes"),
        loc("amos_0001.npy", 12, "Left"),
        loc("amos_0001.npy", 99, "Yes"),
    ]
    assert local_accuracy(rows, GT) == 0.625
    # (1 + 0 + 0) / 3 = 0.333333 after rounding.
    rows = [loc("amos_0001.npy", 20, "No"), loc("amos_0001.npy", 20, "Yes"), loc("amos_0002.npy", 1, "Yes")]
    assert local_accuracy(rows, GT) == 0.333333
    assert local_accuracy([], GT) == 0.0
    with pytest.raises(ValueError, match="no question_id"):
        local_accuracy([loc("amos_0001.npy", None, "Yes")], GT)


def test_unknown_case_raises_a_key_error_naming_it():
    for score in (global_accuracy, local_accuracy):
        row = glob("amos_9999.npy", "x") if score is global_accuracy else loc("amos_9999.npy", 1, "x")
        with pytest.raises(KeyError, match="amos_9999") as info:
            score([row], GT)
        assert isinstance(info.value, UnknownCaseError)
    # Rows of another scope are never looked up.
    assert global_accuracy([PredictionRow("amos_9999.npy", "other", None, "q", "x")], GT) == 0.0


def test_strict_scores_count_cases_and_chains():
    rows = [
        glob("amos_0001.npy", "Kidney stone, Kidney stone"),  # first row: {kidney stone} vs 2 labels -> 1/2
        glob("amos_0001.npy", "Kidney stone, Ascites"),  # not the first global row of A: ignored
        glob("valid_1_a_1.npy", None),  # missing = empty set, empty truth -> 1.0
        # C has no global row -> 0.0
        loc("amos_0001.npy", 10, "Yes|Renal pelvis"),  # 2 / 4
        loc("amos_0001.npy", 10, "Yes|Renal pelvis|Left|6 mm"),  # second row of chain 10: ignored
        loc("amos_0002.npy", 1, None),  # missing = empty chain -> 0
        # chain A/20 has no row -> 0
    ]
    # global (0.5 + 1 + 0) / 3 = 0.5; local (0.5 + 0 + 0) / 3 = 0.166667
    assert strict_scores(rows, GT) == {
        "global_accuracy": 0.5,
        "local_accuracy": 0.166667,
        "cases": 3,
        "chains": 3,
    }
    # The reference on the same rows: global (1 + 1 + 0) / 3; local (0.5 + 1 + 0) / 3.
    assert global_accuracy(rows, GT) == 0.666667
    assert local_accuracy(rows, GT) == 0.5
    # A string answer is one label in the strict variant.
    text = [{"case_id": "x.nii.gz", "global_vqa": [{"answer": "Ascites"}], "local_vqa": []}]
    assert strict_scores([glob("x.npy", "ascites")], text)["global_accuracy"] == 1.0


def test_csv_round_trip_and_score_predictions(tmp_path):
    rows = [
        glob("amos_0001.npy", "Kidney stone, Kidney stone"),  # ref 1.0, strict 1/2
        glob("amos_0001.npy", "Splenomegaly"),  # ref 0 / max(1, 2) = 0; strict ignored
        glob("valid_1_a_1.npy", None),  # ref "nan" -> 0; strict 1.0
        loc("amos_0001.npy", 10, "Yes|Renal pelvis|Left|6 mm"),  # ref 1.0, strict 1.0
        loc("amos_0001.npy", 10, "Yes"),  # ref 0.25; strict ignored
        loc("amos_0001.npy", 12, "Left"),  # skipped by both
        loc("amos_0002.npy", 1, "No|None of the above"),  # 1.0 both
        PredictionRow("amos_0002.npy", "local", 1, "1. A mass?\n2. Which lobe? Choices: ['Left']", "No"),
    ]
    csv_path, gt_path = tmp_path / "predictions.csv", tmp_path / "val.json"
    write_predictions(csv_path, rows)
    gt_path.write_text(json.dumps(GT), encoding="utf-8")
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == ",".join(CSV_COLUMNS)
    assert read_predictions(csv_path) == rows
    # ref global (1 + 0 + 0) / 3; ref local (1 + 0.25 + 1 + 0.5) / 4 = 0.6875 (last row: 1 of 2)
    # strict global (0.5 + 1 + 0) / 3 = 0.5; strict local: A/10 1.0, A/20 0 (no row), C/1 1.0 -> 2/3
    assert score_predictions(csv_path, gt_path) == {
        "global_accuracy": 0.333333,
        "local_accuracy": 0.6875,
        "strict": {"global_accuracy": 0.5, "local_accuracy": 0.666667, "cases": 3, "chains": 3},
        "global_rows": 3,
        "local_rows": 4,
        "local_rows_skipped": 1,
    }


def test_read_predictions_cells(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(
        "case_id,scope,question_id,question,prediction\r\n"
        'a.npy,global,,"multi\nline",None\r\n'
        "\r\n"  # blank line: skipped
        "a.npy,local,3.0,q, None\r\n"
        "a.npy,local,4,q,\r\n",
        encoding="utf-8",
    )
    rows = read_predictions(path)
    assert [(r.question_id, r.question, r.prediction) for r in rows] == [
        (None, "multi\nline", None),
        (3, "q", " None"),
        (4, "q", None),
    ]
    path.write_text("case_id,scope,question\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\['question_id', 'prediction'\]"):
        read_predictions(path)


def test_missing_cells_are_those_pandas_reads_as_nan(tmp_path):
    pd = pytest.importorskip("pandas")
    near_misses = ["none", "NONE", " None", "nan ", "0", "-", "n.a."]
    values = sorted(PANDAS_NA_VALUES) + near_misses
    path = tmp_path / "p.csv"
    write_predictions(path, [glob("a.npy", v) for v in values])
    frame = pd.read_csv(path)
    rows = read_predictions(path)
    assert len(frame) == len(rows) == len(values)
    assert [r.prediction is None for r in rows] == frame["prediction"].isna().tolist()
    assert [r.prediction is None for r in rows] == [v in PANDAS_NA_VALUES for v in values]


# ------------------------------------------------------------------ region-structured reports


def test_region_lists():
    assert len(FLARE_REGIONS) == 19 and len(EVAL_REPORT_REGIONS) == 18
    assert set(FLARE_REGIONS) - set(EVAL_REPORT_REGIONS) == {"urinary system"}
    assert EVAL_REPORT_REGIONS[:3] == ("lymphatic system", "liver", "mediastinum")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("liver: Normal size.\nkidneys: 6 mm stone.\n", {"liver": "Normal size.", "kidneys": "6 mm stone."}),
        ("  Liver :   Normal  \n\n", {"liver": "Normal"}),
        ("Spleen \u2013 enlarged", {"spleen": "enlarged"}),  # en dash separates
        ("spleen - enlarged", {"spleen": "enlarged"}),  # so does a hyphen
        ("lungs and pleura: left-sided effusion", {"lungs and pleura": "left-sided effusion"}),
        ("post-operative liver: changes", {"post": "operative liver: changes"}),  # hyphen before the colon
        ("- liver: normal", {}),  # bullet: nothing before the first hyphen, line dropped
        ("1. liver: normal", {"1. liver": "normal"}),  # numbering stays in the key
        ("liver:\nspleen:   ", {}),  # a value is required
        ("liver: first\nLIVER: second", {"liver": "second"}),  # later duplicate wins
        ("kidneys: stone\nno hydronephrosis", {"kidneys": "stone"}),  # continuation line dropped
        ("kidneys: stone\nno peri-renal fluid", {"kidneys": "stone", "no peri": "renal fluid"}),  # mis-keyed
        ("The liver is normal.", {}),  # prose
        ('{"Liver": "Normal", "n": 1}', {"Liver": "Normal", "n": 1}),  # JSON object as is
        ('"liver: x"', {'"liver': 'x"'}),  # JSON, but not an object: parsed as lines
    ],
)
def test_parse_regions(text, expected):
    assert parse_regions(text) == expected


def test_serialise_findings_is_the_training_target():
    findings = {"Liver": "Normal.", "kidneys": "Stone: 6 mm."}
    assert serialise_findings(findings) == "Liver: Normal.\nkidneys: Stone: 6 mm."
    assert parse_regions(serialise_findings(findings)) == {"liver": "Normal.", "kidneys": "Stone: 6 mm."}
    assert parse_regions(findings) == findings


GT_REPORT = "liver: normal\nkidneys: left renal stone\nspleen: normal"
GEN_REPORT = "kidneys: no stone\nheart: enlarged\nliver: normal"


def test_region_pairs_directions():
    pairs = region_pairs(GT_REPORT, GEN_REPORT)
    assert pairs.matched == [("kidneys", "left renal stone", "no stone"), ("liver", "normal", "normal")]
    # Invented: the generated text is the reference and "<region> is normal." the candidate.
    assert pairs.invented == [("heart", "enlarged", "heart is normal.")]
    assert pairs.omitted == ["spleen"]


def test_judge_regions_calls_and_case_score():
    calls: list[list[tuple[str, str]]] = []
    table = {
        ("left renal stone", "no stone"): 0.5,
        ("normal", "normal"): 1.0,
        ("enlarged", "heart is normal."): 0.25,
    }

    def judge(pairs):
        calls.append(list(pairs))
        return [table[p] for p in pairs]

    case = score_case(GT_REPORT, GEN_REPORT, judge)
    # One call for the matched regions, one per invented region, none for the omitted one.
    assert calls == [
        [("left renal stone", "no stone"), ("normal", "normal")],
        [("enlarged", "heart is normal.")],
    ]
    assert case == CaseRegionScores(
        ("liver", "kidneys", "spleen"), {"kidneys": 0.5, "liver": 1.0, "heart": 0.25, "spleen": 0.0}
    )
    assert case_score(case.scores) == (0.5 + 1.0 + 0.25 + 0.0) / 4
    assert case_score({}) == 0.0
    assert judge_regions(region_pairs("", ""), judge) == {} and len(calls) == 2


def test_summary_means_versus_all_case_means():
    first = CaseRegionScores(
        ("liver", "kidneys", "spleen"), {"kidneys": 0.5, "liver": 1.0, "heart": 0.25, "spleen": 0.0}
    )
    second = CaseRegionScores(("liver", "urinary system"), {"liver": 0.5, "urinary system": 1.0})
    # case scores 0.4375 and 0.75 -> green 0.59375 in both
    summary = summary_means([first, second])
    assert summary["green"] == 0.59375
    # Over the cases whose GT has the region; heart is in no GT and has no mean.
    assert summary["region_means"] == {"liver": 0.75, "kidneys": 0.5, "spleen": 0.0, "urinary system": 1.0}
    assert list(summary["region_means"]) == ["liver", "kidneys", "spleen", "urinary system"]
    every = all_case_means([first, second])
    assert every["green"] == 0.59375
    means = every["region_means"]
    assert list(means) == list(EVAL_REPORT_REGIONS)  # no urinary system
    # Over all cases with 0 where absent: kidneys (0.5 + 0) / 2, heart (invented) (0.25 + 0) / 2.
    assert (means["liver"], means["kidneys"], means["spleen"], means["heart"]) == (0.75, 0.25, 0.0, 0.125)
    assert means["diaphragm"] is None  # in no case: eval_report.py would raise KeyError
    assert summary_means([]) == {"green": 0.0, "region_means": {}}


@pytest.fixture(scope="session")
def nltk_data(tmp_path_factory) -> Path:
    """The project's nltk_data folder, else one assembled from the installed Debian WordNet."""
    if not nltk_setup.missing_nltk_data(nltk_setup.default_nltk_data()):
        return nltk_setup.use_nltk_data()
    try:
        folder = nltk_setup.setup_nltk_data(tmp_path_factory.mktemp("nltk_data"))
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"WordNet / punkt not installed (make nltk-data): {exc}")
    return nltk_setup.use_nltk_data(folder)


def test_region_text_scores(nltk_data):
    cases = [
        (
            "liver: liver is normal\nspleen: no splenomegaly",
            "liver: liver normal\nspleen: spleen enlarged\nheart: ok",
        ),
        ("liver: liver is normal", "liver: liver is normal"),
    ]
    result = region_text_scores(cases, nltk_data=nltk_data)
    first, second = result["cases"]
    assert list(first) == ["liver", "spleen"] and list(second) == ["liver"]  # heart is invented: no pair
    # "liver normal" vs "liver is normal": BLEU-1 = precision 2/2 x brevity exp(1 - 3/2) = 0.606531;
    # ROUGE-1 F = 2 * 1 * (2/3) / (1 + 2/3) = 0.8.
    assert first["liver"]["bleu"] == pytest.approx(0.606531, abs=1e-6)
    assert first["liver"]["rouge1"] == pytest.approx(0.8)
    assert first["liver"]["meteor"] == pytest.approx(meteor("liver normal", "liver is normal", nltk_data))
    assert first["spleen"] == {"bleu": 0.0, "rouge1": 0.0, "meteor": 0.0}  # no word in common
    assert (second["liver"]["bleu"], second["liver"]["rouge1"]) == (pytest.approx(1.0), pytest.approx(1.0))
    liver = result["region_means"]["liver"]
    assert liver["bleu"] == pytest.approx((0.606531 + 1) / 2, abs=1e-6)
    assert liver["rouge1"] == pytest.approx(0.9)
    assert result["means"]["rouge1"] == pytest.approx((0.8 + 0 + 1) / 3)
