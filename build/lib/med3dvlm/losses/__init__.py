"""Contrastive image-text losses: SigLIP (the method's) and CLIP InfoNCE (for ablations)."""

from med3dvlm.losses.clip import ClipLoss, clip_loss
from med3dvlm.losses.siglip import SigLIPLoss, pairwise_sigmoid_sum, siglip_loss

__all__ = ["ClipLoss", "SigLIPLoss", "clip_loss", "pairwise_sigmoid_sum", "siglip_loss"]
