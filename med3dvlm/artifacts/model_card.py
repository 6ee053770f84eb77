"""The model card of a model folder: ``README.md``, as the Hugging Face Hub shows a model.

``python -m med3dvlm.export`` writes it after the folder: YAML front matter the Hub reads (``license``,
``library_name``, ``tags``, ``datasets``, ``base_model``), then what the model is, how to load it, its
record (the artifacts it was built from, their data and preprocessing, the prompt format), its
evaluation scores, and the licence of its data (:mod:`med3dvlm.data.licences`).

The card is a view of ``record.json``, not part of it: no loader reads it and the record does not
fingerprint it, so it can be rewritten once evaluations exist (``export source=<model folder>``).
Scores are those of ``python -m med3dvlm.evaluate`` runs found under the outputs folder whose metrics
JSON names this folder and was written after the folder was (so never the scores of an earlier
model written to the same place), newest per task; text-only controls (``zero_images``) are left out.
Without any, the card says the model is not evaluated.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from med3dvlm.artifacts.hub import is_hub_id
from med3dvlm.artifacts.record import ArtifactRecord, read_record
from med3dvlm.configs import work_root
from med3dvlm.data.licences import combined_licence, dataset_licence
from med3dvlm.utils.atomic import atomic_write_text
from med3dvlm.utils.markdown import markdown_table

CARD_FILE = "README.md"
TAGS: tuple[str, ...] = (
    "med3dvlm",
    "medical",
    "3d-medical-imaging",
    "vision-language",
    "visual-question-answering",
    "report-generation",
)
_SAMPLE_COUNTS = ("num_samples", "num_pairs", "num_cases")


@dataclass(frozen=True)
class Evaluation:
    """One ``python -m med3dvlm.evaluate`` run of a model: its metrics JSON and Markdown table."""

    task: str
    run: Path
    metrics: Mapping[str, Any]
    table: str
    written: float


def _model_path(model: str) -> Path:
    # evaluate takes model= as given on its command line, relative to where it ran (the work root).
    path = Path(model)
    return (path if path.is_absolute() else work_root() / path).resolve()


def find_evaluations(folder: str | os.PathLike, root: str | os.PathLike, since: float) -> list[Evaluation]:
    """The newest evaluation per task under ``root`` of the model ``folder`` written after ``since``
    (the folder's creation), controls left out (see the module docstring)."""
    folder, root = Path(folder).resolve(), Path(root)
    newest: dict[str, Evaluation] = {}
    for path in root.glob("**/metrics_*.json"):
        table = path.with_suffix(".md")
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
            written = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        model = metrics.get("model") if isinstance(metrics, dict) else None
        if (
            not isinstance(model, str)
            or metrics.get("zero_images")
            or written < since
            or not table.is_file()
            or _model_path(model) != folder
        ):
            continue
        task = str(metrics.get("task") or path.stem.removeprefix("metrics_"))
        if task not in newest or written > newest[task].written:
            newest[task] = Evaluation(task, path.parent, metrics, table.read_text(encoding="utf-8"), written)
    return [newest[task] for task in sorted(newest)]


def _lineage(record: ArtifactRecord) -> list[tuple[str, ArtifactRecord | None]]:
    """``(role, record)`` of the folder and every artifact it was built from, nearest first."""
    rows: list[tuple[str, ArtifactRecord | None]] = [("this model", record)]
    pending = list(record.parents)
    while pending:
        parent = pending.pop(0)
        rows.append((parent.role, parent.record))
        pending += parent.record.parents if parent.record else ()
    return rows


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")


def _component(config: Mapping[str, Any]) -> str:
    variant = f" ({config['variant']})" if "variant" in config else ""
    return f"`{config.get('_target_', '?')}`{variant}"


def _front_matter(record: ArtifactRecord, datasets: list[str]) -> str:
    from huggingface_hub import ModelCardData

    hub_datasets = [hub_id for name in datasets for hub_id in dataset_licence(name).hub_ids]
    data = ModelCardData(
        license=combined_licence(datasets),
        library_name="med3dvlm",
        tags=list(TAGS),
        datasets=hub_datasets or None,
        base_model=record.llm if record.llm and is_hub_id(record.llm) else None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _about(record: ArtifactRecord, name: str) -> str:
    depth, height, width = record.input_size
    llm = record.llm if record.llm and is_hub_id(record.llm) else "a local LLM folder (see `llm/`)"
    rows = [
        ["vision tower", _component(record.components["vision_tower"])],
        ["projector", _component(record.components["projector"])],
        ["LLM", llm],
        ["input", f"one volume (1, {depth}, {height}, {width}), values in [0, 1]"],
        ["image tokens", f"{record.num_image_tokens} × `{record.image_token}`"],
        ["prompt format", f"`{record.prompt_format}` (`med3dvlm.data.prompts`)"],
    ]
    return (
        "A 3D medical vision-language model (Med3DVLM style) written by med3dvlm: the vision tower "
        "encodes a CT or MRI volume, the projector turns it into image tokens, and the LLM answers "
        "questions about it and writes its report.\n\n"
        + markdown_table(["part", ""], rows)
        + "\n\n## Use\n\n```python\n"
        "from med3dvlm.artifacts.model_folder import load_pretrained\n\n"
        f'loaded = load_pretrained("{name}")  # a Hub id (fetched with `hf download`) or a folder\n'
        "```\n\n```bash\n"
        f"python -m med3dvlm.infer model={name} image=scan.nii.gz question='What organ is shown?'\n"
        "```\n\n"
        "A scan goes through the preprocessing of the training data below, as `record.json` "
        "records it; `infer`, `evaluate` and the web page apply it.\n"
    )


def _record(record: ArtifactRecord) -> str:
    lineage = markdown_table(
        ["artifact", "kind", "stage", "experiment", "data", "written"],
        [
            [role, "not recorded", "", "", "", ""]
            if rec is None
            else [
                role,
                rec.kind.replace("_", " "),
                rec.stage or "",
                rec.experiment,
                rec.preprocessing.dataset,
                _date(rec.created),
            ]
            for role, rec in _lineage(record)
        ],
    )
    sources = markdown_table(
        ["source", "window (HU)", "scale", "voxel order", "spacing (mm)", "foreground crop", "resize"],
        [
            [
                name,
                list(spec.window) if spec.window else "none",
                spec.scale,
                spec.orientation or "as stored",
                list(spec.spacing) if spec.spacing else "as stored",
                "none" if spec.foreground_threshold is None else f"above {spec.foreground_threshold}",
                spec.resize,
            ]
            for name, spec in record.preprocessing.sources.items()
        ],
    )
    prepared = json.dumps(dict(record.preprocessing.prepare), sort_keys=True, default=str)
    assumed = (
        "\n\nThis preprocessing is assumed (M3D's), not recorded: the model was written by an older version."
        if record.preprocessing.inferred
        else ""
    )
    return (
        "## Training record\n\n"
        "From `record.json`, which also holds the SHA-256 of every file (checked when the folder is "
        "loaded) and the configs that rebuild each part.\n\n"
        f"{lineage}\n\n### Preprocessing ({record.preprocessing.dataset})\n\n{sources}\n\n"
        f"`prepare` settings: `{prepared}`{assumed}\n"
    )


def _decoding(metrics: Mapping[str, Any]) -> str:
    generation = metrics.get("generation")
    if not isinstance(generation, Mapping):
        return ""
    if not generation.get("do_sample"):
        return f", greedy decoding (max_new_tokens {generation.get('max_new_tokens')})"
    return (
        f", sampled decoding (temperature {generation.get('temperature')}, top_p {generation.get('top_p')}, "
        f"seed {generation.get('seed')})"
    )


def _evaluation(evaluations: list[Evaluation], root: Path) -> str:
    if not evaluations:
        return (
            "## Evaluation\n\nNot evaluated: no `python -m med3dvlm.evaluate model=<this folder>` run "
            "written after this folder was found when this card was written. After evaluating, "
            "`python -m med3dvlm.export source=<this folder>` rewrites this card with the scores.\n"
        )
    parts = [
        (
            "## Evaluation\n\nScores of this folder's evaluations (`python -m med3dvlm.evaluate`), the "
            "newest run per task; each run folder also holds the predictions and the metrics JSON.\n"
        )
    ]
    for evaluation in evaluations:
        metrics = evaluation.metrics
        counts = "".join(f", {metrics[k]} {k.removeprefix('num_')}" for k in _SAMPLE_COUNTS if k in metrics)
        run = evaluation.run.relative_to(root) if evaluation.run.is_relative_to(root) else evaluation.run.name
        table = re.sub(r"^(#+) ", r"\1# ", evaluation.table.strip(), flags=re.MULTILINE)
        parts.append(
            f"{table}\n\nRun `{run.as_posix()}` ({_date(evaluation.written)}): "
            f"split {metrics.get('split', '?')}{counts}{_decoding(metrics)}.\n"
        )
    return "\n".join(parts)


def _licence(datasets: list[str]) -> str:
    rows = [[name, f"`{dataset_licence(name).licence}`", dataset_licence(name).note] for name in datasets]
    return (
        "## Licence\n\n"
        f"`{combined_licence(datasets)}`: the licence of the data it was trained on (one licence when "
        "all its data share it, else `other`). The base LLM has its own licence.\n\n"
        + markdown_table(["data", "licence", ""], rows)
        + "\n"
    )


def model_card(
    record: ArtifactRecord, evaluations: list[Evaluation], name: str, root: str | os.PathLike
) -> str:
    """The card's text for a model folder with ``record``, loaded as ``name`` (a Hub id or a path)."""
    datasets = list(dict.fromkeys(rec.preprocessing.dataset for _, rec in _lineage(record) if rec))
    title = name.rsplit("/", 1)[-1] if is_hub_id(name) else f"med3dvlm model ({record.experiment})"
    return "\n".join(
        [
            _front_matter(record, datasets),
            f"# {title}\n",
            _about(record, name),
            _record(record),
            _evaluation(evaluations, Path(root)),
            _licence(datasets),
        ]
    )


def write_model_card(folder: str | os.PathLike, root: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write (or rewrite) ``folder``'s card, with the evaluations found under ``root`` (the outputs
    folder); ``repo_id``: the Hub id it is pushed as (the card's examples load that)."""
    folder = Path(folder)
    record = read_record(folder, "model_folder")
    evaluations = find_evaluations(folder, root, record.created)
    text = model_card(record, evaluations, repo_id or "<this folder>", root)
    atomic_write_text(folder / CARD_FILE, text)
    return folder / CARD_FILE
