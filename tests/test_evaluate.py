"""Evaluation runner with a fake generate function: outputs, per-type scores, resume, entry point."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from med3dvlm.evaluation.runner import generate_predictions
from med3dvlm.evaluation.tasks import ClosedVQATask, EvalContext, LeakageTask, OpenVQATask
from med3dvlm.models.generation import GenerationSettings, distinct_rows, model_generate_fn

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [  # (question type, answer letter, the fake model's output)
    ("1", "A", "A. Axial"),
    ("1", "B", "A. B."),
    ("2", "C", "C"),
    ("3", "D", "The answer is D."),
    ("3", "A", "B. Liver"),
    ("4", "B", "B. Yes"),
    ("5", "C", "c. left"),
]


class FakeClosedVQA(Dataset):
    """Prompt-only samples shaped like ClosedVQADataset's, with prompts of different lengths."""

    def __len__(self) -> int:
        return len(QUESTIONS)

    def __getitem__(self, index: int) -> dict:
        qtype, letter, _ = QUESTIONS[index]
        return {
            "image": torch.full((1, 2, 2, 2), float(index)),
            "input_ids": torch.arange(1, 3 + index),
            "question": f"question {index}?",
            "answer": f"{letter}. text {index}",
            "answer_choice": letter,
            "question_type": qtype,
            "image_path": f"vol/{index}.npy",
        }


