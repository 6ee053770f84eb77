"""Stage 1 (SigLIP): the train entry point, logging, optimiser set-up, resume, DDP equality, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.commands import run_forked
from helpers.siglip import INPUT_SIZE, ResumableLoader, prepared_data, stage, tiny_bert
from lightning.pytorch.callbacks import ModelCheckpoint

from med3dvlm.artifacts.encoder_export import SIGLIP_EXPORT
from med3dvlm.artifacts.latest import latest
from med3dvlm.artifacts.record import read_record
from med3dvlm.data.datamodule import M3DDataModule
from med3dvlm.data.prepared import dataset_preprocessing
from med3dvlm.training.callbacks import RNGStateInCheckpoint
from med3dvlm.training.optim import split_decay

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    data = prepared_data(root / "demo")
    return data, tiny_bert(root, data)


def datamodule(data: Path, bert: Path, batch_size: int = 4) -> M3DDataModule:
    from transformers import AutoTokenizer

    return M3DDataModule(
        data,
        mixture="retrieval",
        tokenizer=AutoTokenizer.from_pretrained(bert),
        max_length=128,
        batch_size=batch_size,
        num_workers=0,
        augment=False,
        spatial_size=INPUT_SIZE,
    )


def fixed_batches(data: Path, bert: Path, count: int, batch_size: int = 4) -> list[dict]:
    dm = datamodule(data, bert, batch_size)
    dm.setup("fit")
    loader = torch.utils.data.DataLoader(
        dm.datasets["train"], batch_size=batch_size, shuffle=False, collate_fn=dm.collate()
    )
    batches = list(loader)
    return [batches[i % len(batches)] for i in range(count)]


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
        "gradient_clip_val": 1.0,
    }
    return L.Trainer(**{**options, **kwargs})


class StepLosses(L.Callback):
    """Records the training loss of every step (to a file when given, for spawned processes)."""

    def __init__(self, path: Path | None = None) -> None:
        self.losses: list[float] = []
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if self.path is not None and trainer.is_global_zero:
            self.path.write_text(json.dumps(self.losses))


class StopAfter(L.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def test_weight_decay_only_on_weights(assets):
    module = stage(assets[1])
    decay, no_decay = split_decay(module)
    assert "loss.log_scale" in no_decay and "loss.bias" in no_decay
    assert all(not n.endswith(".bias") for n in decay)
    assert not any("norm" in n.lower() for n in decay)
    params = dict(module.named_parameters())
    assert all(params[n].ndim >= 2 for n in decay)
    assert len(decay) + len(no_decay) == len(params)
    assert any(n.startswith("image_tower.encoder") for n in decay)
    assert any(n.startswith("text_tower") for n in decay)


def test_frozen_batchnorm_stays_in_eval_mode(assets):
    module = stage(assets[1], freeze_bn=True)
    module.train()
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(not m.training for m in norms)
    assert module.image_tower.training and module.text_tower.training
    before = [m.running_mean.clone() for m in norms]
    module(fixed_batches(*assets, count=1)[0]).backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))


def test_loss_decreases_and_bare_loaders_give_an_export_of_inferred_preprocessing(assets, tmp_path):
    data, bert = assets
    batches = fixed_batches(data, bert, count=3, batch_size=8)  # 24 synthetic pairs, seen 10 times
    module = stage(bert, lr=1e-3, export_dir=tmp_path / "export", experiment="unit")
    record = StepLosses()
    trainer(tmp_path, max_epochs=10, callbacks=[record], limit_val_batches=0).fit(
        module, ResumableLoader(batches)
    )
    losses = record.losses
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
    # The export's content is tested in test_retrieval_eval; here: no prepared folder, no preprocessing known.
    assert read_record(tmp_path / "export").preprocessing.inferred


def test_validation_logs_retrieval_and_best_export(assets, tmp_path):
    data, bert = assets
    module = stage(bert, best_export_dir=str(tmp_path / "best"), experiment="unit")
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    fit.fit(module, datamodule(data, bert))
    metrics = fit.callback_metrics
    assert 0.0 <= float(metrics["val/recall_mean"]) <= 1.0
    pairs = len(module.last_retrieval["indices"])
    assert pairs == len(datamodule(data, bert).build("validation"))
    assert module.last_retrieval["indices"].tolist() == list(range(pairs))
    assert f"val/i2t_R@5_n{pairs}" in metrics
    best = read_record(tmp_path / "best")
    assert best.which == "best"
    # The export carries the preprocessing prepare recorded for the folder it was trained on.
    assert best.preprocessing == dataset_preprocessing(data) and not best.preprocessing.inferred
    assert (
        best.preprocessing.sources["m3d"].orientation == "LPI"
        and best.preprocessing.prepare["format"] == "npy"
    )


def test_resume_mid_epoch_gives_the_same_next_step(assets, tmp_path):
    data, bert = assets
    batches = fixed_batches(data, bert, count=6)
    straight = StepLosses()
    trainer(tmp_path / "a", max_steps=4, callbacks=[straight], limit_val_batches=0).fit(
        stage(bert), ResumableLoader(batches)
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    # Same max_steps as the straight run (the schedule depends on it), killed after step 3. The RNG
    # state (dropout) travels in the checkpoint through the callback every configured run has.
    trainer(
        tmp_path / "b",
        max_steps=4,
        callbacks=[StopAfter(3), ckpt, RNGStateInCheckpoint()],
        enable_checkpointing=True,
        limit_val_batches=0,
    ).fit(stage(bert), ResumableLoader(batches))
    (path,) = (tmp_path / "ckpt").glob("*step=3*.ckpt")
    resumed = StepLosses()
    trainer(
        tmp_path / "c", max_steps=4, callbacks=[resumed, RNGStateInCheckpoint()], limit_val_batches=0
    ).fit(stage(bert, seed=123), ResumableLoader(batches), ckpt_path=str(path))
    assert len(resumed.losses) == 1
    assert resumed.losses[0] == pytest.approx(straight.losses[3], rel=1e-5, abs=1e-6)


def test_train_cli_fast_dev_run_with_offline_wandb(assets, tmp_path):
    data, _ = assets
    root = data.parents[1]  # the text_encoder=tiny config reads its corpus from <data_dir>/demo/prepared
    run = tmp_path / "outputs" / "run"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # any attempt to reach the network fails fast
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
    }
    arguments = [
        "experiment=demo",
        "stage=siglip",
        "logger=wandb",
        f"paths.data_dir={root}",
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"hydra.run.dir={run}",
        f"data.data_dir={data}",
        f"data.spatial_size=[{','.join(map(str, INPUT_SIZE))}]",
        "data.max_length=128",
        "data.batch_size=4",
        "+trainer.fast_dev_run=2",
    ]
    result = run_forked("train", *arguments, cwd=REPO, env=env, output=tmp_path / "console", timeout=300)
    assert "retrieval (R@K on the first N pairs)" in result.stdout
    assert "i2t_R@1" in result.stdout
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert latest(SIGLIP_EXPORT, "demo", tmp_path / "outputs") == run / "export"
