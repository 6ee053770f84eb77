"""Several nodes, on one machine: 2 nodes x 1 process (gloo, CPU), each process started with the
environment a launcher gives it, as ``torchrun`` on each node or ``srun`` would.

- Every stage on 2 nodes (torchrun's environment) has the per-step losses of one process on the same
  global batch, and resumes its sharded checkpoint (one launch runs every 2-node fit).
- A run resumed on another process count (1 -> 2 and 2 -> 1, mid-epoch, from shard folders that are
  resharded on load) serves each remaining sample of the epoch once, with a warning.
- The training command on 2 nodes under torchrun, killed, resumed under SLURM (Lightning's
  ``SLURMEnvironment``): sharded checkpoints, one W&B run, outputs written once.
- Nodes started with another setting or other data fail at start-up, naming each difference.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from helpers.commands import finish_forked, free_port, start_forked
from helpers.distributed import (
    CHECKPOINT_STEP,
    STAGES,
    STEPS,
    GlobalLoss,
    build_stage,
    fit,
    losses,
    rank_share,
)
from helpers.siglip import INPUT_SIZE as SIGLIP_INPUT_SIZE
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from med3dvlm.configs import CONFIG_DIR
from med3dvlm.data.corpus import corpus_texts
from med3dvlm.data.datamodule import M3DDataModule
from med3dvlm.data.prepared import MANIFEST_FILE, caption_file
from med3dvlm.models.tiny_assets import ensure_tiny_bert
from med3dvlm.training.launch import LaunchMismatch, disagreements, exchange_fingerprints, launch_fingerprint
from med3dvlm.training.resumable_data import make_training_data_resumable
from med3dvlm.training.sharding import FSDP2Strategy, consolidate, positional_optimizer_state

REPO = Path(__file__).resolve().parents[1]
NODES = 2
BATCH_SIZE = 2  # per process: the 22 training pairs make 11 steps on one process, 6 on two
ONE_PROCESS_STEPS = 3  # the 1-process run's checkpoint: 6 samples served
TWO_NODE_STEPS = 2  # the 2-node run's checkpoint: 8 samples served
# Launcher variables of the machine running the tests stay out of the processes they start.
LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


# --- what a launcher sets -------------------------------------------------------------------------------


def torchrun_environment(node: int, port: int) -> dict[str, str]:
    """What ``torchrun --nnodes=2 --nproc-per-node=1 --node-rank=NODE --master-addr=127.0.0.1
    --master-port=PORT`` sets for its worker (no agent here: rank 0 hosts the store)."""
    return {
        "RANK": str(node),
        "GROUP_RANK": str(node),
        "ROLE_RANK": str(node),
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(NODES),
        "GROUP_WORLD_SIZE": str(NODES),
        "ROLE_WORLD_SIZE": str(NODES),
        "LOCAL_WORLD_SIZE": "1",
        "ROLE_NAME": "default",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    }


def slurm_environment(node: int, port: int) -> dict[str, str]:
    """What ``srun`` sets for task NODE of ``sbatch --nodes=2 --ntasks-per-node=1`` (the job's
    name is neither ``bash`` nor ``interactive``: Lightning detects SLURM), and the address the
    batch script exports."""
    return {
        "SLURM_NTASKS": str(NODES),
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(node),
        "SLURM_NNODES": str(NODES),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "med3dvlm",
        "SLURM_NODELIST": "node[0-1]",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def launch(
    commands: list[list[str]], environments: list[dict[str, str]], logs: Path, timeout: int = 600
) -> list[tuple[int, str]]:
    """Start node ``n``'s command with its environment, each node a little after the one before (nodes
    never start at the same instant); ``(exit code, output)`` per node. ``python -m med3dvlm.train``
    runs forked (:func:`start_forked`), other commands as they are."""
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "TORCHELASTIC_", "ROLE_", "GROUP_", "LOCAL_WORLD"))
        and key not in LAUNCHER_VARIABLES
    }
    base.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PL_GLOBAL_SEED="0",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    started = []
    for node, (command, environment) in enumerate(zip(commands, environments, strict=True)):
        output = logs / f"node{node}"
        if command[1:3] == ["-m", "med3dvlm.train"]:
            started.append(start_forked("train", command[3:], REPO, output, {**base, **environment}))
        else:
            output.mkdir(parents=True)
            with open(output / "stdout", "w") as stdout, open(output / "stderr", "w") as stderr:
                started.append(
                    subprocess.Popen(
                        command, cwd=REPO, env={**base, **environment}, stdout=stdout, stderr=stderr
                    )
                )
        time.sleep(1.2)
    deadline = time.monotonic() + timeout
    results = []
    for node, process in enumerate(started):
        left, output = max(1.0, deadline - time.monotonic()), logs / f"node{node}"
        if isinstance(process, subprocess.Popen):
            try:
                code = process.wait(timeout=left)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        else:
            code = finish_forked(process, output, left).returncode
        results.append((code, (output / "stdout").read_text() + (output / "stderr").read_text()))
    return results


# --- every stage, the sharded checkpoints and the data position on 2 nodes --------------------------------


class SampleLog(L.Callback):
    """Each step's sample ids on this process, to ``<folder>/samples.<rank>.json`` at train end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([str(i) for i in batch["sample_id"]])

    def on_train_end(self, trainer, pl_module):
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"samples.{trainer.global_rank}.json").write_text(json.dumps(self.steps))