class FakeModel:
    """Answers by the image's fill value; records the batches it saw; can fail after N calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.seen: list[int] = []

    def __call__(self, batch) -> list[str]:
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        mask = batch["attention_mask"]
        assert bool((mask[:, -1] == 1).all()), "prompts must be left-padded"
        indices = [int(img.flatten()[0]) for img in batch["image"]]
        self.seen += indices
        return [QUESTIONS[i][2] for i in indices]


def context(tmp_path: Path, **kw) -> EvalContext:
    return EvalContext(out_dir=str(tmp_path), data_dir=str(tmp_path), batch_size=3, progress=False, **kw)


def test_closed_vqa_outputs_and_per_type_accuracy(tmp_path):
    result = ClosedVQATask().evaluate(context(tmp_path), FakeClosedVQA(), FakeModel(), pad_token_id=0)
    acc, strict = result.metrics["metrics"]["accuracy"], result.metrics["metrics"]["accuracy_strict"]
    # substring: A. Axial ok, "A. B." ok for B, "C" no, "The answer is D." ok, B for A no, B ok, c no.
    assert acc == {
        "Plane": 1.0,
        "Phase": 0.0,
        "Organ": 0.5,
        "Abnormality": 1.0,
        "Location": 0.0,
        "Overall": pytest.approx(4 / 7),
    }
    assert strict == {
        "Plane": 0.5,
        "Phase": 1.0,
        "Organ": 0.5,
        "Abnormality": 1.0,
        "Location": 0.0,
        "Overall": pytest.approx(4 / 7),
    }
    with open(result.files["predictions"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:6] == ["Question Type", "Question", "Answer", "Answer Choice", "Pred", "Image Path"]
    assert [r["Correct"] for r in rows] == ["1", "1", "0", "1", "0", "1", "0"]
    assert json.loads(result.files["metrics"].read_text())["metrics"]["count"]["Organ"] == 2
    assert "| Organ | 50.00 | 50.00 | 2 |" in result.files["table"].read_text()
    assert result.files["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "greedy decoding" in result.table


def test_resume_after_interruption_generates_only_the_rest(tmp_path):
    reference = ClosedVQATask().evaluate(context(tmp_path / "full"), FakeClosedVQA(), FakeModel(), 0)
    first = FakeModel(fail_after=1)  # dies during the second batch
    with pytest.raises(KeyboardInterrupt):
        ClosedVQATask().evaluate(context(tmp_path / "run"), FakeClosedVQA(), first, 0)
    csv_path = tmp_path / "run" / "predictions_vqa_closed.csv"
    with open(csv_path, "a") as fh:  # a torn row from the kill
        fh.write('3,"question 3?",D. te')
    second = FakeModel()
    resumed = ClosedVQATask().evaluate(context(tmp_path / "run"), FakeClosedVQA(), second, 0)
    assert first.seen == [0, 1, 2] and second.seen == [3, 4, 5, 6]
    assert resumed.files["predictions"].read_text() == reference.files["predictions"].read_text()
    assert resumed.metrics["metrics"] == reference.metrics["metrics"]


def test_resume_refuses_rows_of_other_data(tmp_path):
    csv_path = tmp_path / "p.csv"
    columns = ["Question", "Pred"]
    csv_path.write_text("Question,Pred\nsomething else?,A.\n")

    def row_of(batch, i):
        return {"Question": batch["question"][i]}

    with pytest.raises(ValueError, match="does not match sample 0"):
        generate_predictions(FakeClosedVQA(), row_of, FakeModel(), csv_path, columns, 0)
    csv_path.write_text("Other,Pred\nx,y\n")
    with pytest.raises(ValueError, match="another task"):
        generate_predictions(FakeClosedVQA(), row_of, FakeModel(), csv_path, columns, 0)


def test_generation_settings_are_explicit():
    assert GenerationSettings().kwargs() == {"max_new_tokens": 256, "do_sample": False}
    sampled = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9).kwargs()
    assert sampled == {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0).kwargs()


def test_open_vqa_scores_per_type(tmp_path, nltk_data):
    class Open(FakeClosedVQA):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            sample["answer"] = QUESTIONS[index][2]  # the fake model answers exactly
            return sample

    result = OpenVQATask().evaluate(context(tmp_path, nltk_data=nltk_data), Open(), FakeModel(), 0)
    metrics = result.metrics["metrics"]
    assert metrics["bleu"]["Overall"] == pytest.approx(1.0)
    assert metrics["rouge1"]["Organ"] == pytest.approx(1.0)
    # METEOR's fragmentation penalty keeps exact one-word answers at 0.5.
    assert metrics["meteor"]["Phase"] == pytest.approx(0.5)
    assert metrics["meteor"]["Overall"] > 0.8
    assert result.metrics["bertscore"] is None and "BERTScore not computed" in result.table


def test_leakage_task_on_prepared_layout(tmp_path):
    data = tmp_path / "prepared"
    cases = {
        "train": [("000001", "axial", "Liver cyst.")],
        "test": [
            ("000001", "coronal", "Other."),
            ("000002", "axial", "Liver cyst."),
            ("000003", "axial", "X."),
        ],
    }
    split_file = {}
    for split, items in cases.items():
        split_file[split] = []
        for case, series, text in items:
            folder = data / "M3D_Cap" / "ct_case" / case
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{series}.txt").write_text(text)
            split_file[split].append(
                {
                    "image": f"M3D_Cap/ct_case/{case}/{series}.npy",
                    "text": f"M3D_Cap/ct_case/{case}/{series}.txt",
                }
            )
    (data / "M3D_Cap.json").write_text(json.dumps(split_file))
    result = LeakageTask().run(EvalContext(out_dir=str(tmp_path / "run"), data_dir=str(data)))
    assert "| leaking_test_items | 2 |" in result.table
    out = tmp_path / "run"
    report = json.loads((out / "leakage.json").read_text())
    assert report["captions"]["leaking"] == {
        "M3D_Cap/ct_case/000001/coronal.npy": ["case"],
        "M3D_Cap/ct_case/000002/axial.npy": ["text"],
    }


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny exported VLM (untrained) and a prepared folder at its input size."""
    from helpers.data import make_prepared
    from helpers.vlm import (
        ENCODER_CONFIG,
        INPUT_SIZE,
        pretrain,
    )

    from med3dvlm.artifacts.model_folder import save_pretrained
    from med3dvlm.artifacts.record import ArtifactRecord
    from med3dvlm.data.prepared import m3d_preprocessing

    root = tmp_path_factory.mktemp("eval_model")
    stage = pretrain(root)
    record = ArtifactRecord(
        "model_folder",
        "unit",
        INPUT_SIZE,
        m3d_preprocessing(),
        {"vision_tower": ENCODER_CONFIG, "projector": stage.projector_config},
        prompt_format="m3d",
    )
    folder = save_pretrained(stage.model, root / "model", record)
    return folder, make_prepared(root / "prepared", shape=INPUT_SIZE)


