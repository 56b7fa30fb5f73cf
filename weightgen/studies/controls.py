"""Controls for the VAE prior: what a per-layer scale rule, or a linear Gaussian model of the zoo's
tokens, gives without the VAE.

- :func:`rms_matched_init`: timm's own init, each layer rescaled to the RMS the VAE's scale model
  predicts. Same layers as :func:`weightgen.vae.prior.sample_weights` (same skip, same fallbacks),
  so any gain of the prior beyond this control comes from the VAE's directions, not its scales.
- A probabilistic PCA prior (Tipping & Bishop 1999) over the zoo's 64-value tokens, one per layer
  kind and depth quarter (the cells of the VAE's latent density), with the VAE's latent size:
  :func:`fit_ppca`, :func:`ppca_sample_weights`, :func:`save_ppca` / :func:`load_ppca`. Samples
  are scaled to the same scale model's RMS as the VAE's.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_directory, check_output_dir
from ..vae.codec import DEPTH_BUCKETS, depth_bucket, rms, weight_layers
from ..vae.prior import trained_kinds
from ..vae.store import predict_scale
from ..vae.tokenize import KINDS, TOKEN_SIZE, detokenize, token_count, tokenize

__all__ = ["rms_matched_init", "PPCAPrior", "fit_ppca", "zoo_token_records", "fit_ppca_on_zoo",
           "ppca_sample_weights", "ppca_encode_weights", "save_ppca", "load_ppca", "PPCA_FORMAT_VERSION"]

log = logging.getLogger(__name__)

PPCA_FORMAT_VERSION = 1
PPCA_KIND = "ppca"  # the output directory's manifest kind
_WEIGHTS, _META = "ppca.safetensors", "ppca.json"
POOLED = DEPTH_BUCKETS  # cell index of a kind's fit over every depth


def _check_scale_model(meta: dict) -> None:
    if "scale_model" not in meta:
        raise ValueError("this VAE has no scale model; retrain it with scripts/train_vae.py")


def _layers(model: nn.Module, skip: set[str] | None) -> list[dict]:
    return [layer for layer in weight_layers(model) if layer["name"] not in (skip or set())]


def _warn_fallback(layers: list[dict], fallback: list[str], kinds: set[str], what: str) -> None:
    unseen = [l for l in layers if l["name"] in fallback and l["kind"] not in kinds]
    if unseen:
        log.warning("%s knows no %s layers; kept timm init for %d layers (e.g. %s)", what,
                    "/".join(sorted({l["kind"] for l in unseen})), len(unseen), unseen[0]["name"])
    indirect = [l["name"] for l in layers if l["name"] in fallback and l["kind"] in kinds]
    if indirect:
        log.warning("kept timm init for %d layers whose weight is not a plain tensor (parametrized, e.g. %s)",
                    len(indirect), indirect[0])


def _stat(layer: dict, target: float, init: torch.Tensor, weight: torch.Tensor) -> dict:
    init_rms = rms(init)
    return {"name": layer["name"], "kind": layer["kind"], "shape": list(layer["shape"]), "depth": layer["depth"],
            "rms": target, "timm_init_rms": init_rms, "mean": weight.mean().item(),
            "timm_init_mean": init.mean().item(), "rms_ratio_to_timm": target / max(init_rms, 1e-12)}


@torch.no_grad()
def rms_matched_init(model: nn.Module, meta: dict, skip: set[str] | None = None,
                     in_place: bool = False) -> tuple[dict, list[dict], list[str]]:
    """timm's init of ``model`` with each layer scaled to the RMS the VAE's scale model predicts.

    The layers are exactly those :func:`~weightgen.vae.prior.sample_weights` samples for the same
    ``meta`` and ``skip``: layers of a kind the VAE never saw, and layers whose weight is not a
    plain tensor, keep timm's init and are returned as ``fallback``. No randomness: the model's own
    init is the direction. Returns (weights keyed ``name.weight``, per-layer statistics, fallback),
    like ``sample_weights``; with ``in_place`` the model's weights are scaled where they are.
    """
    _check_scale_model(meta)
    kinds = trained_kinds(meta)
    modules = dict(model.named_modules())
    weights, stats, fallback = {}, [], []
    layers = _layers(model, skip)
    for layer in layers:
        name = layer["name"]
        if layer["kind"] not in kinds or not layer["direct"]:
            fallback.append(name)
            continue
        init = modules[name].weight
        target = predict_scale(meta["scale_model"], layer["kind"], layer["shape"], layer["depth"])
        factor = target / max(rms(init), 1e-12)
        weight = init.detach() * factor
        stats.append(_stat(layer, target, init, weight))
        weights[f"{name}.weight"] = _place(init, weight, in_place)
    _warn_fallback(layers, fallback, kinds, "VAE")
    return weights, stats, fallback


def _place(init: torch.Tensor, weight: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``weight`` written into the model's own tensor (in place: no second copy), or as it is."""
    if not in_place:
        return weight
    init.copy_(weight)
    return init