class LoadedState(L.Callback):
    """The whole weights and optimizer state a resumed run starts from, to ``<folder>/loaded.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optimizer = trainer.strategy.model, trainer.optimizers[0]
        weights = get_model_state_dict(model, options=options)  # collective: every rank gathers
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if trainer.is_global_zero:
            state = {"weights": weights, "optimizer": positional_optimizer_state(optimizer_state)}
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.folder / "loaded.pt")


def data_fit(
    root: Path,
    folder: Path,
    num_nodes: int = 1,
    max_steps: int = -1,
    checkpoint_step: int | None = None,
    ckpt_path: Path | None = None,
) -> None:
    """Stage 1 under FSDP2 on the prepared data through the resumable training loader (Lightning
    deals it to the processes), one epoch or ``max_steps``; sharded checkpoints every ``checkpoint_step``."""
    from transformers import AutoTokenizer

    datamodule = M3DDataModule(
        root / "demo" / "prepared",
        mixture="retrieval",
        tokenizer=AutoTokenizer.from_pretrained(root / "tiny_bert"),
        max_length=128,
        batch_size=BATCH_SIZE,
        num_workers=0,
        augment=False,
        spatial_size=SIGLIP_INPUT_SIZE,
    )
    callbacks = [make_training_data_resumable(datamodule, seed=0), SampleLog(folder)]
    if ckpt_path is not None:
        callbacks.append(LoadedState(folder))
    if checkpoint_step is not None:
        every = {"every_n_train_steps": checkpoint_step, "save_top_k": -1}
        callbacks.append(ModelCheckpoint(dirpath=folder / "ckpt", filename="{step}", **every))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=num_nodes,
        strategy=FSDP2Strategy(),
        max_epochs=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=checkpoint_step is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=folder,
        callbacks=callbacks,
    )
    trainer.fit(build_stage("siglip", root), datamodule=datamodule, ckpt_path=ckpt_path)


def checkpoint(folder: Path, step: int) -> Path:
    return folder / "ckpt" / f"step={step}.ckpt"


def run_nodes_worker(root: Path, out: Path) -> None:
    """One process of the 2-node launch: every stage under FSDP2 on its share of the global batches
    (finetune checkpoints at step 2 and resumes from it); the 1-process data run resumed on 2 nodes;
    a 2-node data run checkpointed mid-epoch (resumed on one process by the test)."""
    rank = int(os.environ["RANK"])
    batches = torch.load(out / "batches.pt")
    nodes = out / "nodes"
    for name in STAGES:
        callbacks = [GlobalLoss(nodes / f"{name}.json")]
        if name == "finetune":
            every = {"every_n_train_steps": CHECKPOINT_STEP, "save_top_k": -1}
            callbacks.append(ModelCheckpoint(dirpath=nodes / "ckpt", filename="{step}", **every))
        share = rank_share(batches[name], rank, NODES)
        fit(
            build_stage(name, root),
            share,
            nodes / name,
            FSDP2Strategy(),
            num_nodes=NODES,
            callbacks=callbacks,
        )
    fit(
        build_stage("finetune", root),
        rank_share(batches["finetune"], rank, NODES),
        nodes / "resumed",
        FSDP2Strategy(),
        num_nodes=NODES,
        ckpt_path=str(checkpoint(nodes, CHECKPOINT_STEP)),
        callbacks=[GlobalLoss(nodes / "resumed.json")],
    )
    data_fit(root, out / "data_one_to_two", NODES, ckpt_path=checkpoint(out / "data_one", ONE_PROCESS_STEPS))
    data_fit(root, out / "data_two", NODES, max_steps=TWO_NODE_STEPS, checkpoint_step=TWO_NODE_STEPS)


WORKER = """import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_multinode import run_nodes_worker
run_nodes_worker(Path({root!r}), Path({out!r}))
"""


@contextlib.contextmanager
def alone_in_a_process_group() -> Iterator[None]:
    """FSDP2 in this process, alone: a process group of one that Lightning finds started. What its
    launcher exports into the environment is undone after."""
    environ = dict(os.environ)
    os.environ["PL_GLOBAL_SEED"] = "0"  # the distributed sampler's seed, as in the nodes
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


@contextlib.contextmanager
def logged(name: str) -> Iterator[list[str]]:
    """The messages logger ``name`` emits inside the block."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def nodes(distributed_references):
    """One process: a data run checkpointed mid-epoch; the 2-node launch (timed); one process
    resuming the 2-node checkpoint, its warnings kept."""
    root, out = distributed_references.root, distributed_references.out
    with alone_in_a_process_group():
        data_fit(root, out / "data_one", max_steps=ONE_PROCESS_STEPS, checkpoint_step=ONE_PROCESS_STEPS)
    script = root / "nodes_worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests"), root=str(root), out=str(out)))
    port = free_port()
    started = time.perf_counter()
    results = launch(
        [[sys.executable, str(script)]] * NODES,
        [torchrun_environment(n, port) for n in range(NODES)],
        out / "nodes_logs",
    )
    for code, output in results:
        assert code == 0, output[-4000:]
    print(f"2-node launch: {time.perf_counter() - started:.1f} s")
    with alone_in_a_process_group(), logged("med3dvlm.training.resumable_data") as messages:
        data_fit(root, out / "data_two_to_one", ckpt_path=checkpoint(out / "data_two", TWO_NODE_STEPS))
    return out, results, messages


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_on_two_nodes_has_the_losses_of_one_process(nodes, name):
    out, _, _ = nodes
    one, two = losses(out / "one" / f"{name}.json"), losses(out / "nodes" / f"{name}.json")
    assert len(one) == len(two) == STEPS and len(set(one)) == STEPS
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


