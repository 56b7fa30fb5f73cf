"""Similarity measures every module uses: weight cosine (flattened, float64, clamped); prediction
agreement and linear CKA of two models' outputs on the same probe inputs."""
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


def prediction_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of inputs on which two models' top-1 predictions agree.

    ``a``, ``b``: logits (N, classes) of the same N inputs (or already-argmaxed labels, (N,)). Only
    meaningful between models whose output classes mean the same thing (same task and head).
    """
    a = a.detach().argmax(-1) if a.ndim == 2 else a.detach()
    b = b.detach().argmax(-1) if b.ndim == 2 else b.detach()
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"prediction_agreement needs predictions of the same inputs, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("prediction_agreement needs at least one input")
    return (a == b.to(a.device)).double().mean().item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) of two feature matrices of the same inputs.

    ``x``: (N, p), ``y``: (N, q), rows the same N inputs. ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``
    after centring each column, in float64. Invariant to orthogonal transforms and isotropic scaling
    of either side (so to permutations of units), in [0, 1]; 1 for features that differ by such a
    transform. A matrix with no variance (constant features) gives 0.
    """
    x = x.detach().reshape(len(x), -1).double()
    y = y.detach().reshape(len(y), -1).double().to(x.device)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"linear_cka needs the same N >= 2 inputs on both sides, got {len(x)} and {len(y)}")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    # the N x N Gram form is cheaper when features outnumber inputs; the feature form otherwise
    if x.shape[1] + y.shape[1] > len(x):
        kx, ky = x @ x.T, y @ y.T
        cross, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross, nx, ny = (y.T @ x).pow(2).sum(), (x.T @ x).norm(), (y.T @ y).norm()
    denom = (nx * ny).item()
    if denom == 0:
        return 0.0
    return max(0.0, min(1.0, cross.item() / denom))
