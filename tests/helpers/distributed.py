"""The distributed stage tests' shared parts: every stage built the same way in every process,
global batches and each process's share of them, the global-batch loss of every step, a fit, and
the one-process references every multi-process run is compared with (``one_process_references``)."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.siglip import INPUT_SIZE as SIGLIP_INPUT_SIZE
from helpers.siglip import ResumableLoader, prepared_data, tiny_bert
from helpers.siglip import stage as siglip_stage
from helpers.vlm import INPUT_SIZE, finetune, lora, padded, pretrain, tiny_llm
from med3dvlm.data.datamodule import M3DDataModule

STAGES = ("siglip", "pretrain", "finetune")
STEPS = 3
CHECKPOINT_STEP = 2
ANSWERS = (
    "Yes",
    "No",
    "a large lesion in the liver",
    "No. The spleen is small",
    "Yes, in the kidney",
    "a small lesion",
)


# --- stages and batches (built identically in every process) ------------------------------------------


def deterministic(module: L.LightningModule) -> L.LightningModule:
    """Dropout off and BatchNorm on its running statistics: per-process batch statistics and dropout
    draws would differ from one process (on GPUs, ``sync_batchnorm`` covers BatchNorm)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            # Kept in eval mode whatever Lightning's train() calls say (the encoder reads a
            # BatchNorm's mode before running it, so switching it from a hook would be too late).
            layer.eval()
            layer.train = functools.partial(lambda bn, mode=True: bn, layer)
    return module


def build_stage(name: str, root: Path, export_dir: Path | None = None) -> L.LightningModule:
    """The stage with SGD + momentum: unlike Adam, its updates scale with the gradient (a wrongly
    scaled gradient shows in the next losses), and it does not blow float noise in near-zero
    gradients up to full-size steps (the exports of 1 and 2 processes stay comparable)."""
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    if name == "siglip":
        module = siglip_stage(root / "tiny_bert", export_dir=export_dir)
    elif name == "pretrain":
        module = pretrain(root, export_dir=export_dir)
    else:
        torch.manual_seed(0)
        module = finetune(
            root,
            root / "pre",
            train_vision_tower=True,
            train_input_embeddings=True,
            train_lm_head=True,
            export_dir=export_dir,
            lora=lora(),
        )
    module.optimizer_factory = sgd
    return deterministic(module)


def siglip_batches(data: Path, bert: Path, count: int, batch_size: int = 4) -> list[dict]:
    from transformers import AutoTokenizer

    dm = M3DDataModule(
        data,
        mixture="retrieval",
        tokenizer=AutoTokenizer.from_pretrained(bert),
        max_length=128,
        batch_size=batch_size,
        num_workers=0,
        augment=False,
        spatial_size=SIGLIP_INPUT_SIZE,
    )
    dm.setup("fit")
    loader = torch.utils.data.DataLoader(
        dm.datasets["train"], batch_size=batch_size, shuffle=False, collate_fn=dm.collate()
    )
    keys = ("image", "input_ids", "attention_mask")
    return [{k: b[k] for k in keys} for b, _ in zip(loader, range(count))]


def answer_batches(model, count: int, batch_size: int = 4) -> list[dict]:
    """Right-padded image + question + answer batches whose halves hold different numbers of answer
    tokens (so a per-process token mean would differ from the global one)."""
    g = torch.Generator().manual_seed(0)
    tok = model.tokenizer
    prompt = tok(model.image_prompt() + "Is there a lesion?")["input_ids"]
    batches = []
    for i in range(count):
        rows = []
        for b in range(batch_size):
            answer = tok(" " + ANSWERS[(i + b * (1 + b)) % len(ANSWERS)])["input_ids"] + [tok.eos_token_id]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        images = torch.rand(batch_size, 1, *INPUT_SIZE, generator=g)
        batches.append({"image": images, **padded(rows, tok.pad_token_id)})
    return batches


def rank_share(batches: list[dict], rank: int, world: int) -> list[dict]:
    """This process's contiguous part of every global batch (no distributed sampler: a fixed order)."""
    size = batches[0]["input_ids"].shape[0] // world
    return [{k: v[rank * size : (rank + 1) * size] for k, v in b.items()} for b in batches]


class GlobalLoss(L.Callback):
    """Every step's training loss averaged over the processes (the global-batch loss), to a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.losses))


def fit(
    module,
    batches,
    out: Path,
    strategy="auto",
    devices: int = 1,
    max_steps: int = STEPS,
    num_nodes: int = 1,
    ckpt_path: str | None = None,
    callbacks=(),
) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        gradient_clip_val=1.0,
        default_root_dir=out,
        callbacks=list(callbacks),
    )
    trainer.fit(module, ResumableLoader(batches), ckpt_path=ckpt_path)


def losses(path: Path) -> list[float]:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class References:
    """``root``: tiny data, BERT, Qwen and the pretrain hand-off ``root/pre``; ``out``: the global
    batches (``batches.pt``) and each stage's one-process losses (``one/<stage>.json``) and exports."""

    root: Path
    out: Path
    batches: dict[str, list[dict]]


def one_process_references(root: Path) -> References:
    """Assets, ``STEPS`` global batches per stage, and every stage fitted on them in this process."""
    data = prepared_data(root / "demo")
    bert = tiny_bert(root, data)
    tiny_llm(root)
    out = root / "out"
    out.mkdir()
    handoff = build_stage("pretrain", root)  # the hand-off every finetune run goes on from
    handoff.write_export(root / "pre")
    vlm = handoff.model
    batches = {
        "siglip": siglip_batches(data, bert, STEPS),
        "pretrain": answer_batches(vlm, STEPS),
        "finetune": answer_batches(vlm, STEPS),
    }
    torch.save(batches, out / "batches.pt")
    for name in STAGES:
        fit(
            build_stage(name, root, export_dir=out / "one" / f"{name}_export"),
            batches[name],
            out / "one" / name,
            callbacks=[GlobalLoss(out / "one" / f"{name}.json")],
        )
    return References(root, out, batches)


def references_built_once(root: Path) -> References:
    """:func:`one_process_references` in ``root``, built by the first process that asks while the
    others wait, then read from there (processes of one test run share ``root``)."""
    done = root / "complete"
    with FileLock(f"{root}.lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # what a failed build left
            root.mkdir()
            references = one_process_references(root)
            done.touch()
            return references
    return References(root, root / "out", torch.load(root / "out" / "batches.pt", weights_only=True))
