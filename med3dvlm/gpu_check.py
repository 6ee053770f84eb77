"""``python -m med3dvlm.gpu_check`` (``make gpu-check``): a few FSDP + bf16 steps of each stage at the
paper's shapes on one GPU, printing step time, samples/s and peak GPU memory.

Shapes: 128x256x256 volumes, DCFormer-small, a randomly initialised Qwen2.5-0.5B-architecture LLM
(Qwen2Config: 24 layers, width 896, 151,936-token vocabulary; input embedding and head untied as in
Qwen2.5-7B, so 630M parameters; a locally trained tokenizer padded to that vocabulary), the Mixer
projector to its width (256 image tokens).
Everything is built in a scratch folder (synthetic data, LLM, exports) and the three stages run
through ``python -m med3dvlm.train trainer=fsdp``, as a user would. Without a CUDA GPU it says so
and exits 0. Typical total: a few minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

STAGES = ("siglip", "pretrain", "finetune")
QWEN2_5_0_5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}


class StepTimer(L.Callback):
    """Records each training step's wall time (CUDA-synchronised), the batch size and the peak GPU
    memory; rank 0 writes them as JSON to ``path`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seconds: list[float] = []
        self.batch_size = 0
        self._started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        torch.cuda.synchronize()
        self.batch_size = int(batch["image"].shape[0])
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._started)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            record = {
                "seconds": self.seconds,
                "batch_size": self.batch_size,
                "world_size": trainer.world_size,
                "peak_bytes": torch.cuda.max_memory_allocated(),
            }
            Path(self.path).write_text(json.dumps(record))


def build_llm(out: Path, corpus: list[str]) -> int:
    """A random Qwen2.5-0.5B-architecture model in bf16 with a tokenizer padded to its vocabulary;
    returns the parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from med3dvlm.models.tiny_qwen import train_tokenizer

    tokenizer = train_tokenizer(corpus, 2000)
    # One slot stays free for the <im_patch> token the VLM adds.
    tokenizer.add_tokens([f"<|filler_{i}|>" for i in range(QWEN2_5_0_5B["vocab_size"] - len(tokenizer) - 1)])
    config = Qwen2Config(
        **QWEN2_5_0_5B, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def prepare_data(root: Path, cases: int) -> Path:
    """Synthetic cases prepared at 128x256x256 (npy) under ``root/demo/prepared``, where the tiny
    text-encoder config finds its corpus."""
    from med3dvlm.data.preparation import prepare_dataset
    from med3dvlm.data.releases.m3d.synthetic import generate

    out = root / "demo" / "prepared"
    generate(root / "raw", cases=cases, seed=0, slices=128, size=256)
    prepare_dataset(source=root / "raw", out=out, spatial_size=(128, 256, 256), format="npy", progress=False)
    return out


def stage_command(stage: str, work: Path, llm: Path, steps: int, batch_size: int, timer: Path) -> list[str]:
    data = work / "data"
    args = [
        f"stage={stage}",
        "trainer=fsdp",
        "trainer.accelerator=gpu",
        "trainer.devices=1",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=1000",
        "trainer.enable_progress_bar=false",
        "+trainer.limit_val_batches=0",
        "test=false",
        "logger=csv",
        "experiment_name=gpu_check",
        f"paths.data_dir={data}",
        f"paths.log_dir={work / 'outputs'}",
        f"hydra.run.dir={work / 'outputs' / stage}",
        "data=m3d",
        f"data.data_dir={data / 'demo' / 'prepared'}",
        f"data.batch_size={batch_size}",
        "data.num_workers=4",
        "encoder=dcformer_small",
        "projector=mixer",
        "~callbacks.model_checkpoint",
        "~callbacks.step_checkpoint",
        "+callbacks.gpu_timer._target_=med3dvlm.gpu_check.StepTimer",
        f"+callbacks.gpu_timer.path={timer}",
    ]
    if stage == "siglip":
        return [*args, "text_encoder=tiny"]
    return [*args, "llm=qwen2_5_7b", f"llm.name_or_path={llm}"]


def summarise(stage: str, record: dict[str, Any], warmup: int) -> str:
    times = record["seconds"][warmup:] or record["seconds"]
    step = statistics.median(times)
    samples = record["batch_size"] * record["world_size"] / step
    return f"| {stage} | {len(record['seconds'])} | {step:.3f} | {samples:.2f} | {record['peak_bytes'] / 2**30:.1f} |"


def arguments() -> argparse.ArgumentParser:
    """The command's arguments (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=8, help="training steps per stage (the first 3 are warm-up)"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step")
    parser.add_argument("--cases", type=int, default=24, help="synthetic cases to prepare")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="PATH",
        help="a checkout of the original (mirthAI/Med3DVLM): also time its encoder and Mixer beside "
        "ours on this GPU in bf16 (its code runs here)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="med3dvlm-gpu-check-") as scratch:
        work = Path(args.work_dir or scratch)
        print(f"gpu-check on {torch.cuda.get_device_name(0)}, scratch {work}", flush=True)
        prepared = prepare_data(work / "data", args.cases)
        from med3dvlm.data.corpus import corpus_texts

        params = build_llm(work / "qwen2_0_5b", corpus_texts(prepared))
        print(
            f"data and a {params / 1e6:.0f}M-parameter Qwen2 ready after {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
        rows = []
        for stage in STAGES:
            timer = work / f"{stage}_timing.json"
            cmd = [
                sys.executable,
                "-m",
                "med3dvlm.train",
                *stage_command(stage, work, work / "qwen2_0_5b", args.steps, args.batch_size, timer),
            ]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if result.returncode != 0 or not timer.is_file():
                print(f"gpu-check: stage {stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
                return 1
            rows.append(summarise(stage, json.loads(timer.read_text()), warmup=min(3, args.steps - 1)))
            print(rows[-1], flush=True)
    print(
        f"\nFSDP2 (trainer=fsdp), bf16 compute, 1 GPU, batch {args.batch_size}, 128x256x256, DCFormer-small, "
        f"Qwen2 {params / 1e6:.0f}M (random), Mixer 256 tokens; median of steps after warm-up"
    )
    print("| stage | steps | step s | samples/s | peak GPU memory GiB |\n|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.reference is not None:
        print("\nSide by side with the original on this GPU (bf16 autocast, interleaved pairs):")
        print(side_by_side(args.reference))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def side_by_side(reference: Path) -> str:
    """The encoder and projector bench rows on the GPU against the original at ``reference``."""
    from med3dvlm.benchmarks import BenchOptions, bench_table, encoder, projector

    options = BenchOptions(reference=reference)
    return bench_table(encoder.run(options, device="cuda") + projector.run(options, device="cuda"))


if __name__ == "__main__":
    sys.exit(main())
