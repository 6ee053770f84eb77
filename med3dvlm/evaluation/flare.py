"""FLARE 2025 Task 5's evaluations: VQA (global questions and question chains) and region-structured
reports, as Med3DVLM's FLARE_2025 branch runs and scores them, on a prepared FLARE folder.

``task=flare_vqa``: every global question and every question chain of each case is asked (the
chains as the original asks them: a root and its direct children, numbered), answers are written to
``predictions.csv`` in the challenge's columns (``case_id, scope, question_id, question,
prediction``; a chain's answer lines joined by ``|`` as the original's ``format_pred`` does) and
scored exactly as the original's ``eval_vqa.py`` (:mod:`med3dvlm.metrics.flare_vqa`), with a stricter
variant beside it. Greedy by default; the original sampled (``sampling=original``: top-p 0.9,
temperature 1.0). ``predictions=<csv> gt=<json>`` scores any submission without a model.

``task=flare_report``: a report per case with findings, scored per region with BLEU-1, ROUGE-1 and
METEOR, and with region-wise GREEN when a judge model folder is given (``judge=``; the reference is
``StanfordAIMI/GREEN-RadLlama2-7b``, a 7B model: a GPU). Judge answers are kept in
``green_judgements.csv``, so a rerun in the same folder asks only what is missing.

Both resume: generation appends to its CSV batch by batch (``evaluation.runner``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from med3dvlm.data.datasets import VolumeReader
from med3dvlm.data.prompts import PromptBuilder
from med3dvlm.data.releases.flare.layout import serialise_findings
from med3dvlm.data.releases.flare.samples import chain, chain_text, read_cases, roots, with_choices
from med3dvlm.evaluation.outputs import metric_table, write_scores
from med3dvlm.evaluation.runner import generate_predictions
from med3dvlm.evaluation.tasks import EvalContext, EvalResult, check_data_preprocessing
from med3dvlm.metrics.flare_vqa import (
    PredictionRow,
    format_chain_prediction,
    read_predictions,
    score_predictions,
    write_predictions,
)
from med3dvlm.metrics.green import GreenJudge
from med3dvlm.metrics.region_report import (
    CaseRegionScores,
    all_case_means,
    judge_regions,
    parse_regions,
    region_pairs,
    region_text_scores,
    summary_means,
)
from med3dvlm.models.generation import GenerationSettings, model_generate_fn
from med3dvlm.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

ORIGINAL_SAMPLING = {"do_sample": True, "top_p": 0.9, "temperature": 1.0}
"""How the original's vqa.py decodes (seed 42)."""


class FlareItems(Dataset):
    """Prompt-only samples of FLARE cases: one per ``(case, question)`` item, in the model's format."""

    def __init__(
        self, data_dir: str, items: Sequence[dict[str, Any]], prompts: PromptBuilder, volumes: VolumeReader
    ) -> None:
        self.data_dir, self.items, self.prompts, self.volumes = Path(data_dir), list(items), prompts, volumes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        prompt = self.prompts.report() if item["scope"] == "report" else self.prompts.vqa(item["asked"])
        ids = self.prompts.tokenize(prompt, None).input_ids
        return {
            "image": self.volumes(self.data_dir / item["image"], None),
            "input_ids": torch.tensor(ids),
            "image_path": item["image"],
            **{k: str(v) for k, v in item.items() if k != "image"},
        }


def _load(ctx: EvalContext) -> tuple[Any, PromptBuilder, VolumeReader]:
    from med3dvlm.artifacts.model_folder import load_pretrained

    if not ctx.model:
        raise ValueError(
            "this evaluation needs model=PATH (a model folder: export, or import_weights kind=flare)"
        )
    loaded = load_pretrained(ctx.model, dtype=ctx.dtype, verify_files=ctx.verify_model_files)
    if loaded.record.prompt_format != "flare":
        log.warning(
            "%s was trained with the %r prompt format; FLARE's questions are asked in it",
            ctx.model,
            loaded.record.prompt_format,
        )
    check_data_preprocessing(loaded.record.preprocessing, ctx.data_dir)
    model = loaded.model.to(ctx.device)
    prompts = PromptBuilder(
        model.tokenizer,
        model.image_token,
        model.num_image_tokens,
        ctx.max_length,
        loaded.record.prompt_format,
    )
    return model, prompts, VolumeReader(spatial_size=loaded.record.input_size)