def test_two_nodes_resume_their_sharded_checkpoint(nodes):
    out, _, _ = nodes
    folder = checkpoint(out / "nodes", CHECKPOINT_STEP)
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    straight = losses(out / "nodes" / "finetune.json")
    assert losses(out / "nodes" / "resumed.json") == pytest.approx(
        straight[CHECKPOINT_STEP:], rel=1e-4, abs=1e-5
    )


def served(folder: Path) -> list[str]:
    return [
        i for f in sorted(folder.glob("samples.*.json")) for step in json.loads(f.read_text()) for i in step
    ]


@pytest.mark.parametrize(
    ("first", "rest", "processes"), [("data_one", "data_one_to_two", 2), ("data_two", "data_two_to_one", 1)]
)
def test_a_resume_on_another_process_count_serves_the_rest_of_the_epoch_once(nodes, first, rest, processes):
    out, results, caught = nodes
    before, after = served(out / first), served(out / rest)
    assert len(list((out / rest).glob("samples.*.json"))) == processes
    assert before and after
    pairs = json.loads(caption_file(out.parent / "demo" / "prepared").read_text())["train"]
    everything = Counter(before + after)
    assert set(everything.values()) == {1} and len(everything) == len(pairs)  # every training pair, once
    messages = caught if processes == 1 else [output for _, output in results]
    assert any("per-step batches differ" in message for message in messages)


@pytest.mark.parametrize(
    ("written", "step", "resumed"),
    [("data_one", ONE_PROCESS_STEPS, "data_one_to_two"), ("data_two", TWO_NODE_STEPS, "data_two_to_one")],
)
def test_sharded_checkpoints_reshard_on_load(nodes, written, step, resumed):
    out, _, _ = nodes
    folder = checkpoint(out / written, step)
    assert len(list(folder.glob("*.distcp"))) == (1 if written == "data_one" else NODES)
    whole = torch.load(consolidate(folder, out / f"{written}.ckpt"), weights_only=True)
    loaded = torch.load(out / resumed / "loaded.pt", weights_only=True)
    assert loaded["weights"].keys() == whole["state_dict"].keys()
    torch.testing.assert_close(loaded["weights"], whole["state_dict"], rtol=0, atol=0)
    (optimizer,) = whole["optimizer_states"]
    assert loaded["optimizer"]["state"].keys() == optimizer["state"].keys() and optimizer["state"]
    torch.testing.assert_close(loaded["optimizer"]["state"], optimizer["state"], rtol=0, atol=0)


