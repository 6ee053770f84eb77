"""Shared fixtures for the VLM stage and export tests: tiny Qwen, nano DCFormer, toy batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from med3dvlm.artifacts.encoder_export import write_encoder_export
from med3dvlm.artifacts.record import ArtifactRecord, record_file
from med3dvlm.data.prepared import m3d_preprocessing
from med3dvlm.data.preprocess import Preprocessing
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.llm import LanguageModel
from med3dvlm.models.tiny_qwen import build_tiny_qwen

INPUT_SIZE = (32, 64, 64)
ENCODER_CONFIG = {"_target_": "med3dvlm.models.dcformer.DCFormer", "variant": "nano"}
PROJECTOR_CONFIG = {
    "_target_": "med3dvlm.models.projectors.MixerProjector",
    "encoder_channels": "???",
    "encoder_tokens": "???",
    "llm_dim": "???",
    "low_tokens": [4, 4],
    "high_tokens": [2, 4],
    "depth": 2,
    "mlp_depth": 2,
}
CORPUS = [
    f"Is there a {size} lesion in the {organ}? {answer}"
    for size in ("small", "large")
    for organ in ("liver", "spleen", "kidney")
    for answer in ("Yes", "No")
]


def tiny_llm(root: Path) -> LanguageModel:
    path = root / "tiny_qwen"
    if not path.exists():
        build_tiny_qwen(path, CORPUS, vocab_size=400, hidden_size=64)
    return LanguageModel(str(path))


def llm_node(root: Path) -> dict[str, Any]:
    return {"_target_": "med3dvlm.models.llm.LanguageModel", "name_or_path": tiny_llm(root).name_or_path}


def encoder(seed: int = 0) -> DCFormer:
    torch.manual_seed(seed)
    return DCFormer(variant="nano")


def encoder_export(root: Path, seed: int = 0) -> Path:
    """A stage-1 export of :func:`encoder` ``(seed)`` at ``INPUT_SIZE`` (written once per root and seed)."""
    folder = root / f"encoder_export_{seed}"
    if record_file(folder) is None:
        record = ArtifactRecord(
            "encoder_export",
            "unit",
            INPUT_SIZE,
            m3d_preprocessing(),
            {"encoder": ENCODER_CONFIG},
            stage="siglip",
            which="final",
        )
        write_encoder_export(folder, encoder(seed), record)
    return folder


def optimizer(lr: float = 1e-2, name: str = "torch.optim.AdamW") -> dict[str, Any]:
    return {"_target_": name, "_partial_": True, "lr": lr}


def scheduler() -> dict[str, Any]:
    return {"_target_": "med3dvlm.training.optim.cosine_with_warmup", "_partial_": True, "warmup_ratio": 0.03}


def lora(r: int = 4, alpha: int = 8) -> dict[str, Any]:
    return {
        "_target_": "peft.LoraConfig",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        "task_type": "CAUSAL_LM",
    }


def pretrain(root: Path, lr: float = 1e-2, seed: int = 0, encoder_seed: int = 0, **kwargs: Any):
    """A pretrain stage on the seeded encoder export and the tiny LLM (projector seeded by ``seed``)."""
    from med3dvlm.stages.pretrain import PretrainStage

    export = encoder_export(root, encoder_seed)
    torch.manual_seed(seed)
    return PretrainStage(
        str(export),
        PROJECTOR_CONFIG,
        llm_node(root),
        INPUT_SIZE,
        optimizer(lr),
        scheduler(),
        experiment="unit",
        **kwargs,
    )


def finetune(root: Path, pretrain_export: Path, lr: float = 1e-2, **kwargs: Any):
    """A finetune stage (LoRA r 4 on every linear layer) on a pretrain hand-off."""
    from med3dvlm.stages.finetune import FinetuneStage

    kwargs.setdefault("lora", lora())
    return FinetuneStage(
        str(pretrain_export),
        llm_node(root),
        optimizer=optimizer(lr),
        scheduler=scheduler(),
        experiment="unit",
        **kwargs,
    )


def toy_batches(model, count: int = 4, batch_size: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Image-dependent yes/no batches in the datamodule's format (right padding, labels = answer + EOS)."""
    g = torch.Generator().manual_seed(seed)
    tok = model.tokenizer
    batches = []
    for _ in range(count):
        images = torch.rand(batch_size, 1, *INPUT_SIZE, generator=g) * 0.2
        rows = []
        for b in range(batch_size):
            bright = bool(torch.rand(1, generator=g) < 0.5)
            if bright:
                images[b, :, 8:24, 16:48, 16:48] += 0.8
            prompt = tok(model.image_prompt() + "Is there a large lesion in the liver?")["input_ids"]
            answer = tok(" Yes" if bright else " No")["input_ids"] + [tok.eos_token_id]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        batches.append({"image": images, **padded(rows, tok.pad_token_id)})
    return batches


def fit(stage: L.LightningModule, batches: list[dict], steps: int) -> None:
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(stage, loader)


def model_folder(root: Path, preprocessing: Preprocessing | None = None) -> Path:
    """A model folder of the untrained pretrain stage (no training: for the commands' checks), its record
    holding ``preprocessing`` (default M3D's); written once per root."""
    from med3dvlm.artifacts.model_folder import save_pretrained

    folder = root / "model"
    if record_file(folder) is None:
        stage = pretrain(root)
        record = ArtifactRecord(
            "model_folder",
            "unit",
            INPUT_SIZE,
            preprocessing or m3d_preprocessing(),
            {"vision_tower": ENCODER_CONFIG, "projector": stage.projector_config},
            prompt_format="m3d",
        )
        save_pretrained(stage.model, folder, record)
    return folder


def finetuned(root: Path) -> tuple[L.LightningModule, Path, list[dict]]:
    """A finetune stage trained a few steps on toy batches, its hand-off folder and the batches
    (pretrain 1 step -> hand-off -> finetune 3 steps, LoRA on every linear layer)."""
    pre = pretrain(root, export_dir=str(root / "pre"))
    fit(pre, toy_batches(pre.model, count=1), steps=1)
    stage = finetune(
        root, root / "pre", train_input_embeddings=True, train_lm_head=True, export_dir=str(root / "fine")
    )
    batches = toy_batches(stage.model)
    fit(stage, batches, steps=3)
    return stage, root / "fine", batches


def padded(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``(token ids, labels)`` rows right-padded into ``input_ids``, ``attention_mask`` and ``labels``."""
    longest = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), longest), pad_token_id)
    labels = torch.full((len(rows), longest), -100)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, (row_ids, row_labels) in enumerate(rows):
        ids[b, : len(row_ids)] = torch.tensor(row_ids)
        labels[b, : len(row_ids)] = torch.tensor(row_labels)
        mask[b, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