def _generate(
    ctx: EvalContext,
    model: Any,
    dataset: FlareItems,
    csv_name: str,
    columns: Sequence[str],
    settings: GenerationSettings,
    answer_column: str,
) -> list[dict[str, str]]:
    def row_of(batch: Mapping[str, Any], i: int) -> dict[str, str]:
        return {c: batch[c][i] for c in columns if c != answer_column}

    return generate_predictions(
        dataset,
        row_of,
        model_generate_fn(model, settings, ctx.zero_images),
        Path(ctx.out_dir) / csv_name,
        columns,
        model.tokenizer.pad_token_id,
        batch_size=ctx.batch_size,
        num_workers=ctx.num_workers,
        seed=settings.seed,
        progress=ctx.progress,
        pred_column=answer_column,
    )


class FlareVQATask:
    """FLARE's global and chain VQA (module docstring).

    Args:
        split: the prepared split asked (``test`` = the challenge's validation set).
        limit: the first N cases only.
        predictions / gt: score this predictions CSV against this ground-truth JSON, no model.
        global_tokens / chain_tokens: new tokens per answer (the original's 128 and 64).
        sampling: ``greedy`` or ``original`` (top-p 0.9, temperature 1.0, seeded).
    """

    name = "flare_vqa"

    def __init__(
        self,
        split: str = "test",
        limit: int | None = None,
        predictions: str | None = None,
        gt: str | None = None,
        global_tokens: int = 128,
        chain_tokens: int = 64,
        sampling: str = "greedy",
    ) -> None:
        if sampling not in ("greedy", "original"):
            raise ValueError(f"task.sampling={sampling!r}: greedy or original")
        if (predictions is None) != (gt is None):
            raise ValueError("task.predictions and task.gt go together: a predictions CSV and its val.json")
        self.split, self.limit, self.sampling = split, limit, sampling
        self.predictions, self.gt = predictions, gt
        self.tokens = {"global": global_tokens, "local": chain_tokens}

    @property
    def reads_data(self) -> bool:
        """A submission scored against its ``gt`` needs no prepared folder."""
        return self.predictions is None

    def run(self, ctx: EvalContext) -> EvalResult:
        out = Path(ctx.out_dir)
        if self.predictions is not None:
            return self.report(ctx, Path(self.predictions), Path(self.gt))
        cases = read_cases(ctx.data_dir, self.split)[: self.limit]
        gt = out / "ground_truth.json"
        atomic_write_text(gt, json.dumps(cases, ensure_ascii=False) + "\n")
        model, prompts, volumes = _load(ctx)
        settings = (
            ctx.generation if self.sampling == "greedy" else replace(ctx.generation, **ORIGINAL_SAMPLING)
        )
        rows: list[PredictionRow] = []
        for scope in ("global", "local"):
            items = [item for case in cases for item in self.items(case) if item["scope"] == scope]
            answered = _generate(
                ctx,
                model,
                FlareItems(ctx.data_dir, items, prompts, volumes),
                f"predictions_{scope}.csv",
                ("case_id", "scope", "question_id", "question", "prediction"),
                replace(settings, max_new_tokens=self.tokens[scope]),
                "prediction",
            )
            rows += [
                PredictionRow(
                    r["case_id"],
                    scope,
                    int(r["question_id"]) if r["question_id"] else None,
                    r["question"],
                    format_chain_prediction(r["prediction"]) if scope == "local" else r["prediction"],
                )
                for r in answered
            ]
        csv_path = out / "predictions.csv"
        write_predictions(csv_path, rows)
        return self.report(ctx, csv_path, gt, decoding=vars(settings))

    @staticmethod
    def items(case: dict[str, Any]) -> list[dict[str, Any]]:
        """The questions the original asks of a case: every global question, then every chain."""
        questions = case.get("local_vqa", [])
        found = [
            {
                "case_id": case["case_id"],
                "scope": "global",
                "question_id": "",
                "question": q["question"],
                "asked": with_choices(q["question"], q.get("choices")),
                "image": case["image"],
            }
            for q in case.get("global_vqa", [])
        ]
        for root in roots(questions):
            asked, _ = chain_text(chain(questions, root))
            found.append(
                {
                    "case_id": case["case_id"],
                    "scope": "local",
                    "question_id": root["id"],
                    "question": asked,
                    "asked": asked,
                    "image": case["image"],
                }
            )
        return found

    def report(
        self,
        ctx: EvalContext,
        csv_path: Path,
        gt: Path,
        decoding: Mapping[str, Any] | None = None,
    ) -> EvalResult:
        scores = score_predictions(csv_path, gt)
        metrics = {
            "task": self.name,
            "model": ctx.model,
            "predictions": str(csv_path),
            "gt": str(gt),
            **({"generation": dict(decoding)} if decoding else {}),
            **scores,
        }
        out = Path(ctx.out_dir)
        by_metric = {
            "global accuracy": {
                "original": scores["global_accuracy"],
                "strict": scores["strict"]["global_accuracy"],
            },
            "local accuracy": {
                "original": scores["local_accuracy"],
                "strict": scores["strict"]["local_accuracy"],
            },
        }
        table = (
            "## FLARE 2025 VQA\n\n"
            + metric_table(by_metric)
            + f"\n\nScores in %: {len(read_predictions(csv_path))} rows. original = the original's eval_vqa.py "
            "(rows are the unit; an empty answer counts as one wrong label; missing chains are not "
            "penalised); strict = per case, missing answers count 0. Published (Med3DVLM-FLARE): "
            "global 23.58, local 41.80."
        )
        files = {"predictions": csv_path, **write_scores(out, self.name, metrics, table)}
        return EvalResult(metrics, table, files)


