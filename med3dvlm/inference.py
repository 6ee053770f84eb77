"""Answer a question about one volume with an exported VLM (used by ``python -m med3dvlm.infer``)."""

from __future__ import annotations

import os

import torch

from med3dvlm.data.preprocess import DEFAULT_MAX_VOXELS, load_nifti_as_dhw, preprocess_volume
from med3dvlm.data.volume_io import read_volume
from med3dvlm.models.vlm import VisionLanguageModel


def load_volume_for(model: VisionLanguageModel, path: str | os.PathLike,
                    max_voxels: int = DEFAULT_MAX_VOXELS) -> torch.Tensor:
    """``(1, 1, D, H, W)`` input for ``model``: a NIfTI of any size (up to ``max_voxels``, checked from
    its header) is preprocessed exactly like ``prepare`` (min-max, foreground crop, resize); a
    prepared ``.npy`` must already fit."""
    if model.input_size is None:
        raise ValueError("the model does not record its input size; load it with load_pretrained")
    if str(path).endswith((".nii", ".nii.gz")):
        volume = preprocess_volume(load_nifti_as_dhw(path, max_voxels), model.input_size, source=path)
    else:
        volume = read_volume(path, shape=model.input_size)
    return torch.from_numpy(volume)[None, None]


@torch.no_grad()
def answer(model: VisionLanguageModel, image: torch.Tensor, prompt: str, max_new_tokens: int = 256) -> str:
    """Greedy answer to ``prompt`` (image block + question, from the prompt builder) for ``image``."""
    device = next(model.parameters()).device
    enc = model.tokenizer([prompt], return_tensors="pt")
    out = model.generate(image.to(device), enc["input_ids"].to(device), enc["attention_mask"].to(device),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
