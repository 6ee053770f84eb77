"""Datasets and the prompt builder over a tiny prepared folder: text, tokens, labels, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import (
    CASES,
    IMAGE_TOKEN,
    SHAPE,
    VQA_COLUMNS,
    make_prepared,
    make_tokenizer,
    report,
    write_csv,
)

from med3dvlm.data.datasets import CaptionDataset, RetrievalDataset, SkipLog, VolumeReader
from med3dvlm.data.errors import DataError
from med3dvlm.data.prompts import (
    CAPTION_QUESTIONS,
    IGNORE_INDEX,
    PromptBuilder,
    build_prompt,
    tokenize_example,
)
from med3dvlm.data.releases.m3d.samples import ClosedVQADataset, OpenVQADataset, YesNoVQADataset
from med3dvlm.data.volume_io import to_float

N_IMAGE = 4


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture()
def fresh(tmp_path) -> Path:
    """A prepared folder a test may damage."""
    return make_prepared(tmp_path / "prepared")


def prompts(tokenizer, max_length: int = 128) -> PromptBuilder:
    return PromptBuilder(tokenizer, IMAGE_TOKEN, N_IMAGE, max_length)


def reader() -> VolumeReader:
    return VolumeReader(SHAPE)


def target_text(tokenizer, sample) -> str:
    return tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX])


def prompt_text(tokenizer, sample) -> str:
    return tokenizer.decode(sample["input_ids"][sample["labels"] == IGNORE_INDEX])


def check_image(sample, root: Path) -> None:
    image = sample["image"]
    assert image.shape == (1, *SHAPE) and image.dtype == torch.float32
    stored = np.load(root / sample["image_path"])
    np.testing.assert_array_equal(image[0].numpy(), to_float(stored))


def test_caption_sample(tokenizer, prepared):
    ds = CaptionDataset(prepared, "train", prompts(tokenizer), reader())
    assert len(ds) == len(CASES["train"])
    sample = ds[1]
    check_image(sample, prepared)
    case = CASES["train"][1]
    assert sample["answer"] == report(case)
    assert sample["question"] == CAPTION_QUESTIONS[0]
    # prompt: N image tokens then the question (no separator, as M3D's captions); answer + EOS.
    assert prompt_text(tokenizer, sample) == IMAGE_TOKEN * N_IMAGE + CAPTION_QUESTIONS[0]
    assert target_text(tokenizer, sample) == " " + report(case) + tokenizer.eos_token
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert sample["input_ids"][:N_IMAGE].tolist() == [image_id] * N_IMAGE
    assert sample["labels"][-1] == tokenizer.eos_token_id
    assert sample["input_ids"].dtype == torch.long and sample["labels"].shape == sample["input_ids"].shape
    assert sample["task"] == "caption" and sample["sample_id"] == "caption/train/1"


def test_caption_random_question_uses_the_templates(tokenizer, prepared):
    ds = CaptionDataset(prepared, "train", prompts(tokenizer), reader(), random_question=True)
    questions = {ds[i % len(ds)]["question"] for i in range(60)}
    assert questions <= set(CAPTION_QUESTIONS) and len(questions) > 5
    assert len(CAPTION_QUESTIONS) == 15


def test_closed_vqa_sample(tokenizer, prepared):
    ds = ClosedVQADataset(prepared, "validation", prompts(tokenizer), reader())
    sample = ds[0]
    check_image(sample, prepared)
    case = CASES["validation"][0]  # 000005: organ spleen, letter B
    assert sample["question"] == (
        "Which organ holds the lesion? Choices: A. Liver A B. Spleen C. Liver C D. Liver D"
    )
    assert sample["answer"] == "B. Spleen" and sample["answer_choice"] == "B"
    assert sample["question_type"] == "3"
    assert prompt_text(tokenizer, sample) == IMAGE_TOKEN * N_IMAGE + " " + sample["question"]
    assert target_text(tokenizer, sample) == " B. Spleen" + tokenizer.eos_token
    assert case in sample["image_path"]


def test_open_and_yes_no_samples(tokenizer, prepared):
    open_sample = OpenVQADataset(prepared, "test", prompts(tokenizer), reader())[2]
    assert open_sample["answer"] == "Spleen" and open_sample["answer_choice"] == ""  # case 000009
    assert target_text(tokenizer, open_sample) == " Spleen" + tokenizer.eos_token
    yes_no = YesNoVQADataset(prepared, "test", prompts(tokenizer), reader())
    answers = [yes_no[i]["answer"] for i in range(len(yes_no))]
    assert answers == ["Yes", "No", "Yes"]
    assert target_text(tokenizer, yes_no[1]) == " No" + tokenizer.eos_token
    assert yes_no[1]["question"] == "Is there a lesion in the liver?"


def test_retrieval_sample_is_the_report_truncated(tokenizer, prepared):
    full = RetrievalDataset(prepared, "train", tokenizer, reader(), max_length=512)[0]
    assert full["text"] == report(CASES["train"][0])
    assert tokenizer.decode(full["input_ids"]) == full["text"]
    short = RetrievalDataset(prepared, "train", tokenizer, reader(), max_length=5)[0]
    assert short["input_ids"].tolist() == full["input_ids"][:5].tolist()
    assert "labels" not in short


def test_prompt_only_mode(tokenizer, prepared):
    sample = ClosedVQADataset(prepared, "test", prompts(tokenizer), reader(), prompt_only=True)[0]
    assert "labels" not in sample
    expected = tokenizer(build_prompt(IMAGE_TOKEN, N_IMAGE, sample["question"]))["input_ids"]
    assert sample["input_ids"].tolist() == expected
    builder = PromptBuilder(tokenizer, IMAGE_TOKEN, N_IMAGE)
    assert builder.vqa("Where?") == IMAGE_TOKEN * N_IMAGE + " Where?"


def test_truncation_cuts_the_answer_never_the_image_block(tokenizer):
    prompt = build_prompt(IMAGE_TOKEN, N_IMAGE, "Describe this medical scan with findings.")
    prompt_len = len(tokenizer(prompt)["input_ids"])
    answer = "A hypodense lesion of 9 mm in the liver. No ascites. " * 5
    cut = tokenize_example(tokenizer, prompt, answer, prompt_len + 3, IMAGE_TOKEN, N_IMAGE)
    assert cut.truncated and len(cut.input_ids) == prompt_len + 3
    assert cut.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tokenizer.eos_token_id not in cut.labels  # a cut answer has no EOS (as the original)
    whole = tokenize_example(tokenizer, prompt, "No", 512, IMAGE_TOKEN, N_IMAGE)
    assert not whole.truncated and whole.labels[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="no room for the answer"):
        tokenize_example(tokenizer, prompt, answer, prompt_len, IMAGE_TOKEN, N_IMAGE)


def test_image_token_must_be_a_single_token(tokenizer):
    prompt = build_prompt("<img>", N_IMAGE, "What?")  # "<img>" is not a token of this tokenizer
    with pytest.raises(ValueError, match="expected 4"):
        tokenize_example(tokenizer, prompt, "Yes", 128, "<img>", N_IMAGE)


def test_prompt_too_long_is_a_data_error_naming_the_csv(tokenizer, prepared):
    ds = ClosedVQADataset(prepared, "train", prompts(tokenizer, max_length=20), reader())
    with pytest.raises(DataError, match=r"M3D_VQA_train\.csv \(data row 1\).*no room"):
        ds[0]


# --- bad inputs: each names the file ----------------------------------------------------------


def first_volume(root: Path) -> Path:
    return root / json.loads((root / "M3D_Cap.json").read_text())["train"][0]["image"]


def test_truncated_volume(tokenizer, fresh):
    path = first_volume(fresh)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=rf"{path}: unreadable or truncated"):
        CaptionDataset(fresh, "train", prompts(tokenizer), reader())[0]


def test_wrong_shape(tokenizer, fresh):
    path = first_volume(fresh)
    np.save(path, np.zeros((8, 16, 12), dtype=np.uint8))
    with pytest.raises(DataError, match=rf"{path}: wrong shape \(8, 16, 12\), expected \(8, 16, 16\)"):
        CaptionDataset(fresh, "train", prompts(tokenizer), reader())[0]


@pytest.mark.parametrize("augment", [False, True])
def test_nan_volume(tokenizer, fresh, augment):
    from med3dvlm.data.transforms import Augmentation

    path = first_volume(fresh)
    bad = np.full(SHAPE, 0.5, dtype=np.float16)
    bad[1, 2, 3] = np.nan
    np.save(path, bad)
    volumes = VolumeReader(SHAPE, Augmentation() if augment else None)
    with pytest.raises(DataError, match=rf"{path}: volume contains NaN or Inf"):
        CaptionDataset(fresh, "train", prompts(tokenizer), volumes)[0]


def test_empty_report(tokenizer, fresh):
    text = fresh / "M3D_Cap" / "ct_case" / CASES["train"][0] / "text.txt"
    text.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{text}: empty report"):
        CaptionDataset(fresh, "train", prompts(tokenizer), reader())[0]
    with pytest.raises(DataError, match=rf"{text}: empty report"):
        RetrievalDataset(fresh, "train", tokenizer, reader())[0]


def test_missing_csv_column(tokenizer, fresh):
    csv_path = fresh / "M3D-VQA" / "M3D_VQA_train.csv"
    write_csv(csv_path, [], [c for c in VQA_COLUMNS if c != "Choice C"])
    with pytest.raises(DataError, match=rf"{csv_path}: missing CSV column\(s\) \['Choice C'\]"):
        ClosedVQADataset(fresh, "train", prompts(tokenizer), reader())
    # open VQA does not need the choices
    assert len(OpenVQADataset(fresh, "train", prompts(tokenizer), reader())) == 0


def test_missing_files(tokenizer, fresh):
    volume = first_volume(fresh)
    volume.unlink()
    with pytest.raises(DataError, match=rf"{volume}: file not found"):
        CaptionDataset(fresh, "train", prompts(tokenizer), reader())[0]
    csv_path = fresh / "M3D-VQA" / "M3D_VQA_yn_val.csv"
    csv_path.unlink()
    with pytest.raises(DataError, match=rf"{csv_path}: file not found"):
        YesNoVQADataset(fresh, "validation", prompts(tokenizer), reader())
    split_file = fresh / "M3D_Cap.json"
    split_file.unlink()
    with pytest.raises(DataError, match=rf"{split_file}: file not found"):
        CaptionDataset(fresh, "train", prompts(tokenizer), reader())


# --- on_error ------------------------------------------------------------------------------------


def test_on_error_skip_returns_the_next_valid_sample_and_lists_it(tokenizer, fresh, tmp_path):
    bad_text = fresh / "M3D_Cap" / "ct_case" / CASES["train"][1] / "text.txt"
    bad_text.write_text("", encoding="utf-8")
    bad_volume = fresh / json.loads((fresh / "M3D_Cap.json").read_text())["train"][2]["image"]
    bad_volume.write_bytes(b"garbage")
    skip_file = tmp_path / "run" / "skipped.tsv"
    log = SkipLog(skip_file)
    ds = CaptionDataset(fresh, "train", prompts(tokenizer), reader(), on_error="skip", skip_log=log)
    assert ds[0]["sample_id"] == "caption/train/0"
    assert ds[1]["sample_id"] == "caption/train/3"  # 1 and 2 are bad: the next valid one, not random
    assert ds[2]["sample_id"] == "caption/train/3"
    assert log.count == 3
    lines = skip_file.read_text().splitlines()
    assert lines[0].startswith(f"caption/train/1\t{bad_text}: empty report")
    assert lines[1].startswith(f"caption/train/2\t{bad_volume}: unreadable")
    default = CaptionDataset(fresh, "train", prompts(tokenizer), reader())
    with pytest.raises(DataError):
        default[1]


def test_on_error_skip_wraps_around_and_fails_when_nothing_is_valid(tokenizer, fresh):
    for case in CASES["validation"]:
        (fresh / "M3D_Cap" / "ct_case" / case / "text.txt").write_text("")
    ds = CaptionDataset(fresh, "validation", prompts(tokenizer), reader(), on_error="skip")
    with pytest.raises(DataError, match="every caption sample"):
        ds[1]
    assert ds.skip_log.count == 2