# --- the training command on 2 nodes: torchrun, then SLURM --------------------------------------------------


def train_command(root: Path, *overrides: str) -> list[str]:
    """``python -m med3dvlm.train`` stage 1 of the demo on 2 nodes x 1 CPU process, 2 pairs a process a step."""
    return [
        sys.executable,
        "-m",
        "med3dvlm.train",
        "experiment=demo",
        "stage=siglip",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"trainer.num_nodes={NODES}",
        f"paths.data_dir={root}",
        f"paths.log_dir={root / 'outputs'}",
        f"data.data_dir={root / 'demo' / 'prepared'}",
        f"data.spatial_size=[{','.join(map(str, SIGLIP_INPUT_SIZE))}]",
        "data.max_length=128",
        f"data.batch_size={BATCH_SIZE}",
        "data.train_subset=20",
        "trainer.max_epochs=1",
        "test=false",
        *overrides,
    ]


@pytest.fixture(scope="module")
def command_root(distributed_references) -> Path:
    """The references' data with the demo's tiny BERT built before any node starts (nodes would
    build it at once)."""
    root = distributed_references.root
    ensure_tiny_bert(
        root / "assets" / "tiny_bert", functools.partial(corpus_texts, root=root / "demo" / "prepared")
    )
    return root


@pytest.fixture(scope="module")
def two_sittings(command_root, tmp_path_factory):
    """``trainer=fsdp logger=wandb`` (offline) on 2 nodes under torchrun, killed at step 3 after the
    step-2 checkpoint; then ``resume=`` on 2 nodes under SLURM to the end of the epoch (5 steps)."""
    base = tmp_path_factory.mktemp("two_nodes")
    run, records = base / "run", base / "processes.jsonl"
    common = [
        "trainer=fsdp",
        "logger=wandb",
        "checkpoint_every_n_steps=2",
        "+callbacks.record._target_=helpers.runs.RecordProcess",
        f"+callbacks.record.path={records}",
    ]
    environment = {"WANDB_MODE": "offline", "HOME": str(base / "home")}
    port = free_port()
    kill = ["+callbacks.kill._target_=helpers.runs.KillAtStep", "+callbacks.kill.step=3"]
    first = launch(
        [train_command(command_root, *common, f"hydra.run.dir={run}", *kill)] * NODES,
        [{**torchrun_environment(n, port), **environment} for n in range(NODES)],
        base / "torchrun",
    )
    assert [code for code, _ in first] == [-9, -9], first[0][1][-3000:] + first[1][1][-3000:]
    port = free_port()
    second = launch(
        [train_command(command_root, *common, f"resume={run}")] * NODES,
        [{**slurm_environment(n, port), **environment} for n in range(NODES)],
        base / "slurm",
    )
    for code, output in second:
        assert code == 0, output[-4000:]
    return run, [json.loads(line) for line in records.read_text().splitlines()], second


def test_lightning_detects_torchrun_then_slurm_on_every_node(two_sittings):
    _, records, _ = two_sittings
    seen = sorted((r["environment"], r["rank"], r["node"], r["world_size"]) for r in records)
    assert seen == [
        ("SLURMEnvironment", 0, 0, 2),
        ("SLURMEnvironment", 1, 1, 2),
        ("TorchElasticEnvironment", 0, 0, 2),
        ("TorchElasticEnvironment", 1, 1, 2),
    ]


