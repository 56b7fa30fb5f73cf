"""Weights for any architecture from a trained WeightVAE: no checkpoint, no download, on any device."""
from __future__ import annotations

import copy
import logging
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import WeightgenError
from .codec import decode_layer, rms, sample_latents, weight_layers
from .model import WeightVAE
from .store import load_vae, predict_scale
from .tokenize import token_count

log = logging.getLogger(__name__)


def default_vae_dir() -> Path:
    """The VAE shipped inside the package (trained on the default digits zoo)."""
    return Path(str(resources.files("weightgen") / "assets" / "vae"))


def load_vae_bundle(path: str | Path | None = None) -> tuple[WeightVAE, dict]:
    """(vae, meta) from ``path`` or the shipped default, with user-facing errors."""
    path = Path(path) if path else default_vae_dir()
    try:
        with torch.random.fork_rng(devices=[]):  # WeightVAE's init, overwritten at once, draws from the global RNG
            vae, meta = load_vae(path)
    except ValueError as err:
        hint = "" if path != default_vae_dir() else " (the shipped VAE is missing: reinstall, or pass --vae DIR)"
        raise WeightgenError(f"{err}{hint}") from None
    if "scale_model" not in meta or "latent_density" not in meta:
        raise WeightgenError(f"VAE in {path} lacks its scale model / latent density; export it with scripts/train_vae.py")
    return vae, meta


def vae_on(vae: WeightVAE, device: torch.device) -> WeightVAE:
    """``vae`` frozen in eval mode on ``device``; a copy when it lives elsewhere (the caller's stays put)."""
    if next(vae.parameters()).device != torch.device(device):
        vae = copy.deepcopy(vae).to(device)
    return vae.eval().requires_grad_(False)


def trained_kinds(meta: dict) -> set[str]:
    return {kind for kind, cell in meta.get("latent_density", {}).items() if cell.get("seen")}


@torch.no_grad()
def sample_weights(model: nn.Module, vae: WeightVAE, meta: dict, seed: int = 0, temperature: float = 1.0,
                   skip: set[str] | None = None, progress: bool = False,
                   in_place: bool = False) -> tuple[dict, list[dict], list[str]]:
    """Sample every Linear/Conv2d weight of ``model`` (except ``skip``) from the VAE.

    Latents come from the density fitted to the zoo per layer kind and depth; each layer is then
    scaled to the RMS the zoo's scale model predicts for its kind, shape and depth. Linear/Conv2d
    subclasses (timm's ``ScaledStdConv2d``) are sampled too. Layers of a kind the VAE never saw, and
    layers whose weight is not a plain tensor (parametrized), keep timm's init, are returned as
    ``fallback`` and named in a logged warning.
    Weights come out on the model's device, where the VAE decodes them; the latents are drawn
    from a CPU generator, so a seed gives the same weights on every device (to float rounding).
    With ``in_place`` each layer is written into the model's own weight as soon as it is decoded,
    and the returned dict holds those weights themselves: no second model-size copy.
    Returns (weights keyed ``name.weight``, per-layer statistics, fallback layer names).
    """
    if "scale_model" not in meta:
        raise ValueError("this VAE has no scale model; retrain it with scripts/train_vae.py")
    kinds = trained_kinds(meta)
    density = meta.get("latent_density")
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    vae = vae_on(vae, device)
    generator = torch.Generator().manual_seed(seed)
    weights, stats, fallback = {}, [], []
    layers = [layer for layer in weight_layers(model) if layer["name"] not in (skip or set())]
    for layer in tqdm(layers, desc="sampling layers", disable=not progress):
        name, shape, kind, depth = layer["name"], layer["shape"], layer["kind"], layer["depth"]
        if kind not in kinds or not layer["direct"]:
            fallback.append(name)
            continue
        latents = sample_latents(density, kind, depth, token_count(shape, vae.config.token_size),
                                 vae.config.latent_dim, generator, temperature).to(device)
        weight = decode_layer(vae, latents, shape, kind, depth, 1.0)
        target = predict_scale(meta["scale_model"], kind, shape, depth)
        weight.mul_(target / max(rms(weight), 1e-12))
        init = modules[name].weight
        init_rms = rms(init)  # timm's init: read before an in-place write replaces it
        stats.append({"name": name, "kind": kind, "shape": list(shape), "depth": depth,
                      "rms": target, "timm_init_rms": init_rms, "mean": weight.mean().item(),
                      "timm_init_mean": init.mean().item(), "rms_ratio_to_timm": target / max(init_rms, 1e-12)})
        if in_place:
            init.copy_(weight)
            del weight  # freed before the next layer is decoded
            weights[f"{name}.weight"] = init
        else:
            weights[f"{name}.weight"] = weight
    unseen = [l for l in layers if l["name"] in fallback and l["kind"] not in kinds]
    if unseen:
        log.warning("VAE knows no %s layers; kept timm init for %d layers (e.g. %s)",
                    "/".join(sorted({l["kind"] for l in unseen})), len(unseen), unseen[0]["name"])
    indirect = [l["name"] for l in layers if l["name"] in fallback and l["kind"] in kinds]
    if indirect:
        log.warning("kept timm init for %d layers whose weight is not a plain tensor (parametrized, e.g. %s)",
                    len(indirect), indirect[0])
    return weights, stats, fallback


@torch.no_grad()
def activation_ranges(recorded: tuple[dict, torch.Tensor], batch: torch.Tensor) -> dict:
    """Std of each block's output relative to the input std: a sanity check for generated weights.

    ``recorded`` is what ``mimicry.fidelity.record_features`` returned for ``batch``.
    """
    feats, logits = recorded
    in_std = batch.std().item()
    ratios = {name: out.float().std().item() / in_std for name, out in feats.items()}
    finite = all(torch.isfinite(out).all().item() for out in feats.values()) and torch.isfinite(logits).all().item()
    return {"input_std": in_std, "block_std_ratio": ratios, "max_ratio": max(ratios.values()),
            "min_ratio": min(ratios.values()), "all_finite": bool(finite)}
