"""Models built from our own configs: the projector with its sizes derived from the encoder and the
LLM actually configured, and the VLM around them. (Artifacts from elsewhere are rebuilt through the
allow-list of :mod:`med3dvlm.models.components` instead.)"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from med3dvlm.models.llm import LanguageModel
from med3dvlm.models.projectors import encoder_sizes
from med3dvlm.models.vlm import VisionLanguageModel


def plain_config(node: Mapping | DictConfig) -> dict[str, Any]:
    """A ``_target_`` node as a plain, resolved dict (what a hand-off records)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def build_projector(
    projector: Mapping, vision_tower: nn.Module, input_size: Iterable[int], llm_dim: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The projector from its config node with the sizes derived from the encoder and LLM, and that
    completed config (which rebuilds it exactly)."""
    config = plain_config(projector)
    config.pop("_partial_", None)
    config.update(encoder_sizes(vision_tower, tuple(input_size)), llm_dim=llm_dim)
    return instantiate(config), config


def build_vlm(
    vision_tower: nn.Module,
    projector: Mapping,
    llm: LanguageModel,
    input_size: Iterable[int],
    reference_placement: bool = False,
) -> tuple[VisionLanguageModel, dict[str, Any]]:
    """VLM from a loaded vision tower, a projector config node and an LLM source; also returns the
    completed projector config."""
    language_model = llm.load_model()
    tokenizer = llm.load_tokenizer()
    hidden = language_model.get_input_embeddings().weight.shape[1]
    proj, proj_config = build_projector(projector, vision_tower, input_size, hidden)
    model = VisionLanguageModel(
        vision_tower, proj, language_model, tokenizer, reference_placement=reference_placement
    )
    return model, proj_config