# ---- PPCA prior ---------------------------------------------------------------------------------

@dataclass
class PPCACell:
    """x = components.T @ (scales * z) + mean + sqrt(noise_variance) * eps, z, eps ~ N(0, I)."""

    mean: torch.Tensor  # (token_size,)
    components: torch.Tensor  # (latent_dim, token_size), orthonormal rows (sklearn's components_)
    scales: torch.Tensor  # (latent_dim,) sqrt(max(eigenvalue - noise_variance, 0)): PPCA's ML W
    noise_variance: float
    tokens: int  # how many tokens the fit saw

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = E[z | x]]: the posterior-mean code decoded, mu + sum_i s_i^2 / (s_i^2 + sigma^2) c_i c_i^T (x - mu)."""
        c, s2 = self.components.to(x), self.scales.to(x) ** 2
        shrink = s2 / (s2 + self.noise_variance).clamp_min(1e-30)
        return self.mean.to(x) + ((x - self.mean.to(x)) @ c.T * shrink) @ c

    def covariance(self) -> torch.Tensor:
        """The model's token covariance W W^T + sigma^2 I (float64)."""
        w = self.components.double().T * self.scales.double()
        return w @ w.T + self.noise_variance * torch.eye(w.shape[0], dtype=torch.float64)


@dataclass
class PPCAPrior:
    token_size: int
    latent_dim: int
    cells: dict[str, list[PPCACell | None]]  # kind -> DEPTH_BUCKETS cells + the kind's pooled fit
    info: dict = field(default_factory=dict)

    def cell(self, kind: str, depth: float) -> PPCACell | None:
        """The depth cell's fit, else the kind's pooled fit, else None (an unseen kind)."""
        cells = self.cells.get(kind)
        if not cells:
            return None
        return cells[depth_bucket(depth)] or cells[POOLED]

    def kinds(self) -> set[str]:
        return {k for k, cells in self.cells.items() if cells and cells[POOLED] is not None}


def _fit_cell(x: np.ndarray, latent_dim: int, seed: int) -> PPCACell:
    from sklearn.decomposition import PCA

    q = min(latent_dim, x.shape[1], x.shape[0] - 1)
    if q < 1:
        raise ValueError(f"a PPCA cell needs at least 2 tokens, got {x.shape[0]}")
    pca = PCA(n_components=q, svd_solver="full", random_state=seed).fit(x)
    noise = float(pca.noise_variance_) if q < x.shape[1] else 0.0
    scales = np.sqrt(np.clip(pca.explained_variance_ - noise, 0.0, None))
    components = pca.components_
    if q < latent_dim:  # too few tokens for the latent size: zero columns keep the latent size
        components = np.vstack([components, np.zeros((latent_dim - q, x.shape[1]))])
        scales = np.concatenate([scales, np.zeros(latent_dim - q)])
    f32 = {"dtype": torch.float32}
    return PPCACell(torch.tensor(pca.mean_, **f32), torch.tensor(components, **f32), torch.tensor(scales, **f32),
                    noise, int(x.shape[0]))


