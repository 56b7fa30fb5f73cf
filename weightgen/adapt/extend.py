"""Extra templates for a fitted bank: more directions for coefficient-only adaptation.

Each bank gains ``extra`` templates; every layer of the bank gains ``extra`` coefficients per set,
all zero, so the model's function at the start point is unchanged. Sources:

- ``random``: Gaussian templates, each scaled to the RMS of the bank's own templates;
- ``pca``: the top singular directions (uncentred PCA) of the *other* banks' templates of the same
  shape, after removing what the bank already spans (directions its neighbours use and it lacks); banks
  with no same-shape neighbour (or too few directions) are filled with ``random`` and reported;
- ``vae``: templates decoded from latents drawn from the VAE prior for the bank's layer kind and
  depth, scaled to the bank's RMS; layer kinds the VAE never saw are filled with ``random``.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from ..bank import banks_of
from ..cli import user_errors
from ..io import WeightgenError
from ..layers import recast_layers
from ..vae.codec import decode_layer, sample_latents, weight_layers
from ..vae.prior import load_vae_bundle, trained_kinds, vae_on
from ..vae.tokenize import token_count

log = logging.getLogger(__name__)
SOURCES = ("random", "pca", "vae")


@torch.no_grad()
def extend_banks(model: nn.Module, extra: int, source: str = "random", seed: int = 0, vae=None) -> dict[str, str]:
    """Add ``extra`` templates to every bank of ``model`` in place; returns {bank: source used}.

    ``vae``: a ``(WeightVAE, meta)`` pair, a VAE directory, or None for the shipped VAE (``vae`` only).
    The templates' and coefficients' ``requires_grad`` flags are kept; build optimizers afterwards.
    """
    if source not in SOURCES:
        raise WeightgenError(f"unknown template source {source!r}; choose from {', '.join(SOURCES)}")
    if extra < 1:
        raise WeightgenError("the number of extra templates must be >= 1")
    with user_errors():
        banks = banks_of(model)
    layers_of: dict[str, list] = {key: [] for key in banks}
    bank_key = {id(bank): key for key, bank in banks.items()}
    for name, layer in recast_layers(model).items():
        layers_of[bank_key[id(layer.bank)]].append((name, layer))
    generator = torch.Generator().manual_seed(seed)  # CPU draws: same templates on every device
    sampler = _VaeSampler(model, vae, layers_of) if source == "vae" else None
    new, used = {}, {}
    for key, bank in banks.items():  # all new templates computed before any bank changes
        old = bank.templates.detach()
        scale = _rms(old)
        drawn, used[key] = None, source
        if source == "pca":
            others = [b.templates.detach() for k, b in banks.items() if k != key and b.weight_shape == bank.weight_shape]
            drawn = _pca_directions(old, others, extra)
        elif source == "vae":
            drawn = sampler.sample(key, bank.weight_shape, extra, generator)
        if drawn is None:
            used[key] = "random" if source == "random" else f"random (no {source} directions)"
            drawn = torch.randn(extra, *bank.weight_shape, generator=generator)
        drawn = drawn.float()
        drawn = drawn * (scale / drawn.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)).view(-1, *[1] * (old.dim() - 1))
        new[key] = drawn.to(device=old.device, dtype=old.dtype)
    for key, bank in banks.items():
        flag = bank.templates.requires_grad
        bank.templates = nn.Parameter(torch.cat([bank.templates.detach(), new[key]]), requires_grad=flag)
        for _, layer in layers_of[key]:
            coefficients = layer.coefficients.detach()
            zeros = coefficients.new_zeros(coefficients.shape[0], extra)  # (K, extra): start point unchanged
            layer.coefficients = nn.Parameter(torch.cat([coefficients, zeros], dim=1),
                                              requires_grad=layer.coefficients.requires_grad)
    config = model.__dict__.get("recast_config")
    if config is not None:  # artifacts record it, so loading rebuilds banks of the new size
        model.recast_config = dataclasses.replace(config, extra_templates=config.extra_templates + extra)
    log.info("extended %d banks by %d templates (%s)", len(banks), extra, source)
    return used


def _rms(t: torch.Tensor) -> float:
    return torch.linalg.vector_norm(t.float()).item() / math.sqrt(max(t.numel(), 1))


def _pca_directions(own: torch.Tensor, others: list[torch.Tensor], count: int) -> torch.Tensor | None:
    """Top ``count`` singular directions of ``others`` orthogonal to the span of ``own``, or None."""
    if not others:
        return None
    flat_own = own.reshape(own.shape[0], -1).double()  # (n, D)
    pool = torch.cat([o.reshape(o.shape[0], -1).double() for o in others]).cpu()  # (m, D)
    basis = torch.linalg.qr(flat_own.cpu().T).Q  # (D, n): what the bank already spans
    residual = pool - (pool @ basis) @ basis.T
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)
    keep = int((s > s.max().clamp_min(1e-30) * 1e-6).sum()) if s.numel() else 0
    if keep < count:
        return None
    return vh[:count].reshape(count, *own.shape[1:]).float()


class _VaeSampler:
    def __init__(self, model: nn.Module, vae, layers_of: dict[str, list]):
        if vae is None or isinstance(vae, (str, bytes)) or hasattr(vae, "__fspath__"):
            vae = load_vae_bundle(vae)
        self.vae, self.meta = vae
        self.kinds = trained_kinds(self.meta)
        info = {layer["name"]: layer for layer in weight_layers(model)}
        # a bank's kind and depth: those of its first layer
        self.first = {key: info.get(members[0][0]) for key, members in layers_of.items() if members}

    def sample(self, key: str, shape: tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor | None:
        layer = self.first.get(key)
        if layer is None or layer["kind"] not in self.kinds:
            return None
        vae = vae_on(self.vae, torch.device("cpu"))
        tokens = token_count(shape, vae.config.token_size)
        out = []
        for _ in range(count):
            latents = sample_latents(self.meta.get("latent_density"), layer["kind"], layer["depth"], tokens,
                                     vae.config.latent_dim, generator)
            out.append(decode_layer(vae, latents, shape, layer["kind"], layer["depth"], 1.0))
        return torch.stack(out)
