"""Whole layers through a WeightVAE: encode to latents, decode to weights, and a latent density."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import RecastLayer
from .model import WeightVAE
from .tokenize import KINDS, condition, detokenize, layer_kind, tokenize

DEPTH_BUCKETS = 4
# tokens per VAE call: bounds memory on large layers; a power of two, so chunks keep the
# transformer VAE's (power-of-two) windows intact
_CHUNK = 65536
# without autograd on the CPU, smaller calls keep each layer's activations (4096 x 512 floats) in
# cache: 1.6x faster decoding, and the same bits (each token's window is computed alone either way)
_CPU_INFERENCE_CHUNK = 4096


def _chunk(device: torch.device, grad: bool) -> int:
    return _CPU_INFERENCE_CHUNK if device.type == "cpu" and not grad else _CHUNK


def weight_layers(model: nn.Module) -> list[dict]:
    """Every Linear / Conv2d weight (subclasses and recast layers too) in model order.

    Each entry: name, shape, groups, kind, relative depth, and ``direct``: whether ``name.weight``
    is the module's own tensor (False for recast layers and parametrized weights such as weight
    norm), i.e. whether it can be read from / written into the state dict as is. Subclasses such
    as timm's ``ScaledStdConv2d`` are direct: their forward transforms a plain weight.
    """
    found = [(n, tuple(m.bank.weight_shape) if isinstance(m, RecastLayer) else tuple(m.weight.shape), m)
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, RecastLayer))]
    last = max(len(found) - 1, 1)
    return [{"name": name, "shape": shape, "groups": getattr(m, "groups", 1),
             "kind": layer_kind(shape, getattr(m, "groups", 1)), "depth": i / last,
             "direct": not isinstance(m, RecastLayer) and isinstance(m._parameters.get("weight"), torch.Tensor)}
            for i, (name, shape, m) in enumerate(found)]


def _token_size(vae: WeightVAE) -> int:
    return vae.config.token_size


@torch.no_grad()
def encode_layer(vae: WeightVAE, weight: torch.Tensor, kind: str, depth: float) -> tuple[torch.Tensor, float]:
    """Latent means (N, latent_dim) of a layer's tokens, on the VAE's device, and the layer's scale (RMS)."""
    tokens = tokenize(weight, kind, depth, _token_size(vae))  # in the weight's dtype/device, moved chunk by chunk
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    step = _chunk(device, grad=False)
    mus = [vae.encode(tokens.values[i:i + step].to(device, dtype), tokens.cond[i:i + step].to(device, dtype))[0]
           for i in range(0, tokens.values.shape[0], step)]
    return torch.cat(mus), tokens.scale