def fit_ppca(records: Iterable[tuple[str, float, torch.Tensor]], latent_dim: int, token_size: int = TOKEN_SIZE,
             seed: int = 0, max_tokens_per_cell: int = 200_000, info: dict | None = None) -> PPCAPrior:
    """PPCA per layer kind and depth quarter (plus a pooled fit per kind) of tokens.

    records: (kind, relative depth, token values (N, token_size)): the normalised, zero-padded
    tokens of :func:`~weightgen.vae.tokenize.tokenize`. A cell with more than
    ``max_tokens_per_cell`` tokens is fitted on a seeded subset (numpy Generator, no global RNG).
    """
    if latent_dim < 1 or latent_dim > token_size:
        raise ValueError(f"latent_dim must be in [1, {token_size}], got {latent_dim}")
    groups: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in range(DEPTH_BUCKETS)] for k in KINDS}
    for kind, depth, values in records:
        if kind not in groups:
            raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")
        values = torch.as_tensor(values).detach().double().cpu().numpy()
        if values.ndim != 2 or values.shape[1] != token_size:
            raise ValueError(f"tokens must be (N, {token_size}), got {values.shape}")
        groups[kind][depth_bucket(depth)].append(values)
    rng = np.random.default_rng(seed)

    def fit(parts: list[np.ndarray], cell_seed: int) -> PPCACell | None:
        if not parts:
            return None
        x = np.concatenate(parts)
        if len(x) < 2:
            return None
        if len(x) > max_tokens_per_cell:
            x = x[np.sort(rng.choice(len(x), max_tokens_per_cell, replace=False))]
        return _fit_cell(x, latent_dim, cell_seed)

    cells = {}
    for kind in KINDS:
        per_depth = [fit(groups[kind][b], seed + b) for b in range(DEPTH_BUCKETS)]
        pooled = fit([p for b in range(DEPTH_BUCKETS) for p in groups[kind][b]], seed + DEPTH_BUCKETS)
        if pooled is not None:
            cells[kind] = per_depth + [pooled]
    if not cells:
        raise ValueError("fit_ppca got no tokens")
    return PPCAPrior(token_size, latent_dim, cells, dict(info or {}))


def zoo_token_records(models: list[dict], token_size: int = TOKEN_SIZE, max_tokens_per_layer: int = 512,
                      seed: int = 0):
    """(kind, depth, tokens (<= max_tokens_per_layer, token_size)) for every layer of zoo models.

    ``models``: entries of :func:`weightgen.vae.data.list_zoo`. At most ``max_tokens_per_layer``
    tokens per layer (a seeded subset, as the VAE's latent density uses), so big layers do not
    swamp a cell.
    """
    from ..vae.train import iter_layers  # deferred: vae.train imports pytorch_lightning (seconds)

    gen = torch.Generator().manual_seed(seed)
    for _, layer, kind, weight in iter_layers(models):
        values = tokenize(weight, kind, layer["depth"], token_size).values.float()
        if values.shape[0] > max_tokens_per_layer:
            values = values[torch.randperm(values.shape[0], generator=gen)[:max_tokens_per_layer]]
        yield kind, float(layer["depth"]), values


