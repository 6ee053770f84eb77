"""``python -m med3dvlm.demo [--cases N] [--fresh]`` (``make demo``): the whole chain offline on CPU.

synthetic data -> prepare -> DataModule batch -> siglip -> pretrain -> finetune -> export ->
evaluation, each step a normal command of this package (printed before it runs), then one table.
Re-running reuses the data and every stage export newer than what it was trained from; ``--fresh``
retrains the stages.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from med3dvlm.artifacts.encoder_export import SIGLIP_EXPORT
from med3dvlm.artifacts.handoff import ADAPTER_HANDOFF, PROJECTOR_HANDOFF
from med3dvlm.artifacts.latest import latest
from med3dvlm.configs import work_root
from med3dvlm.utils.markdown import markdown_table

EXPERIMENT = "demo"
CHANCE = {"retrieval i2t R@1 (100)": 0.01, "retrieval i2t R@5 (100)": 0.05, "retrieval i2t R@10 (100)": 0.10}
CLOSED_CHANCE = 0.25  # four choices per closed question
EVAL_TASKS = ("vqa_closed", "vqa_open", "report")
# Choices listed in a fixed order: the tiny LLM, random at the start and trained for minutes, cannot
# learn to read four shuffled options (README, Demo), so the letter must follow from the image alone.
SYNTHETIC_SETTINGS = ("seed=0", "choice_order=fixed")
# Recorded beside the settings: data written in an older layout (one collection) is made again.
SYNTHETIC_LAYOUT = "layout=m3d-release"


def run(step: str, args: list[str]) -> None:
    """Run ``python -m med3dvlm.<args>`` in the project root, failing the demo if it fails."""
    command = [sys.executable, "-m", *args]
    print(f"\n=== {step}: {shlex.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=work_root(), check=True)
    print(f"=== {step} done in {time.perf_counter() - start:.0f} s", flush=True)


def make_data(raw: Path, cases: int) -> float:
    """Generate the synthetic raw data unless ``raw`` holds data of these settings; return when it was made."""
    settings = [f"out={raw}", f"cases={cases}", *SYNTHETIC_SETTINGS]
    stamp = raw / "demo_settings.txt"
    recorded = [*settings[1:], SYNTHETIC_LAYOUT]
    if not (stamp.is_file() and stamp.read_text(encoding="utf-8").split() == recorded):
        run("synthetic data", ["med3dvlm.synthetic", *settings])
        stamp.write_text(" ".join(recorded) + "\n", encoding="utf-8")
    return stamp.stat().st_mtime


def train_stage(stage: str, run_dir: Path, fresh: bool, inputs_made: float) -> tuple[Path, float]:
    """Train ``stage`` of the demo experiment unless an export newer than its inputs (the data and the
    previous stage, made at ``inputs_made``) exists; return its folder and when its export was made."""
    kind = {"siglip": SIGLIP_EXPORT, "pretrain": PROJECTOR_HANDOFF, "finetune": ADAPTER_HANDOFF}[stage]
    existing = latest(kind, EXPERIMENT, work_root() / "outputs")
    if existing is not None and existing.stat().st_mtime > inputs_made and not fresh:
        print(f"\n=== {stage}: reusing {existing}")
        return existing.parent, existing.stat().st_mtime
    run(
        stage,
        ["med3dvlm.train", f"experiment={EXPERIMENT}", f"stage={stage}", f"hydra.run.dir={run_dir / stage}"],
    )
    return run_dir / stage, time.time()


def retrieval_scores(siglip_dir: Path) -> dict[str, float]:
    """The last logged test retrieval figures at 100 pairs from the stage's CSV log."""
    scores: dict[str, float] = {}
    for path in siglip_dir.glob("**/metrics.csv"):
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for k in (1, 5, 10):
                    value = row.get(f"test/i2t_R@{k}_n100")
                    if value:
                        scores[f"retrieval i2t R@{k} (100)"] = float(value)
    return scores


def evaluation_scores(eval_dir: Path) -> dict[str, float]:
    """Closed-VQA accuracy per question type and open-VQA/report text scores from the metrics JSON files."""
    scores: dict[str, float] = {}
    closed = eval_dir / "metrics_vqa_closed.json"
    if closed.is_file():
        for question_type, value in json.loads(closed.read_text())["metrics"]["accuracy"].items():
            scores[f"closed VQA accuracy {question_type}"] = value
    for task, label in (("vqa_open", "open VQA"), ("report", "report")):
        path = eval_dir / f"metrics_{task}.json"
        if path.is_file():
            metrics = json.loads(path.read_text())["metrics"]
            for name in ("bleu", "rouge1", "meteor"):
                scores[f"{label} {name}"] = metrics[name]["Overall"]
    return scores


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def score_table(scores: dict[str, float], zero_image_scores: dict[str, float]) -> str:
    """Markdown table: each score beside the same model fed all-zero volumes and the chance level."""
    rows = [
        [
            name,
            _cell(value),
            _cell(zero_image_scores.get(name)),
            _cell(CLOSED_CHANCE if name.startswith("closed VQA") else CHANCE.get(name)),
        ]
        for name, value in scores.items()
    ]
    return "\n" + markdown_table(
        ["demo score", "value", "zero-image control", "chance"], rows, right=[1, 2, 3]
    )


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (``--help`` lists them)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=1000, help="synthetic cases (10%% form the test split)")
    parser.add_argument("--fresh", action="store_true", help="retrain every stage even if exports exist")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = arguments()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run_dir = work_root() / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")

    raw, prepared = work_root() / "data" / "demo" / "raw", work_root() / "data" / "demo" / "prepared"
    made = make_data(raw, args.cases)
    run(
        "prepare",
        ["med3dvlm.prepare", f"source={raw}", f"out={prepared}", "spatial_size=[32,64,64]", "format=npy"],
    )
    siglip_dir, made = train_stage("siglip", run_dir, args.fresh, made)
    _, made = train_stage("pretrain", run_dir, args.fresh, made)
    train_stage("finetune", run_dir, args.fresh, made)
    model = run_dir / "model"
    run(
        "export",
        [
            "med3dvlm.export",
            f"experiment_name={EXPERIMENT}",
            f"out={model}",
            f"hydra.run.dir={run_dir / 'export'}",
        ],
    )
    eval_dir, control_dir = run_dir / "eval", run_dir / "eval_zero_images"
    for task in EVAL_TASKS:
        for folder, zero_images in ((eval_dir, False), (control_dir, True)):
            run(
                f"evaluate {task}{' (zero images)' if zero_images else ''}",
                [
                    "med3dvlm.evaluate",
                    f"task={task}",
                    f"model={model}",
                    f"data_dir={prepared}",
                    f"context.zero_images={str(zero_images).lower()}",
                    f"hydra.run.dir={folder}",
                ],
            )

    print(
        score_table(
            {**retrieval_scores(siglip_dir), **evaluation_scores(eval_dir)}, evaluation_scores(control_dir)
        )
    )
    print(f"\nrun folders: {run_dir} (stages reused from earlier runs are named above)")
    print(f"total wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