def test_two_nodes_write_sharded_checkpoints_and_resume_them_on_a_requeue(two_sittings):
    run, _, second = two_sittings
    assert all(f"resuming from {run / 'checkpoints' / 'step000002.ckpt'}" in output for _, output in second)
    for name in ("step000002.ckpt", "last.ckpt"):
        assert sorted(p.name for p in (run / "checkpoints" / name).glob("*.distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    meta = torch.load(run / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == 5  # 20 pairs, 2 a process, 2 processes: 5 steps, 2 before the kill


def test_two_nodes_keep_one_wandb_run_and_write_outputs_once(two_sittings):
    run, _, _ = two_sittings
    run_id = (run / "wandb" / "run_id").read_text().strip()
    sittings = sorted((run / "wandb").glob("offline-run-*"))
    assert len(sittings) == 2 and {p.name.rsplit("-", 1)[1] for p in sittings} == {run_id}
    # One record of each sitting's config (the nodes start at different seconds), one summary, one export.
    assert (run / ".hydra" / "config.yaml").is_file()
    assert len(list((run / ".hydra").glob("resume-*"))) == 1
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 5
    assert (run / "export" / "record.json").is_file()


def test_the_sbatch_script_names_its_run_folder_by_job_then_resumes_it(tmp_path):
    """``scripts/slurm/train.sbatch`` under a stand-in ``srun``: the training command for every task,
    the run folder named after the job id, ``resume=`` once that folder holds its config (a requeued job)."""
    bin_dir, arguments = tmp_path / "bin", tmp_path / "srun.arguments"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {arguments}\n')
    (bin_dir / "srun").chmod(0o755)
    environment = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_NAME": "med3dvlm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "8",
    }
    script = [str(REPO / "scripts" / "slurm" / "train.sbatch"), "experiment=paper_siglip"]
    run = tmp_path / "outputs" / "slurm" / "med3dvlm-4242"
    expected = [
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "med3dvlm.train",
        "trainer=fsdp",
        "trainer.num_nodes=2",
    ]
    for start in (f"hydra.run.dir={run}", f"resume={run}"):
        subprocess.run(["bash", *script], env=environment, check=True, timeout=60)
        called = arguments.read_text().splitlines()
        assert called == [*expected, "trainer.devices=8", start, "experiment=paper_siglip"]
        (run / ".hydra").mkdir(parents=True, exist_ok=True)
        (run / ".hydra" / "config.yaml").write_text("{}\n")  # what the first start's rank 0 writes
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=called[4:])
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.resume) == (2, 8, str(run))


# --- nodes that disagree ---------------------------------------------------------------------------------


def test_nodes_started_with_other_settings_or_data_fail_at_start_up_naming_the_differences(
    command_root, tmp_path
):
    copy = tmp_path / "prepared"
    shutil.copytree(command_root / "demo" / "prepared", copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**manifest, "copied": True}))  # another data version
    common = ["logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    port = free_port()
    results = launch(
        [
            train_command(command_root, *common, "optimizer.lr=0.001"),
            train_command(command_root, *common, "optimizer.lr=0.002", f"data.data_dir={copy}"),
        ],
        [torchrun_environment(n, port) for n in range(NODES)],
        tmp_path / "logs",
    )
    for code, output in results:
        assert code != 0
        assert "LaunchMismatch: the 2 processes of this launch disagree" in output
        assert "optimizer.lr: 0.001 on rank 0; 0.002 on rank 1" in output
        assert "data.data_dir: " in output and "data: manifest.json " in output
        assert "Epoch 0" not in output  # nothing trained


def test_a_process_that_never_reports_is_named_after_a_bounded_wait():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with pytest.raises(LaunchMismatch, match=r"rank 1 of 2 did not report what they train within 1 s"):
        exchange_fingerprints(store, 0, 2, {"a": "1"}, "test/absent", timedelta(seconds=1))


def test_processes_exchange_fingerprints_through_the_store():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    fingerprints = [{"a": "1", "b": "2"}, {"a": "1", "b": "3"}, {"a": "1", "b": "2"}]
    seen: dict[int, list[dict[str, str]]] = {}

    def rank(r: int) -> None:
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False)
        seen[r] = exchange_fingerprints(client, r, 3, fingerprints[r], "test/three", timedelta(seconds=30))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {r: fingerprints for r in range(3)}
    assert disagreements(fingerprints) == ["b: 2 on ranks 0, 2; 3 on rank 1"]
    assert disagreements([{"a": "1"}, {}]) == ["a: 1 on rank 0; <absent> on rank 1"]


def test_the_fingerprint_leaves_out_where_the_code_lives_and_the_loggers(command_root):
    def fingerprint(*overrides: str) -> dict[str, str]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    "experiment=demo",
                    f"paths.data_dir={command_root}",
                    "paths.log_dir=/shared/outputs",
                    "paths.output_dir=/shared/outputs/run",
                    *overrides,
                ],
            )
        return launch_fingerprint(cfg)

    here = fingerprint("paths.root_dir=/node0/checkout", "logger=csv")
    # where each node's checkout is does not matter once the data and outputs are set (shared storage)
    assert here == fingerprint("paths.root_dir=/node1/checkout", "logger=wandb")
    assert here["code"].startswith("med3dvlm ") and "torch " in here["code"]
    assert here["data"].startswith("manifest.json ")
    other = fingerprint(
        "paths.root_dir=/node0/checkout", "logger=csv", "seed=1", "paths.log_dir=/node0/outputs"
    )
    assert disagreements([here, other]) == [
        'paths.log_dir: "/shared/outputs" on rank 0; "/node0/outputs" on rank 1',
        "seed: 42 on rank 0; 1 on rank 1",
    ]
