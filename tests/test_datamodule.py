"""M3DDataModule: mixtures, dynamic / left padding, augmentation split, configs, DDP sharding."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers.data import CASES, IMAGE_TOKEN, SHAPE, make_prepared, make_tokenizer

from med3dvlm.data.collate import PadCollate
from med3dvlm.data.datamodule import M3DDataModule
from med3dvlm.data.prompts import IGNORE_INDEX
from med3dvlm.data.volume_io import to_float

N_IMAGE = 4


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared"))


def datamodule(prepared, tokenizer, **kwargs) -> M3DDataModule:
    settings = {
        "mixture": "finetune",
        "num_image_tokens": N_IMAGE,
        "max_length": 128,
        "batch_size": 4,
        "spatial_size": SHAPE,
    } | kwargs
    return M3DDataModule(prepared, tokenizer=tokenizer, **settings)


def test_mixture_sizes(prepared, tokenizer):
    n = {split: len(cases) for split, cases in CASES.items()}
    finetune = datamodule(prepared, tokenizer)
    finetune.setup("fit")
    assert len(finetune.datasets["train"]) == 4 * n["train"]
    assert len(finetune.datasets["validation"]) == 4 * n["validation"]
    pretrain = datamodule(prepared, tokenizer, mixture="pretrain")
    pretrain.setup("test")
    assert len(pretrain.datasets["test"]) == 3 * n["test"]
    tasks = {s["task"] for s in pretrain.datasets["test"]}
    assert tasks == {"caption", "closed_vqa", "open_vqa"}
    capped = datamodule(prepared, tokenizer, val_subset=1)
    capped.setup("validate")
    assert len(capped.datasets["validation"]) == 4
    with pytest.raises(ValueError, match="unknown mixture"):
        datamodule(prepared, tokenizer, mixture="everything")


def test_training_batches_are_padded_per_batch_on_the_right(prepared, tokenizer):
    dm = datamodule(prepared, tokenizer, batch_size=3, max_length=512)
    lengths = []
    for batch in dm.train_dataloader():
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert batch["image"].shape == (ids.shape[0], 1, *SHAPE) and batch["image"].dtype == torch.float32
        assert ids.dtype == labels.dtype == mask.dtype == torch.long
        sample_lengths = mask.sum(1)
        assert ids.shape[1] == int(sample_lengths.max()) < 512  # padded to the batch's longest only
        for row, length in enumerate(sample_lengths.tolist()):
            assert mask[row, :length].all() and not mask[row, length:].any()
            assert (ids[row, length:] == tokenizer.pad_token_id).all()
            assert (labels[row, length:] == IGNORE_INDEX).all()
            answer = labels[row][labels[row] != IGNORE_INDEX]
            assert answer[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(answer) == " " + batch["answer"][row] + tokenizer.eos_token
        assert isinstance(batch["question"], list) and len(batch["question"]) == ids.shape[0]
        lengths.append(ids.shape[1])
    assert len(set(lengths)) > 1


def test_augmentation_only_in_training(prepared, tokenizer):
    dm = datamodule(
        prepared,
        tokenizer,
        mixture="caption",
        batch_size=4,
        augmentation={"rotate90_prob": 1.0, "scale_prob": 1.0},
    )
    stored = [
        to_float(np.load(prepared / f"M3D_Cap/ct_case/{c}/Axial_C__portal_venous_phase.npy"))
        for c in CASES["validation"]
    ]
    val = next(iter(dm.val_dataloader()))
    for row, volume in enumerate(stored):
        np.testing.assert_array_equal(val["image"][row, 0].numpy(), volume)
    torch.manual_seed(0)
    train = next(iter(dm.train_dataloader()))
    changed = [
        not torch.equal(train["image"][row, 0], torch.from_numpy(volume))
        for row, volume in enumerate(to_float(np.load(prepared / p)) for p in train["image_path"])
    ]
    assert all(changed)
    off = datamodule(prepared, tokenizer, mixture="caption", augment=False)
    assert off.augmentation is None


def test_worker_seeds_give_reproducible_but_distinct_augmentation(prepared, tokenizer):
    def first_images(seed: int) -> torch.Tensor:
        dm = datamodule(prepared, tokenizer, mixture="caption", batch_size=4, num_workers=2)
        torch.manual_seed(seed)
        return next(iter(dm.train_dataloader()))

    a, b, c = first_images(1), first_images(1), first_images(2)
    assert a["sample_id"] == b["sample_id"] and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"]) or a["sample_id"] != c["sample_id"]


def test_tokenizer_from_a_path_gets_the_image_token(prepared, tmp_path):
    plain = make_tokenizer()
    folder = tmp_path / "tok"
    plain.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**json.loads((folder / "tokenizer_config.json").read_text()), "extra_special_tokens": {}})
    )
    dm = datamodule(prepared, str(folder), image_token="<scan>", mixture="yes_no_vqa")
    assert dm.tokenizer.convert_tokens_to_ids("<scan>") != dm.tokenizer.unk_token_id
    batch = next(iter(dm.val_dataloader()))
    scan_id = dm.tokenizer.convert_tokens_to_ids("<scan>")
    assert ((batch["input_ids"] == scan_id).sum(1) == N_IMAGE).all()
    with pytest.raises(ValueError, match="no tokenizer"):
        M3DDataModule(prepared, tokenizer=None).train_dataloader()


def test_retrieval_mixture_and_summary(prepared, tokenizer):
    dm = datamodule(prepared, tokenizer, mixture="retrieval", max_length=6, batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (2, 6) and "labels" not in batch
    assert batch["attention_mask"].all()
    text = datamodule(prepared, tokenizer, batch_size=2).summary("validation")
    assert f"image           (2, 1, {SHAPE[0]}, {SHAPE[1]}, {SHAPE[2]}) torch.float32" in text
    assert f"{IMAGE_TOKEN} x {N_IMAGE}" in text and "target[0]:" in text


def test_collate_rejects_bad_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        PadCollate(0, "middle")


@pytest.mark.parametrize("name", ["m3d", "demo"])
def test_data_configs_instantiate(name, tokenizer):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from med3dvlm.configs import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=[f"+data={name}"])
    OmegaConf.update(cfg, "paths.output_dir", "/tmp/unused", force_add=True)
    dm = instantiate(cfg.data, tokenizer=tokenizer, num_image_tokens=N_IMAGE)
    assert isinstance(dm, M3DDataModule) and dm.mixture == "finetune"
    assert dm.spatial_size == ((128, 256, 256) if name == "m3d" else (32, 64, 64))
    assert dm.augmentation is not None and dm.augmentation.flip_prob == 0.1


# --- DDP: Lightning's automatic DistributedSampler gives each rank a disjoint shard ----------------


class RecordIds(L.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch["sample_id"])
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_train_end(self) -> None:
        (Path(self.out_dir) / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


def test_ddp_two_processes_get_disjoint_shards(prepared, tokenizer, tmp_path):
    dm = datamodule(prepared, tokenizer, batch_size=2)  # 16 training samples
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    module = RecordIds(str(tmp_path))
    trainer.fit(module, datamodule=dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 16


def test_a_resumed_epoch_augments_as_the_uninterrupted_one_with_any_number_of_workers(prepared, tokenizer):
    from med3dvlm.training.resumable_data import resumable

    def loader(workers: int):
        built = resumable(
            datamodule(prepared, tokenizer, batch_size=2, num_workers=workers).train_dataloader(), seed=3
        )
        built.sampler.set_epoch(1)
        return built

    whole = [(b["sample_id"], b["image"], b["question"]) for b in loader(2)]
    assert len(whole) >= 4 and not all(torch.equal(whole[0][1], b[1]) for b in whole[1:])
    resumed = loader(2)
    resumed.load_state_dict({"epoch": 1, "served": 2})  # killed after two batches of epoch 1
    rest = [(b["sample_id"], b["image"], b["question"]) for b in resumed]
    one_process = [(b["sample_id"], b["image"], b["question"]) for b in loader(0)]
    for want, got in zip(whole[2:], rest, strict=True):
        assert want[0] == got[0] and want[2] == got[2] and torch.equal(want[1], got[1])
    for want, got in zip(whole, one_process, strict=True):
        assert want[0] == got[0] and torch.equal(want[1], got[1])
    again = loader(2)
    again.sampler.set_epoch(2)
    assert not torch.equal(next(iter(again))["image"], whole[0][1])  # another epoch: other draws
