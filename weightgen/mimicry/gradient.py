"""Gradient Neural Mimicry, vectorised over banks.

``paper`` follows the RECAST recipe as a faithful baseline: random start, RMSprop, SmoothL1 on
weights, small Gaussian noise on coefficients, StepLR, gradient clipping at 1.0, keep the best.
``refine`` starts from the current (closed-form) banks and maximises the mean per-layer cosine
(a per-layer normalised loss) with Adam, keeps the best state, then re-solves coefficients by least
squares, which can only raise each layer's cosine: it never ends worse than its start.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..bank import banks_of
from ..layers import recast_layers
from .closed_form import least_squares_coefficients

log = logging.getLogger(__name__)


@dataclass
class GradientSettings:
    steps: int = 1000
    lr: float = 1e-3
    noise_std: float = 1e-4  # Gaussian noise added to coefficients each step (paper recipe)
    lr_step_fraction: float = 0.25  # StepLR period as a fraction of steps
    lr_gamma: float = 0.5
    clip: float = 1.0


class _BankProblem(nn.Module):
    """One bank as stacked tensors: templates (n, D), coefficients (L, K, n), target (L, D)."""

    def __init__(self, bank, layers, target):
        super().__init__()
        self.bank, self.layers = bank, layers
        # optimised in float32 whatever the model's dtype; write_back casts to the bank's dtype
        self.templates = nn.Parameter(bank.templates.detach().reshape(bank.num_templates, -1).float().clone())
        self.coefficients = nn.Parameter(torch.stack([layer.coefficients.detach() for layer in layers]).float().clone())
        device = bank.templates.device
        self.register_buffer("target", torch.stack([target[f"{n}.weight"].reshape(-1).to(device, torch.float32)
                                                    for n in bank.members]))  # (L, D)
        self.register_buffer("target_norm2", self.target.pow(2).sum(1).clamp(min=1e-30))

    def weights(self) -> torch.Tensor:
        return self.coefficients.mean(1) @ self.templates  # (L, n) @ (n, D) -> (L, D)

    def write_back(self, templates: torch.Tensor, coefficients: torch.Tensor) -> None:
        with torch.no_grad():
            self.bank.templates.copy_(templates.reshape(self.bank.templates.shape))
            for layer, coef in zip(self.layers, coefficients):
                layer.coefficients.copy_(coef)


def _problems(model: nn.Module, target: dict[str, torch.Tensor]) -> list[_BankProblem]:
    layers = recast_layers(model)
    return [_BankProblem(bank, [layers[n] for n in bank.members], target) for bank in banks_of(model).values()]


def _random_start(problems: list[_BankProblem], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU, then moved: the same start on every device
    with torch.no_grad():
        for p in problems:
            fan_in = math.prod(p.bank.weight_shape[1:])
            bound = 1.0 / math.sqrt(fan_in)  # the default nn.Linear / nn.Conv2d init range
            p.templates.copy_(torch.rand(p.templates.shape, generator=gen, device="cpu") * 2 * bound - bound)  # copy_ moves
            p.coefficients.copy_(torch.randn(p.coefficients.shape, generator=gen, device="cpu") / math.sqrt(p.templates.shape[0]))


def cosine_loss(problems: list[_BankProblem]) -> torch.Tensor:
    """Mean over layers of 1 - cos(W_l, W*_l): every layer counts alike, whatever its norm."""
    return 1 - torch.cat([F.cosine_similarity(p.weights(), p.target, dim=1, eps=1e-30) for p in problems]).mean()


def _smooth_l1_loss(problems: list[_BankProblem]) -> torch.Tensor:
    return sum(F.smooth_l1_loss(p.weights(), p.target) for p in problems)


def descend_keep_best(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], opt, steps: int,
                      desc: str, progress: bool = False, on_step: Callable[[int, float], None] | None = None,
                      before_step: Callable[[], None] | None = None,
                      after_step: Callable[[], None] | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """Run ``steps`` optimiser steps; returns (best parameter values, loss history).

    The best state lives in preallocated buffers: no per-step deepcopy of a model. Each step's
    forward loss scores the state *before* that step's update, so nothing is evaluated twice.
    """
    best = [t.detach().clone() for t in params]
    best_loss, history = math.inf, []
    # the bar counts optimiser steps; the extra pass scores the state after the last one
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for step in range(steps + 1):
        loss = loss_fn()
        history.append(loss.item())
        if on_step is not None:
            on_step(step, history[-1])
        if history[-1] < best_loss:
            best_loss = history[-1]
            for keep, t in zip(best, params):
                keep.copy_(t.detach())
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
        if after_step is not None:
            after_step()
        bar.update()
    bar.close()
    return best, history


def fit_gradient(model: nn.Module, target: dict[str, torch.Tensor], mode: str = "paper",
                 settings: GradientSettings | None = None, seed: int = 0, progress: bool = False,
                 on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fit banks and coefficients in place; returns the loss history."""
    if mode not in ("paper", "refine"):
        raise ValueError(f"mode must be 'paper' or 'refine', got {mode!r}")
    settings = settings or GradientSettings()
    problems = _problems(model, target)
    params = [t for p in problems for t in (p.templates, p.coefficients)]
    if mode == "paper":
        _random_start(problems, seed)
        loss_fn = _smooth_l1_loss
        opt = torch.optim.RMSprop(params, lr=settings.lr)
    else:
        loss_fn = cosine_loss
        opt = torch.optim.Adam(params, lr=settings.lr)
    period = max(1, int(settings.steps * settings.lr_step_fraction))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=period, gamma=settings.lr_gamma)
    noise_gen = torch.Generator().manual_seed(seed + 1)

    def clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, settings.clip)

    def after_step() -> None:
        sched.step()
        if mode == "paper" and settings.noise_std > 0:
            with torch.no_grad():
                for p in problems:
                    noise = torch.randn(p.coefficients.shape, generator=noise_gen, device="cpu")  # CPU draw: device-independent
                    p.coefficients.add_(noise.to(p.coefficients.device) * settings.noise_std)

    best, history = descend_keep_best(params, lambda: loss_fn(problems), opt, settings.steps,
                                      f"mimicry ({mode})", progress, on_step, clip, after_step)
    best_loss = min(history)
    for i, p in enumerate(problems):
        coefficients = best[2 * i + 1]
        if mode == "refine":
            # the projection onto the template span maximises each layer's cosine and fixes its norm
            solved = least_squares_coefficients(p.target, best[2 * i])  # (L, n)
            coefficients = solved[:, None, :].expand_as(coefficients)
        p.write_back(best[2 * i], coefficients)
    log.info("gradient mimicry (%s): %d steps, loss %.3g -> best %.3g", mode, settings.steps, history[0], best_loss)
    return history