class FlareReportTask:
    """FLARE's region-structured report generation (module docstring).

    Args:
        split / limit: the prepared split and its first N cases with findings.
        max_new_tokens: the original generates up to 512.
        judge: a local GREEN judge folder (``StanfordAIMI/GREEN-RadLlama2-7b``); ``None``: text scores only.
        judge_batch_size / judge_device: GREEN's batch of 8; ``None``: the evaluation's device.
    """

    name = "flare_report"
    columns = ("generated", "gt", "name", "case_id")

    def __init__(
        self,
        split: str = "test",
        limit: int | None = None,
        max_new_tokens: int = 512,
        judge: str | None = None,
        judge_batch_size: int = 8,
        judge_device: str | None = None,
    ) -> None:
        self.split, self.limit, self.max_new_tokens = split, limit, max_new_tokens
        self.judge, self.judge_batch_size, self.judge_device = judge, judge_batch_size, judge_device

    def run(self, ctx: EvalContext) -> EvalResult:
        if self.judge is not None and not Path(self.judge).is_dir():  # before any report is generated
            raise FileNotFoundError(
                f"task.judge={self.judge}: not a local folder; download the judge once "
                "(huggingface-cli download StanfordAIMI/GREEN-RadLlama2-7b) and pass its folder"
            )
        cases = [case for case in read_cases(ctx.data_dir, self.split) if case.get("findings")][: self.limit]
        model, prompts, volumes = _load(ctx)
        items = [
            {
                "case_id": case["case_id"],
                "scope": "report",
                "gt": serialise_findings(case["findings"]),
                "name": case["case_id"].split(".")[0],
                "image": case["image"],
            }
            for case in cases
        ]
        rows = _generate(
            ctx,
            model,
            FlareItems(ctx.data_dir, items, prompts, volumes),
            "predictions_flare_report.csv",
            self.columns,
            replace(ctx.generation, max_new_tokens=self.max_new_tokens),
            "generated",
        )
        pairs = [(row["gt"], row["generated"]) for row in rows]
        text = region_text_scores(pairs, ctx.nltk_data)
        metrics: dict[str, Any] = {
            "task": self.name,
            "model": ctx.model,
            "num_cases": len(rows),
            "region_text": {"means": text["means"], "region_means": text["region_means"]},
        }
        if self.judge is not None:
            scored = self.green(ctx, pairs, [row["name"] for row in rows])
            metrics["green"] = {"summary": summary_means(scored), "all_cases": all_case_means(scored)}
        return self.write(ctx, metrics)

    def green(
        self, ctx: EvalContext, pairs: Sequence[tuple[str, str]], names: Sequence[str]
    ) -> list[CaseRegionScores]:
        """Region-wise GREEN of every case, judge answers kept in (and reused from) green_judgements.csv."""
        path = Path(ctx.out_dir) / "green_judgements.csv"
        known: dict[tuple[str, str], float] = {}
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as handle:
                known = {(r["reference"], r["candidate"]): float(r["green"]) for r in csv.DictReader(handle)}
        judge = GreenJudge(
            self.judge, device=self.judge_device or ctx.device, batch_size=self.judge_batch_size
        )
        wanted = [(ref, hyp) for gt, generated in pairs for ref, hyp in _judged(gt, generated)]
        missing = list(dict.fromkeys(p for p in wanted if p not in known))
        new = path.is_file()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["reference", "candidate", "green", "answer"])
            if not new:
                writer.writeheader()
            for start in range(0, len(missing), self.judge_batch_size):
                batch = missing[start : start + self.judge_batch_size]
                for (ref, hyp), (score, answer) in zip(batch, judge.judge(batch), strict=True):
                    known[(ref, hyp)] = score
                    writer.writerow({"reference": ref, "candidate": hyp, "green": score, "answer": answer})
                handle.flush()
        scored = [
            CaseRegionScores(
                tuple(parse_regions(gt)),
                judge_regions(region_pairs(gt, generated), lambda p: [known[x] for x in p]),
            )
            for gt, generated in pairs
        ]
        log.info(
            "GREEN judged %d region pairs (%d reused) for %d cases",
            len(missing),
            len(wanted) - len(missing),
            len(names),
        )
        return scored

    def write(self, ctx: EvalContext, metrics: dict[str, Any]) -> EvalResult:
        out = Path(ctx.out_dir)
        by_metric = {
            metric: {"all regions": value} for metric, value in metrics["region_text"]["means"].items()
        }
        if "green" in metrics:
            by_metric["GREEN"] = {"all regions": metrics["green"]["summary"]["green"]}
        table = (
            "## FLARE 2025 region-structured reports\n\n"
            + metric_table(by_metric)
            + f"\n\nScores in %, {metrics['num_cases']} cases; BLEU-1, ROUGE-1 and METEOR per matched region. "
            + (
                "GREEN region-wise as the original (summary.json and eval_report.py means in the JSON); "
                "published 41.84."
                if "green" in metrics
                else "GREEN not computed (task.judge=<judge folder>)."
            )
        )
        files = {
            "predictions": out / "predictions_flare_report.csv",
            **write_scores(out, self.name, metrics, table),
        }
        return EvalResult(metrics, table, files)


def _judged(gt: str, generated: str) -> list[tuple[str, str]]:
    pairs = region_pairs(gt, generated)
    return [(ref, hyp) for _, ref, hyp in (*pairs.matched, *pairs.invented)]
