"""Neural Mimicry: fit template banks and coefficients to a target dense state dict."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..recasting import parameter_counts
from .closed_form import fit_closed_form, solve_bank
from .decoder import fit_decoder
from .fidelity import function_fidelity, weight_fidelity
from .gradient import GradientSettings, fit_gradient

METHODS = ("closed_form", "gradient", "closed_form+gradient", "decoder")
DEFAULT_STEPS = {"gradient": 1000, "closed_form+gradient": 200, "decoder": 300}
DEFAULT_LR = {"gradient": 1e-3, "closed_form+gradient": 1e-4, "decoder": 1e-2}


def fit(model: nn.Module, target: dict[str, torch.Tensor], method: str = "closed_form", *,
        steps: int | None = None, lr: float | None = None, seed: int | None = None,
        progress: bool = False, on_step: Callable[[int, float], None] | None = None,
        vae=None, release_target: bool = False) -> dict:
    """Fit a recast ``model`` in place to ``target``; returns the fit report.

    ``release_target`` (closed_form only): each bank's layers are removed from ``target`` once that
    bank is fitted and measured, so that a caller holding no other reference frees them bank by bank.
    """
    if release_target and method != "closed_form":
        raise ValueError("release_target needs method 'closed_form': the other methods read the target to the end")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    seed = model.recast_config.seed if seed is None else seed
    steps = DEFAULT_STEPS.get(method, 0) if steps is None else steps
    lr = DEFAULT_LR.get(method, 0.0) if lr is None else lr
    if steps < 0 or (method != "closed_form" and lr <= 0):
        raise ValueError("steps must be >= 0 and lr > 0")
    start = time.perf_counter()
    history: list[float] = []
    rows = None
    if method in ("closed_form", "closed_form+gradient"):
        rows = fit_closed_form(model, target, seed=seed, release=release_target)
    if method == "gradient":
        history = fit_gradient(model, target, "paper", GradientSettings(steps=steps, lr=lr), seed, progress, on_step)
    elif method == "closed_form+gradient" and steps > 0:
        history = fit_gradient(model, target, "refine", GradientSettings(steps=steps, lr=lr), seed, progress, on_step)
    elif method == "decoder":
        return _fit_decoder(model, target, vae, steps, lr, seed, progress, on_step)
    seconds = time.perf_counter() - start
    return build_report(model, target, method, seconds, history, rows)


def _fit_decoder(model, target, vae, steps, lr, seed, progress, on_step) -> dict:
    """Decoder mimicry, reported beside the closed-form fit it starts from."""
    if vae is None:
        raise ValueError("method 'decoder' needs a VAE: pass vae=(WeightVAE, meta)")
    start = time.perf_counter()
    fit_closed_form(model, target, seed=seed)
    baseline = build_report(model, target, "closed_form", time.perf_counter() - start)
    start = time.perf_counter()
    history, storage = fit_decoder(model, target, vae, steps=steps, lr=lr, seed=seed, progress=progress,
                                   on_step=on_step)
    report = build_report(model, target, "decoder", time.perf_counter() - start, history)
    report["decoder"] = {**storage, "closed_form_mean_cosine": baseline["mean_cosine"],
                         "closed_form_min_cosine": baseline["min_cosine"]}
    return report


def build_report(model: nn.Module, target: dict[str, torch.Tensor], method: str, seconds: float,
                 history: list[float] | None = None, layers: list[dict] | None = None) -> dict:
    """``layers``: ``weight_fidelity``'s rows when already measured (the target may be gone by now)."""
    layers = weight_fidelity(model, target) if layers is None else layers
    cosines = [row["cosine"] for row in layers]
    return {
        "method": method,
        "mean_cosine": sum(cosines) / len(cosines),
        "min_cosine": min(cosines),
        "seconds": seconds,
        "layers": layers,
        "params": parameter_counts(model),
        "loss_history": history[:: max(1, len(history) // 200)] if history else [],
    }


__all__ = ["fit", "build_report", "solve_bank", "fit_closed_form", "fit_gradient", "GradientSettings",
           "weight_fidelity", "function_fidelity", "METHODS"]
