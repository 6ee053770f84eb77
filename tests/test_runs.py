"""Runs: kill-and-resume equality, damaged checkpoints, atomic writes, mid-epoch data order, multirun
sweeps with 2-process jobs, the sweep recipes, gpu-check without a GPU."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers.commands import run_command, run_forked
from helpers.siglip import INPUT_SIZE, prepared_data
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from med3dvlm.configs import CONFIG_DIR
from med3dvlm.training.checkpointing import (
    AtomicCheckpointIO,
    CorruptCheckpoint,
    check_checkpoint,
    latest_valid_checkpoint,
    write_shard_checksums,
)
from med3dvlm.training.resumable_data import ResumableDataLoader, resumable

REPO = Path(__file__).resolve().parents[1]
# Wall-clock rates differ between any two runs.
TIMING_METRICS = ("train/samples_per_s",)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_data(tmp_path_factory.mktemp("runs") / "demo")


def train_cli(
    data: Path, log_dir: Path, *overrides: str, multirun: bool = False, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m med3dvlm.train`` on the tiny SigLIP demo (20 training pairs: 5 steps an epoch), forked
    (:func:`run_forked`) unless it is a multirun."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "med3dvlm.train",
        *(["-m"] if multirun else []),
        "experiment=demo",
        "stage=siglip",
        "logger=csv",
        f"paths.data_dir={data.parents[1]}",
        f"paths.log_dir={log_dir}",
        f"data.data_dir={data}",
        f"data.spatial_size=[{','.join(map(str, INPUT_SIZE))}]",
        "data.max_length=128",
        "data.batch_size=4",
        "data.train_subset=20",
        "test=false",
        *overrides,
    ]
    if multirun:  # each job's second process is launched as `python -m med3dvlm.train ...` again
        result = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=env, check=False
        )
    else:
        output = Path(tempfile.mkdtemp(prefix="train-output-", dir=log_dir))
        result = run_forked("train", *cmd[3:], cwd=REPO, env=env, output=output, check=False)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def curves(run: Path) -> dict[tuple[str, int], float]:
    """metrics.csv as {(metric, step): value}; a step logged twice (repeated after a resume) keeps
    its later row."""
    values: dict[tuple[str, int], float] = {}
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch", *TIMING_METRICS) and value != "":
                    values[(key, int(row["step"]))] = float(value)
    return values


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((256, 256), float(step))}}


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    io = AtomicCheckpointIO()
    for step in (10, 20):
        io.save_checkpoint(_checkpoint(step), tmp_path / f"step{step:06d}.ckpt")
    newest = tmp_path / "step000020.ckpt"
    assert latest_valid_checkpoint(tmp_path) == newest
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="med3dvlm.training.checkpointing"):
        assert latest_valid_checkpoint(tmp_path) == tmp_path / "step000010.ckpt"
    assert f"{newest}: unreadable" in caplog.text
    with pytest.raises(CorruptCheckpoint, match="step000020.ckpt: unreadable"):
        check_checkpoint(newest)


def test_a_checkpoint_with_damaged_bytes_fails_its_checksum(tmp_path, caplog):
    io = AtomicCheckpointIO()
    for step in (10, 20):
        io.save_checkpoint(_checkpoint(step), tmp_path / f"step{step:06d}.ckpt")
    newest = tmp_path / "step000020.ckpt"
    assert (tmp_path / "step000020.ckpt.sha256").read_text().split()[1] == "step000020.ckpt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # 4 KB of tensor data overwritten: the zip still parses
    newest.write_bytes(bytes(data))
    assert torch.load(newest, weights_only=True)["global_step"] == 20
    with pytest.raises(CorruptCheckpoint, match=r"step000020.ckpt: checksum check failed"):
        check_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="med3dvlm.training.checkpointing"):
        assert latest_valid_checkpoint(tmp_path) == tmp_path / "step000010.ckpt"
    assert "step000020.ckpt: checksum check failed" in caplog.text
    io.remove_checkpoint(newest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step000010.ckpt", "step000010.ckpt.sha256"]


def test_sharded_checkpoint_folders_are_checked_too(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "last.ckpt"  # Lightning names shard folders like files
    dcp.save({"state_dict": {"w": torch.arange(4096.0)}}, checkpoint_id=str(folder))
    torch.save({"global_step": 7, "epoch": 0}, folder / "meta.pt")
    write_shard_checksums(folder)
    assert check_checkpoint(folder).global_step == 7
    assert latest_valid_checkpoint(tmp_path) == folder
    (shard,) = folder.glob("*.distcp")
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-8] + bytes(8))  # same length, damaged bytes
    with pytest.raises(CorruptCheckpoint, match=r"__0_0.distcp: sha256 .* differs"):
        check_checkpoint(folder)
    shard.write_bytes(intact)
    (folder / "checksums.json").unlink()
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        check_checkpoint(folder)
    shard.unlink()
    with pytest.raises(CorruptCheckpoint, match="is missing"):
        check_checkpoint(folder)
    assert latest_valid_checkpoint(tmp_path) is None


def test_a_failed_checkpoint_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1), path)
    with pytest.raises(Exception):  # noqa: B017 -- a lambda cannot be pickled: the write fails midway
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "bad": lambda: 0}, path)
    assert check_checkpoint(path).global_step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_resumable_loader_skips_served_batches_of_the_same_epoch_only():
    loader = resumable(torch.utils.data.DataLoader(list(range(20)), batch_size=4, shuffle=True), seed=3)
    assert isinstance(loader, ResumableDataLoader)
    loader.sampler.set_epoch(1)
    epoch = [b.tolist() for b in loader]
    assert sorted(i for batch in epoch for i in batch) == list(range(20))
    again = iter(loader)
    first_two = [next(again).tolist() for _ in range(2)]
    assert first_two == epoch[:2]  # the order is a function of (seed, epoch)
    state = loader.state_dict()
    assert state == {"epoch": 1, "served": 2, "samples": 8, "start": 0, "processes": 1, "batch_size": 4}

    restored = resumable(torch.utils.data.DataLoader(list(range(20)), batch_size=4, shuffle=True), seed=3)
    restored.load_state_dict(state)
    restored.sampler.set_epoch(1)
    assert len(restored) == 5
    assert [b.tolist() for b in restored] == epoch[2:]
    assert [b.tolist() for b in restored] == epoch  # the next pass is a whole epoch again
    restored.load_state_dict(state)
    restored.sampler.set_epoch(2)  # a state from another epoch does not skip
    assert len([b for b in restored]) == 5


def test_multirun_with_two_process_jobs_gives_one_folder_and_one_wandb_run_per_job(
    data, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    outputs, processes = tmp_path / "outputs", tmp_path / "processes.jsonl"
    train_cli(
        data,
        outputs,
        "logger=wandb",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "optimizer.lr=1e-3",
        "stage.embed_dim=16,32",
        "+callbacks.record._target_=helpers.runs.RecordProcess",
        f"+callbacks.record.path={processes}",
        multirun=True,
    )
    (sweep,) = (outputs / "siglip" / "multirun").glob("*/*")  # one sweep folder: no second output tree
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    # Exactly two processes per job, both in the job's folder, none re-running the sweep.
    records = [json.loads(line) for line in processes.read_text().splitlines()]
    assert sorted((Path(r["folder"]).name, r["rank"]) for r in records) == [
        (j, r) for j in jobs for r in (0, 1)
    ]
    assert all(Path(r["folder"]).parent == sweep and "-m" not in r["argv"] for r in records)
    runs = set()
    for job in jobs:
        folder = sweep / job
        (run,) = (folder / "wandb").glob("offline-run-*")  # exactly one W&B run, in the job's folder
        runs.add(run.name)
        summary = json.loads((folder / "final_metrics.json").read_text())
        assert summary["optimized_metric"] == "val/recall_mean" and 0 <= summary["value"] <= 1
        assert (folder / "checkpoints" / "last.ckpt").exists()
        overrides = (folder / ".hydra" / "overrides.yaml").read_text()
        assert "optimizer.lr" in overrides and "stage.embed_dim" in overrides
    assert len(runs) == 2


def _compose(experiment: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("experiment", ["sweep_projector", "sweep_lora"])
def test_sweep_recipes_compose_for_every_grid_point(experiment):
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = _compose(experiment, []).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    grid = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    assert len(grid) >= 2
    for combo in itertools.product(*grid):
        cfg = _compose(experiment, list(combo))
        assert cfg.stage.module.export_dir is None and "sweep" in cfg.tags
        if experiment == "sweep_projector":
            node = instantiate(
                {**cfg.projector, "encoder_channels": [32, 64], "encoder_tokens": [64, 8], "llm_dim": 128}
            )
            assert node([torch.zeros(1, 64, 32), torch.zeros(1, 8, 64)]).shape[-1] == 128
        else:
            lora = instantiate(cfg.lora)
            assert lora.r in (8, 16)
            targets = lora.target_modules
            assert targets == "all-linear" or set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize(("experiment", "trained"), [("demo", False), ("paper_finetune", True)])
def test_stage3_encoder_training_follows_the_experiment(experiment, trained):
    cfg = _compose(experiment, ["stage=finetune"])
    assert OmegaConf.select(cfg, "stage.module.train_vision_tower") is trained


LIBRARY_NOISE = (
    "litlogger",  # Lightning's advertisement for its cloud logger
    "is deprecated",  # libraries' deprecations of each other (torch's LeafSpec, transformers' checkpointing)
    "module(s) in eval mode",  # stages 2-3 keep their frozen encoder and LLM in eval mode on purpose
    "save_embedding_layers",  # peft saving the embedding matrix resized for <im_patch>, as it should
)


def test_a_demo_training_run_prints_no_warning_a_user_cannot_act_on(data, tmp_path):
    """The demo's three stages, two steps each: no library notice nobody can act on, and no warning
    from inside a library at all (Python prints each with its file, under site-packages)."""
    for stage in ("siglip", "pretrain", "finetune"):
        done = run_command(
            "med3dvlm.train",
            "experiment=demo",
            f"stage={stage}",
            "logger=csv",
            f"paths.data_dir={data.parents[1]}",
            f"paths.log_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / stage}",
            "trainer.max_epochs=1",
            "++trainer.limit_train_batches=2",
            "++trainer.limit_val_batches=1",
            "data.batch_size=2",
            "test=false",
            cwd=REPO,
        )
        noise = [
            line
            for line in (done.stdout + done.stderr).splitlines()
            if "site-packages" in line or any(notice in line for notice in LIBRARY_NOISE)
        ]
        assert not noise, (stage, noise)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_succeeds(capsys):
    from med3dvlm import gpu_check

    assert gpu_check.main([]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out


class _StubRun:
    """Stands in for a W&B run: records the summary and logged rows."""

    def __init__(self) -> None:
        self.summary: dict = {}
        self.logged: list[dict] = []
        self.finished = False

    def log(self, row: dict, **kwargs) -> None:
        self.logged.append(row)

    def finish(self) -> None:
        self.finished = True


def test_the_sweeper_gets_the_best_validation_value_or_the_last():
    from med3dvlm.training.run_summary import MetricHistory, optimized_value

    history = MetricHistory("val/loss", "min")
    history.load_state_dict({"values": [[5, 2.0], [10, 1.5]]})  # before a crash, restored from the checkpoint
    history.values.append((15, 1.8))
    assert optimized_value({"val/loss": 1.8}, history, "best") == (1.5, "best", 10)
    assert optimized_value({"val/loss": 1.8}, history, "last") == (1.8, "last", None)
    assert optimized_value({}, MetricHistory("val/loss", "min"), "best") == (None, "last", None)
    with pytest.raises(ValueError, match="'best' or 'last'"):
        optimized_value({}, history, "mean")


def test_final_metrics_reach_the_run_folder_and_the_wandb_summary(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from med3dvlm.training.run_summary import SUMMARY_FILE, finish_wandb_runs, write_summary

    run = _StubRun()
    logger = WandbLogger(experiment=run)
    metrics = {"test/recall_mean": 0.5, "val/loss": 1.25}
    write_summary(metrics, tmp_path, [logger], "val/loss", 1.0, "best", 20)
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {
        "optimized_metric": "val/loss",
        "value": 1.0,
        "value_is": "best",
        "step": 20,
        "metrics": metrics,
    }
    assert run.summary == metrics
    (table,) = [row["final/metrics"] for row in run.logged if "final/metrics" in row]
    assert table.data == [["test/recall_mean", 0.5], ["val/loss", 1.25]]
    finish_wandb_runs([logger])
    assert run.finished


def test_sweep_runs_are_grouped_by_sweep_and_tagged():
    cfg = _compose("sweep_lora", [])
    assert cfg.logger.wandb.group.startswith("sweep_lora-") and list(cfg.tags) == ["sweep", "lora"]
    assert cfg.logger.wandb.log_model is False  # logger.wandb.log_model=true|all uploads checkpoints


def test_optuna_sweeper_optimises_what_train_returns(data, tmp_path):
    """Runs only where hydra-optuna-sweeper is installed (``pip install hydra-optuna-sweeper``)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    train_cli(
        data,
        tmp_path / "outputs",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.direction=maximize",
        "optimizer.lr=interval(1e-4,1e-2)",
        "stage.embed_dim=choice(16,32)",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        f"hydra.sweep.dir={sweep}",
        multirun=True,
    )
    import yaml

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads((sweep / job / "final_metrics.json").read_text())["value"] for job in ("0", "1")]
    assert result["best_value"] == pytest.approx(max(values))


