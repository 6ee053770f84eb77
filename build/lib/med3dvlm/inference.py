"""Answer a question about one volume with an exported VLM (used by ``python -m med3dvlm.infer``)."""

from __future__ import annotations

import logging
import os

import torch

from med3dvlm.data.preprocess import WindowSpec, prepare_scan, window_range
from med3dvlm.data.scans import DEFAULT_MAX_VOXELS
from med3dvlm.data.volume_io import is_prepared, read_volume
from med3dvlm.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


def load_volume_for(model: VisionLanguageModel, path: str | os.PathLike, window: WindowSpec = None,
                    max_voxels: int = DEFAULT_MAX_VOXELS) -> torch.Tensor:
    """``(1, 1, D, H, W)`` input for ``model``.

    A volume ``prepare`` wrote (``.npy``, or a NIfTI with its header mark) is read as it is and must
    have the model's size; any other scan (``data.scans``: NIfTI, NRRD, MetaImage, a DICOM folder; up
    to ``max_voxels``) goes through exactly ``prepare``'s steps: ``window`` (HU) or min-max,
    foreground crop, resize. A raw-HU scan without a window is min-maxed, with a warning.
    """
    if model.input_size is None:
        raise ValueError("the model does not record its input size; load it with load_pretrained")
    if is_prepared(path):
        if window is not None:
            log.info("%s was prepared already (window as prepare chose); intensity.window is not applied again", path)
        volume = read_volume(path, shape=model.input_size)
    else:
        scan = prepare_scan(path, model.input_size, window_range(window), max_voxels=max_voxels)
        if scan.hu_unwindowed and window is None:
            log.warning("%s looks like raw CT in Hounsfield units and no intensity.window is set: it was min-max "
                        "normalised, which squeezes soft tissue into a sliver of [0, 1]; pass the window the "
                        "training data was prepared with (e.g. intensity.window=soft_tissue)", path)
        volume = scan.volume
    return torch.from_numpy(volume)[None, None]


@torch.no_grad()
def answer(model: VisionLanguageModel, image: torch.Tensor, prompt: str, max_new_tokens: int = 256) -> str:
    """Greedy answer to ``prompt`` (image block + question, from the prompt builder) for ``image``."""
    device = next(model.parameters()).device
    enc = model.tokenizer([prompt], return_tensors="pt")
    out = model.generate(image.to(device), enc["input_ids"].to(device), enc["attention_mask"].to(device),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
