"""Evaluation tasks: closed VQA, open VQA, report generation, image-text retrieval (M3D benchmark
protocol) and the train/test leakage report. Each task is built from ``configs/task/<name>.yaml`` and run with an
:class:`EvalContext`; the generation tasks can also be run on any dataset and generate function
(:meth:`GenerationTask.evaluate`), which is how they are tested without a model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from med3dvlm.data.collate import PadCollate
from med3dvlm.data.datasets import (
    CaptionDataset,
    RetrievalDataset,
    VolumeReader,
    read_caption_split,
    read_csv_columns,
    read_report,
)
from med3dvlm.data.leakage import Item, case_id, format_leakage, split_leakage
from med3dvlm.data.prepared import dataset_preprocessing
from med3dvlm.data.preprocess import Preprocessing
from med3dvlm.data.prompts import PromptBuilder
from med3dvlm.data.releases.m3d.layout import IMAGE_COLUMN
from med3dvlm.data.releases.m3d.samples import ClosedVQADataset, OpenVQADataset, vqa_csv
from med3dvlm.evaluation.outputs import (
    flatten,
    log_wandb_table,
    metric_table,
    write_metrics_json,
    write_scored_csv,
    write_scores,
)
from med3dvlm.evaluation.runner import generate_predictions
from med3dvlm.metrics.ctclip_retrieval import report_to_volume_recall
from med3dvlm.metrics.retrieval import (
    DIRECTIONS,
    RECALL_AT,
    SUBSET_SIZES,
    metric_name,
    retrieval_metrics,
    subset_sizes,
    true_match_ranks,
)
from med3dvlm.metrics.text import TEXT_METRICS, BERTScorer, bertscore_problem, mean, text_scores
from med3dvlm.metrics.vqa import closed_vqa_metrics, open_vqa_metrics
from med3dvlm.models.generation import GenerateFn, GenerationSettings, model_generate_fn
from med3dvlm.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

METRIC_LABELS = {
    "bleu": "BLEU-1",
    "rouge1": "ROUGE-1",
    "meteor": "METEOR",
    "bert_f1": "BERTScore-F1",
    "accuracy": "Accuracy (substring)",
    "accuracy_strict": "Accuracy (strict)",
    "count": "n",
}


@dataclass
class EvalContext:
    """Where and how to evaluate (built by ``python -m med3dvlm.evaluate`` from its config)."""

    out_dir: str
    data_dir: str
    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    num_workers: int = 0
    max_length: int = 512
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    nltk_data: str | None = None
    # BERTScorer keyword arguments; None leaves BERTScore out.
    bertscore: Mapping[str, Any] | None = None
    loggers: Sequence[Any] = ()
    progress: bool = True
    # All-zero volumes instead of the real ones: the text-only control of an image-grounded score.
    zero_images: bool = False
    # Check every file of the model folder against its recorded SHA-256 before loading.
    verify_model_files: bool = True


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    table: str
    files: dict[str, Path]


def check_data_preprocessing(model: Preprocessing, data_dir: str | Path) -> None:
    """Evaluation reads volumes as ``prepare`` wrote them: a folder prepared otherwise than the model's
    training data is allowed (to measure it), with a warning naming what differs."""
    data = dataset_preprocessing(data_dir)
    if data is None or data.inferred or model.inferred:
        return
    for name, spec in data.sources.items():
        trained = model.sources.get(name) or next(iter(model.sources.values()))
        changed = trained.differences(spec)
        if changed:
            log.warning(
                "%s was prepared otherwise than the model's training data (source %r: %s, model vs data)",
                data_dir,
                name,
                "; ".join(changed),
            )


class GenerationTask:
    """Shared machinery: dataset -> batched generation (resumable CSV) -> scores -> outputs."""

    name = ""
    title = ""
    pred_column = "Pred"
    csv: str | None = None  # the VQA tasks' CSV choice
    generation_columns: tuple[str, ...] = ()
    score_columns: tuple[str, ...] = ()

    def __init__(self, split: str = "test", limit: int | None = None) -> None:
        self.split = split
        self.limit = limit

    def dataset(self, data_dir: str, prompts: PromptBuilder, volumes: VolumeReader) -> Dataset:
        raise NotImplementedError

    def row_of(self, batch: Mapping[str, Any], i: int) -> dict[str, str]:
        raise NotImplementedError

    def score(self, rows: list[dict[str, str]], ctx: EvalContext) -> tuple[dict[str, Any], dict[str, dict]]:
        """Add score columns to ``rows``; return the metrics and the per-type table data."""
        raise NotImplementedError

    def run(self, ctx: EvalContext) -> EvalResult:
        """Load the exported model, build the test dataset and evaluate."""
        from med3dvlm.artifacts.model_folder import load_pretrained

        if not ctx.model:
            raise ValueError("evaluation needs model=PATH (a folder written by python -m med3dvlm.export)")
        loaded = load_pretrained(ctx.model, dtype=ctx.dtype, verify_files=ctx.verify_model_files)
        model = loaded.model.to(ctx.device)
        check_data_preprocessing(loaded.record.preprocessing, ctx.data_dir)
        prompts = PromptBuilder(
            model.tokenizer,
            model.image_token,
            model.num_image_tokens,
            ctx.max_length,
            loaded.record.prompt_format,
        )
        dataset = self.dataset(ctx.data_dir, prompts, VolumeReader(spatial_size=loaded.record.input_size))
        return self.evaluate(
            ctx,
            dataset,
            model_generate_fn(model, ctx.generation, ctx.zero_images),
            model.tokenizer.pad_token_id,
        )

    def evaluate(
        self, ctx: EvalContext, dataset: Dataset, generate: GenerateFn, pad_token_id: int
    ) -> EvalResult:
        out = Path(ctx.out_dir)
        csv_path = out / f"predictions_{self.name}.csv"
        rows = generate_predictions(
            dataset,
            self.row_of,
            generate,
            csv_path,
            self.generation_columns,
            pad_token_id,
            batch_size=ctx.batch_size,
            num_workers=ctx.num_workers,
            seed=ctx.generation.seed,
            progress=ctx.progress,
            pred_column=self.pred_column,
        )
        metrics, by_metric = self.score(rows, ctx)
        metrics = {
            "task": self.name,
            "model": ctx.model,
            "split": self.split,
            **({"csv": self.csv} if self.csv else {}),
            "num_samples": len(rows),
            "generation": vars(ctx.generation),
            "zero_images": ctx.zero_images,
            **metrics,
        }
        columns = [*self.generation_columns, *self.score_columns]
        table = f"## {self.title}\n\n" + metric_table(by_metric, METRIC_LABELS) + self.notes(metrics)
        chart = {METRIC_LABELS.get(k, k): v for k, v in by_metric.items() if k != "count"}
        files = {
            "predictions": write_scored_csv(csv_path, rows, columns),
            **write_scores(out, self.name, metrics, table, chart, self.title),
        }
        log_wandb_table(
            ctx.loggers,
            f"eval/{self.name}/predictions",
            rows,
            columns,
            flatten(metrics["metrics"], f"eval/{self.name}/"),
        )
        return EvalResult(metrics, table, files)

    def notes(self, metrics: Mapping[str, Any]) -> str:
        decoding = metrics["generation"]
        mode = "greedy" if not decoding["do_sample"] else f"sampling (seed {decoding['seed']})"
        return (
            f"\n\nScores in %, {metrics['num_samples']} samples, {mode} decoding, "
            f"max_new_tokens={decoding['max_new_tokens']}."
        )


class _TextScoredTask(GenerationTask):
    reference_column = "Answer"
    score_columns = TEXT_METRICS

    def run(self, ctx: EvalContext) -> EvalResult:
        problem = bertscore_problem(**ctx.bertscore) if ctx.bertscore is not None else None
        if problem:  # before generating every answer, not after
            raise FileNotFoundError(
                f"context.bertscore: {problem}; set context.bertscore=null to leave it out"
            )
        return super().run(ctx)

    def text_metrics(
        self, rows: list[dict[str, str]], ctx: EvalContext
    ) -> tuple[dict[str, list[float]], dict]:
        scorer = BERTScorer(**ctx.bertscore) if ctx.bertscore is not None else None
        preds = [r[self.pred_column] for r in rows]
        refs = [r[self.reference_column] for r in rows]
        scores = text_scores(preds, refs, scorer, ctx.nltk_data)
        for name, values in scores.items():
            for row, value in zip(rows, values):
                row[name] = f"{value:.4f}"
        info = (
            {"model": scorer.describe(), "comparable_with_published": scorer.comparable} if scorer else None
        )
        return scores, {"bertscore": info}

    def notes(self, metrics: Mapping[str, Any]) -> str:
        text = (
            super().notes(metrics) + " BLEU-1, ROUGE-1 F, METEOR and BERTScore-F1 per sample, then averaged."
        )
        info = metrics.get("bertscore")
        if info is None:
            text += " BERTScore not computed."
        elif not info["comparable_with_published"]:
            text += (
                f"\n\n**BERTScore-F1 computed with {info['model']}, not roberta-large layer 17: "
                "not comparable with published numbers.**"
            )
        return text


class _VQATask(GenerationTask):
    """A VQA task on the split's CSV or on ``csv``, any CSV of the prepared ``M3D-VQA/`` folder
    (``M3D_VQA_test5k.csv``, the subset later papers score on)."""

    def __init__(self, split: str = "test", limit: int | None = None, csv: str | None = None) -> None:
        super().__init__(split, limit)
        self.csv = csv


class ClosedVQATask(_VQATask):
    """M3D-VQA closed-ended: accuracy per question type, substring rule and strict rule."""

    name = "vqa_closed"
    title = "Closed-ended VQA"
    generation_columns = ("Question Type", "Question", "Answer", "Answer Choice", "Pred", IMAGE_COLUMN)
    score_columns = ("Correct", "Correct (strict)")

    def dataset(self, data_dir: str, prompts: PromptBuilder, volumes: VolumeReader) -> Dataset:
        return ClosedVQADataset(
            data_dir, self.split, prompts, volumes, prompt_only=True, limit=self.limit, csv=self.csv
        )

    def row_of(self, batch: Mapping[str, Any], i: int) -> dict[str, str]:
        return {
            "Question Type": str(batch["question_type"][i]),
            "Question": batch["question"][i],
            "Answer": batch["answer"][i],
            "Answer Choice": batch["answer_choice"][i],
            IMAGE_COLUMN: batch["image_path"][i],
        }

    def score(self, rows: list[dict[str, str]], ctx: EvalContext) -> tuple[dict[str, Any], dict[str, dict]]:
        from med3dvlm.metrics.vqa import strict_correct, substring_correct

        for row in rows:
            row["Correct"] = str(int(substring_correct(row["Pred"], row["Answer Choice"])))
            row["Correct (strict)"] = str(int(strict_correct(row["Pred"], row["Answer Choice"])))
        metrics = closed_vqa_metrics(
            [r["Pred"] for r in rows], [r["Answer Choice"] for r in rows], [r["Question Type"] for r in rows]
        )
        return {"metrics": metrics}, metrics

    def notes(self, metrics: Mapping[str, Any]) -> str:
        return super().notes(metrics) + (
            ' Substring = the benchmark\'s rule ("<letter>." anywhere in the '
            "output); strict = the first answer letter of the output."
        )


class OpenVQATask(_TextScoredTask, _VQATask):
    """M3D-VQA open-ended: BLEU-1, ROUGE-1, METEOR, BERTScore-F1 per question type."""

    name = "vqa_open"
    title = "Open-ended VQA"
    generation_columns = ("Question Type", "Question", "Answer", "Pred", IMAGE_COLUMN)

    def dataset(self, data_dir: str, prompts: PromptBuilder, volumes: VolumeReader) -> Dataset:
        return OpenVQADataset(
            data_dir, self.split, prompts, volumes, prompt_only=True, limit=self.limit, csv=self.csv
        )

    def row_of(self, batch: Mapping[str, Any], i: int) -> dict[str, str]:
        return {
            "Question Type": str(batch["question_type"][i]),
            "Question": batch["question"][i],
            "Answer": batch["answer"][i],
            IMAGE_COLUMN: batch["image_path"][i],
        }

    def score(self, rows: list[dict[str, str]], ctx: EvalContext) -> tuple[dict[str, Any], dict[str, dict]]:
        scores, info = self.text_metrics(rows, ctx)
        metrics = open_vqa_metrics(scores, [r["Question Type"] for r in rows])
        return {"metrics": metrics, **info}, metrics


class ReportTask(_TextScoredTask):
    """M3D-Cap report generation on the first ``limit`` (1,000) test captions."""

    name = "report"
    title = "Report generation"
    pred_column = "pred"
    reference_column = "Ground Truth"
    generation_columns = ("Question", "Ground Truth", "pred", IMAGE_COLUMN)

    def __init__(self, split: str = "test", limit: int | None = 1000) -> None:
        super().__init__(split, limit)

    def dataset(self, data_dir: str, prompts: PromptBuilder, volumes: VolumeReader) -> Dataset:
        return CaptionDataset(data_dir, self.split, prompts, volumes, prompt_only=True, limit=self.limit)

    def row_of(self, batch: Mapping[str, Any], i: int) -> dict[str, str]:
        return {
            "Question": batch["question"][i],
            "Ground Truth": batch["answer"][i],
            IMAGE_COLUMN: batch["image_path"][i],
        }

    def score(self, rows: list[dict[str, str]], ctx: EvalContext) -> tuple[dict[str, Any], dict[str, dict]]:
        scores, info = self.text_metrics(rows, ctx)
        metrics = {name: {"Overall": mean(values)} for name, values in scores.items()}
        return {"metrics": metrics, **info}, metrics


class RetrievalTask:
    """Image->text and text->image recall@K of a SigLIP export on the first N test pairs of M3D-Cap,
    for each N in ``sizes`` the split holds (all pairs when it holds fewer than the smallest)."""

    name = "retrieval"
    title = "Image-text retrieval"

    def __init__(
        self,
        split: str = "test",
        sizes: Sequence[int] = SUBSET_SIZES,
        recall_at: Sequence[int] = RECALL_AT,
        ctclip_recall_at: Sequence[int] = (),
    ) -> None:
        self.split = split
        self.sizes = tuple(int(n) for n in sizes)
        self.recall_at = tuple(int(k) for k in recall_at)
        self.ctclip_recall_at = tuple(int(k) for k in ctclip_recall_at)

    def run(self, ctx: EvalContext) -> EvalResult:
        from med3dvlm.artifacts.encoder_export import load_siglip_export

        if not ctx.model:
            raise ValueError(
                "retrieval needs model=PATH: a stage-1 export (<siglip run folder>/export) or the "
                "SigLIP folder `python -m med3dvlm.import_weights` writes"
            )
        towers = load_siglip_export(ctx.model)
        max_length = min(ctx.max_length, towers.text_tower.max_length)
        check_data_preprocessing(towers.record.preprocessing, ctx.data_dir)
        dataset = RetrievalDataset(
            ctx.data_dir,
            self.split,
            towers.tokenizer,
            VolumeReader(towers.record.input_size),
            max_length,
            limit=None if self.ctclip_recall_at else max(self.sizes),
        )
        image_emb, text_emb = self.embed(
            towers.image_tower.to(ctx.device),
            towers.text_tower.to(ctx.device),
            dataset,
            towers.tokenizer.pad_token_id,
            ctx,
        )
        return self.evaluate(
            ctx,
            image_emb,
            text_emb,
            [dataset.images[i] for i in range(len(dataset))],
            [dataset.texts[i] for i in range(len(dataset))],
        )

    @staticmethod
    @torch.no_grad()
    def embed(
        image_tower: torch.nn.Module,
        text_tower: torch.nn.Module,
        dataset: Dataset,
        pad_token_id: int,
        ctx: EvalContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_emb, text_emb)``, ``(num_pairs, E)`` each, in dataset order."""
        loader = DataLoader(
            dataset,
            batch_size=ctx.batch_size,
            shuffle=False,
            num_workers=ctx.num_workers,
            collate_fn=PadCollate(pad_token_id),
        )
        images, texts = [], []
        for batch in tqdm(loader, desc="embedding pairs", disable=not ctx.progress):
            images.append(image_tower(batch["image"].to(ctx.device)).float().cpu())
            texts.append(
                text_tower(batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device))
                .float()
                .cpu()
            )
        return torch.cat(images), torch.cat(texts)

    def evaluate(
        self,
        ctx: EvalContext,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        image_paths: Sequence[str],
        text_paths: Sequence[str],
    ) -> EvalResult:
        """Score the embeddings of the test pairs (row i of both belongs to pair i) and write the
        outputs: per-pair ranks CSV, metrics JSON, Markdown table, bar chart, W&B table."""
        out = Path(ctx.out_dir)
        flat = retrieval_metrics(image_emb, text_emb, self.sizes, self.recall_at)
        held = subset_sizes(image_emb.shape[0], self.sizes)
        by_metric = {
            f"R@{k}": {f"{d} n={n}": flat[metric_name(d, k, n)] for n in held for d in DIRECTIONS}
            for k in self.recall_at
        }
        ranks = true_match_ranks(image_emb[: held[-1]] @ text_emb[: held[-1]].T)
        columns = [IMAGE_COLUMN, "Text Path", f"i2t rank (n={held[-1]})", f"t2i rank (n={held[-1]})"]
        rows = [
            dict(zip(columns, (image_paths[i], text_paths[i], int(ranks["i2t"][i]), int(ranks["t2i"][i]))))
            for i in range(held[-1])
        ]
        ctclip = (
            report_to_volume_recall(text_emb, image_emb, self.ctclip_recall_at)
            if self.ctclip_recall_at
            else {}
        )
        metrics = {
            "task": self.name,
            "model": ctx.model,
            "split": self.split,
            "num_pairs": int(image_emb.shape[0]),
            "subsets": held,
            "metrics": {**flat, **{f"ctclip_report_to_volume/R@{k}": v for k, v in ctclip.items()}},
        }
        table = (
            f"## {self.title}\n\n"
            + metric_table(by_metric)
            + f"\n\nRecall in %, first N of {metrics['num_pairs']} {self.split} pairs; i2t: image query, text "
            "candidates; t2i: the reverse. Ties count against the query."
        )
        if ctclip:
            table += (
                "\n\n"
                + metric_table({f"R@{k}": {"report -> volume": v} for k, v in ctclip.items()})
                + f"\n\nCT-CLIP's report-to-volume recall in %, all {metrics['num_pairs']} pairs."
            )
        files = {
            "predictions": write_scored_csv(out / f"predictions_{self.name}.csv", rows, columns),
            **write_scores(out, self.name, metrics, table, by_metric, self.title),
        }
        log_wandb_table(
            ctx.loggers,
            f"eval/{self.name}/ranks",
            rows,
            columns,
            flatten(metrics["metrics"], f"eval/{self.name}/"),
        )
        return EvalResult(metrics, table, files)


