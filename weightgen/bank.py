"""TemplateBank: the n shared templates of one group of same-shape layers."""
from __future__ import annotations

import torch
from torch import nn


class TemplateBank(nn.Module):
    """n templates of one weight shape, registered once on the model (``model.recast_banks``).

    Layers keep a plain reference to their bank, so ``state_dict()`` holds each bank once.
    """

    def __init__(self, templates: torch.Tensor, members: list[str]):
        super().__init__()
        # frozen by default: downstream tasks train only coefficients
        self.templates = nn.Parameter(templates, requires_grad=False)  # (n, *shape)
        self.members = list(members)

    @property
    def num_templates(self) -> int:
        return self.templates.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.templates.shape[1:])

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``(1/K) sum_k sum_i c[k, i] T[i]`` for coefficients (K, n) -> one weight (*shape)."""
        mixed = coefficients.mean(dim=0)  # (n,)
        flat = self.templates.reshape(self.num_templates, -1)  # (n, D)
        return (mixed @ flat).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return f"templates={self.num_templates}, shape={self.weight_shape}, layers={len(self.members)}"
