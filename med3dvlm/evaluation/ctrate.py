"""CT-RATE evaluation as its community reports it: zero-shot classification of the 18 labels
(CT-CLIP's protocol), a linear probe on frozen image features, and RadGenome-ChestCT's VQA scores.

Zero-shot: each volume's image embedding against the two prompts of each label, logits
``exp(log_scale) * cosine`` (CT-CLIP's ``exp(t) * <z_text, z_image>``), softmax over the pair; the
probabilities go to ``predictions_zero_shot.csv`` and every score is computed from exactly those
values. Bootstrap intervals resample the volumes (CT-CLIP's spreadsheets do not, see
:mod:`med3dvlm.metrics.zero_shot`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from med3dvlm.data.datasets import VolumeReader
from med3dvlm.data.errors import DataError
from med3dvlm.data.prompts import PromptBuilder
from med3dvlm.data.releases.ctrate.layout import CTRATE_LABELS
from med3dvlm.data.releases.ctrate.samples import VQA_KINDS, LabelledVolume, RadGenomeVQADataset, read_labels
from med3dvlm.evaluation.outputs import (
    flatten,
    log_wandb_table,
    metric_table,
    write_scored_csv,
    write_scores,
)
from med3dvlm.evaluation.tasks import EvalContext, EvalResult, GenerationTask, check_data_preprocessing
from med3dvlm.metrics.linear_probe import linear_probe
from med3dvlm.metrics.radgenome import radgenome_vqa_metrics
from med3dvlm.metrics.zero_shot import (
    SCORE_NAMES,
    bootstrap_intervals,
    present_probability,
    zero_shot_metrics,
    zero_shot_prompts,
    zero_shot_scores,
)

log = logging.getLogger(__name__)

SCORE_LABELS = {
    "auroc": "AUROC",
    "f1_weighted": "F1 (weighted)",
    "accuracy": "Accuracy",
    "precision": "Precision",
}


class _Volumes(Dataset):
    def __init__(self, data_dir: str, volumes: Sequence[LabelledVolume], reader: VolumeReader) -> None:
        self.paths = [Path(data_dir) / v.image for v in volumes]
        self.reader = reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.reader(self.paths[index], np.random.default_rng(0))


@torch.no_grad()
def embed_volumes(
    image_tower: torch.nn.Module,
    data_dir: str,
    volumes: Sequence[LabelledVolume],
    input_size: Sequence[int],
    ctx: EvalContext,
) -> torch.Tensor:
    """``(N, E)`` L2-normalised image embeddings of ``volumes``, in order."""
    loader = DataLoader(
        _Volumes(data_dir, volumes, VolumeReader(tuple(input_size))),
        batch_size=ctx.batch_size,
        num_workers=ctx.num_workers,
    )
    tower = image_tower.to(ctx.device).eval()
    embeddings = [
        tower(batch.to(ctx.device)).float().cpu()
        for batch in tqdm(loader, desc="embedding volumes", disable=not ctx.progress)
    ]
    return torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)


@torch.no_grad()
def embed_texts(
    text_tower: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int, device: str
) -> torch.Tensor:
    """``(T, E)`` L2-normalised text embeddings."""
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tower = text_tower.to(device).eval()
    out = tower(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float().cpu()
    return torch.nn.functional.normalize(out, dim=-1)


def _labelled(data_dir: str, split: str, limit: int | None) -> list[LabelledVolume]:
    volumes = read_labels(data_dir, split)[:limit]
    if not volumes:
        raise DataError(Path(data_dir) / "CT-RATE", f"no prepared volume in split {split!r}")
    return volumes


def _load_towers(ctx: EvalContext, task: str) -> Any:
    from med3dvlm.artifacts.encoder_export import load_siglip_export

    if not ctx.model:
        raise ValueError(
            f"{task} needs model=PATH: a stage-1 export (<siglip run folder>/export) or the SigLIP folder "
            "`python -m med3dvlm.import_weights` writes"
        )
    towers = load_siglip_export(ctx.model)
    check_data_preprocessing(towers.record.preprocessing, ctx.data_dir)
    return towers


class ZeroShotTask:
    """CT-CLIP's zero-shot classification of the 18 CT-RATE labels on the prepared ``split``."""

    name = "zero_shot"
    title = "Zero-shot classification (CT-RATE)"

    def __init__(
        self,
        split: str = "test",
        bootstrap: int = 1000,
        level: float = 0.95,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        self.split = split
        self.bootstrap = int(bootstrap)
        self.level = float(level)
        self.seed = int(seed)
        self.limit = limit

    def run(self, ctx: EvalContext) -> EvalResult:
        towers = _load_towers(ctx, self.name)
        volumes = _labelled(ctx.data_dir, self.split, self.limit)
        images = embed_volumes(towers.image_tower, ctx.data_dir, volumes, towers.record.input_size, ctx)
        prompts = [prompt for label in CTRATE_LABELS for prompt in zero_shot_prompts(label)]
        texts = embed_texts(
            towers.text_tower,
            towers.tokenizer,
            prompts,
            min(ctx.max_length, towers.text_tower.max_length),
            ctx.device,
        )
        return self.evaluate(ctx, images, texts, math.exp(towers.log_scale), volumes)

    def evaluate(
        self,
        ctx: EvalContext,
        images: torch.Tensor,
        prompts: torch.Tensor,
        scale: float,
        volumes: Sequence[LabelledVolume],
    ) -> EvalResult:
        """Score ``(N, E)`` image and ``(36, E)`` prompt embeddings (present, absent per label, in label order)."""
        logits = (scale * images.double() @ prompts.double().T).numpy()
        probs = present_probability(logits[:, 0::2], logits[:, 1::2])
        columns = ["VolumeName", *CTRATE_LABELS]
        rows = [
            {"VolumeName": v.name, **{label: repr(float(p)) for label, p in zip(CTRATE_LABELS, row)}}
            for v, row in zip(volumes, probs)
        ]
        out = Path(ctx.out_dir)
        predictions = write_scored_csv(out / f"predictions_{self.name}.csv", rows, columns)
        # The scores come from the probabilities as written (repr round-trips a float exactly).
        written = np.array([[float(r[label]) for label in CTRATE_LABELS] for r in rows])
        labels = np.array([v.labels for v in volumes])
        result = zero_shot_metrics(labels, written, CTRATE_LABELS)
        boot = bootstrap_intervals(
            labels,
            written,
            functools.partial(zero_shot_scores, names=CTRATE_LABELS),
            self.bootstrap,
            self.seed,
            self.level,
        )
        metrics = {
            "task": self.name,
            "model": ctx.model,
            "split": self.split,
            "num_volumes": len(volumes),
            "labels": list(CTRATE_LABELS),
            "metrics": {**result["per_label"], "mean": result["mean"]},
            "auroc_labels": result["auroc_labels"],
            "thresholds": dict(zip(CTRATE_LABELS, map(float, boot.thresholds))),
            "bootstrap": {
                "iterations": self.bootstrap,
                "resamples": boot.resamples,
                "skipped": boot.skipped,
                "level": self.level,
                "seed": self.seed,
                "lower": boot.lower,
                "upper": boot.upper,
            },
        }
        by_metric = {
            SCORE_LABELS[s]: {name: m[s] for name, m in metrics["metrics"].items()} for s in SCORE_NAMES
        }
        table = (
            f"## {self.title}\n\n"
            + metric_table(by_metric)
            + f"\n\nScores in %, {len(volumes)} {self.split} volumes; mean AUROC over the {result['auroc_labels']} labels with "
            f"both classes. {self.level:.0%} intervals of the means from {boot.resamples} bootstrap resamples of the volumes: "
            + ", ".join(
                f"{SCORE_LABELS[s]} [{100 * boot.lower[f'mean/{s}']:.1f}, {100 * boot.upper[f'mean/{s}']:.1f}]"
                for s in SCORE_NAMES
            )
            + "."
        )
        files = {
            "predictions": predictions,
            **write_scores(ctx.out_dir, self.name, metrics, table, by_metric, self.title),
        }
        log_wandb_table(
            ctx.loggers,
            f"eval/{self.name}/predictions",
            rows,
            columns,
            flatten(metrics["metrics"], f"eval/{self.name}/"),
        )
        return EvalResult(metrics, table, files)


class LinearProbeTask:
    """One logistic regression per label on the frozen image embeddings of ``train_split``, AUROC on ``split``."""

    name = "linear_probe"
    title = "Linear probe (CT-RATE)"

    def __init__(
        self,
        split: str = "test",
        train_split: str = "train",
        C: float = 1.0,
        max_iter: int = 1000,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        self.split = split
        self.train_split = train_split
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.limit = limit

    def run(self, ctx: EvalContext) -> EvalResult:
        towers = _load_towers(ctx, self.name)
        train = _labelled(ctx.data_dir, self.train_split, self.limit)
        test = _labelled(ctx.data_dir, self.split, self.limit)
        embed = functools.partial(
            embed_volumes, towers.image_tower, ctx.data_dir, input_size=towers.record.input_size, ctx=ctx
        )
        return self.evaluate(ctx, embed(train), train, embed(test), test)

    def evaluate(
        self,
        ctx: EvalContext,
        train_features: torch.Tensor,
        train: Sequence[LabelledVolume],
        test_features: torch.Tensor,
        test: Sequence[LabelledVolume],
    ) -> EvalResult:
        result = linear_probe(
            train_features.numpy(),
            np.array([v.labels for v in train]),
            test_features.numpy(),
            np.array([v.labels for v in test]),
            CTRATE_LABELS,
            C=self.C,
            max_iter=self.max_iter,
            seed=self.seed,
        )
        metrics = {
            "task": self.name,
            "model": ctx.model,
            "split": self.split,
            "train_split": self.train_split,
            "num_train": len(train),
            "num_test": len(test),
            "metrics": {"auroc": result["auroc"], "mean_auroc": result["mean_auroc"]},
            "skipped": result["skipped"],
        }
        by_metric = {"AUROC": {**result["auroc"], "mean": result["mean_auroc"]}}
        table = (
            f"## {self.title}\n\n"
            + metric_table(by_metric)
            + f"\n\nAUROC in % on {len(test)} {self.split} volumes; probes fit on {len(train)} {self.train_split} volumes "
            f"(standardised features, C={self.C:g})."
            + (f" Left out (one class only): {', '.join(result['skipped'])}." if result["skipped"] else "")
        )
        return EvalResult(
            metrics, table, write_scores(ctx.out_dir, self.name, metrics, table, by_metric, self.title)
        )


class RadGenomeVQATask(GenerationTask):
    """RadGenome-ChestCT VQA: hit score (abnormality, location), presence accuracy, size error in mm."""

    name = "radgenome_vqa"
    title = "RadGenome-ChestCT VQA"
    generation_columns = ("Question Type", "Question", "Answer", "Pred", "Image Path")
    score_columns = ("Score",)

    def __init__(
        self, split: str = "test", limit: int | None = None, kinds: Sequence[str] = VQA_KINDS
    ) -> None:
        super().__init__(split, limit)
        self.kinds = tuple(kinds)

    def dataset(self, data_dir: str, prompts: PromptBuilder, volumes: VolumeReader) -> Dataset:
        return RadGenomeVQADataset(
            data_dir, self.split, prompts, volumes, prompt_only=True, limit=self.limit, kinds=self.kinds
        )

    def row_of(self, batch: Mapping[str, Any], i: int) -> dict[str, str]:
        return {
            "Question Type": str(batch["question_type"][i]),
            "Question": batch["question"][i],
            "Answer": batch["answer"][i],
            "Image Path": batch["image_path"][i],
        }

    def score(self, rows: list[dict[str, str]], ctx: EvalContext) -> tuple[dict[str, Any], dict[str, dict]]:
        from med3dvlm.metrics.radgenome import hit_score, normalise_presence, size_error_mm

        for row in rows:
            kind, pred, answer = row["Question Type"], row["Pred"], row["Answer"]
            if kind == "presence":
                value: float | None = float(normalise_presence(pred) == normalise_presence(answer))
            elif kind == "size":
                value = size_error_mm(pred, answer)
            else:
                value = hit_score(pred, answer)
            row["Score"] = "" if value is None else f"{value:.4f}"
        metrics = radgenome_vqa_metrics(
            [{"kind": r["Question Type"], "prediction": r["Pred"], "reference": r["Answer"]} for r in rows]
        )
        by_metric: dict[str, dict[str, float]] = {}
        for kind, values in metrics.items():
            for key, value in values.items():
                if key in ("hit_score", "accuracy"):
                    by_metric.setdefault("Hit score / accuracy", {})[kind] = value
        return {"metrics": metrics}, by_metric

    def notes(self, metrics: Mapping[str, Any]) -> str:
        size = metrics["metrics"].get("size")
        extra = (
            f" Size: mean L1 {size['mean_l1_mm']:.1f} mm over {size['scored']} of {size['count']} answers with a parseable size."
            if size
            else ""
        )
        return (
            super().notes(metrics)
            + " Abnormality and location: the authors' hit score; presence: exact match."
            + extra
        )