def decode_layer(vae: WeightVAE, latents: torch.Tensor, shape, kind: str, depth: float,
                 scale: float | torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Weight of ``shape`` from per-token latents (N, latent_dim), on their device; differentiable in them."""
    cond = (condition(shape, kind, depth, _token_size(vae)) if cond is None else cond).to(latents.device)
    step = _chunk(latents.device, torch.is_grad_enabled() and (latents.requires_grad or any(
        p.requires_grad for p in vae.parameters())))
    values = torch.cat([vae.decode(latents[i:i + step], cond[i:i + step])
                        for i in range(0, latents.shape[0], step)])  # (N, token_size)
    return detokenize(values, shape, 1.0, _token_size(vae)) * scale


def fit_latent_density(records: list[tuple], latent_dim: int, family: str = "gaussian", seed: int = 0) -> dict:
    """Density of latent means per layer kind and depth bucket (JSON-able).

    records: (kind, depth, mu (N, latent_dim)) or (kind, depth, mu, model id). ``family``:
    "gaussian" (one diagonal Gaussian per cell) or "mixture" (a diagonal Gaussian mixture per cell,
    1-8 components chosen by BIC, see ``_fit_mixture``; the Gaussian's mean/std are kept beside it,
    so readers that know only the Gaussian still work). With model ids, each mixture also gets an
    N(0, I) component (the VAE's own prior) of weight 1 / (models in the cell + 1): a cell fitted
    on few models is trusted less (on held-out models it lifted depthwise layers, fitted on two
    models, from below N(0, I) to above it: docs/bench_prior.md). Empty cells fall back to the
    kind's pooled statistics, then to the standard normal prior.
    """
    if family not in ("gaussian", "mixture"):
        raise ValueError(f"unknown latent density family {family!r}: use 'gaussian' or 'mixture'")
    cpu64 = {"dtype": torch.float64, "device": "cpu"}  # JSON-bound statistics, whatever device mu is on
    sums = {k: torch.zeros(DEPTH_BUCKETS + 1, latent_dim, **cpu64) for k in KINDS}
    squares = {k: torch.zeros(DEPTH_BUCKETS + 1, latent_dim, **cpu64) for k in KINDS}
    counts = {k: torch.zeros(DEPTH_BUCKETS + 1, **cpu64) for k in KINDS}
    for kind, depth, mu, *_ in records:
        mu = mu.detach().double().cpu()
        for bucket in (depth_bucket(depth), DEPTH_BUCKETS):  # the last row pools every depth
            sums[kind][bucket] += mu.sum(0)
            squares[kind][bucket] += mu.pow(2).sum(0)
            counts[kind][bucket] += mu.shape[0]
    density = {}
    for kind in KINDS:
        n = counts[kind][:, None]
        mean = torch.where(n > 0, sums[kind] / n.clamp(min=1), torch.zeros(1, **cpu64))
        var = torch.where(n > 1, squares[kind] / n.clamp(min=1) - mean ** 2, torch.ones(1, **cpu64))
        std = var.clamp(min=1e-6).sqrt()
        pooled = counts[kind][DEPTH_BUCKETS] > 0
        for b in range(DEPTH_BUCKETS):
            if counts[kind][b] == 0 and pooled:
                mean[b], std[b] = mean[DEPTH_BUCKETS], std[DEPTH_BUCKETS]
        density[kind] = {"mean": mean[:DEPTH_BUCKETS].tolist(), "std": std[:DEPTH_BUCKETS].tolist(),
                         "tokens": counts[kind][:DEPTH_BUCKETS].tolist(), "seen": bool(pooled)}
        if family == "mixture":
            cells = [[r for r in records if r[0] == kind and depth_bucket(r[1]) == b] for b in range(DEPTH_BUCKETS)]
            pooled_fit = None
            mixtures = []
            for b, cell in enumerate(cells):
                if not cell and pooled_fit is None:  # the kind's pooled mixture, or N(0, I) for an unseen kind
                    every = [r for c in cells for r in c]
                    pooled_fit = (_with_backstop(_fit_mixture([r[2] for r in every], seed), every) if every else
                                  {"weights": [1.0], "means": [[0.0] * latent_dim], "stds": [[1.0] * latent_dim]})
                mixtures.append(_with_backstop(_fit_mixture([r[2] for r in cell], seed + b), cell) if cell else pooled_fit)
            density[kind].update({"type": "mixture", "mixture": mixtures})
    return density


_MIXTURE_COMPONENTS = (1, 2, 4, 8)
_SAMPLE_CHUNK = 4096  # tokens per in-place mixture update in sample_latents (fits in cache)
_MIXTURE_MAX_TOKENS = 65536  # per cell: bounds the EM's cost on big zoos; more adds little to 8 components
_MIXTURE_TOKENS_PER_PARAM = 4  # at most one component per 4 * (2 * latent_dim + 1) tokens


def _with_backstop(mixture: dict, records: list[tuple]) -> dict:
    """``mixture`` plus an N(0, I) component of weight 1 / (models + 1), when the records name their models."""
    if not records or any(len(r) < 4 for r in records):
        return mixture
    share = 1.0 / (len({r[3] for r in records}) + 1)
    dim = len(mixture["means"][0])
    return {"weights": [w * (1.0 - share) for w in mixture["weights"]] + [share],
            "means": mixture["means"] + [[0.0] * dim], "stds": mixture["stds"] + [[1.0] * dim]}


def _fit_mixture(cell: list[torch.Tensor], seed: int) -> dict:
    """Diagonal Gaussian mixture (JSON-able weights / means / stds) of one cell's latents.

    cell: one (N_i, latent_dim) latent-mean tensor per layer. The component count (1, 2, 4 or 8,
    at most one per ``_MIXTURE_TOKENS_PER_PARAM`` tokens per parameter) is the one with the lowest
    BIC: on the shipped VAE's held-out models it predicted better than choosing the count on every
    4th training layer (-21.467 vs -21.486 nats per token, measured once; allowing 16 did not help).
    Deterministic: fixed sklearn random_state and a seeded numpy Generator (no global RNG).
    """
    import numpy as np
    from sklearn.mixture import GaussianMixture

    x = torch.cat([mu.detach().double().cpu() for mu in cell]).numpy()
    if len(x) > _MIXTURE_MAX_TOKENS:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), _MIXTURE_MAX_TOKENS, replace=False))]
    cap = max(1, len(x) // (_MIXTURE_TOKENS_PER_PARAM * (2 * x.shape[1] + 1)))
    fits = [GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-6, max_iter=200).fit(x)
            for k in _MIXTURE_COMPONENTS if k <= cap or k == 1]
    gm = min(fits, key=lambda fit: fit.bic(x))
    return {"weights": gm.weights_.tolist(), "means": gm.means_.tolist(), "stds": np.sqrt(gm.covariances_).tolist()}


def depth_bucket(depth: float) -> int:
    return min(int(depth * DEPTH_BUCKETS), DEPTH_BUCKETS - 1)


def sample_latents(density: dict | None, kind: str, depth: float, count: int, latent_dim: int,
                   generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """(count, latent_dim) latents from the fitted density, or from N(0, I) without one.

    Drawn on the CPU (``generator`` is a CPU generator), so a seed gives the same latents on any
    device; the caller moves them.
    """
    noise = torch.randn(count, latent_dim, generator=generator, device="cpu")
    if not density or kind not in density:
        return noise * temperature
    cell = depth_bucket(depth)
    if density[kind].get("type") == "mixture":
        # temperature scales the spread within a component; which component is drawn is unaffected
        mix = density[kind]["mixture"][cell]
        means = torch.tensor(mix["means"], dtype=torch.float32, device="cpu")
        stds = torch.tensor(mix["stds"], dtype=torch.float32, device="cpu") * temperature
        # Walker's alias method: one uniform per token picks a column (integer part) and, against the
        # column's threshold, the column or its alias (fraction): exact, and 2x faster than searchsorted
        prob, alias = _alias_table(mix["weights"])
        u = torch.rand(count, generator=generator, dtype=torch.float64, device="cpu").mul_(len(prob))
        column = u.long().clamp_(max=len(prob) - 1)
        component = torch.where(u.sub_(column) < prob.index_select(0, column), column, alias.index_select(0, column))
        # in place, in cache-sized chunks: ~4x faster than whole-tensor gathers, and no (count, dim) temporary
        for start in range(0, count, _SAMPLE_CHUNK):
            pick = component[start:start + _SAMPLE_CHUNK]
            noise[start:start + _SAMPLE_CHUNK].mul_(stds.index_select(0, pick)).add_(means.index_select(0, pick))
        return noise
    noise = noise * temperature
    mean = torch.tensor(density[kind]["mean"][cell], dtype=torch.float32, device="cpu")
    std = torch.tensor(density[kind]["std"][cell], dtype=torch.float32, device="cpu")
    return mean + noise * std


def _alias_table(weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold, alias) per column for Walker's alias method over ``weights`` (need not sum to 1)."""
    k, total = len(weights), float(sum(weights))
    scaled = [float(w) * k / total for w in weights]
    prob, alias = [1.0] * k, list(range(k))
    small = [i for i, p in enumerate(scaled) if p < 1.0]
    large = [i for i, p in enumerate(scaled) if p >= 1.0]
    while small and large:
        s, big = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], big
        scaled[big] -= 1.0 - scaled[s]
        (small if scaled[big] < 1.0 else large).append(big)
    return (torch.tensor(prob, dtype=torch.float64, device="cpu"),  # sampling runs on the CPU generator
            torch.tensor(alias, dtype=torch.long, device="cpu"))


def latent_log_prob(density: dict | None, kind: str, depth: float, latents: torch.Tensor) -> torch.Tensor:
    """Log density (N,) of latents (N, latent_dim) under the cell ``sample_latents`` draws from (float64, CPU)."""
    x = latents.detach().double().cpu()
    if not density or kind not in density:
        means, stds, weights = torch.zeros(1, x.shape[1], device="cpu"), torch.ones(1, x.shape[1], device="cpu"), [1.0]
    elif density[kind].get("type") == "mixture":
        mix = density[kind]["mixture"][depth_bucket(depth)]
        means, stds, weights = torch.tensor(mix["means"], device="cpu"), torch.tensor(mix["stds"], device="cpu"), mix["weights"]
    else:
        cell = depth_bucket(depth)
        means = torch.tensor([density[kind]["mean"][cell]], device="cpu")
        stds, weights = torch.tensor([density[kind]["std"][cell]], device="cpu"), [1.0]
    means, stds = means.double(), stds.double()
    z = (x[:, None, :] - means) / stds  # (N, K, D)
    per_component = -0.5 * z.pow(2).sum(-1) - stds.log().sum(-1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
    log_w = torch.tensor(weights, dtype=torch.float64, device="cpu").log()
    return torch.logsumexp(per_component + log_w, dim=1)


def rms(weight: torch.Tensor) -> float:
    """Root mean square (float32 accumulation: plenty for a statistic, and no float64 copy)."""
    return torch.linalg.vector_norm(weight.detach().float()).item() / math.sqrt(weight.numel()) if weight.numel() else 0.0


__all__ = ["weight_layers", "encode_layer", "decode_layer", "fit_latent_density", "sample_latents", "latent_log_prob",
           "depth_bucket", "rms"]
