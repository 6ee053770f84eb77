"""Artifacts written by earlier versions keep loading and computing the same (tests/data/legacy): an
encoder export and a model folder written before the package was reorganised (d5c4110), and every
artifact kind as main wrote them before artifacts carried one record (4c4914b). Their preprocessing
is taken as M3D's, and the log says so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from med3dvlm.artifacts.encoder_export import load_encoder_export, load_siglip_export
from med3dvlm.artifacts.handoff import load_finetune_handoff, load_pretrain_handoff
from med3dvlm.artifacts.model_folder import load_pretrained, write_merged_model
from med3dvlm.artifacts.record import read_record
from med3dvlm.models.llm import LanguageModel

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"
MAIN = LEGACY / "4c4914b"
QUESTION = "Is there a lesion in the liver?"


def _logits(model, image, question: str, separator: str = "") -> torch.Tensor:
    ids = model.tokenizer([model.image_prompt() + separator + question], return_tensors="pt")
    with torch.no_grad():
        return model(ids["input_ids"], ids["attention_mask"], images=image).logits


def _says_inferred(caplog) -> bool:
    return "records no preprocessing (written by an older version): assuming M3D's" in caplog.text


def test_an_encoder_export_of_the_previous_layout_loads_and_computes_the_same(caplog):
    expected = load_file(str(LEGACY / "expected.safetensors"))
    with caplog.at_level(logging.WARNING):
        encoder, record = load_encoder_export(LEGACY / "encoder_export")
    assert record.components["encoder"]["_target_"] == "med3dvlm.models.dcformer.DCFormer"
    assert record.preprocessing.inferred and record.preprocessing.dataset == "m3d" and _says_inferred(caplog)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(expected["image"])[-1], expected["encoder_last"])


def test_a_model_folder_of_the_previous_layout_loads_and_computes_the_same():
    expected = load_file(str(LEGACY / "expected.safetensors"))
    model = load_pretrained(LEGACY / "model").model
    image = expected["image"]
    with torch.no_grad():
        torch.testing.assert_close(model.project(model.encode_images(image)), expected["image_features"])
    torch.testing.assert_close(_logits(model, image, QUESTION), expected["logits"])


def test_every_artifact_kind_main_wrote_before_records_loads_and_computes_the_same(caplog):
    expected = load_file(str(MAIN / "expected.safetensors"))
    image = expected["image"]
    llm = LanguageModel(str(MAIN / "tiny_qwen"))  # the hand-offs name the LLM at its old absolute path
    with caplog.at_level(logging.WARNING):
        towers = load_siglip_export(MAIN / "siglip_export")
    assert (
        _says_inferred(caplog) and towers.record.stage == "siglip" and towers.record.text_pooling == "first"
    )
    ids = towers.tokenizer(["The liver shows a small cyst."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(towers.image_tower(image), expected["siglip_image"])
        torch.testing.assert_close(
            towers.text_tower(ids["input_ids"], ids["attention_mask"]), expected["siglip_text"]
        )

    # Stage 2's hand-off held no encoder: it names the export (by a path relative to where training ran).
    with pytest.raises(
        FileNotFoundError, match=r"holds no encoder; the encoder export it names \(runs/siglip/export\)"
    ):
        load_pretrain_handoff(MAIN / "projector_handoff", llm)
    pre, record = load_pretrain_handoff(
        MAIN / "projector_handoff", llm, encoder_export=MAIN / "siglip_export"
    )
    assert record.kind == "projector_handoff" and record.preprocessing.inferred
    with torch.no_grad():
        torch.testing.assert_close(
            pre.eval().project(pre.encode_images(image)), expected["projector_features"]
        )

    fine, record = load_finetune_handoff(MAIN / "adapter_handoff", llm=llm)
    assert record.trained_embeddings == ("input_embeddings", "lm_head")
    torch.testing.assert_close(_logits(fine, image, QUESTION, " "), expected["finetune_logits"])

    loaded = load_pretrained(MAIN / "model")
    assert loaded.record.kind == "model_folder" and loaded.record.prompt_format == "m3d"
    torch.testing.assert_close(_logits(loaded.model, image, QUESTION, " "), expected["model_logits"])


def test_a_legacy_hand_off_exports_into_a_model_folder_with_a_record(tmp_path):
    expected = load_file(str(MAIN / "expected.safetensors"))
    folder = write_merged_model(
        MAIN / "adapter_handoff", tmp_path / "model", llm=LanguageModel(str(MAIN / "tiny_qwen"))
    )
    record = read_record(folder, "model_folder", verify_files=True)
    assert record.parent("adapter").record.kind == "adapter_handoff" and record.preprocessing.inferred
    model = load_pretrained(folder).model
    torch.testing.assert_close(_logits(model, expected["image"], QUESTION, " "), expected["model_logits"])


@pytest.mark.parametrize("folder", ["siglip_export/export.json", "model/config.json"])
def test_legacy_records_are_found_by_kind(folder):
    record = read_record((MAIN / folder).parent, quiet=True)
    assert record.version == 1 and record.kind in ("encoder_export", "model_folder")
