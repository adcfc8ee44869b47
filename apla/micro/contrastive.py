"""The micro world's CLIP-style pieces: an image tower, caption features read off the text encoder, and CLIP's
symmetric contrastive loss with repeated captions. The text stage of `apla.micro.pretrain` trains the micro text
encoder with them (as SD's CLIP text tower was trained on image-text pairs), and `apla.micro.image_tower` trains a
pixel-space image tower against the frozen result, for the CLIP metrics on micro-world videos (apla.eval.metrics).
No part of the APLA paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LatentImageTower(nn.Module):
    """The image side of the micro CLIP: scaled latents (B, 4, 16, 16) -> features (B, D). Flattening (not
    pooling) keeps where things are, so the text side must learn position words too."""

    def __init__(self, dim: int, channels: int = 4, side: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),  # (B, 64, side/2, side/2)
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),  # (B, 64, side/4, side/4)
            nn.Flatten(), nn.Linear(64 * (side // 4) ** 2, dim))  # (B, 64 * (side/4)^2) -> (B, D)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def caption_features(text_encoder, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, 77) ids -> (B, D): the mean of the final token states from the first end token on (end + padding)."""
    h = text_encoder(input_ids=ids).last_hidden_state  # (B, 77, D)
    after = (ids == eos_id).long().cumsum(1) > 0  # (B, 77): True from the first end token on
    return (h * after[..., None]).sum(1) / after.sum(1, keepdim=True)  # (B, 77, D) -> (B, D)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, labels: torch.Tensor, logit_scale) -> tuple:
    """Symmetric InfoNCE over a batch (CLIP's loss) where every pair with the same caption label is a match.
    Returns the loss and the image -> caption retrieval accuracy."""
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    logits = logit_scale.exp() * image @ text.T  # (B, B)
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)  # (B, B)
    target = same / same.sum(1, keepdim=True)
    # $$\tfrac12\big(\mathrm{CE}(\text{logits}, Y) + \mathrm{CE}(\text{logits}^\top, Y)\big)$$
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    accuracy = same.gather(1, logits.argmax(1, keepdim=True)).mean()
    return loss, accuracy
