"""What an evaluation leaves in its run folder: scored predictions CSV, metrics JSON, a Markdown
table, a PNG bar chart of the per-type scores, and a W&B table when a logger is on."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from med3dvlm.utils.atomic import atomic_path, atomic_write_text
from med3dvlm.utils.markdown import markdown_table


def write_scored_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> Path:
    """The predictions CSV with its score columns, written atomically over the generation CSV."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    atomic_write_text(path, json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    return Path(path)


def write_scores(
    out_dir: str | os.PathLike,
    name: str,
    metrics: Mapping[str, Any],
    table: str,
    chart: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "",
) -> dict[str, Path]:
    """An evaluation's scores in ``out_dir``: ``metrics_<name>.json``, ``metrics_<name>.md`` (``table``)
    and, given ``chart`` (scores by metric), ``scores_<name>.png`` titled ``title``."""
    out = Path(out_dir)
    files = {
        "metrics": write_metrics_json(out / f"metrics_{name}.json", metrics),
        "table": out / f"metrics_{name}.md",
    }
    atomic_write_text(files["table"], table + "\n")
    if chart is not None:
        files["chart"] = bar_chart(out / f"scores_{name}.png", chart, title)
    return files


def _cell(value: Any, percent: bool) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{100 * value:.2f}" if percent else f"{value:.4f}"
    return str(value)


def metric_table(
    by_metric: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str] | None = None, percent: bool = True
) -> str:
    """Rows = question types (or one row), columns = metrics; ``by_metric[metric][type]``."""
    labels = labels or {}
    metrics = list(by_metric)
    types: list[str] = []
    for values in by_metric.values():
        types += [t for t in values if t not in types]
    rows = [
        [qtype, *(_cell(by_metric[m].get(qtype, float("nan")), percent and m != "count") for m in metrics)]
        for qtype in types
    ]
    return markdown_table(
        ["type", *(labels.get(m, m) for m in metrics)], rows, right=range(1, len(metrics) + 1)
    )


def bar_chart(path: str | os.PathLike, by_metric: Mapping[str, Mapping[str, float]], title: str) -> Path:
    """Grouped bars: one group per type, one bar per metric (scores in %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types: list[str] = []
    for values in by_metric.values():
        types += [t for t in values if t not in types]
    width = 0.8 / max(1, len(by_metric))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(types) * max(1, len(by_metric)) / 2), 4))
    for k, (metric, values) in enumerate(by_metric.items()):
        xs = [i + (k - (len(by_metric) - 1) / 2) * width for i in range(len(types))]
        ax.bar(xs, [100 * values.get(t, float("nan")) for t in types], width, label=metric)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def log_wandb_table(
    loggers: Iterable[Any],
    key: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    metrics: Mapping[str, float],
) -> int:
    """Log the predictions as a table and the flat metrics on every logger that can (W&B);
    return how many did."""
    logged = 0
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(
                key=key, columns=list(columns), data=[[row.get(c, "") for c in columns] for row in rows]
            )
            logger.log_metrics(dict(metrics))
            logged += 1
    return logged


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"accuracy": {"Organ": 0.5}}`` -> ``{"accuracy/Organ": 0.5}`` (numbers only)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
