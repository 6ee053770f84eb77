"""Shared fixtures for the SigLIP stage tests: tiny prepared data, tiny BERT, stage builder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from med3dvlm.data.corpus import corpus_texts
from med3dvlm.data.preparation import prepare_dataset
from med3dvlm.data.releases.m3d.synthetic import generate
from med3dvlm.models.tiny_assets import build_tiny_bert
from med3dvlm.stages.siglip import SigLIPStage

INPUT_SIZE = (16, 32, 32)
ENCODER_CONFIG = {"_target_": "med3dvlm.models.dcformer.DCFormer", "variant": "nano"}
BERT_SIZES = {
    "vocab_size": 400,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "max_length": 128,
}


def prepared_data(root: Path, cases: int = 24) -> Path:
    """Synthetic cases prepared at ``INPUT_SIZE`` as npy (built once per ``root``)."""
    out = root / "prepared"
    if not (out / "manifest.json").is_file():
        generate(root / "raw", cases=cases, seed=0, slices=16, size=32, workers=0)
        prepare_dataset(
            source=root / "raw", out=out, spatial_size=INPUT_SIZE, format="npy", workers=0, progress=False
        )
    return out


def tiny_bert(root: Path, data: Path) -> Path:
    path = root / "tiny_bert"
    if not path.exists():
        build_tiny_bert(path, corpus_texts(data), **BERT_SIZES)
    return path


def stage(
    bert: Path, lr: float = 1e-3, seed: int = 0, export_dir: Path | None = None, **kwargs
) -> SigLIPStage:
    torch.manual_seed(seed)
    return SigLIPStage(
        encoder=ENCODER_CONFIG,
        text_encoder={"_target_": "med3dvlm.models.towers.TextTower", "model_name_or_path": str(bert)},
        loss={"_target_": "med3dvlm.losses.siglip.SigLIPLoss"},
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": lr},
        scheduler={
            "_target_": "med3dvlm.training.optim.cosine_with_warmup",
            "_partial_": True,
            "warmup_ratio": 0.1,
        },
        input_size=INPUT_SIZE,
        embed_dim=32,
        export_dir=str(export_dir) if export_dir else None,
        **kwargs,
    )


class ResumableLoader(DataLoader):
    """A DataLoader over a fixed list of batches that Lightning can resume mid-epoch
    (``state_dict``/``load_state_dict``: the number of batches already served this epoch)."""

    def __init__(self, batches: list[dict]) -> None:
        super().__init__(batches, batch_size=None, shuffle=False)
        self.served = 0
        self._skip = 0

    def __iter__(self):
        start, self._skip = self._skip, 0
        self.served = start
        for batch in list(super().__iter__())[start:]:
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["served"]
