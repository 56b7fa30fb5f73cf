"""The one cosine similarity every module uses: flattened, accumulated in float64, clamped."""
from __future__ import annotations

import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flattened tensors, clamped to [-1, 1], accumulated in float64.

    float32 ``norm``/``dot`` on CPU lose ~1e-4..1e-3 relative over multi-million-entry weights
    (an exact vit_large fit read as cos 0.9987), which swamps the 1 - cos being measured.
    Two zero tensors count as identical (1.0); a zero against a non-zero tensor as 0.0.
    """
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    if a.shape != b.shape:
        raise ValueError(f"cosine of tensors of different sizes ({a.numel()} vs {b.numel()})")
    denom = (a.norm() * b.norm()).item()
    if denom == 0:
        return 1.0 if a.abs().sum() == b.abs().sum() else 0.0
    return max(-1.0, min(1.0, torch.dot(a, b).item() / denom))
