"""Artifacts written by an earlier version keep loading and computing the same: an encoder export
and a merged model folder written before the package was reorganised (tests/data/legacy)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from med3dvlm.artifacts.encoder_export import load_encoder_export
from med3dvlm.artifacts.model_folder import load_pretrained

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


def test_an_encoder_export_of_the_previous_layout_loads_and_computes_the_same():
    expected = load_file(str(LEGACY / "expected.safetensors"))
    encoder, config = load_encoder_export(LEGACY / "encoder_export")
    assert config["_target_"] == "med3dvlm.models.dcformer.DCFormer"
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(expected["image"])[-1], expected["encoder_last"])


def test_a_model_folder_of_the_previous_layout_loads_and_computes_the_same():
    expected = load_file(str(LEGACY / "expected.safetensors"))
    model = load_pretrained(LEGACY / "model")
    image = expected["image"]
    ids = model.tokenizer([model.image_prompt() + "Is there a lesion in the liver?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.project(model.encode_images(image)), expected["image_features"])
        logits = model(ids["input_ids"], ids["attention_mask"], images=image).logits
    torch.testing.assert_close(logits, expected["logits"])
