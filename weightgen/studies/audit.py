"""Memorisation audit of a weight generator: is a generated model a copy of a zoo model?

Weights are compared layer by layer (every Linear/Conv2d weight, the classifier head excepted,
since generators keep timm's head) by cosine similarity of the flattened tensors, averaged over
layers with equal weight. A sample's *nearest zoo model* is the zoo model of the same
architecture with the highest mean cosine; the yardstick is how close zoo models trained from
different seeds are to one another. Naive generators (a zoo model plus noise, an average of zoo
models) give the closeness one would see from a generator that copies.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data import TensorSplits, model_splits
from ..io import WeightgenError
from ..metrics import cosine
from ..recasting import head_names
from ..vae.codec import weight_layers

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def compared_weights(model: nn.Module) -> list[str]:
    """State-dict keys of the weights an audit compares: Linear/Conv2d weights, head excepted."""
    head = head_names(model)
    return [f"{layer['name']}.weight" for layer in weight_layers(model)
            if layer["direct"] and layer["name"] not in head]


def layer_cosines(a: State, b: State, names: list[str]) -> torch.Tensor:
    """Cosine similarity of each named weight in ``a`` and ``b`` (float64, one per name)."""
    if not names:
        raise ValueError("no weights to compare")
    out = []
    for name in names:
        if a[name].shape != b[name].shape:
            raise ValueError(f"{name}: shapes differ ({tuple(a[name].shape)} vs {tuple(b[name].shape)})")
        out.append(cosine(a[name], b[name]))
    return torch.tensor(out, dtype=torch.float64)


def mean_layer_cosine(a: State, b: State, names: list[str]) -> float:
    return layer_cosines(a, b, names).mean().item()


def chance_cosine_std(state: State, names: list[str]) -> float:
    """Std of :func:`mean_layer_cosine` between two independent isotropic random models of these shapes.

    Each layer's cosine has variance ~1/numel; the mean of L of them has std sqrt(sum 1/numel) / L.
    Cosines within a few of these of zero cannot tell a model from an independent one.
    """
    return math.sqrt(sum(1.0 / state[name].numel() for name in names)) / len(names)


def nearest(state: State, references: dict[str, State], names: list[str],
            exclude: Callable[[str], bool] | None = None) -> tuple[str | None, float]:
    """(id, mean layer cosine) of the reference closest to ``state``; (None, nan) if none qualifies."""
    best, best_cos = None, -math.inf
    for ref_id, ref in references.items():
        if exclude is not None and exclude(ref_id):
            continue
        cos = mean_layer_cosine(state, ref, names)
        if cos > best_cos:
            best, best_cos = ref_id, cos
    return (best, best_cos) if best is not None else (None, math.nan)


def with_relative_noise(state: State, names: list[str], sigma: float, generator: torch.Generator) -> State:
    """A copy of ``state`` with Gaussian noise of std ``sigma`` x the layer's RMS added to each named weight.

    The noise is drawn on the CPU from ``generator`` (same bytes on every device) and moved.
    """
    out = {k: v.clone() for k, v in state.items()}
    for name in names:
        w = out[name]
        rms = w.detach().float().pow(2).mean().sqrt()
        noise = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        w.add_((noise.to(w.device) * rms * sigma).to(w.dtype))
    return out


def average_states(states: list[State]) -> State:
    """Element-wise mean of every floating tensor (weights, norms, BN buffers); others from the first."""
    if not states:
        raise ValueError("nothing to average")
    first = states[0]
    return {k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone())
            for k, v in first.items()}


def match_accuracy(accuracy_at: Callable[[float], float], target: float, low: float = 1e-3, high: float = 30.0,
                   iterations: int = 10) -> tuple[float, float]:
    """Noise level whose accuracy is closest to ``target``, by bisection on log(sigma).

    ``accuracy_at(sigma)`` should fall as sigma grows (noise destroys a trained model). Returns
    (sigma, its accuracy) of the best of the levels tried.
    """
    tried: dict[float, float] = {}

    def acc(sigma: float) -> float:
        if sigma not in tried:
            tried[sigma] = accuracy_at(sigma)
        return tried[sigma]

    lo, hi = math.log(low), math.log(high)
    if acc(low) <= target:
        return low, acc(low)
    if acc(high) >= target:
        return high, acc(high)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if acc(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    sigma = min(tried, key=lambda s: (abs(tried[s] - target), s))
    return sigma, tried[sigma]


def zoo_models(zoo_dir: str | Path) -> list[dict]:
    """Every model's JSON in ``zoo_dir`` (plus ``model_id`` and ``weights``), with a user-facing error."""
    from ..vae.data import list_zoo  # deferred: vae.data imports pytorch_lightning (seconds)

    zoo_dir = Path(zoo_dir)
    if not zoo_dir.is_dir():
        raise WeightgenError(f"zoo directory {zoo_dir} does not exist")
    try:
        models = list_zoo(zoo_dir)
    except ValueError as err:
        raise WeightgenError(f"{err} (a zoo is what scripts/build_zoo.py writes)") from None
    for meta in models:
        if not isinstance(meta.get("model_kwargs", {}), dict):
            raise WeightgenError(f"{meta['model_id']}: model_kwargs is not a JSON object")
    return models


def architecture_key(meta: dict) -> str:
    """Models with the same key have the same architecture and tensor shapes."""
    return meta["arch"] + " " + json.dumps(meta.get("model_kwargs", {}), sort_keys=True)


@torch.no_grad()
def probe_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logit features (N, d), logits (N, classes)) of a timm model on inputs ``x``, in eval mode.

    What prediction agreement and CKA (``weightgen.metrics``) compare between two models; the
    features are what a linear probe reads. Batches run on the model's device; outputs come back on the CPU.
    """
    model.eval()
    device = next(model.parameters()).device
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f = model.forward_head(model.forward_features(x[i:i + batch_size].to(device)), pre_logits=True)
        feats.append(f.float().cpu())
        logits.append(model.get_classifier()(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def task_data(task: str | None, image_size: int = 32, in_chans: int = 1, seed: int = 0) -> TensorSplits:
    """Train/val/test data of a zoo model's ``task`` as model input (``weightgen.data.model_splits``).

    ``None`` (a model JSON without ``task``: the default zoo) is the ``digits`` task.
    """
    return model_splits(task or "digits", seed=seed, image_size=image_size, in_chans=in_chans)
