"""Paths between two checkpoints of one architecture: in weight space and through a WeightVAE's latents.

Three paths per point ``alpha`` in [0, 1] (:data:`METHODS`):

* ``weight_lerp``: every tensor of the state dict interpolated linearly.
* ``latent_lerp`` / ``latent_slerp``: each Linear/Conv2d weight the VAE can handle is encoded at both
  ends (latent means per token + layer scale), the latents are interpolated (linearly, or spherically
  per token), the log scale linearly, and the result is decoded. Everything else (biases, norms,
  skipped layers such as the head, layers of a kind the VAE never saw) follows ``weight_lerp``.

At ``alpha`` 0 and 1 every path is the original checkpoint, not its VAE reconstruction. With
``residual=True`` each end's decoding error is faded in linearly, so latent paths are continuous at
both ends; without it they are the raw decodings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..metrics import cosine
from .codec import decode_layer, encode_layer, weight_layers
from .model import WeightVAE
from .prior import trained_kinds
from .tokenize import condition

METHODS = ("weight_lerp", "latent_lerp", "latent_slerp")
_PARALLEL = 1e-4  # |sin(angle)| below this: slerp == lerp to ~1e-8, and the formula is ill-conditioned

__all__ = ["METHODS", "InterpolationPath", "slerp", "lerp_state", "weight_cosine"]


def slerp(u: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """Row-wise spherical interpolation of (N, D) latents (Shoemake's formula on the raw vectors).

    Rows that are (anti)parallel or zero have no unique great circle: they fall back to lerp.
    ``t`` = 0 / 1 return ``u`` / ``v`` exactly.
    """
    u64, v64 = u.double(), v.double()
    nu, nv = u64.norm(dim=-1, keepdim=True), v64.norm(dim=-1, keepdim=True)  # (N, 1)
    tiny = torch.finfo(torch.float64).tiny
    cos = ((u64 * v64).sum(-1, keepdim=True) / (nu * nv).clamp_min(tiny)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)  # (N, 1)
    sin = torch.sin(omega)
    ok = (sin > _PARALLEL) & (nu > 0) & (nv > 0)
    sin = torch.where(ok, sin, torch.ones_like(sin))
    spherical = torch.sin((1.0 - t) * omega) / sin * u64 + torch.sin(t * omega) / sin * v64
    return torch.where(ok, spherical, torch.lerp(u64, v64, t)).to(u.dtype)


def lerp_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Linear interpolation of float tensors; others (BN step counters) come from the nearer end."""
    return {k: torch.lerp(a[k], b[k], alpha) if a[k].is_floating_point() else (a[k] if alpha < 0.5 else b[k]).clone()
            for k in a}


def weight_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return cosine(x, y)


@dataclass
class _Layer:
    name: str
    shape: tuple
    kind: str
    depth: float
    cond: torch.Tensor  # (N, COND_DIM)
    mu_a: torch.Tensor  # (N, latent_dim)
    mu_b: torch.Tensor
    log_scale_a: float
    log_scale_b: float
    residual_a: torch.Tensor | None = None  # original - decode(own latents): what the VAE misses
    residual_b: torch.Tensor | None = None


class InterpolationPath:
    """Interpolated state dicts between two state dicts of ``model``'s architecture.

    ``skip``: Linear/Conv2d module name -> why it stays in weight space (e.g. ``{"head": "head"}``;
    a set of names gives the reason "skipped").
    Layers of a kind the VAE never saw (``prior.trained_kinds(meta)``) stay in weight space too;
    :attr:`weight_space` lists every such layer with its reason.
    """

    def __init__(self, model: nn.Module, state_a: dict, state_b: dict, vae: WeightVAE, meta: dict,
                 skip: dict[str, str] | set[str] | None = None, residual: bool = True):
        self.state_a, self.state_b, self.vae = state_a, state_b, vae
        skip = dict(skip) if isinstance(skip, dict) else dict.fromkeys(skip or (), "skipped")
        kinds = trained_kinds(meta)
        layers = [layer for layer in weight_layers(model) if layer["direct"]]  # others: plain state-dict lerp
        self.weight_keys = [f"{layer['name']}.weight" for layer in layers]
        self.flat_a, self.flat_b = self.flatten(state_a), self.flatten(state_b)
        self.layers: list[_Layer] = []
        self.weight_space: dict[str, str] = {}  # layer name -> why it is not interpolated through the VAE
        for layer in layers:
            name, shape, kind, depth = layer["name"], tuple(layer["shape"]), layer["kind"], layer["depth"]
            if name in skip:
                self.weight_space[name] = skip[name]
                continue
            if kind not in kinds:
                self.weight_space[name] = f"VAE never saw {kind} layers"
                continue
            mu_a, scale_a = encode_layer(vae, state_a[f"{name}.weight"], kind, depth)
            mu_b, scale_b = encode_layer(vae, state_b[f"{name}.weight"], kind, depth)
            layer_path = _Layer(name, shape, kind, depth, condition(shape, kind, depth, vae.config.token_size),
                                mu_a, mu_b, math.log(scale_a), math.log(scale_b))
            if residual:
                # residual correction: the path carries each end's decoding error, faded linearly, so
                # it is continuous at both ends and shows only the latent geometry's own effect
                key = f"{name}.weight"
                layer_path.residual_a = state_a[key] - self._decode(layer_path, mu_a, layer_path.log_scale_a)
                layer_path.residual_b = state_b[key] - self._decode(layer_path, mu_b, layer_path.log_scale_b)
            self.layers.append(layer_path)

    @property
    def residual_corrected(self) -> bool:
        return any(layer.residual_a is not None for layer in self.layers)

    def flatten(self, state: dict) -> torch.Tensor:
        """Every Linear/Conv2d weight concatenated (float64), the vector the cosines are taken on."""
        return torch.cat([state[k].detach().reshape(-1).double() for k in self.weight_keys])

    def cosines(self, state: dict) -> tuple[float, float]:
        flat = self.flatten(state)
        return weight_cosine(flat, self.flat_a), weight_cosine(flat, self.flat_b)

    @torch.no_grad()
    def _decode(self, layer: _Layer, latents: torch.Tensor, log_scale: float) -> torch.Tensor:
        return decode_layer(self.vae, latents, layer.shape, layer.kind, layer.depth, math.exp(log_scale),
                            cond=layer.cond)

    @torch.no_grad()
    def state(self, alpha: float, method: str) -> dict[str, torch.Tensor]:
        """The state dict at ``alpha`` along ``method``; exactly the inputs at alpha 0 and 1."""
        if method not in METHODS:
            raise ValueError(f"unknown interpolation method {method!r}; expected one of {METHODS}")
        if alpha == 0.0 or alpha == 1.0:
            return {k: v.clone() for k, v in (self.state_a if alpha == 0.0 else self.state_b).items()}
        state = lerp_state(self.state_a, self.state_b, alpha)
        if method == "weight_lerp":
            return state
        mix = torch.lerp if method == "latent_lerp" else slerp
        for layer in self.layers:
            latents = mix(layer.mu_a, layer.mu_b, alpha)
            log_scale = layer.log_scale_a + alpha * (layer.log_scale_b - layer.log_scale_a)
            weight = self._decode(layer, latents, log_scale)
            if layer.residual_a is not None:
                weight = weight + (1 - alpha) * layer.residual_a + alpha * layer.residual_b
            state[f"{layer.name}.weight"] = weight.to(state[f"{layer.name}.weight"].dtype)
        return state

    @torch.no_grad()
    def reconstruction(self, end: str) -> tuple[dict[str, torch.Tensor], list[float]]:
        """End ``"a"``/``"b"`` with its VAE layers decoded from their own latents, and per-layer cosines."""
        source = self.state_a if end == "a" else self.state_b
        state = {k: v.clone() for k, v in source.items()}
        cosines = []
        for layer in self.layers:
            mu, log_scale = (layer.mu_a, layer.log_scale_a) if end == "a" else (layer.mu_b, layer.log_scale_b)
            key = f"{layer.name}.weight"
            state[key] = self._decode(layer, mu, log_scale).to(source[key].dtype)
            cosines.append(weight_cosine(state[key].reshape(-1).double(), source[key].reshape(-1).double()))
        return state, cosines
