"""CLR (channel-wise lightweight reprogramming): a depthwise 3x3 conv after a conv, dirac-initialised
so that it starts as the identity."""
from __future__ import annotations

import torch
from torch import nn

from .base import Wrapper


class CLRConv(Wrapper):
    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        weight = base_layer.weight
        channels = weight.shape[0]
        self.reprogram = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False,
                                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            nn.init.dirac_(self.reprogram.weight, groups=channels)  # (C, 1, 3, 3): 1 at the centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reprogram(self.base_layer(x))