def test_entry_point_closed_vqa_on_an_exported_model(exported_model, tmp_path):
    model, data = exported_model
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "med3dvlm.evaluate",
        "task=vqa_closed",
        f"model={model}",
        f"data_dir={data}",
        "context.generation.max_new_tokens=3",
        "context.batch_size=2",
        "context.progress=false",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "| Overall |" in proc.stdout and "Accuracy (substring)" in proc.stdout
    with open(out / "predictions_vqa_closed.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(r["Correct"] in ("0", "1") for r in rows)
    for name in ("metrics_vqa_closed.json", "metrics_vqa_closed.md", "scores_vqa_closed.png"):
        assert (out / name).stat().st_size > 0


def test_report_task_runs_the_model_batched(exported_model, tmp_path, nltk_data):
    from med3dvlm.evaluation.tasks import ReportTask

    model, data = exported_model
    ctx = EvalContext(
        out_dir=str(tmp_path),
        data_dir=str(data),
        model=str(model),
        batch_size=3,
        progress=False,
        generation=GenerationSettings(max_new_tokens=3),
        nltk_data=nltk_data,
    )
    result = ReportTask(limit=2).run(ctx)
    assert result.metrics["num_samples"] == 2
    assert set(result.metrics["metrics"]) == {"bleu", "rouge1", "meteor"}
    with open(result.files["predictions"], newline="") as fh:
        assert list(next(csv.DictReader(fh)))[:3] == ["Question", "Ground Truth", "pred"]


def test_distinct_rows():
    rows, inverse = distinct_rows(["a", "a", "b", "a", "c", "b"])
    assert rows == [0, 2, 4] and inverse.tolist() == [0, 0, 1, 0, 2, 1]


@pytest.mark.parametrize("zero_images", [False, True])
def test_model_generate_encodes_each_volume_once_and_matches_the_model(exported_model, zero_images):
    from med3dvlm.artifacts.model_folder import load_pretrained
    from med3dvlm.data.collate import PadCollate
    from med3dvlm.data.prompts import PromptBuilder

    loaded = load_pretrained(exported_model[0])
    model = loaded.model
    prompts = PromptBuilder(model.tokenizer, model.image_token, model.num_image_tokens, 512)
    g = torch.Generator().manual_seed(0)
    volumes = {name: torch.rand(1, *loaded.record.input_size, generator=g) for name in ("a", "b")}
    names = ["a", "a", "b", "a"]
    samples = [
        {
            "image": volumes[name],
            "image_path": name,
            "input_ids": torch.tensor(
                prompts.tokenize(prompts.prompt("Is there a lesion?" + " Where?" * i), None).input_ids
            ),
        }
        for i, name in enumerate(names)
    ]
    batch = PadCollate(model.tokenizer.pad_token_id, padding_side="left")(samples)
    encoded: list[int] = []
    model.vision_tower.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    settings = GenerationSettings(max_new_tokens=4)
    answers = model_generate_fn(model, settings, zero_images=zero_images)(batch)
    assert encoded == [2]  # two distinct volumes
    assert all(answers), answers
    images = torch.zeros_like(batch["image"]) if zero_images else batch["image"]
    expected = model.generate(images, batch["input_ids"], batch["attention_mask"], **settings.kwargs())
    assert answers == [t.strip() for t in model.tokenizer.batch_decode(expected, skip_special_tokens=True)]
    with pytest.raises(ValueError, match="left-padded"):
        model_generate_fn(model, settings)(PadCollate(model.tokenizer.pad_token_id)(samples))
