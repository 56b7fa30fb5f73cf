"""Walk from one checkpoint to another: in weight space, and through the WeightVAE's latent space.

Three paths per point ``alpha`` in ``linspace(0, 1, steps)``:

* ``weight_lerp``: every tensor of the state dict interpolated linearly.
* ``latent_lerp`` / ``latent_slerp``: each Linear/Conv2d weight the VAE can handle is encoded at both
  ends (latent means per token + layer RMS), the latents are interpolated (linearly, or spherically
  per token), the log RMS linearly, and the result is decoded. Everything else (biases, norms,
  the classifier head, layers of a kind the VAE never saw) follows ``weight_lerp``.

At ``alpha`` 0 and 1 every path is the original checkpoint, not its VAE reconstruction, so the ends
reproduce the inputs exactly; how far the reconstruction is from them (the jump a latent path makes
right after its first point) is reported separately as ``recon_cosine_a`` / ``recon_cosine_b``.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import WeightgenError, atomic_directory, check_output_dir, load_checkpoint, write_json
from ..models import create_model, input_size, load_into
from .codec import decode_layer, encode_layer, weight_layers
from .model import WeightVAE
from .prior import default_vae_dir, load_vae_bundle, trained_kinds
from .tokenize import condition

log = logging.getLogger(__name__)

METHODS = ("weight_lerp", "latent_lerp", "latent_slerp")
COLUMNS = ("alpha", "method", "accuracy", "cosine_a", "cosine_b")
_PARALLEL = 1e-4  # |sin(angle)| below this: slerp == lerp to ~1e-8, and the formula is ill-conditioned

__all__ = ["METHODS", "COLUMNS", "interpolate", "InterpolationPath", "slerp", "lerp_state", "weight_cosine"]


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
    return float((x @ y) / (x.norm() * y.norm()).clamp_min(torch.finfo(torch.float64).tiny))


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
    """Interpolated state dicts between two loaded checkpoints of one architecture.

    ``skip``: Linear/Conv2d module names kept in weight space (:func:`interpolate` passes the head).
    Layers of a kind the VAE never saw (``prior.trained_kinds``) are kept in weight space too.
    """

    def __init__(self, model: nn.Module, state_a: dict, state_b: dict, vae: WeightVAE, meta: dict,
                 skip: set[str] | None = None, residual: bool = True):
        self.state_a, self.state_b, self.vae = state_a, state_b, vae
        kinds = trained_kinds(meta)
        layers = weight_layers(model)
        heads = _heads(model)
        self.weight_keys = [f"{layer['name']}.weight" for layer in layers]
        self.flat_a, self.flat_b = self.flatten(state_a), self.flatten(state_b)
        self.layers: list[_Layer] = []
        self.weight_space: dict[str, str] = {}  # layer name -> why it is not interpolated through the VAE
        for layer in layers:
            name, shape, kind, depth = layer["name"], tuple(layer["shape"]), layer["kind"], layer["depth"]
            if name in (skip or set()):
                self.weight_space[name] = "head" if name in heads else "skipped"
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
            state[f"{layer.name}.weight"] = weight
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
            state[key] = self._decode(layer, mu, log_scale)
            cosines.append(weight_cosine(state[key].reshape(-1).double(), source[key].reshape(-1).double()))
        return state, cosines


def _heads(model: nn.Module) -> set[str]:
    from ..recast import head_names

    return head_names(model)


class _DigitsEval:
    """Held-out digits accuracy with BatchNorm statistics re-estimated on training batches."""

    def __init__(self, model: nn.Module, image_size: int, in_chans: int, seed: int):
        from ..digits import load_digits_data
        from ..zoo import ZOO_DATA_SEED

        self.model, self.seed = model, seed
        # the zoo's split: another seed would test on images the zoo models were trained on
        self.data = load_digits_data(image_size, in_chans, seed=ZOO_DATA_SEED)

    def __call__(self, state: dict, reestimate: bool = True) -> float:
        from ..digits import evaluate, reestimate_batchnorm

        self.model.load_state_dict(state, strict=True)
        if reestimate:
            with torch.random.fork_rng(devices=[]):  # dropout / drop-path run in train mode here
                torch.manual_seed(self.seed)
                reestimate_batchnorm(self.model, self.data.train)
        return evaluate(self.model, self.data.test)


def _eval_setup(model: nn.Module, image_size: int | None) -> tuple[int, int] | str:
    """(image_size, in_chans) for digits accuracy, or why accuracy does not apply."""
    from ..zoo import ZOO_IMAGE_SIZE

    classes = getattr(model, "num_classes", None)
    if classes != 10:
        return f"the head has {classes} classes, digits needs 10"
    try:
        chans, height, width = input_size(model)
    except WeightgenError as err:
        return str(err)
    if chans not in (1, 3):
        return f"the model takes {chans} input channels, digits has 1 (or 3 repeated)"
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None) is not None
    if fixed:  # ViT-like: the size is part of the architecture
        if height != width:
            return f"the model takes {height}x{width} inputs, digits are square"
        if image_size is not None and image_size != height:
            raise WeightgenError(f"--image-size {image_size} does not match the model's fixed input size {height}")
        return height, chans
    # CNNs accept any size; timm's pretrained_cfg size (e.g. 224) is not what a digits model was
    # trained at, so use the zoo's training size unless told otherwise.
    size = ZOO_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 8:
        raise WeightgenError(f"--image-size must be >= 8, got {size}")
    return size, chans


def _load_end(model: nn.Module, path, label: str) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    load_into(model, state, f"checkpoint {label} ({path})")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}  # in the model's dtypes


def interpolate(arch: str, a, b, steps: int, out, vae_dir=None, model_kwargs: dict | None = None, seed: int = 0,
                overwrite: bool = False, logdir=None, progress: bool = False, image_size: int | None = None,
                skip: set[str] | None = None, residual: bool = True) -> tuple[Path, list[dict]]:
    """Interpolate checkpoints ``a`` -> ``b`` of ``arch`` along every method in :data:`METHODS`.

    Writes ``interpolation.csv`` (one row per point and method, :data:`COLUMNS`), ``interpolation.png``
    and ``summary.json`` to ``out`` atomically; with ``logdir`` also TensorBoard scalars
    ``interpolation/<method>/{accuracy,cosine_a,cosine_b}`` at global step = point index.
    Accuracy (held-out digits, BN re-estimated on training batches) only when the head has 10
    classes; ``image_size`` defaults to the model's fixed input size, else the zoo's 32.
    ``skip``: Linear/Conv2d module names interpolated in weight space (default: the classifier head).
    Returns (out dir, rows); raises WeightgenError on bad input before anything is written.
    """
    start = time.perf_counter()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise WeightgenError(f"--steps must be an integer >= 2 (the two end points), got {steps!r}")
    out = Path(out)
    check_output_dir(out, overwrite, kind="interpolation")
    vae, meta = load_vae_bundle(vae_dir)
    with torch.random.fork_rng(devices=[]):  # deterministic in seed; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = create_model(arch, model_kwargs)
        state_a, state_b = _load_end(model, a, "a"), _load_end(model, b, "b")
        skip = _heads(model) if skip is None else set(skip)
        unknown = skip - {layer["name"] for layer in weight_layers(model)}
        if unknown:
            raise WeightgenError(f"skip names no Linear/Conv2d layer of {arch}: {sorted(unknown)[:3]}")
        setup = _eval_setup(model, image_size)
        path = InterpolationPath(model, state_a, state_b, vae, meta, skip, residual)
        evaluator = None if isinstance(setup, str) else _DigitsEval(model, *setup, seed=seed)
        if evaluator is None:
            log.info("no accuracy: %s", setup)
        unseen = {n: why for n, why in path.weight_space.items() if why.startswith("VAE never")}
        if unseen:
            log.warning("%d layer(s) of kinds the VAE never saw are interpolated in weight space (e.g. %s)",
                        len(unseen), next(iter(unseen)))

        def measure(state: dict) -> dict:
            cos_a, cos_b = path.cosines(state)
            return {"accuracy": evaluator(state) if evaluator else None, "cosine_a": cos_a, "cosine_b": cos_b}

        alphas = torch.linspace(0, 1, steps, dtype=torch.float64).tolist()
        rows: list[dict] = []
        ends: dict[float, dict] = {}  # every method is the original checkpoint at 0 and 1
        for alpha in tqdm(alphas, desc="interpolating", disable=not progress):
            for method in METHODS:
                if alpha in (0.0, 1.0):
                    if alpha not in ends:
                        ends[alpha] = measure(path.state(alpha, method))
                    metrics = ends[alpha]
                else:
                    metrics = measure(path.state(alpha, method))
                rows.append({"alpha": alpha, "method": method, **metrics})

        recon = {}
        for end, source in (("a", state_a), ("b", state_b)):
            state, layer_cos = path.reconstruction(end)
            flat = path.flatten(state)
            recon[end] = {"cosine": weight_cosine(flat, path.flatten(source)),
                          "accuracy": evaluator(state) if evaluator else None, "layer_cosines": layer_cos}
        checkpoint_accuracy = {end: evaluator(s, reestimate=False) if evaluator else None
                               for end, s in (("a", state_a), ("b", state_b))}

    summary = _summary(arch, model_kwargs, a, b, steps, seed, vae_dir, setup, path, rows, recon,
                       checkpoint_accuracy)
    with atomic_directory(out, overwrite, kind="interpolation") as tmp:
        _write_csv(tmp / "interpolation.csv", rows)
        _plot(tmp / "interpolation.png", rows, recon, arch)
        if logdir:
            _tensorboard(logdir, rows)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        write_json(tmp / "summary.json", summary)
    log.info("interpolated %s in %.1fs: %s", arch, summary["seconds"], out)
    return out, rows


def _summary(arch, model_kwargs, a, b, steps, seed, vae_dir, setup, path, rows, recon, checkpoint_accuracy) -> dict:
    methods = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        acc = [r["accuracy"] for r in mine]
        entry = {"accuracy": acc, "cosine_a": [r["cosine_a"] for r in mine], "cosine_b": [r["cosine_b"] for r in mine]}
        if acc[0] is not None:
            # barrier: how far the worst point falls below the mean of the two ends
            entry.update(min_accuracy=min(acc), barrier=(acc[0] + acc[-1]) / 2 - min(acc))
        methods[method] = entry
    return {
        "arch": arch, "model_kwargs": dict(model_kwargs or {}), "a": str(a), "b": str(b), "steps": steps,
        "seed": seed, "vae": str(vae_dir or default_vae_dir()),
        "residual_corrected": any(layer.residual_a is not None for layer in path.layers),
        "alphas": [r["alpha"] for r in rows if r["method"] == METHODS[0]],
        "accuracy": ({"applies": False, "reason": setup} if isinstance(setup, str) else
                     {"applies": True, "data": "sklearn digits, zoo split, test set", "image_size": setup[0],
                      "in_chans": setup[1], "batchnorm": "re-estimated on training batches at every point",
                      "checkpoint_a_stored_bn": checkpoint_accuracy["a"],
                      "checkpoint_b_stored_bn": checkpoint_accuracy["b"]}),
        "endpoints": "alpha 0 and 1 are the original checkpoints for every method (not VAE reconstructions)",
        "recon_cosine_a": recon["a"]["cosine"], "recon_cosine_b": recon["b"]["cosine"],
        "recon_accuracy_a": recon["a"]["accuracy"], "recon_accuracy_b": recon["b"]["accuracy"],
        "vae_layers": [{"name": layer.name, "kind": layer.kind, "recon_cosine_a": ca, "recon_cosine_b": cb}
                       for layer, ca, cb in zip(path.layers, recon["a"]["layer_cosines"], recon["b"]["layer_cosines"])],
        "weight_space_layers": [{"name": n, "reason": why} for n, why in path.weight_space.items()],
        "methods": methods,
    }


def _write_csv(file: Path, rows: list[dict]) -> None:
    with open(file, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})


def _plot(file: Path, rows: list[dict], recon: dict, arch: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    has_acc = rows[0]["accuracy"] is not None
    fig = Figure(figsize=(11 if has_acc else 6, 5), layout="constrained")
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange")))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        alphas = [r["alpha"] for r in mine]
        if has_acc:
            axes[0].plot(alphas, [r["accuracy"] for r in mine], "o-", ms=3, color=colors[method], label=method)
        axes[-1].plot(alphas, [r["cosine_a"] for r in mine], "-", color=colors[method], label=f"{method} cos to a")
        axes[-1].plot(alphas, [r["cosine_b"] for r in mine], "--", color=colors[method], label=f"{method} cos to b")
    if has_acc:
        axes[0].plot([0, 1], [recon["a"]["accuracy"], recon["b"]["accuracy"]], "x", ms=9, color="tab:red",
                     label="VAE reconstruction of the ends")
        axes[0].set(xlabel="alpha", ylabel="held-out digits accuracy", title=f"{arch}: accuracy", ylim=(0, 1.02))
        axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axes[-1].plot([0, 1], [recon["a"]["cosine"], recon["b"]["cosine"]], "x", ms=9, color="tab:red",
                  label="VAE recon cosine of the ends")
    axes[-1].set(xlabel="alpha", ylabel="weight cosine (Linear/Conv2d)", title="cosine to a (solid) / b (dashed)")
    axes[-1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.savefig(file, dpi=110)


def _tensorboard(logdir, rows: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    index = {alpha: i for i, alpha in enumerate(sorted({r["alpha"] for r in rows}))}
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for row in rows:
            step = index[row["alpha"]]
            for key in ("accuracy", "cosine_a", "cosine_b"):
                if row[key] is not None:
                    writer.add_scalar(f"interpolation/{row['method']}/{key}", row[key], step)
