"""Every stage on 2 CPU processes (gloo) under ``ddp`` and ``fsdp`` (FSDP2): the same losses as one
process on the same global batch, exports from sharded weights, sharded checkpoints, consolidation
and resume from either; the ``trainer=ddp|fsdp`` presets through the CLI.

One 2-process script (``run_worker``) runs every distributed fit, so the processes start once.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from med3dvlm.artifacts.encoder_export import load_encoder_export
from med3dvlm.consolidate import main as consolidate_command
from med3dvlm.training.optim import param_groups
from med3dvlm.training.sharding import FSDP2Strategy, consolidate, shard_plan

REPO = Path(__file__).resolve().parents[1]


# --- the 2-process script -------------------------------------------------------------------------------


class CPUMixedPrecision(FSDP2Strategy):
    """bf16 FSDP2 mixed precision on CPU processes (``FSDP2Strategy`` uses it on GPUs only): the
    dtype hand-offs between units that GPUs rely on, tested here."""

    def compute_dtype(self) -> torch.dtype | None:
        return self.param_dtype


def run_worker(root: Path, out: Path) -> None:
    """Every distributed fit, in 2 processes: each stage under ddp and fsdp; the fsdp finetune run
    checkpoints at step 2 as a shard folder, which is consolidated, the fsdp siglip run as one file;
    then fsdp resumes from the folder and from the consolidated file."""
    world = 2
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    batches = torch.load(out / "batches.pt")
    for strategy in ("ddp", "fsdp"):
        for name in STAGES:
            callbacks = [GlobalLoss(out / strategy / f"{name}.json")]
            # The fsdp runs also cover the options: a single-file checkpoint (siglip), gathered weights
            # kept until backward (pretrain), activation checkpointing (finetune; resumed without it).
            options = {
                "siglip": {"save_distributed_checkpoint": False},
                "pretrain": {"reshard_after_forward": False},
                "finetune": {"activation_checkpointing": True},
            }[name]
            chosen = "ddp" if strategy == "ddp" else FSDP2Strategy(**options)
            if strategy == "fsdp" and name != "pretrain":
                callbacks.append(
                    ModelCheckpoint(
                        dirpath=out / f"ckpt_{name}",
                        filename="{step}",
                        every_n_train_steps=CHECKPOINT_STEP,
                        save_top_k=-1,
                    )
                )
            module = build_stage(name, root, export_dir=out / strategy / f"{name}_export")
            fit(
                module,
                rank_share(batches[name], rank, world),
                out / strategy / name,
                chosen,
                world,
                callbacks=callbacks,
            )
    for name in STAGES:
        fit(
            build_stage(name, root),
            rank_share(batches[name], rank, world),
            out / "bf16" / name,
            CPUMixedPrecision(),
            world,
            callbacks=[GlobalLoss(out / "bf16" / f"{name}.json")],
        )
    sharded = out / "ckpt_finetune" / f"step={CHECKPOINT_STEP}.ckpt"
    if rank == 0:
        consolidate(sharded, out / "consolidated.ckpt")
    torch.distributed.barrier()
    for source, path in (("folder", sharded), ("file", out / "consolidated.ckpt")):
        fit(
            build_stage("finetune", root),
            rank_share(batches["finetune"], rank, world),
            out / source,
            FSDP2Strategy(),
            world,
            ckpt_path=str(path),
            callbacks=[GlobalLoss(out / f"resume_{source}.json")],
        )


WORKER = """import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_distributed_stages import run_worker
run_worker(Path({root!r}), Path({out!r}))
"""


@pytest.fixture(scope="module")
def run(distributed_references):
    """The one-process references, then the 2-process script (timed)."""
    root, out, batches = (
        distributed_references.root,
        distributed_references.out,
        distributed_references.batches,
    )
    script = root / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests"), root=str(root), out=str(out)))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"2-process script: {time.perf_counter() - started:.1f} s")
    return root, out, batches


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", STAGES)
def test_two_processes_match_one_process(run, name, strategy):
    _, out, _ = run
    one = losses(out / "one" / f"{name}.json")
    two = losses(out / strategy / f"{name}.json")
    assert len(one) == len(two) == STEPS
    assert len(set(one)) == STEPS  # the steps change the weights: later losses depend on earlier steps
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", STAGES)
def test_fsdp_bf16_mixed_precision_stays_close_to_float32(run, name):
    _, out, _ = run
    one = losses(out / "one" / f"{name}.json")
    bf16 = losses(out / "bf16" / f"{name}.json")
    assert bf16 != one  # it did compute in bf16
    assert bf16 == pytest.approx(one, rel=2e-2)


def export_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        tensors.update({f"{file.relative_to(folder)}:{k}": v for k, v in load_file(str(file)).items()})
    return tensors


@pytest.mark.parametrize("name", STAGES)
def test_exports_from_sharded_weights_equal_the_one_process_exports(run, name):
    _, out, _ = run
    one = export_tensors(out / "one" / f"{name}_export")
    assert one
    for strategy in ("ddp", "fsdp"):
        two = export_tensors(out / strategy / f"{name}_export")
        assert two.keys() == one.keys()
        for key, tensor in one.items():
            assert two[key].shape == tensor.shape, key
            torch.testing.assert_close(two[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_consolidated_checkpoint_is_one_standard_file(run):
    root, out, _ = run
    checkpoint = torch.load(out / "consolidated.ckpt", weights_only=True)
    module = build_stage("finetune", root)
    expected = {k: v for k, v in module.state_dict().items() if k in module.lean_keys()}
    assert checkpoint["state_dict"].keys() == expected.keys()  # lean: the frozen base stays out
    assert len(expected) < len(module.state_dict())
    for key, value in expected.items():
        assert checkpoint["state_dict"][key].shape == value.shape, key
    assert checkpoint["global_step"] == CHECKPOINT_STEP
    (optimizer_state,) = checkpoint["optimizer_states"]
    # PyTorch's layout: the parameters numbered in optimiser order, so a plain optimiser over the
    # same parameter groups takes the state as it is
    in_order = [p for group in param_groups(module, module.weight_decay) for p in group["params"]]
    positions = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    assert positions == list(range(len(in_order)))
    shapes = {i: s["momentum_buffer"].shape for i, s in optimizer_state["state"].items()}
    assert shapes == {i: p.shape for i, p in enumerate(in_order)}


def test_fsdp_single_file_checkpoint_is_standard_and_resumes_on_one_process(run, tmp_path):
    root, out, batches = run
    path = out / "ckpt_siglip" / f"step={CHECKPOINT_STEP}.ckpt"
    assert path.is_file()
    checkpoint = torch.load(path, weights_only=True)
    module = build_stage("siglip", root)
    assert {k: v.shape for k, v in checkpoint["state_dict"].items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }
    (optimizer_state,) = checkpoint["optimizer_states"]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert sorted(i for g in optimizer_state["param_groups"] for i in g["params"]) == list(
        range(len(trainable))
    )
    fit(
        module,
        batches["siglip"],
        tmp_path,
        ckpt_path=str(path),
        callbacks=[GlobalLoss(tmp_path / "resume.json")],
    )
    straight = losses(out / "fsdp" / "siglip.json")
    assert losses(tmp_path / "resume.json") == pytest.approx(straight[CHECKPOINT_STEP:], rel=1e-4, abs=1e-5)


def test_resume_from_sharded_folder_or_consolidated_file_continues_the_run(run, tmp_path):
    root, out, batches = run
    straight = losses(out / "fsdp" / "finetune.json")
    for source in ("folder", "file"):
        resumed = losses(out / f"resume_{source}.json")
        assert len(resumed) == STEPS - CHECKPOINT_STEP
        assert resumed == pytest.approx(straight[CHECKPOINT_STEP:], rel=1e-4, abs=1e-5), source
    # one process resumes from the consolidated file too (no sharding involved)
    fit(
        build_stage("finetune", root),
        batches["finetune"],
        tmp_path,
        ckpt_path=str(out / "consolidated.ckpt"),
        callbacks=[GlobalLoss(tmp_path / "resume.json")],
    )
    assert losses(tmp_path / "resume.json") == pytest.approx(straight[CHECKPOINT_STEP:], rel=1e-4, abs=1e-5)


def test_consolidate_rejects_what_is_not_a_sharded_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        consolidate(tmp_path / "missing", tmp_path / "out.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a sharded Lightning checkpoint"):
        consolidate(tmp_path / "empty", tmp_path / "out.ckpt")


# --- the presets through the CLI --------------------------------------------------------------------------


def cli(
    module: str, *args: str, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_cli_fsdp_run_consolidate_and_resume_under_ddp(run, tmp_path):
    """``trainer=fsdp`` with 2 CPU processes writes sharded checkpoints and a full export; the
    consolidation command makes one file of the last one; ``trainer=ddp`` resumes from that file."""
    root, _, _ = run
    data = root / "demo" / "prepared"
    common = [
        "experiment=demo",
        "stage=siglip",
        "logger=none",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.data_dir={root}",
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={data}",
        f"data.spatial_size=[{','.join(map(str, SIGLIP_INPUT_SIZE))}]",
        "data.max_length=128",
        "data.batch_size=4",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    ]
    cli(
        "med3dvlm.train",
        *common,
        "trainer=fsdp",
        "trainer.max_epochs=1",
        "test=false",
        f"hydra.run.dir={tmp_path / 'fsdp'}",
    )
    sharded = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2

    consolidated = tmp_path / "last.ckpt"
    consolidate_command([str(sharded), "--out", str(consolidated)])  # python -m med3dvlm.consolidate
    checkpoint = torch.load(consolidated, weights_only=True)
    assert checkpoint["global_step"] == 2
    # the export written from the gathered shards holds the checkpoint's final encoder weights
    encoder_module, _ = load_encoder_export(tmp_path / "fsdp" / "export")
    prefix = "image_tower.encoder."
    saved = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    torch.testing.assert_close(saved, encoder_module.state_dict(), rtol=0, atol=0)

    cli(
        "med3dvlm.train",
        *common,
        "trainer=ddp",
        "trainer.max_epochs=2",
        f"ckpt_path={consolidated}",
        f"hydra.run.dir={tmp_path / 'ddp'}",
    )
    resumed = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1


def test_a_new_encoder_in_one_file_and_one_yaml_trains_under_fsdp_with_its_shard_units(run, tmp_path):
    """tests/extension: an encoder class that declares its shard units, and its YAML found through
    hydra.searchpath, trained by stage 1 on 2 CPU processes: every unit it names is an FSDP unit."""
    root, _, _ = run
    extension = REPO / "tests" / "extension"
    marker = tmp_path / "units"
    cli(
        "med3dvlm.train",
        "experiment=demo",
        "stage=siglip",
        "encoder=tiny_cnn",
        f"hydra.searchpath=[file://{extension / 'configs'}]",
        "logger=none",
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "test=false",
        f"paths.data_dir={root}",
        f"paths.log_dir={tmp_path}",
        f"data.data_dir={root / 'demo' / 'prepared'}",
        "data.batch_size=4",
        "data.max_length=128",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"PYTHONPATH": str(extension), "TINY_CNN_SHARD_MARKER": str(marker)},
    )
    for rank in (0, 1):
        assert json.loads(Path(f"{marker}.{rank}").read_text()) == [
            True,
            True,
            True,
            True,
        ]  # 3 stages + encoder
    sys.path.insert(0, str(extension))
    importlib.import_module("tiny_cnn")  # registers the class: only then may an artifact rebuild it
    encoder, record = load_encoder_export(tmp_path / "run" / "export")
    assert record.components["encoder"]["_target_"] == "tiny_cnn.TinyCNN" and len(encoder.stages) == 3


def test_shard_plan_names_layers_encoder_stages_components_then_the_root(run):
    root, _, _ = run
    finetune = build_stage("finetune", root)
    units, checkpointed = shard_plan(finetune)
    vlm = finetune.model
    decoder_layers = [m for m in finetune.modules() if type(m).__name__ == "Qwen2DecoderLayer"]
    assert decoder_layers and all(layer in checkpointed for layer in decoder_layers)
    assert all(stage in checkpointed for stage in vlm.vision_tower.stages)
    assert units[-1] is finetune and units[-2] is vlm
    for component in (vlm.vision_tower, vlm.projector):
        assert component in units and component not in checkpointed
    assert len(units) == len(set(units)) == len(checkpointed) + 4  # + vision tower, projector, VLM, root
    # inner units come before the units that hold them (fully_shard goes bottom-up)
    for i, unit in enumerate(units):
        assert not any(inner in units[i + 1 :] for inner in unit.modules() if inner is not unit)

    siglip = build_stage("siglip", root)
    units, checkpointed = shard_plan(siglip)
    assert [type(m).__name__ for m in checkpointed].count("BertLayer") == 1
    assert {siglip.image_tower, siglip.text_tower, siglip.loss, siglip.image_tower.encoder} <= set(units)
    assert units[-1] is siglip
