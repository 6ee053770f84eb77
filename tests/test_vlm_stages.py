"""Stages 2 and 3 on tiny assets: what trains, strict hand-offs, loss decreases, LoRA merge."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.vlm import (
    ENCODER_CONFIG,
    INPUT_SIZE,
    PROJECTOR_CONFIG,
    encoder_export,
    finetune,
    fit,
    llm_node,
    optimizer,
    pretrain,
    scheduler,
    tiny_llm,
    toy_batches,
)

from med3dvlm.artifacts.handoff import PROJECTOR_HANDOFF, load_pretrain_handoff
from med3dvlm.artifacts.latest import resolve
from med3dvlm.models.lora import merge_lora
from med3dvlm.stages.finetune import FinetuneStage
from med3dvlm.stages.pretrain import PretrainStage


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("assets")


def pretrain_stage(assets, reference_placement=False, lr=1e-2, export_dir=None, **kwargs) -> PretrainStage:
    return pretrain(assets, lr=lr, reference_placement=reference_placement, export_dir=export_dir, **kwargs)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("reference_placement", [False, True])
def test_pretrain_changes_only_projector_and_image_row(assets, reference_placement):
    stage = pretrain_stage(assets, reference_placement)
    before = snapshot(stage.model)
    fit(stage, toy_batches(stage.model), steps=3)
    after = snapshot(stage.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith("projector.") or k == "image_token_embedding" for k in changed), sorted(changed)
    assert len([k for k in changed if k.startswith("projector.")]) == len(
        [k for k in before if k.startswith("projector.")]
    )
    # the row only receives gradient where the original's placement leaves it in the sequence
    assert ("image_token_embedding" in changed) == reference_placement
    assert not stage.model.vision_tower.training  # BN statistics stayed frozen (buffers unchanged above)


def mean_loss(stage, batches) -> float:
    stage.eval()
    with torch.no_grad():
        return sum(float(stage(b)) for b in batches) / len(batches)


def test_pretrain_loss_decreases(assets):
    # The frozen tiny LLM is untrained, so the projector alone moves the loss only a little.
    stage = pretrain_stage(assets, lr=1e-2)
    batches = toy_batches(stage.model, count=4)
    start = mean_loss(stage, batches)
    fit(stage, batches * 5, steps=20)
    assert mean_loss(stage, batches) < 0.95 * start


def test_pretrain_handoff_round_trip_and_strict_errors(assets, tmp_path):
    stage = pretrain_stage(assets, export_dir=str(tmp_path / "run" / "export"))
    fit(stage, toy_batches(stage.model, count=1), steps=1)
    folder = resolve(None, PROJECTOR_HANDOFF, "unit", tmp_path)
    assert folder == tmp_path / "run" / "export"
    model, record = load_pretrain_handoff(folder, tiny_llm(assets))
    torch.testing.assert_close(snapshot(model.projector), snapshot(stage.model.projector))
    torch.testing.assert_close(model.image_token_embedding, stage.model.image_token_embedding)
    torch.testing.assert_close(snapshot(model.vision_tower), snapshot(stage.model.vision_tower))
    assert record.components["vision_tower"] == ENCODER_CONFIG and record.num_image_tokens == 8
    assert (
        record.parent("encoder").record.kind == "encoder_export"
        and record.llm == tiny_llm(assets).name_or_path
    )

    with pytest.raises(FileNotFoundError, match="python -m med3dvlm.train stage=pretrain"):
        resolve(None, PROJECTOR_HANDOFF, "other-experiment", tmp_path)
    # a projector trained for a different configuration does not load
    record_file = folder / "record.json"
    content = json.loads(record_file.read_text())
    content["components"]["projector"]["low_tokens"] = [4, 6]
    record_file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="projector.safetensors.*has shape"):
        load_pretrain_handoff(folder, tiny_llm(assets))
    record_file.unlink()
    with pytest.raises(ValueError, match="record.json missing"):
        load_pretrain_handoff(folder, tiny_llm(assets))


def finetune_stage(assets, tmp_path, train_vision_tower=True, vision_tower_lr=None) -> FinetuneStage:
    pre = pretrain_stage(assets, export_dir=str(tmp_path / "pre"))
    fit(pre, toy_batches(pre.model, count=1), steps=1)
    return finetune(
        assets,
        tmp_path / "pre",
        train_vision_tower=train_vision_tower,
        vision_tower_lr=vision_tower_lr,
        export_dir=str(tmp_path / "fine"),
    )


def test_finetune_trains_lora_projector_encoder_not_base(assets, tmp_path):
    stage = finetune_stage(assets, tmp_path)
    before = snapshot(stage.model)
    fit(stage, toy_batches(stage.model), steps=3)
    after = snapshot(stage.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if "lora_" in k}
    assert lora_keys and {k for k in lora_keys if "lora_B" in k} <= changed
    assert any(k.startswith("projector.") for k in changed)
    assert any(k.startswith("vision_tower.") for k in changed)
    base_llm = {k for k in changed if k.startswith("llm.") and "lora_" not in k}
    assert not base_llm, sorted(base_llm)[:5]
    linear_names = {k.split(".lora_A")[0] for k in lora_keys if ".lora_A" in k}
    assert len(linear_names) == 7 * stage.model.llm.config.num_hidden_layers  # every linear but lm_head


def test_finetune_vision_tower_lr_applies_to_the_encoder_only(assets, tmp_path):
    stage = finetune_stage(assets, tmp_path, vision_tower_lr=1e-4)
    fit(stage, toy_batches(stage.model), steps=1)
    encoder = {id(p) for p in stage.model.vision_tower.parameters()}
    groups = stage.trainer.optimizers[0].param_groups
    for group in groups:
        in_encoder = {id(p) in encoder for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["initial_lr"] == (1e-4 if in_encoder.pop() else 1e-2)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in stage.parameters())


@pytest.mark.parametrize("train_vision_tower", [True, False])
def test_finetune_trains_in_train_mode_whatever_mode_it_was_built_in(assets, tmp_path, train_vision_tower):
    stage = finetune_stage(assets, tmp_path, train_vision_tower=train_vision_tower)
    stage.eval()  # as from_pretrained leaves the LLM
    modes = []
    step = stage.training_step

    def recording_step(batch, batch_idx):
        modes.append((stage.model.llm.training, stage.model.vision_tower.training))
        return step(batch, batch_idx)

    stage.training_step = recording_step
    fit(stage, toy_batches(stage.model), steps=2)
    assert modes == [(True, train_vision_tower)] * 2


def test_lora_merge_keeps_outputs(assets, tmp_path):
    stage = finetune_stage(assets, tmp_path, train_vision_tower=False)
    batches = toy_batches(stage.model)
    fit(stage, batches, steps=3)
    model = stage.model.eval()
    batch = batches[0]
    with torch.no_grad():
        unmerged = model(batch["input_ids"], batch["attention_mask"], images=batch["image"]).logits
        merge_lora(model)
        merged = model(batch["input_ids"], batch["attention_mask"], images=batch["image"]).logits
    assert (merged - unmerged).abs().max() < 1e-5
    assert not any("lora_" in k for k in model.state_dict())


def test_finetune_loss_decreases(assets, tmp_path):
    stage = finetune_stage(assets, tmp_path)
    batches = toy_batches(stage.model, count=4)
    start = mean_loss(stage, batches)
    fit(stage, batches * 5, steps=20)
    assert mean_loss(stage, batches) < 0.9 * start


def test_feature_cache_gives_the_same_loss_and_computes_each_volume_once(assets):
    plain = pretrain_stage(assets)
    cached = pretrain_stage(assets)
    cached.cache_encoder_features = True
    batches = toy_batches(plain.model, count=2)
    calls = []
    cached.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    for stage in (plain, cached):
        stage.train()
    with torch.no_grad():
        for _ in range(2):
            for batch in batches:
                torch.testing.assert_close(cached(batch), plain(batch))
    assert len(calls) == len(batches) and len(cached.feature_cache) == 2 * len(batches)


def test_stages_2_and_3_refuse_data_of_another_size_than_their_exports(assets, tmp_path):
    export = encoder_export(assets)
    with pytest.raises(
        ValueError,
        match=rf"{export}: the encoder was trained on \[32, 64, 64\] volumes, the data "
        r"is \[16, 32, 32\]",
    ):
        PretrainStage(str(export), PROJECTOR_CONFIG, llm_node(assets), [16, 32, 32], optimizer(), scheduler())
    pre = pretrain_stage(assets, export_dir=str(tmp_path / "pre"))
    fit(pre, toy_batches(pre.model, count=1), steps=1)
    with pytest.raises(ValueError, match=r"pre: the projector was trained on \[32, 64, 64\] volumes"):
        FinetuneStage(
            str(tmp_path / "pre"),
            llm_node(assets),
            {"_target_": "peft.LoraConfig"},
            optimizer(),
            scheduler(),
            input_size=[16, 32, 32],
        )


def _fit_with_checkpoints(stage, batches, folder, steps, ckpt_path=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from med3dvlm.training.checkpointing import AtomicCheckpointIO

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=2, save_top_k=-1)],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(stage, DataLoader(batches, batch_size=None, shuffle=False), ckpt_path=ckpt_path)


def test_stage_2_and_3_checkpoints_hold_only_what_trains_and_resume_exactly(assets, tmp_path):
    from med3dvlm.training.lean_checkpoint import FrozenBaseMismatch, split_state_keys

    for seed in (0, 1):  # the second pretrain hand-off holds another encoder
        pre = pretrain_stage(assets, export_dir=str(tmp_path / f"pre{seed}"), encoder_seed=seed)
        fit(pre, toy_batches(pre.model, count=1), steps=1)

    def build(name, seed=0):
        if name == "pretrain":
            return pretrain_stage(assets)
        torch.manual_seed(0)
        return finetune(assets, tmp_path / f"pre{seed}", train_vision_tower=False)

    for name in ("pretrain", "finetune"):
        batches = toy_batches(build(name).model, count=2)  # two steps an epoch: a checkpoint ends epoch 1
        straight = build(name)
        _fit_with_checkpoints(straight, batches, tmp_path / name / "straight", steps=4)
        saved = torch.load(tmp_path / name / "straight" / "step=2.ckpt", weights_only=True)
        trained, frozen = split_state_keys(straight)
        assert set(saved["state_dict"]) == trained and frozen  # the frozen base stays out
        full = sum(t.numel() for t in straight.state_dict().values())
        lean = sum(t.numel() for t in saved["state_dict"].values())
        assert lean < full / 2, (lean, full)
        assert saved["frozen_base"]["fingerprint"] == straight.frozen_fingerprint()

        resumed = build(name)
        _fit_with_checkpoints(
            resumed,
            batches,
            tmp_path / name / "resumed",
            steps=4,
            ckpt_path=tmp_path / name / "straight" / "step=2.ckpt",
        )
        want, got = straight.state_dict(), resumed.state_dict()
        assert max((want[k] - got[k]).abs().max().item() for k in trained) == 0.0

    other = build("finetune", seed=1)  # another frozen encoder
    with pytest.raises(FrozenBaseMismatch, match="another frozen base"):
        _fit_with_checkpoints(
            other,
            batches,
            tmp_path / "other",
            steps=4,
            ckpt_path=tmp_path / "finetune" / "straight" / "step=2.ckpt",
        )


def test_stage_3_validates_by_generation_with_closed_vqa_accuracy_per_question_type(assets, tmp_path):
    import lightning as L
    from helpers.data import make_prepared
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from med3dvlm.data.datamodule import M3DDataModule
    from med3dvlm.training.callbacks import ClosedVQAValidation

    stage = finetune_stage(assets, tmp_path, train_vision_tower=False)
    data = make_prepared(tmp_path / "prepared", shape=INPUT_SIZE)
    datamodule = M3DDataModule(
        data,
        mixture="finetune",
        tokenizer=stage.model.tokenizer,
        num_image_tokens=stage.model.num_image_tokens,
        max_length=128,
        batch_size=2,
        spatial_size=INPUT_SIZE,
        augment=False,
    )
    check = ClosedVQAValidation(size=2, seed=3, max_new_tokens=4)
    best = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/closed_accuracy", mode="max", filename="best"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path / "logs", name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[check, best],
    )
    trainer.fit(stage, datamodule=datamodule)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/closed_accuracy"]) <= 1.0
    assert "val/closed_accuracy/Organ" in metrics  # the prepared questions are all of type 3 (Organ)
    assert (tmp_path / "ckpt" / "best.ckpt").is_file()  # it can be the monitored metric
    assert len(check.subset(trainer, stage)) == 2
    again = ClosedVQAValidation(size=2, seed=3).subset(trainer, stage)
    assert again.indices == check.subset(trainer, stage).indices  # fixed and seeded