def fit_ppca_on_zoo(zoo, latent_dim: int, token_size: int = TOKEN_SIZE, seed: int = 0,
                    max_tokens_per_layer: int = 512, max_tokens_per_cell: int = 200_000) -> PPCAPrior:
    """PPCA fitted on the train split of a zoo: models marked ``split: heldout`` (and their
    checkpoints) are left out, as the VAE's training leaves them; a zoo without marks is split by
    :func:`weightgen.vae.data.split_by_model`."""
    from ..vae.data import list_zoo, split_by_model  # deferred: imports pytorch_lightning (seconds)

    models = list_zoo(zoo)
    if all("split" in m for m in models):  # a field zoo, or part of one: the marks decide
        train = {m["model_id"] for m in models if m["split"] != "heldout"}
    else:
        train = set(split_by_model(models)[0])
    chosen = [m for m in models if m["model_id"] in train]
    if not chosen:
        raise ValueError(f"no train models in {zoo}")
    info = {"zoo": str(zoo), "train_models": sorted(m["model_id"] for m in chosen), "seed": seed,
            "max_tokens_per_layer": max_tokens_per_layer, "max_tokens_per_cell": max_tokens_per_cell}
    return fit_ppca(zoo_token_records(chosen, token_size, max_tokens_per_layer, seed), latent_dim, token_size,
                    seed, max_tokens_per_cell, info)


