"""The vision-language model: 3D vision tower + projector + any Hugging Face causal LM.

The tokenizer gains an ``<im_patch>`` token; a prompt carries exactly ``num_image_tokens`` of
them, and the projected image features replace their embeddings wherever they sit (mask
scatter), so left and right padding both work. The ``<im_patch>`` embedding is held in its own
one-row parameter so that a stage can train that row alone without optimiser state for the whole
embedding matrix; ``sync_image_token_row`` writes it back into the LLM before saving.

``reference_placement=True`` reproduces the released Med3DVLM models' placement (see
``tests/data/reference/checkpoint_layouts.md`` (iv)): the original assumes a BOS token at position 0,
which Qwen2.5 does not have, and writes the features over positions 1..N of the sequence. With M3D's
prompts (image block first) the raw ``<im_patch>`` embedding stays at the first image position and
the first text token after the block is overwritten; with FLARE's VQA prompts the features overwrite
the system turn. Use it only to score or continue weights trained that way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

IMAGE_TOKEN = "<im_patch>"


def add_image_token(tokenizer: PreTrainedTokenizerBase, llm: PreTrainedModel, image_token: str) -> int:
    """Add ``image_token`` to the tokenizer and LLM (new rows = mean of the old ones); return its id.

    A tokenizer that already knows the token (a reloaded export) is left as it is.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    old_rows = llm.get_input_embeddings().weight.shape[0]
    if token_id >= old_rows:
        # Exact mean rows (HF's mean_resizing samples around the mean instead).
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            inp = llm.get_input_embeddings().weight
            inp[old_rows:] = inp[:old_rows].mean(dim=0)
            out = llm.get_output_embeddings()
            if out is not None and out.weight is not inp:
                out.weight[old_rows:] = out.weight[:old_rows].mean(dim=0)
    return token_id


class VisionLanguageModel(nn.Module):
    """Vision tower -> projector -> image tokens spliced into a causal LM's input embeddings.

    ``vision_tower(x (B,1,D,H,W))`` returns the list of stage outputs the ``projector`` takes;
    the projector returns ``(B, num_tokens, llm_hidden)``.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        projector: nn.Module,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str = IMAGE_TOKEN,
        reference_placement: bool = False,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.reference_placement = reference_placement
        self.image_token_id = add_image_token(tokenizer, llm, image_token)
        self.num_image_tokens = int(projector.num_tokens)
        row = llm.get_input_embeddings().weight[self.image_token_id].detach().clone()
        self.image_token_embedding = nn.Parameter(row)
        self.vision_tower_frozen = False

    @property
    def hidden_size(self) -> int:
        return self.llm.get_input_embeddings().weight.shape[1]

    def image_prompt(self) -> str:
        """The image block every prompt starts with: ``num_image_tokens`` ``<im_patch>`` tokens."""
        return self.image_token * self.num_image_tokens

    # --- freezing -------------------------------------------------------------------------

    def freeze_vision_tower(self) -> None:
        """No gradients and eval mode (BatchNorm statistics frozen) for the vision tower, kept
        in eval mode across later ``train()`` calls."""
        self.vision_tower.requires_grad_(False)
        self.vision_tower_frozen = True
        self.vision_tower.eval()

    def train(self, mode: bool = True) -> VisionLanguageModel:
        super().train(mode)
        if self.vision_tower_frozen:
            self.vision_tower.eval()
        return self

    # --- image features and the splice ----------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Vision-tower stage outputs for ``images (B,1,D,H,W)``."""
        return self.vision_tower(images)

    def project(self, encoder_outputs: list[torch.Tensor]) -> torch.Tensor:
        """Projector output ``(B, num_image_tokens, hidden)`` for the vision tower's outputs."""
        features = self.projector(encoder_outputs)
        if features.shape[1:] != (self.num_image_tokens, self.hidden_size):
            raise ValueError(
                f"projector output {tuple(features.shape)} does not match "
                f"(B, {self.num_image_tokens} image tokens, {self.hidden_size} LLM hidden size)"
            )
        return features

    def image_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Boolean mask of the positions the image features go to, checked per sample: the image
        tokens, or with ``reference_placement`` the ``num_image_tokens`` positions after each
        sample's first real token (``attention_mask`` tells where left padding ends)."""
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(dim=1)
        bad = (counts != self.num_image_tokens).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"sample {bad[0]} has {int(counts[bad[0]])} {self.image_token} tokens; the projector "
                f"produces {self.num_image_tokens} image features per volume"
            )
        if not self.reference_placement:
            return is_image
        # The original writes the features over positions 1..N of its (unpadded) sequence, assuming a
        # BOS at position 0, wherever the image tokens are: M3D's block starts the prompt, so the
        # features sit one later than its tokens; FLARE's VQA prompt carries the block inside the
        # user turn, so the features overwrite the system turn. Its released weights need exactly this.
        first = (
            attention_mask.long().argmax(dim=1) if attention_mask is not None else torch.zeros_like(counts)
        )
        if int((first + self.num_image_tokens).max()) >= input_ids.shape[1]:
            raise ValueError(
                "reference placement needs at least one token after the first image-feature block"
            )
        idx = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (idx > first[:, None]) & (idx <= first[:, None] + self.num_image_tokens)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings with ``image_features (B,N,hidden)`` spliced in at the image positions."""
        is_image_token = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = self.llm.get_input_embeddings()(input_ids)
        embeds = torch.where(is_image_token, self.image_token_embedding.to(embeds.dtype), embeds)
        targets = self.image_positions(input_ids, attention_mask).unsqueeze(-1)
        return embeds.masked_scatter(targets, image_features.to(embeds.dtype))

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions counted over real tokens only, so left padding does not shift them."""
        return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_outputs: list[torch.Tensor] | None = None,
    ) -> CausalLMOutputWithPast:
        """LM outputs (with ``loss`` when ``labels`` are given). Pass ``images`` or precomputed
        (cached) ``encoder_outputs``."""
        if encoder_outputs is None:
            if images is None:
                raise ValueError("forward needs images or encoder_outputs")
            encoder_outputs = self.encode_images(images)
        embeds = self.embed(input_ids, self.project(encoder_outputs), attention_mask)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=self.position_ids(attention_mask),
            labels=labels,
            use_cache=False,
        )

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
        **gen_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids ``(B, T_new)`` from the LLM's own ``generate``; pass left-padded prompts.

        Pass ``images (B,1,D,H,W)``, or ``images=None`` and precomputed ``image_features
        (B, num_image_tokens, hidden)`` (``project(encode_images(...))``, e.g. one encoding per
        distinct volume repeated for its questions)."""
        if (images is None) == (image_features is None):
            raise ValueError("generate needs exactly one of images and image_features")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left-padded prompts (a sample ends with padding)")
        if image_features is None:
            image_features = self.project(self.encode_images(images))
        embeds = self.embed(input_ids, image_features, attention_mask)
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        gen_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **gen_kwargs)

    def sync_image_token_row(self) -> None:
        """Copy the trained ``<im_patch>`` row into the LLM's embedding matrix."""
        with torch.no_grad():
            self.llm.get_input_embeddings().weight[self.image_token_id] = self.image_token_embedding