class LeakageTask:
    """Test items of M3D-Cap (and M3D-VQA) whose case or report text also occurs in train."""

    name = "leakage"

    def __init__(self, train: str = "train", test: str = "test", include_vqa: bool = True) -> None:
        self.train, self.test = train, test
        self.include_vqa = include_vqa

    def run(self, ctx: EvalContext) -> EvalResult:
        data_dir = Path(ctx.data_dir)

        def captions(split: str) -> list[Item]:
            return [
                Item(image, case_id(image), read_report(data_dir / text))
                for image, text in read_caption_split(data_dir, split)
            ]

        reports = {"captions": split_leakage(captions(self.train), captions(self.test))}
        if self.include_vqa and vqa_csv(data_dir, self.test).is_file():

            def vqa(split: str) -> list[Item]:
                paths = read_csv_columns(vqa_csv(data_dir, split), [IMAGE_COLUMN])[IMAGE_COLUMN]
                return [
                    Item(f"{split} row {i + 1}: {paths[i]}", case_id(paths[i])) for i in range(len(paths))
                ]

            reports["vqa"] = split_leakage(vqa(self.train), vqa(self.test))
        metrics = {
            "task": self.name,
            "data_dir": str(data_dir),
            **{k: r.to_dict() for k, r in reports.items()},
        }
        table = "\n\n".join(
            format_leakage(r, f"Leakage, {k}: {self.test} vs {self.train}") for k, r in reports.items()
        )
        out = Path(ctx.out_dir)
        files = {"metrics": write_metrics_json(out / "leakage.json", metrics), "table": out / "leakage.md"}
        atomic_write_text(files["table"], table + "\n")
        return EvalResult(metrics, table, files)
