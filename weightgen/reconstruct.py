"""Reconstruction of a whole model through the VAE: every Linear/Conv2d weight -> latents -> weight.

Each layer is stored as its per-token latents plus one scale, and rebuilt as
``decode_layer(vae, latents, shape, kind, depth, scale)``. ``encode`` is one amortised pass (latent
means, decoded, scaled to the layer's RMS); ``mimic`` then optimises the latents and the log scale
through the frozen decoder on each layer's normalised squared error (Adam, best state kept).
Layers the VAE cannot take (a kind it never saw, a parametrized weight, the head with
``keep_head``) keep their weights and are listed as ``kept`` with the reason.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .models import resolve_device
from .io import WeightgenError, atomic_directory, check_checkpoint_path, check_output_dir, load_checkpoint, \
    save_tensors, write_json
from .mimicry.fidelity import compare_features, cosine, record_features
from .mimicry.gradient import descend_keep_best
from .models import check_arch, example_batch, model_from_state
from .recast import head_names
from .vae.codec import decode_layer, encode_layer, rms, weight_layers
from .vae.prior import default_vae_dir, load_vae_bundle, trained_kinds, vae_on
from .vae.tokenize import condition

log = logging.getLogger(__name__)

MODES = ("encode", "mimic")
DEFAULT_STEPS = 100
DEFAULT_LR = 1e-2
WEIGHTS_FILE, LATENTS_FILE, REPORT_FILE = "weights.safetensors", "latents.safetensors", "report.json"
LATENTS_FORMAT = "weightgen-latents/1"


@dataclass
class ReconstructOptions:
    arch: str
    checkpoint: str
    out: str
    model_kwargs: dict = field(default_factory=dict)
    vae: str | None = None  # VAE directory (default: the shipped one)
    mode: str = "encode"
    steps: int | None = None  # mimic only (default DEFAULT_STEPS)
    lr: float = DEFAULT_LR
    keep_head: bool = False
    seed: int = 0  # the probe batch of the function check
    device: str = "cpu"
    overwrite: bool = False
    fidelity_batch: int = 8


def validate(opts: ReconstructOptions) -> None:
    """Every check that needs no model, before any work is done."""
    if opts.mode not in MODES:
        raise WeightgenError(f"unknown mode {opts.mode!r}; choose from {', '.join(MODES)}")
    if opts.steps is not None and opts.steps < 0:
        raise WeightgenError("--steps must be >= 0")
    if opts.mode == "encode" and opts.steps:
        raise WeightgenError("--steps has no effect with --mode encode; use --mode mimic")
    if not opts.lr > 0:
        raise WeightgenError("--lr must be > 0")
    if opts.fidelity_batch < 1:
        raise WeightgenError("the fidelity batch must hold at least one input")
    if not opts.out:
        raise WeightgenError("name an output directory (--out DIR)")
    resolve_device(opts.device)
    check_arch(opts.arch)
    check_checkpoint_path(opts.checkpoint)
    check_output_dir(opts.out, opts.overwrite, kind="reconstruction")


class _Layer:
    """One layer's target weight, latents and log scale, on the model's device."""

    def __init__(self, vae, spec: dict, weight: torch.Tensor):
        self.vae, self.name, self.shape = vae, spec["name"], spec["shape"]
        self.kind, self.depth = spec["kind"], spec["depth"]
        self.target = weight.detach().float()  # the model's own tensor when float32: no copy
        self.cond = condition(self.shape, self.kind, self.depth, vae.config.token_size).to(weight.device)
        mu, _ = encode_layer(vae, weight.detach(), self.kind, self.depth)
        unit = decode_layer(vae, mu, self.shape, self.kind, self.depth, 1.0, self.cond)
        # the decoder sees normalised tokens: the scale is the layer's RMS over the decoded RMS
        scale = rms(self.target) / max(rms(unit), 1e-30)
        self.latents = mu.float().clone().requires_grad_(True)  # (tokens, latent_dim)
        self.log_scale = torch.tensor(math.log(max(scale, 1e-30)), device=weight.device).requires_grad_(True)
        self.target_norm2 = self.target.pow(2).sum().clamp(min=1e-30)

    def decode(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.log_scale.exp() if scale is None else scale
        return decode_layer(self.vae, self.latents, self.shape, self.kind, self.depth, scale, self.cond)

    def loss(self) -> torch.Tensor:
        """||W_hat - W||^2 / ||W||^2: direction and scale, every layer alike whatever its norm."""
        return (self.decode() - self.target).pow(2).sum() / self.target_norm2


def _mimic(layers: list[_Layer], steps: int, lr: float, progress: bool) -> list[float]:
    """Adam on the mean per-layer loss; parameters end at the best state seen."""
    params = [t for layer in layers for t in (layer.latents, layer.log_scale)]
    grads = [torch.zeros_like(p) for p in params]

    def loss_fn() -> torch.Tensor:
        # one layer's graph at a time (memory bounded by the largest layer); gradients are set in
        # before_step, the returned leaf only carries the value
        total = 0.0
        for i, layer in enumerate(layers):
            loss = layer.loss() / len(layers)
            g_latents, g_scale = torch.autograd.grad(loss, [layer.latents, layer.log_scale])
            grads[2 * i].copy_(g_latents)
            grads[2 * i + 1].copy_(g_scale)
            total += loss.item()
        return torch.tensor(total, requires_grad=True)

    def before_step() -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()

    best, history = descend_keep_best(params, loss_fn, torch.optim.Adam(params, lr=lr), steps,
                                      "reconstruct (mimic)", progress, before_step=before_step)
    with torch.no_grad():
        for keep, p in zip(best, params):
            p.copy_(keep)
    return history


def reconstruct(opts: ReconstructOptions, progress: bool = False) -> tuple[Path, dict]:
    """Run the whole job; returns the output directory and its report."""
    validate(opts)
    device = resolve_device(opts.device)
    start = time.perf_counter()
    vae, meta = load_vae_bundle(opts.vae)
    state = load_checkpoint(opts.checkpoint)
    with torch.random.fork_rng(devices=[]):  # a model that cannot be built on meta draws timm's init
        model = model_from_state(opts.arch, opts.model_kwargs, state, opts.checkpoint)
    del state
    model = model.to(device).eval()
    vae = vae_on(vae, device)
    batch = example_batch(model, opts.fidelity_batch, opts.seed).to(device)
    reference = record_features(model, batch)

    known, heads = trained_kinds(meta), head_names(model)
    layers, kept = [], []
    specs = weight_layers(model)
    for spec in tqdm(specs, desc="encoding layers", disable=not progress):
        reason = ("classifier head (keep_head)" if opts.keep_head and spec["name"] in heads
                  else f"the VAE never saw {spec['kind']} layers" if spec["kind"] not in known
                  else "weight is not a plain tensor (parametrized)" if not spec["direct"] else None)
        if reason:
            kept.append({"name": spec["name"], "shape": list(spec["shape"]), "kind": spec["kind"], "reason": reason})
            continue
        layers.append(_Layer(vae, spec, model.get_parameter(f"{spec['name']}.weight")))
    if kept:
        log.warning("kept %d layers as they are (e.g. %s: %s)", len(kept), kept[0]["name"], kept[0]["reason"])

    steps = (DEFAULT_STEPS if opts.steps is None else opts.steps) if opts.mode == "mimic" else 0
    fit_start = time.perf_counter()
    history = _mimic(layers, steps, opts.lr, progress) if steps and layers else []
    fit_seconds = time.perf_counter() - fit_start

    rows, latents = [], {}
    with torch.no_grad():
        for layer in layers:
            scale = layer.log_scale.detach().exp().float().reshape(1)  # stored: the decode uses exactly this
            z = layer.latents.detach().float().contiguous()
            weight = layer.decode(scale).reshape(layer.shape)
            latents[f"{layer.name}.latents"], latents[f"{layer.name}.scale"] = z, scale
            numbers = math.prod(layer.shape)
            rows.append({"name": layer.name, "shape": list(layer.shape), "kind": layer.kind, "depth": layer.depth,
                         "cosine": cosine(weight, layer.target),
                         "rel_error": ((weight - layer.target).norm() / layer.target.norm().clamp(min=1e-30)).item(),
                         "scale": scale.item(), "latent_numbers": z.numel() + 1, "weight_numbers": numbers})
            param = model.get_parameter(f"{layer.name}.weight")
            param.copy_(weight.to(param.dtype))  # after the row: the target may be this very tensor
        recorded = record_features(model, batch)
    function = compare_features(reference, recorded)
    ref_logits, logits = reference[1].float(), recorded[1].float()
    function["logits_rel_error"] = ((logits - ref_logits).norm() / ref_logits.norm().clamp(min=1e-30)).item()
    function.pop("block_cosine", None)  # per-block detail: the min below says enough

    cosines = [r["cosine"] for r in rows]
    latent_numbers = sum(r["latent_numbers"] for r in rows)
    weight_numbers = sum(r["weight_numbers"] for r in rows)
    report = {
        "arch": opts.arch, "model_kwargs": opts.model_kwargs, "checkpoint": str(opts.checkpoint),
        "vae": str(opts.vae or default_vae_dir()), "mode": opts.mode, "steps": steps,
        "lr": opts.lr if steps else None, "keep_head": opts.keep_head, "seed": opts.seed, "device": str(device),
        "layers": rows, "kept": kept,
        "totals": {"reconstructed": len(rows), "kept": len(kept),
                   "mean_cosine": statistics.fmean(cosines) if cosines else None,
                   "median_cosine": statistics.median(cosines) if cosines else None,
                   "min_cosine": min(cosines) if cosines else None,
                   "mean_rel_error": statistics.fmean(r["rel_error"] for r in rows) if rows else None,
                   "latent_numbers": latent_numbers, "weight_numbers": weight_numbers,
                   "compression": latent_numbers / weight_numbers if weight_numbers else None},
        "function": function,
        "loss_history": history,
        "decode": "weight = weightgen.vae.codec.decode_layer(vae, latents, shape, kind, depth, scale)",
        "fit_seconds": fit_seconds,
    }
    metadata = {"format": LATENTS_FORMAT, "vae": report["vae"], "arch": opts.arch}
    with atomic_directory(opts.out, opts.overwrite, kind="reconstruction") as tmp:
        save_tensors(tmp / WEIGHTS_FILE, model.state_dict(), {"format": "weightgen-reconstruction/1", "arch": opts.arch})
        save_tensors(tmp / LATENTS_FILE, latents, metadata)
        report["seconds"] = time.perf_counter() - start
        write_json(tmp / REPORT_FILE, report)
    return Path(opts.out), report


__all__ = ["ReconstructOptions", "reconstruct", "validate", "MODES", "DEFAULT_STEPS", "DEFAULT_LR"]
