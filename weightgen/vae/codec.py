"""Whole layers through a WeightVAE: encode to latents, decode to weights, and a latent density."""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import WeightVAE
from .tokenize import KINDS, condition, detokenize, layer_kind, tokenize

DEPTH_BUCKETS = 4
_CHUNK = 65536  # tokens per decoder call: bounds memory on large layers


def weight_layers(model: nn.Module) -> list[dict]:
    """Every Linear / Conv2d weight (subclasses and recast layers too) in model order.

    Each entry: name, shape, groups, kind, relative depth, and ``direct``: whether ``name.weight``
    is the module's own tensor (False for recast layers and parametrized weights such as weight
    norm), i.e. whether it can be read from / written into the state dict as is. Subclasses such
    as timm's ``ScaledStdConv2d`` are direct: their forward transforms a plain weight.
    """
    from ..layers import RecastLayer

    found = [(n, tuple(m.bank.weight_shape) if isinstance(m, RecastLayer) else tuple(m.weight.shape), m)
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, RecastLayer))]
    last = max(len(found) - 1, 1)
    return [{"name": name, "shape": shape, "groups": getattr(m, "groups", 1),
             "kind": layer_kind(shape, getattr(m, "groups", 1)), "depth": i / last,
             "direct": not isinstance(m, RecastLayer) and isinstance(m._parameters.get("weight"), torch.Tensor)}
            for i, (name, shape, m) in enumerate(found)]


def _token_size(vae: WeightVAE) -> int:
    return vae.config.token_size


@torch.no_grad()
def encode_layer(vae: WeightVAE, weight: torch.Tensor, kind: str, depth: float) -> tuple[torch.Tensor, float]:
    """Latent means (N, latent_dim) of a layer's tokens, on the VAE's device, and the layer's scale (RMS)."""
    tokens = tokenize(weight, kind, depth, _token_size(vae))  # in the weight's dtype/device, moved chunk by chunk
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    mus = [vae.encode(tokens.values[i:i + _CHUNK].to(device, dtype), tokens.cond[i:i + _CHUNK].to(device, dtype))[0]
           for i in range(0, tokens.values.shape[0], _CHUNK)]
    return torch.cat(mus), tokens.scale


def decode_layer(vae: WeightVAE, latents: torch.Tensor, shape, kind: str, depth: float,
                 scale: float | torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Weight of ``shape`` from per-token latents (N, latent_dim), on their device; differentiable in them."""
    cond = (condition(shape, kind, depth, _token_size(vae)) if cond is None else cond).to(latents.device)
    values = torch.cat([vae.decode(latents[i:i + _CHUNK], cond[i:i + _CHUNK])
                        for i in range(0, latents.shape[0], _CHUNK)])  # (N, token_size)
    return detokenize(values, shape, 1.0, _token_size(vae)) * scale


def fit_latent_density(records: list[tuple[str, float, torch.Tensor]], latent_dim: int) -> dict:
    """Diagonal Gaussian of latent means per layer kind and depth bucket (JSON-able).

    records: (kind, depth, mu (N, latent_dim)). Empty cells fall back to the kind's pooled
    statistics, then to the standard normal prior.
    """
    cpu64 = {"dtype": torch.float64, "device": "cpu"}  # JSON-bound statistics, whatever device mu is on
    sums = {k: torch.zeros(DEPTH_BUCKETS + 1, latent_dim, **cpu64) for k in KINDS}
    squares = {k: torch.zeros(DEPTH_BUCKETS + 1, latent_dim, **cpu64) for k in KINDS}
    counts = {k: torch.zeros(DEPTH_BUCKETS + 1, **cpu64) for k in KINDS}
    for kind, depth, mu in records:
        mu = mu.detach().double().cpu()
        for bucket in (depth_bucket(depth), DEPTH_BUCKETS):  # the last row pools every depth
            sums[kind][bucket] += mu.sum(0)
            squares[kind][bucket] += mu.pow(2).sum(0)
            counts[kind][bucket] += mu.shape[0]
    density = {}
    for kind in KINDS:
        n = counts[kind][:, None]
        mean = torch.where(n > 0, sums[kind] / n.clamp(min=1), torch.zeros(1, **cpu64))
        var = torch.where(n > 1, squares[kind] / n.clamp(min=1) - mean ** 2, torch.ones(1, **cpu64))
        std = var.clamp(min=1e-6).sqrt()
        pooled = counts[kind][DEPTH_BUCKETS] > 0
        for b in range(DEPTH_BUCKETS):
            if counts[kind][b] == 0 and pooled:
                mean[b], std[b] = mean[DEPTH_BUCKETS], std[DEPTH_BUCKETS]
        density[kind] = {"mean": mean[:DEPTH_BUCKETS].tolist(), "std": std[:DEPTH_BUCKETS].tolist(),
                         "tokens": counts[kind][:DEPTH_BUCKETS].tolist(), "seen": bool(pooled)}
    return density


def depth_bucket(depth: float) -> int:
    return min(int(depth * DEPTH_BUCKETS), DEPTH_BUCKETS - 1)


def sample_latents(density: dict | None, kind: str, depth: float, count: int, latent_dim: int,
                   generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """(count, latent_dim) latents from the fitted density, or from N(0, I) without one.

    Drawn on the CPU (``generator`` is a CPU generator), so a seed gives the same latents on any
    device; the caller moves them.
    """
    noise = torch.randn(count, latent_dim, generator=generator, device="cpu") * temperature
    if not density or kind not in density:
        return noise
    cell = depth_bucket(depth)
    mean = torch.tensor(density[kind]["mean"][cell], dtype=torch.float32, device="cpu")
    std = torch.tensor(density[kind]["std"][cell], dtype=torch.float32, device="cpu")
    return mean + noise * std


def rms(weight: torch.Tensor) -> float:
    """Root mean square (float32 accumulation: plenty for a statistic, and no float64 copy)."""
    return torch.linalg.vector_norm(weight.detach().float()).item() / math.sqrt(weight.numel()) if weight.numel() else 0.0


__all__ = ["weight_layers", "encode_layer", "decode_layer", "fit_latent_density", "sample_latents",
           "depth_bucket", "rms"]
