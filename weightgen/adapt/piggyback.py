"""Piggyback: a real-valued mask per weight, thresholded to {0, 1} in the forward pass; gradients
reach the real values straight through the threshold. Masks start above the threshold (all ones)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Wrapper, plain_copy

THRESHOLD = 5e-3
MASK_INIT = 1e-2  # Piggyback's default: above the threshold, so the start mask keeps every weight


class PiggybackConv2d(Wrapper):
    foldable = True

    def __init__(self, base_layer: nn.Module, threshold: float = THRESHOLD, init: float = MASK_INIT):
        super().__init__(base_layer)
        weight = base_layer.weight.detach()
        self.threshold = threshold
        self.mask = nn.Parameter(torch.full_like(weight, init))  # (out, in, kh, kw)

    def binary_mask(self) -> torch.Tensor:
        hard = (self.mask > self.threshold).to(self.mask.dtype)
        return hard + self.mask - self.mask.detach()  # forward: hard; backward: identity (STE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return nn.Conv2d._conv_forward(base, x, base.weight * self.binary_mask(), base.bias)

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        layer = plain_copy(self.base_layer)
        layer.weight *= (self.mask > self.threshold).to(layer.weight.dtype)
        return layer
