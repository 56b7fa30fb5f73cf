"""Neural Mimicry through a VAE decoder: every template is ``decode(latents) * scale``.

Latents start as the encoder's means of the current (closed-form) templates and are optimised together with
the coefficients on the per-layer cosine loss; the final coefficients are re-solved by least squares.
A bank of a kind the VAE never saw keeps its closed-form templates. Everything runs on the device of
the model's banks (the VAE is copied there when it lives elsewhere).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..bank import banks_of
from ..layers import recast_layers
from ..vae.codec import decode_layer, encode_layer, weight_layers
from ..vae.prior import trained_kinds, vae_on
from ..vae.tokenize import condition, layer_kind
from .closed_form import least_squares_coefficients
from .gradient import descend_keep_best

log = logging.getLogger(__name__)


class _DecodedBank(nn.Module):
    def __init__(self, vae, bank, layers, target, kind: str, depth: float):
        super().__init__()
        self.vae, self.bank, self.layers, self.kind, self.depth = vae, bank, layers, kind, depth
        shape, device = bank.weight_shape, bank.templates.device
        # (N, COND_DIM), shared by templates
        self.cond = condition(shape, kind, depth, vae.config.token_size).to(device)
        encoded = [encode_layer(vae, bank.templates[i], kind, depth) for i in range(bank.num_templates)]
        self.latents = nn.Parameter(torch.stack([mu for mu, _ in encoded]))  # (n, N, latent_dim)
        self.log_scales = nn.Parameter(torch.tensor([math.log(s) for _, s in encoded], device=device))  # (n,)
        self.coefficients = nn.Parameter(
            torch.stack([layer.coefficients.detach().mean(0) for layer in layers]).float())  # (L, n)
        self.register_buffer("target", torch.stack([target[f"{n}.weight"].reshape(-1).to(device, torch.float32)
                                                    for n in bank.members]))  # (L, D)

    def templates(self) -> torch.Tensor:
        shape = self.bank.weight_shape
        return torch.stack([decode_layer(self.vae, z, shape, self.kind, self.depth, s.exp(), self.cond).reshape(-1)
                            for z, s in zip(self.latents, self.log_scales)])  # (n, D)

    def cosines(self) -> torch.Tensor:
        return F.cosine_similarity(self.coefficients @ self.templates(), self.target, dim=1, eps=1e-30)  # (L,)

    @torch.no_grad()
    def write_back(self) -> None:
        templates = self.templates()
        coefficients = least_squares_coefficients(self.target, templates)  # (L, n)
        self.bank.templates.copy_(templates.reshape(self.bank.templates.shape))
        for layer, coef in zip(self.layers, coefficients):
            layer.coefficients.copy_(coef.expand_as(layer.coefficients))

    def stored_numbers(self) -> int:
        return self.latents.numel() + self.log_scales.numel()


def fit_decoder(model: nn.Module, target: dict[str, torch.Tensor], vae_bundle, steps: int = 300, lr: float = 1e-2,
                seed: int = 0, progress: bool = False, on_step: Callable[[int, float], None] | None = None,
                ) -> tuple[list[float], dict]:
    """Fit in place; returns (loss history, storage summary: latent vs template numbers).

    Deterministic: ``seed`` is accepted for a uniform signature, the fit draws no random numbers.
    """
    vae, meta = vae_bundle
    banks = banks_of(model)
    vae = vae_on(vae, next(iter(banks.values())).templates.device)
    known = trained_kinds(meta)
    layers = recast_layers(model)
    problems, kept = [], []
    for name, bank in banks_of(model).items():
        members = [layers[n] for n in bank.members]
        kind = layer_kind(bank.weight_shape, getattr(members[0], "groups", 1))
        if kind not in known:
            kept.append(name)
            continue
        depth = _mean_depth(model, bank.members)
        problems.append(_DecodedBank(vae, bank, members, target, kind, depth))
    if kept:
        log.warning("VAE knows no layers of banks %s; they keep closed-form templates", ", ".join(kept))
    params = [p for prob in problems for p in (prob.latents, prob.log_scales, prob.coefficients)]
    history: list[float] = []
    if params:
        best, history = descend_keep_best(
            params, lambda: 1 - torch.cat([prob.cosines() for prob in problems]).mean(),
            torch.optim.Adam(params, lr=lr), steps, "mimicry (decoder)", progress, on_step)
        with torch.no_grad():
            for keep, p in zip(best, params):
                p.copy_(keep)
        for prob in problems:
            prob.write_back()
    template_numbers = sum(b.templates.numel() for b in banks_of(model).values())
    decoded_numbers = sum(prob.bank.templates.numel() for prob in problems)
    latent_numbers = sum(prob.stored_numbers() for prob in problems)
    storage = {"decoded_banks": len(problems), "closed_form_banks": kept,
               "template_numbers": template_numbers,
               "stored_numbers": template_numbers - decoded_numbers + latent_numbers,
               "stored_bytes_float32": 4 * (template_numbers - decoded_numbers + latent_numbers),
               "template_bytes_float32": 4 * template_numbers}
    return history, storage


def _mean_depth(model: nn.Module, members) -> float:
    depths = {layer["name"]: layer["depth"] for layer in weight_layers(model)}
    return sum(depths[m] for m in members) / len(members)
