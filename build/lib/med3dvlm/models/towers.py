"""The two towers of the SigLIP stage: each maps its input to an L2-normalised ``(B, embed_dim)``.

Attribute names follow the original ``DEC_CLIP`` state dict so an importer maps it by prefix:

    original                 ours
    vision_encoder.*         image_tower.encoder.*      (through the DCFormer key converter)
    mm_vision_proj.*         image_tower.mm_vision_proj.*
    language_encoder.*       text_tower.language_encoder.*
    mm_language_proj.*       text_tower.mm_language_proj.*
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel

TextPooling = Literal["first", "mean"]


class TextTower(nn.Module):
    """A Hugging Face encoder (``AutoModel``: BERT, DistilBERT, ...) with a linear head.

    Args:
        model_name_or_path: Hub name or local folder of the model; its tokenizer lives there too
            (``tokenizer_path``).
        embed_dim: width of the shared image-text embedding.
        pooling: ``"first"``: the first token's last hidden state ([CLS], as the original);
            ``"mean"``: the mean over the tokens the attention mask keeps.
        trust_remote_code: allow model code from the model's folder (off: no code is run from it).
    """

    def __init__(
        self,
        model_name_or_path: str,
        embed_dim: int,
        pooling: TextPooling = "first",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("first", "mean"):
            raise ValueError(f"TextTower pooling={pooling!r}: expected 'first' or 'mean'")
        self.language_encoder = AutoModel.from_pretrained(
            str(model_name_or_path), trust_remote_code=trust_remote_code
        )
        if isinstance(getattr(self.language_encoder, "pooler", None), nn.Module):
            # BERT-style poolers (a dense layer on [CLS]) are not used here; left in, their parameters
            # get no gradient, which DDP rejects and the optimiser would carry for nothing.
            self.language_encoder.pooler = None
        config = self.language_encoder.config
        # DistilBERT names the width ``dim``; its config maps ``hidden_size`` onto it.
        self.hidden_size: int = int(config.hidden_size)
        self.max_length: int = int(config.max_position_embeddings)
        self.tokenizer_path = str(model_name_or_path)
        self.pooling = pooling
        self.embed_dim = embed_dim
        self.mm_language_proj = nn.Linear(self.hidden_size, embed_dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"TextTower: {input_ids.shape[1]} tokens exceed the {self.max_length} positions of "
                f"{self.tokenizer_path}; tokenize with truncation to max_length"
            )
        hidden = self.language_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(self.mm_language_proj(pooled), dim=-1)


class ImageTower(nn.Module):
    """A volume encoder with a linear head on the mean of its last stage's tokens (as the original).

    ``encoder``: ``forward((B, C, D, H, W)) -> list[(B, tokens_i, C_i)]`` with ``out_channels``.
    """

    def __init__(self, encoder: nn.Module, embed_dim: int) -> None:
        super().__init__()
        channels = getattr(encoder, "out_channels", None)
        if not channels:
            raise ValueError(
                f"ImageTower: the encoder {type(encoder).__name__} has no out_channels list; it must "
                f"state the channels of its stage outputs"
            )
        self.encoder = encoder
        self.embed_dim = embed_dim
        self.mm_vision_proj = nn.Linear(int(channels[-1]), embed_dim)

    def forward(self, image: Tensor) -> Tensor:
        last = self.encoder(image)[-1]
        return F.normalize(self.mm_vision_proj(last.mean(dim=1)), dim=-1)
