"""Region-structured FLARE 2025 reports: parsing, judge pairs and the two GREEN aggregations.

A FLARE report is one ``"{region}: {text}"`` line per anatomical region (the target text the
original trains on, ``data.releases.flare.layout.serialise_findings``). The original scores a generated report region
by region (Med3DVLM's ``generate_green_score.py``):

- both reports are parsed with :func:`parse_regions`;
- a region in both is judged with reference = ground truth, candidate = generated text;
- a region only in the generated report ("invented") is judged with the roles reversed:
  reference = the generated text, candidate = ``"{region} is normal."``;
- a region only in the ground truth ("omitted") scores 0 without a judge call;
- the case score is the mean over the regions of both reports (:func:`case_score`).

Two aggregations of those scores exist, and they differ: :func:`summary_means` (the original's
``summary.json``: a region's mean over the cases whose ground truth has it) and
:func:`all_case_means` (the original's ``eval_report.py``: over all cases, 0 where a case lacks
the region, for 18 fixed regions without ``urinary system``).

:func:`region_text_scores` adds BLEU-1/ROUGE-1/METEOR per matched region: offline scores that
need no judge model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from med3dvlm.metrics.text import mean, text_scores

# The 19 region names of FLARE 2025 Task 5 findings (lower case, as the scorer compares them).
FLARE_REGIONS: tuple[str, ...] = (
    "liver",
    "biliary system",
    "spleen",
    "pancreas",
    "kidneys",
    "endocrine system",
    "lymphatic system",
    "gastrointestinal tract",
    "abdominal cavity and peritoneum",
    "blood vessels",
    "musculoskeletal system",
    "lungs and pleura",
    "respiratory tract",
    "heart",
    "mediastinum",
    "esophagus",
    "urinary system",
    "breast tissue",
    "diaphragm",
)
# eval_report.py's categories, in its order: FLARE_REGIONS without "urinary system".
EVAL_REPORT_REGIONS: tuple[str, ...] = (
    "lymphatic system",
    "liver",
    "mediastinum",
    "respiratory tract",
    "abdominal cavity and peritoneum",
    "blood vessels",
    "esophagus",
    "musculoskeletal system",
    "endocrine system",
    "lungs and pleura",
    "heart",
    "gastrointestinal tract",
    "kidneys",
    "pancreas",
    "biliary system",
    "spleen",
    "breast tissue",
    "diaphragm",
)
# Key = everything before the first ":", en dash (U+2013) or hyphen; a non-empty value must follow.
_REGION_LINE = re.compile(r"([^:\u2013\-]+)[:\u2013\-]\s*(.+)")

Judge = Callable[[Sequence[tuple[str, str]]], Sequence[float]]


def parse_regions(text: str | Mapping[str, str]) -> dict[str, str]:
    """Region -> text, as the original's ``to_dict``.

    A mapping is returned as a dict, and a string holding a JSON object as parsed (keys and
    values untouched). Otherwise each stripped non-empty line (``str.splitlines``) that matches
    ``key<sep>value`` gives ``key.strip().lower() -> value.strip()``, ``<sep>`` being the first
    ``:``, ``–`` or ``-`` of the line; other lines are dropped and a later duplicate key wins.
    Pitfalls (all the original's): a hyphen before the colon splits early
    (``post-operative liver: x`` -> ``post``: ``operative liver: x``); a bulleted line
    ``- liver: x`` is dropped (nothing before the first hyphen); a numbered line
    ``1. liver: x`` keeps the number in the key; ``liver:`` with no text is dropped; a region
    text continued on a new line becomes a line of its own.
    """
    if isinstance(text, Mapping):
        return dict(text)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    regions: dict[str, str] = {}
    for line in text.splitlines():
        match = _REGION_LINE.match(line.strip())
        if match:
            regions[match.group(1).strip().lower()] = match.group(2).strip()
    return regions


@dataclass(frozen=True)
class RegionPairs:
    """What the judge is asked for one case: ``(region, reference, candidate)`` triples for the
    ``matched`` and ``invented`` regions (generated order), and the ``omitted`` regions (ground
    truth order), which score 0."""

    matched: list[tuple[str, str, str]] = field(default_factory=list)
    invented: list[tuple[str, str, str]] = field(default_factory=list)
    omitted: list[str] = field(default_factory=list)


def region_pairs(gt_text: str | Mapping[str, str], generated_text: str | Mapping[str, str]) -> RegionPairs:
    """Split a case into matched, invented and omitted regions with the judge's inputs.

    The original visits invented and omitted regions in set order; here they keep report order."""
    gt, generated = parse_regions(gt_text), parse_regions(generated_text)
    return RegionPairs(
        matched=[(r, gt[r], text) for r, text in generated.items() if r in gt],
        invented=[(r, text, f"{r} is normal.") for r, text in generated.items() if r not in gt],
        omitted=[r for r in gt if r not in generated],
    )


def judge_regions(pairs: RegionPairs, judge: Judge) -> dict[str, float]:
    """Region -> score over both reports: one judge call for the matched regions and one per
    invented region (as the original batches them), 0.0 for omitted regions.

    ``judge`` maps ``(reference, candidate)`` pairs to scores, e.g.
    ``lambda p: [s for s, _ in green_judge.judge(p)]``."""
    scores: dict[str, float] = {}
    if pairs.matched:
        values = judge([(ref, hyp) for _, ref, hyp in pairs.matched])
        scores.update({region: float(v) for (region, _, _), v in zip(pairs.matched, values, strict=True)})
    for region, ref, hyp in pairs.invented:
        scores[region] = float(judge([(ref, hyp)])[0])
    scores.update({region: 0.0 for region in pairs.omitted})
    return scores


@dataclass(frozen=True)
class CaseRegionScores:
    """One scored case: its ground-truth regions (in report order) and its region scores."""

    gt_regions: tuple[str, ...]
    scores: Mapping[str, float]


def score_case(
    gt_text: str | Mapping[str, str], generated_text: str | Mapping[str, str], judge: Judge
) -> CaseRegionScores:
    """Judge one case's regions (:func:`region_pairs`, :func:`judge_regions`)."""
    scores = judge_regions(region_pairs(gt_text, generated_text), judge)
    return CaseRegionScores(tuple(parse_regions(gt_text)), scores)


def case_score(region_scores: Mapping[str, float]) -> float:
    """Mean of the region scores of one case (regions of both reports); 0.0 for none."""
    return sum(region_scores.values()) / len(region_scores) if region_scores else 0.0


def summary_means(cases: Sequence[CaseRegionScores]) -> dict[str, object]:
    """The original's ``summary.json``: ``green`` = mean of the case scores (0.0 for no case);
    ``region_means[r]`` = mean of r's score over the cases whose ground truth has r (keys in
    order of first appearance)."""
    per_region: dict[str, list[float]] = {}
    for case in cases:
        for region in case.gt_regions:
            per_region.setdefault(region, []).append(case.scores.get(region, 0.0))
    return {
        "green": mean([case_score(case.scores) for case in cases]) if cases else 0.0,
        "region_means": {region: mean(values) for region, values in per_region.items()},
    }


def all_case_means(
    cases: Sequence[CaseRegionScores], regions: Sequence[str] = EVAL_REPORT_REGIONS
) -> dict[str, object]:
    """The original's ``eval_report.py``: ``green`` = mean of the case scores; ``region_means[r]``
    = mean over all cases of r's score, 0 where a case has no r (invented-region scores count).

    A region no case mentions gives None (``eval_report.py`` raises KeyError there, its batch
    variant reports None). The default list leaves out ``urinary system``, as the original does."""
    seen = {region for case in cases for region in case.scores}
    return {
        "green": mean([case_score(case.scores) for case in cases]),
        "region_means": {
            region: mean([case.scores.get(region, 0.0) for case in cases]) if region in seen else None
            for region in regions
        },
    }


def region_text_scores(
    cases: Sequence[tuple[str | Mapping[str, str], str | Mapping[str, str]]],
    nltk_data: str | os.PathLike | None = None,
) -> dict[str, object]:
    """BLEU-1, ROUGE-1 and METEOR (:func:`med3dvlm.metrics.text.text_scores`) of each matched
    region of each ``(gt_text, generated_text)`` case, generated text against ground truth.

    Returns ``cases`` (per case: region -> metric -> score), ``region_means`` (region -> metric
    -> mean over the cases where the region is matched, regions in order of first appearance)
    and ``means`` (metric -> mean over all matched regions). Omitted and invented regions have
    no pair and are left out. ``nltk_data`` is METEOR's offline data folder."""
    matched = [region_pairs(gt, generated).matched for gt, generated in cases]
    flat = [pair for case in matched for pair in case]
    scores = text_scores([hyp for _, _, hyp in flat], [ref for _, ref, _ in flat], nltk_data=nltk_data)
    pair_scores = iter([{metric: values[i] for metric, values in scores.items()} for i in range(len(flat))])
    per_case = [{region: next(pair_scores) for region, _, _ in case} for case in matched]
    per_region: dict[str, list[dict[str, float]]] = {}
    for case_scores in per_case:
        for region, region_scores in case_scores.items():
            per_region.setdefault(region, []).append(region_scores)
    return {
        "cases": per_case,
        "region_means": {
            region: {metric: mean([s[metric] for s in rows]) for metric in scores}
            for region, rows in per_region.items()
        },
        "means": {metric: mean(values) for metric, values in scores.items()},
    }
