"""VLM section: a training step of each stage on the tiny assets, the pretrain feature cache,
and generation samples/s at batch 1 vs batched (left padding)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from med3dvlm.artifacts.encoder_export import write_encoder_export
from med3dvlm.artifacts.record import ArtifactRecord
from med3dvlm.benchmarks import BenchOptions, BenchRow, median_seconds
from med3dvlm.data.prepared import m3d_preprocessing
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.tiny_assets import build_tiny_bert
from med3dvlm.models.tiny_qwen import build_tiny_qwen
from med3dvlm.stages.finetune import FinetuneStage
from med3dvlm.stages.pretrain import PretrainStage
from med3dvlm.stages.siglip import SigLIPStage

SECTION = "vlm"
INPUT_SIZE = (32, 64, 64)
ENCODER = {"_target_": "med3dvlm.models.dcformer.DCFormer", "variant": "nano"}
PROJECTOR = {
    "_target_": "med3dvlm.models.projectors.MixerProjector",
    "low_tokens": [32, 32],
    "high_tokens": [16, 32],
    "depth": 2,
    "mlp_depth": 2,
}
OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4}
SCHEDULER = {
    "_target_": "med3dvlm.training.optim.cosine_with_warmup",
    "_partial_": True,
    "warmup_ratio": 0.03,
}
LORA = {
    "_target_": "peft.LoraConfig",
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": "all-linear",
    "task_type": "CAUSAL_LM",
}
CORPUS = [
    f"Which organ contains the lesion? Choices: A. liver B. spleen C. kidney D. pancreas {x}. {y}"
    for x in "ABCD"
    for y in ("liver", "spleen", "left kidney", "pancreas")
]


def _batch(model, batch_size: int, side: str) -> dict[str, torch.Tensor]:
    model.tokenizer.padding_side = side
    texts = [model.image_prompt() + CORPUS[i % len(CORPUS)] * (1 + i % 3) for i in range(batch_size)]
    enc = model.tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {
        "image": torch.rand(batch_size, 1, *INPUT_SIZE),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }


def _step_seconds(stage, batch: dict, repeats: int) -> float:
    params = [p for p in stage.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    stage.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        stage(batch).backward()
        optimizer.step()

    return median_seconds(step, repeats=repeats, warmup=1)


def _siglip_row(tmp: Path, repeats: int) -> BenchRow:
    """A SigLIP step at the demo's shapes: DCFormer-nano, the tiny BERT, batch 16."""
    batch_size = 16
    bert = str(build_tiny_bert(tmp / "tiny_bert", CORPUS))
    stage = SigLIPStage(
        ENCODER,
        {"_target_": "med3dvlm.models.towers.TextTower", "model_name_or_path": bert},
        {"_target_": "med3dvlm.losses.siglip.SigLIPLoss", "distributed": "none"},
        OPTIMIZER,
        SCHEDULER,
        INPUT_SIZE,
        embed_dim=128,
    )
    encoded = stage.tokenizer(
        [CORPUS[i % len(CORPUS)] for i in range(batch_size)], return_tensors="pt", padding=True
    )
    batch = {"image": torch.rand(batch_size, 1, *INPUT_SIZE), **encoded}
    return BenchRow(
        SECTION,
        f"siglip step, batch {batch_size}",
        batch_size / _step_seconds(stage, batch, repeats),
        "samples/s",
        note=f"tiny BERT + DCFormer-nano, {INPUT_SIZE}",
    )


def _encoder_export(folder: Path) -> Path:
    record = ArtifactRecord(
        "encoder_export",
        "bench",
        INPUT_SIZE,
        m3d_preprocessing(),
        {"encoder": ENCODER},
        stage="siglip",
        which="final",
    )
    return write_encoder_export(folder, DCFormer("nano"), record)


def run(options: BenchOptions) -> list[BenchRow]:
    quick = options.quick
    repeats = 3 if quick else 10
    batch_size = 4
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        rows = [_siglip_row(Path(tmp), repeats)]
        llm: dict[str, Any] = {
            "_target_": "med3dvlm.models.llm.LanguageModel",
            "name_or_path": str(build_tiny_qwen(Path(tmp) / "tiny_qwen", CORPUS, vocab_size=512)),
        }
        pre = PretrainStage(
            str(_encoder_export(Path(tmp) / "export")), PROJECTOR, llm, INPUT_SIZE, OPTIMIZER, SCHEDULER
        )
        batch = _batch(pre.model, batch_size, "right")
        rows.append(
            BenchRow(
                SECTION,
                f"pretrain step, batch {batch_size}",
                batch_size / _step_seconds(pre, batch, repeats),
                "samples/s",
                note=f"tiny Qwen + DCFormer-nano, {INPUT_SIZE}, {pre.model.num_image_tokens} image tokens",
            )
        )
        pre.cache_encoder_features = True
        rows.append(
            BenchRow(
                SECTION,
                "pretrain step with encoder-feature cache (hits)",
                batch_size / _step_seconds(pre, batch, repeats),
                "samples/s",
                note="frozen encoder, augmentation off",
            )
        )
        pre.write_export(Path(tmp) / "handoff")
        fine = FinetuneStage(str(Path(tmp) / "handoff"), llm, LORA, OPTIMIZER, SCHEDULER)
        rows.append(
            BenchRow(
                SECTION,
                f"finetune step (LoRA, encoder trained), batch {batch_size}",
                batch_size / _step_seconds(fine, batch, repeats),
                "samples/s",
            )
        )
        model = fine.model.eval()
        gen_batch = 8
        prompts = _batch(model, gen_batch, "left")
        kwargs = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False}

        def one_by_one() -> None:
            for i in range(gen_batch):
                keep = prompts["attention_mask"][i].bool()
                model.generate(
                    prompts["image"][i : i + 1],
                    prompts["input_ids"][i : i + 1, keep],
                    prompts["attention_mask"][i : i + 1, keep],
                    **kwargs,
                )

        def batched() -> None:
            model.generate(prompts["image"], prompts["input_ids"], prompts["attention_mask"], **kwargs)

        single = gen_batch / median_seconds(one_by_one, repeats=max(1, repeats // 3))
        together = gen_batch / median_seconds(batched, repeats=max(1, repeats // 3))
        rows += [
            BenchRow(
                SECTION,
                "generation, batch 1",
                single,
                "samples/s",
                note="16 new tokens, greedy (the original generates one prompt at a time)",
            ),
            BenchRow(
                SECTION,
                f"generation, batch {gen_batch} (left padding)",
                together,
                "samples/s",
                note=f"{together / single:.1f}x batch 1",
            ),
        ]
    return rows