# 10 steps an epoch (batch 2), validation after step 5 and at the epoch end, a step checkpoint every 5.
EXACT = [
    "trainer.max_epochs=2",
    "checkpoint_every_n_steps=5",
    "data.batch_size=2",
    "trainer.val_check_interval=0.5",
]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_cli(data, run.parent, *EXACT, f"hydra.run.dir={run}")
    return run


@pytest.mark.parametrize(
    ("kill", "resumed_step"),
    [
        # At the start of the mid-epoch validation: the step-5 checkpoint is not written before it.
        (("KillAtValidationStart", 5), None),
        # Right after the step-5 checkpoint, written at the end of that validation.
        (("KillAtStep", 5), 5),
        # Right after the checkpoints that end epoch 0 (at its validation's end: best, last, step 10).
        (("KillAtStep", 10), 10),
        # Mid-epoch, three steps after the step-10 checkpoints, a damaged one claiming step 99 beside them.
        (("KillAtStep", 13), 10),
    ],
)
def test_a_kill_after_any_checkpoint_resumes_to_the_uninterrupted_run(
    data, uninterrupted, tmp_path, kill, resumed_step
):
    callback, step = kill
    crashed = tmp_path / "crashed"
    killed = train_cli(
        data,
        tmp_path,
        *EXACT,
        f"hydra.run.dir={crashed}",
        f"+callbacks.kill._target_=helpers.runs.{callback}",
        f"+callbacks.kill.step={step}",
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    damaged = crashed / "checkpoints" / "step000099.ckpt"
    if step == 13:
        damaged.write_bytes((crashed / "checkpoints" / "step000010.ckpt").read_bytes()[:50_000])
    resumed = train_cli(data, tmp_path, *EXACT, f"resume={crashed}")
    log = resumed.stdout + resumed.stderr
    if step == 13:
        assert f"skipping a damaged checkpoint: {damaged}: unreadable" in log
    if resumed_step is None:
        assert "no usable checkpoint" in log
    else:
        chosen = log.split("resuming from ")[1].split()[0]
        assert torch.load(chosen, weights_only=True)["global_step"] == resumed_step
    want = torch.load(uninterrupted / "checkpoints" / "step000020.ckpt", weights_only=True)["state_dict"]
    got = torch.load(crashed / "checkpoints" / "step000020.ckpt", weights_only=True)["state_dict"]
    assert want.keys() == got.keys()
    worst = max((want[k].float() - got[k].float()).abs().max().item() for k in want)
    assert worst <= 1e-5, f"weights differ by {worst} (BatchNorm statistics included)"
    expected, actual = curves(uninterrupted), curves(crashed)
    assert actual.keys() == expected.keys(), sorted(set(expected) ^ set(actual))[:6]
    relative = max(abs(actual[k] - v) / max(abs(v), 1e-6) for k, v in expected.items())
    assert relative <= 1e-4, f"logged metrics differ (max relative {relative})"
    for name in ("last.ckpt", "step000020.ckpt"):
        assert torch.load(crashed / "checkpoints" / name, weights_only=True)["global_step"] == 20


def test_resume_keeps_the_original_config_and_refuses_changed_training_settings(data, tmp_path):
    common = ["trainer.max_epochs=2", "checkpoint_every_n_steps=3"]
    run = tmp_path / "run"
    killed = train_cli(
        data,
        tmp_path,
        *common,
        f"hydra.run.dir={run}",
        "+callbacks.kill._target_=helpers.runs.KillAtStep",
        "+callbacks.kill.step=4",
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    recorded = {name: (run / ".hydra" / name).read_bytes() for name in ("config.yaml", "overrides.yaml")}

    changed = train_cli(
        data, tmp_path, *common, "optimizer.lr=0.002", "data.batch_size=2", f"resume={run}", check=False
    )
    assert changed.returncode != 0
    assert "optimizer.lr: 0.001 -> 0.002" in changed.stderr and "data.batch_size: 4 -> 2" in changed.stderr
    assert "resume_override=true" in changed.stderr
    assert {name: (run / ".hydra" / name).read_bytes() for name in recorded} == recorded

    train_cli(data, tmp_path, *common, "optimizer.lr=0.002", "resume_override=true", f"resume={run}")
    assert {name: (run / ".hydra" / name).read_bytes() for name in recorded} == recorded
    resumes = sorted((run / ".hydra").glob("resume-*/overrides.yaml"))
    assert len(resumes) == 2  # the refused attempt and the accepted one, each beside the original
    assert (
        "optimizer.lr=0.002" in resumes[-1].read_text() and "resume_override=true" in resumes[-1].read_text()
    )


def test_a_resumed_offline_wandb_run_stays_one_run_with_its_files_in_the_run_folder(
    data, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing of the run may land under the home folder
    for variable in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_DIR"):
        monkeypatch.delenv(variable, raising=False)
    run = tmp_path / "run"
    common = ["logger=wandb", "trainer.max_epochs=2", "checkpoint_every_n_steps=3"]
    killed = train_cli(
        data,
        tmp_path,
        *common,
        f"hydra.run.dir={run}",
        "+callbacks.kill._target_=helpers.runs.KillAtStep",
        "+callbacks.kill.step=7",
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    train_cli(data, tmp_path, *common, f"resume={run}")
    run_id = (run / "wandb" / "run_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[1] for p in offline} == {
        run_id
    }  # one run, two sittings
    assert all((p / f"run-{run_id}.wandb").is_file() for p in offline)
    assert not (tmp_path / "home" / ".local" / "share" / "wandb").exists()
    assert not (tmp_path / "home" / ".cache" / "wandb").exists()


def test_wandb_runs_are_named_by_experiment_stage_and_time_with_the_stage_as_job_type(tmp_path):
    cfg = _compose(
        "demo",
        ["stage=finetune", "logger=wandb", f"paths.output_dir={tmp_path}/finetune/2026-12-04/10-11-12"],
    )
    node = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    assert node["name"] == "demo-finetune-2026-12-04_10-11-12"
    assert node["job_type"] == "finetune" and node["group"] == "demo"