def _sample_tokens(cell: PPCACell, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, token_size) float32 tokens on the CPU: z ~ N(0, I), x = W z + mu + noise."""
    z = torch.randn(count, cell.components.shape[0], generator=generator, device="cpu")
    eps = torch.randn(count, cell.components.shape[1], generator=generator, device="cpu")
    return (z * cell.scales) @ cell.components + cell.mean + math.sqrt(cell.noise_variance) * eps


@torch.no_grad()
def ppca_sample_weights(model: nn.Module, ppca: PPCAPrior, meta: dict, seed: int = 0,
                        skip: set[str] | None = None, in_place: bool = False) -> tuple[dict, list[dict], list[str]]:
    """Sample every Linear/Conv2d weight of ``model`` (except ``skip``) from a PPCA prior.

    Tokens come from the layer's kind and depth cell (or the kind's pooled fit), are detokenized
    (padding dropped) and scaled to the RMS ``meta``'s scale model predicts: the VAE prior's
    recipe with the VAE's decoder and latent density replaced by PPCA. Layers the VAE would keep at
    timm's init (unseen kind, parametrized weight), or of a kind the PPCA never saw, are returned
    as ``fallback``. Draws come from a CPU generator seeded with ``seed`` (the global RNG is
    untouched); weights land on the model's device. Returns like ``sample_weights``.
    """
    _check_scale_model(meta)
    kinds = trained_kinds(meta) & ppca.kinds()
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    weights, stats, fallback = {}, [], []
    layers = _layers(model, skip)
    for layer in layers:
        name, shape, kind, depth = layer["name"], layer["shape"], layer["kind"], layer["depth"]
        if kind not in kinds or not layer["direct"]:
            fallback.append(name)
            continue
        tokens = _sample_tokens(ppca.cell(kind, depth), token_count(shape, ppca.token_size), generator)
        init = modules[name].weight
        weight = detokenize(tokens, shape, 1.0, ppca.token_size).to(device=init.device, dtype=init.dtype)
        target = predict_scale(meta["scale_model"], kind, shape, depth)
        weight.mul_(target / max(rms(weight), 1e-12))
        stats.append(_stat(layer, target, init, weight))
        weights[f"{name}.weight"] = _place(init, weight, in_place)
    _warn_fallback(layers, fallback, kinds, "VAE/PPCA")
    return weights, stats, fallback


@torch.no_grad()
def ppca_encode_weights(model: nn.Module, ppca: PPCAPrior, skip: set[str] | None = None,
                        in_place: bool = False) -> tuple[dict, list[dict], list[str]]:
    """Every Linear/Conv2d weight of ``model`` (except ``skip``) through the PPCA's code and back.

    The control for VAE ``encode`` at the same latent size: each layer is cut into the same
    normalised tokens, each token replaced by its posterior-mean reconstruction in its kind and
    depth cell, and the layer's own scale re-applied (the VAE's encode keeps it too). Layers of a kind
    the PPCA never saw, or whose weight is not a plain tensor, are unchanged and returned as
    ``fallback``. Returns (weights keyed ``name.weight``, per-layer {name, kind, cosine, tokens},
    fallback); with ``in_place`` the model's weights are overwritten.
    """
    kinds = ppca.kinds()
    modules = dict(model.named_modules())
    weights, stats, fallback = {}, [], []
    for layer in _layers(model, skip):
        name, kind = layer["name"], layer["kind"]
        if kind not in kinds or not layer["direct"]:
            fallback.append(name)
            continue
        init = modules[name].weight
        t = tokenize(init, kind, layer["depth"], ppca.token_size)
        values = ppca.cell(kind, layer["depth"]).reconstruct(t.values.float()) * t.mask
        weight = detokenize(values, t.shape, t.scale, ppca.token_size).to(device=init.device, dtype=init.dtype)
        stats.append({"name": name, "kind": kind, "tokens": int(t.values.shape[0]),
                      "cosine": torch.nn.functional.cosine_similarity(init.flatten().float(),
                                                                      weight.flatten().float(), 0).item()})
        weights[f"{name}.weight"] = _place(init, weight, in_place)
    return weights, stats, fallback


def save_ppca(ppca: PPCAPrior, out_dir, overwrite: bool = False) -> Path:
    """Write ``out_dir/ppca.safetensors`` + ``out_dir/ppca.json`` atomically (never pickle)."""

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite, kind=PPCA_KIND)
    tensors, cells = {}, {}
    for kind, kind_cells in ppca.cells.items():
        cells[kind] = []
        for i, cell in enumerate(kind_cells):
            if cell is None:
                cells[kind].append(None)
                continue
            for part in ("mean", "components", "scales"):
                tensors[f"{kind}.{i}.{part}"] = getattr(cell, part).detach().cpu().float().contiguous()
            cells[kind].append({"noise_variance": cell.noise_variance, "tokens": cell.tokens})
    meta = {"format_version": PPCA_FORMAT_VERSION, "token_size": ppca.token_size, "latent_dim": ppca.latent_dim,
            "depth_buckets": DEPTH_BUCKETS, "cells": cells, "info": ppca.info}
    text = json.dumps(meta, sort_keys=True, indent=1) + "\n"
    with atomic_directory(out_dir, overwrite, kind=PPCA_KIND) as tmp:
        save_file(tensors, str(tmp / _WEIGHTS), metadata={"format_version": str(PPCA_FORMAT_VERSION)})
        (tmp / _META).write_text(text)
    return out_dir


def load_ppca(path) -> PPCAPrior:
    """Load a directory written by :func:`save_ppca`; ValueError with the reason when it is not one."""
    d = Path(path)
    if not ((d / _META).is_file() and (d / _WEIGHTS).is_file()):
        raise ValueError(f"{d} is not a PPCA prior directory (needs {_META} and {_WEIGHTS})")
    try:
        meta = json.loads((d / _META).read_text())
        tensors = load_file(str(d / _WEIGHTS))
    except Exception as e:  # JSON and safetensors errors alike: one line for the user
        raise ValueError(f"corrupt PPCA prior in {d}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != PPCA_FORMAT_VERSION:
        raise ValueError(f"unknown PPCA format in {d / _META} (expected version {PPCA_FORMAT_VERSION})")
    if meta.get("depth_buckets") != DEPTH_BUCKETS:
        raise ValueError(f"PPCA in {d} has {meta.get('depth_buckets')} depth buckets, this code {DEPTH_BUCKETS}")
    cells = {}
    try:
        for kind, kind_cells in meta["cells"].items():
            cells[kind] = [None if c is None else PPCACell(tensors[f"{kind}.{i}.mean"], tensors[f"{kind}.{i}.components"],
                                                            tensors[f"{kind}.{i}.scales"], float(c["noise_variance"]),
                                                            int(c["tokens"]))
                           for i, c in enumerate(kind_cells)]
    except (KeyError, TypeError) as e:
        raise ValueError(f"PPCA in {d} is incomplete: {e}") from e
    return PPCAPrior(int(meta["token_size"]), int(meta["latent_dim"]), cells, meta.get("info", {}))
