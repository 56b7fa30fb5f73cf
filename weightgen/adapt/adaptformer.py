"""AdaptFormer: a bottleneck MLP (down, ReLU, up) in parallel with each transformer block's MLP.

The adapter reads the MLP's input (after the block's second norm) and its output, scaled, is added
to the MLP's output. The up-projection starts at zero, so the start point is the backbone itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Wrapper, generator


class ParallelAdapter(Wrapper):
    def __init__(self, base_layer: nn.Module, dim: int, rank: int = 2, scale: float = 4.0, seed: int = 0,
                 device=None, dtype=None, out_dim: int | None = None):
        super().__init__(base_layer)
        out_dim = dim if out_dim is None else out_dim
        self.scale = scale
        self.down = nn.Linear(dim, rank, device="meta")
        self.up = nn.Linear(rank, out_dim, device="meta")
        down = torch.empty(rank, dim)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator(seed))
        kind = {"device": device, "dtype": dtype}
        self.down.weight = nn.Parameter(down.to(**kind))
        self.down.bias = nn.Parameter(torch.zeros(rank, **kind))
        self.up.weight = nn.Parameter(torch.zeros(out_dim, rank, **kind))
        self.up.bias = nn.Parameter(torch.zeros(out_dim, **kind))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * self.up(F.relu(self.down(x)))
