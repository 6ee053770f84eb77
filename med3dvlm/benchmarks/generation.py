"""Generation section: evaluation throughput (samples/s) of the runner at batch 1 vs batched.

Measures the whole evaluation path (left-padding collate, image encoding, ``generate``, decoding,
CSV writing) on a VLM of the demo's shape (tiny Qwen + DCFormer-nano, 32 image tokens) with
prompts of different lengths. The prompts come as M3D-VQA and the demo's VQA splits hold them:
five consecutive questions per volume, which a batch encodes once; a second batched row gives
every prompt its own volume (report generation's shape). The original evaluation generates one
sample at a time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from med3dvlm.benchmarks import BenchOptions, BenchRow, median_seconds
from med3dvlm.data.prompts import PromptBuilder
from med3dvlm.evaluation.runner import generate_predictions
from med3dvlm.models.build import build_vlm
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.generation import GenerationSettings, model_generate_fn
from med3dvlm.models.llm import LanguageModel
from med3dvlm.models.tiny_qwen import build_tiny_qwen

SECTION = "generation"
INPUT_SIZE = (32, 64, 64)
# The demo's model (experiments/demo.yaml): 32 image tokens, tiny Qwen with a 1,024-token vocabulary.
PROJECTOR = {
    "_target_": "med3dvlm.models.projectors.MixerProjector",
    "low_tokens": [16, 16],
    "high_tokens": [8, 16],
    "depth": 2,
    "mlp_depth": 2,
}
QUESTIONS = [
    f"Which {part} shows the {size} lesion? Choices: A. liver B. spleen C. kidney D. pancreas"
    + " Describe it." * extra
    for size in ("small", "large")
    for part in ("organ", "plane")
    for extra in range(3)
]
QUESTIONS_PER_VOLUME = 5  # M3D-VQA: plane, phase, organ, abnormality, location


class _Prompts(Dataset):
    """``count`` prompts, ``per_volume`` consecutive ones about each (random) volume."""

    def __init__(self, prompts: PromptBuilder, count: int, per_volume: int) -> None:
        self.prompts, self.count, self.per_volume = prompts, count, per_volume

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        question = QUESTIONS[index % len(QUESTIONS)]
        ids = self.prompts.tokenize(self.prompts.prompt(question), None).input_ids
        volume = index // self.per_volume
        generator = torch.Generator().manual_seed(volume)
        return {
            "image": torch.rand(1, *INPUT_SIZE, generator=generator),
            "input_ids": torch.tensor(ids),
            "question": question,
            "image_path": f"volume_{volume}.npy",
        }


def run(options: BenchOptions) -> list[BenchRow]:
    quick = options.quick
    count = 32 if quick else 64
    settings = GenerationSettings(max_new_tokens=16)
    threads = torch.get_num_threads()
    # One thread: on a small shared CPU a contended second thread slows the big batched matmuls far
    # more than batch-1 steps, so the ratio would measure the neighbours instead of batching.
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            llm = LanguageModel(str(build_tiny_qwen(Path(tmp) / "tiny_qwen", QUESTIONS, vocab_size=1024)))
            torch.manual_seed(0)
            model = build_vlm(DCFormer("nano"), PROJECTOR, llm, INPUT_SIZE)[0].eval()
            prompts = PromptBuilder(model.tokenizer, model.image_token, model.num_image_tokens, 1024)
            generate = model_generate_fn(model, settings)

            def samples_per_second(batch_size: int, per_volume: int) -> float:
                dataset = _Prompts(prompts, count, per_volume)
                csv_path = Path(tmp) / "predictions.csv"

                def evaluate() -> None:
                    csv_path.unlink(missing_ok=True)
                    generate_predictions(
                        dataset,
                        lambda batch, i: {"Question": batch["question"][i]},
                        generate,
                        csv_path,
                        ["Question", "Pred"],
                        model.tokenizer.pad_token_id,
                        batch_size=batch_size,
                        progress=False,
                    )

                return count / median_seconds(evaluate, 1 if quick else 5)

            single = samples_per_second(1, QUESTIONS_PER_VOLUME)
            batched = {n: samples_per_second(n, QUESTIONS_PER_VOLUME) for n in (8, 16)}
            distinct = samples_per_second(8, 1)
    finally:
        torch.set_num_threads(threads)
    note = (
        f"{count} VQA prompts, {QUESTIONS_PER_VOLUME} per volume; {settings.max_new_tokens} new tokens, greedy; "
        "demo model shape; 1 thread, median"
    )
    return [
        BenchRow(
            SECTION,
            "evaluation generation, batch 1",
            single,
            "samples/s",
            note=note + " (the original generates one prompt at a time)",
        ),
        *(
            BenchRow(
                SECTION,
                f"evaluation generation, batch {n} (left padding)",
                value,
                "samples/s",
                note=f"{value / single:.1f}x batch 1 (target >= 4x); each volume encoded once per batch",
            )
            for n, value in batched.items()
        ),
        BenchRow(
            SECTION,
            "evaluation generation, batch 8, one volume per prompt",
            distinct,
            "samples/s",
            note=f"{distinct / single:.1f}x batch 1 (report generation's shape)",
        ),
    ]
