"""LoRA on a Linear / Conv2d / RECAST layer, with an optional q,v-only target on a fused qkv.

Hand-written rather than peft: timm's ViT fuses q, k, v into one ``qkv`` Linear (peft would adapt
k too), and under ``recast+melo`` that layer is a RecastLinear, which peft's LoRA does not wrap.
One small class serves ``lora`` and ``recast+melo`` alike, so the two are compared like for like.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Wrapper, generator, plain_copy


class LoRALinear(Wrapper):
    """``y = base(x) + scaling * B A x`` on chosen output slices (``slices``: (start, stop) each).

    A fused qkv of width 3d adapted on q and v uses ``slices=[(0, d), (2d, 3d)]``: one (A, B) pair
    per slice, as LoRA on separate q and v projections would be.
    """

    foldable = True

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, slices: list[tuple[int, int]] | None = None,
                 seed: int = 0):
        super().__init__(base_layer)
        like = base_layer.weight.detach()  # a RECAST layer's combined weight: its device and dtype
        out_features, in_features = base_layer.out_features, base_layer.in_features
        self.slices = [tuple(s) for s in (slices or [(0, out_features)])]
        widths = {stop - start for start, stop in self.slices}
        if len(widths) != 1:
            raise ValueError("LoRA slices must have one width")
        width = widths.pop()
        self.rank, self.scaling = rank, alpha / rank
        a = torch.empty(len(self.slices), rank, in_features)  # (S, r, in)
        for s in range(len(self.slices)):  # peft's init: A kaiming-uniform, B zero (start point unchanged)
            nn.init.kaiming_uniform_(a[s], a=math.sqrt(5), generator=generator(seed + s))
        self.lora_A = nn.Parameter(a.to(device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.zeros(len(self.slices), width, rank, device=like.device, dtype=like.dtype))

    def delta_weight(self) -> torch.Tensor:
        """(out, in) weight update, zero outside the slices."""
        weight = self.base_layer.weight
        delta = torch.zeros_like(weight)
        for s, (start, stop) in enumerate(self.slices):
            delta[start:stop] = self.scaling * (self.lora_B[s] @ self.lora_A[s])
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        hidden = torch.einsum("...i,sri->...sr", x, self.lora_A)  # (..., S, r)
        update = torch.einsum("...sr,sor->...so", hidden, self.lora_B) * self.scaling  # (..., S, width)
        pieces, cursor = [], 0
        for s, (start, stop) in enumerate(self.slices):
            if start > cursor:
                pieces.append(out.new_zeros(*out.shape[:-1], start - cursor))
            pieces.append(update[..., s, :])
            cursor = stop
        if cursor < out.shape[-1]:
            pieces.append(out.new_zeros(*out.shape[:-1], out.shape[-1] - cursor))
        return out + torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        layer = plain_copy(self.base_layer)
        layer.weight += self.delta_weight()
        return layer


class LoRAConv2d(Wrapper):
    """peft's conv LoRA: A is a conv like the base (r output channels), B a 1x1 conv, zero-init."""

    foldable = True

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, seed: int = 0):
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        weight = base_layer.weight.detach()
        out_channels, in_channels, kh, kw = weight.shape
        self.rank, self.scaling = rank, alpha / rank
        a = torch.empty(rank, in_channels, kh, kw)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator(seed))
        self.lora_A = nn.Parameter(a.to(weight.device, weight.dtype))  # (r, in, kh, kw)
        self.lora_B = nn.Parameter(torch.zeros(out_channels, rank, 1, 1, device=weight.device, dtype=weight.dtype))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * torch.einsum("or,rikl->oikl", self.lora_B[:, :, 0, 0], self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        hidden = nn.Conv2d._conv_forward(base, x, self.lora_A, None)  # the base's stride, padding and padding mode
        return base(x) + F.conv2d(hidden, self.lora_B) * self.scaling

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        layer = plain_copy(self.base_layer)
        layer.weight += self.delta_weight()
        return layer
