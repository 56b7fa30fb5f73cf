"""Train M models of one architecture at once: stacked parameters, one ``vmap`` over the models.

``train_ensemble`` takes M freshly built models of the same architecture (same kwargs), one batch
stream per model, and per-model learning rate and weight decay; it trains them for a fixed number of
steps with SGD (momentum) or AdamW under a OneCycle-shaped learning rate, and writes the trained
weights back into the models. BatchNorm runs in train mode with per-model running statistics (each
model's buffers are a slice of the stacked ones, updated in place under ``vmap``); callers re-estimate
them exactly afterwards (:func:`reestimate_batchnorm`).

Every model draws its batches and augmentation from its own generator, so a model's data does not
depend on which other models share its ensemble. The float results do depend on how the work is
batched (vmap reorders reductions): a zoo fixes its ensembles in its spec list, so that a sharded
build gives the same bytes as one run.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from .metrics import cosine

__all__ = ["EnsembleConfig", "onecycle_factor", "augment", "train_ensemble", "train_single",
           "reestimate_batchnorm", "evaluate", "weight_cosines"]

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class EnsembleConfig:
    steps: int
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw" (betas 0.9, 0.999)
    momentum: float = 0.9
    pct_start: float = 0.3  # OneCycle: fraction of steps spent warming up
    div_factor: float = 25.0  # start lr = lr / div_factor
    final_div_factor: float = 1e4  # final lr = start lr / final_div_factor
    grad_clip: float = 0.0  # per-model global grad-norm clip; 0: none


def onecycle_factor(step: int, steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                    final_div_factor: float = 1e4) -> float:
    """The lr multiplier of torch's OneCycleLR (cosine anneal, no momentum cycling) at ``step``."""
    up = max(1, int(pct_start * steps) - 1)
    start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)

    def cos(a: float, b: float, t: float) -> float:
        return b + (a - b) * (1 + math.cos(math.pi * t)) / 2

    if step <= up:
        return cos(start, 1.0, step / up)
    return cos(1.0, end, (step - up) / max(1, steps - 1 - up))


def augment(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Random affine (shift up to 10%, rotate up to 12 degrees, scale 0.9-1.1, all times ``strength``) of a
    batch (B, C, H, W); ``strength`` 0 returns ``x`` unchanged and draws nothing."""
    if strength <= 0:
        return x
    b = x.shape[0]
    r = torch.rand(b, 4, generator=gen, device=gen.device) * 2 - 1  # uniform in [-1, 1]
    r = r.to(x.device) * strength
    ang = r[:, 0] * math.radians(12)
    scale = 1 + 0.1 * r[:, 1]
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, 0.2 * r[:, 2]], 1), torch.stack([sin, cos, 0.2 * r[:, 3]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # background = the value of a blank pixel (inputs are normalised, so 0 is not blank)
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - bg, grid, align_corners=False, padding_mode="zeros") + bg


class _Stream:
    """One model's batches: fresh permutations by its own generator, partial last batch dropped."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, aug: float):
        self.x, self.y, self.aug = x, y, aug
        self.batch_size = min(batch_size, len(y))
        self.gen = torch.Generator().manual_seed(seed)
        self.perm: list[torch.Tensor] = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.perm:
            perm = torch.randperm(len(self.y), generator=self.gen)
            n = len(perm) // self.batch_size
            self.perm = list(perm[: n * self.batch_size].view(n, self.batch_size).unbind(0))
        idx = self.perm.pop(0)
        return augment(self.x[idx], self.aug, self.gen), self.y[idx]


def _decays(model: nn.Module) -> dict[str, bool]:
    # weight decay on matrices and kernels only; biases, norm scales, tokens/position embeddings with
    # ndim <= 1 are left alone, as is standard
    return {n: p.ndim > 1 for n, p in model.named_parameters()}


def train_ensemble(models: list[nn.Module], data: list[tuple[torch.Tensor, torch.Tensor]],
                   config: EnsembleConfig, lrs: list[float], weight_decays: list[float], seeds: list[int],
                   augs: list[float] | None = None, use_vmap: bool = True) -> list[list[float]]:
    """Train ``models`` (same architecture) in place, model m on ``data[m]`` (inputs, labels); return each
    model's per-step losses. ``use_vmap=False`` trains them one after another with the same update rule
    (the control for the speed measurement, and the path for a single model)."""
    m = len(models)
    augs = augs if augs is not None else [0.0] * m
    if not (len(data) == len(lrs) == len(weight_decays) == len(seeds) == len(augs) == m) or m == 0:
        raise ValueError("need one data split, lr, weight decay, seed and aug per model")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {config.optimizer!r}")
    if not use_vmap or m == 1:
        return [train_single(mod, d, config, lr, wd, s, a)
                for mod, d, lr, wd, s, a in zip(models, data, lrs, weight_decays, seeds, augs)]
    device = next(models[0].parameters()).device
    for mod in models:
        mod.train()
    params, buffers = stack_module_state(models)  # (M, ...) leaves, fresh tensors
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    decays = _decays(models[0])
    streams = [_Stream(x, y, config.batch_size, s, a) for (x, y), s, a in zip(data, seeds, augs)]

    def loss_fn(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    step_fn = vmap(grad_and_value(loss_fn), in_dims=(0, 0, 0, 0), randomness="different")
    lr = torch.tensor(lrs, dtype=torch.float32, device=device)
    wd = torch.tensor(weight_decays, dtype=torch.float32, device=device)
    state = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
    losses: list[list[float]] = [[] for _ in range(m)]
    for step in range(config.steps):
        batches = [s.next() for s in streams]
        x = torch.stack([b[0] for b in batches]).to(device)
        y = torch.stack([b[1] for b in batches]).to(device)
        grads, loss = step_fn(params, buffers, x, y)
        if config.grad_clip > 0:
            norm = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
            clip = (config.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            grads = {k: g * clip.view(-1, *[1] * (g.ndim - 1)) for k, g in grads.items()}
        f = onecycle_factor(step, config.steps, config.pct_start, config.div_factor, config.final_div_factor)
        with torch.no_grad():
            for k, p in params.items():
                shape = (-1,) + (1,) * (p.ndim - 1)
                step_lr = (lr * f).view(shape)
                _update(p, grads[k], state[k], step_lr, wd.view(shape) if decays[k] else None, config, step)
        for i, v in enumerate(loss.tolist()):
            losses[i].append(v)
    with torch.no_grad():
        for i, mod in enumerate(models):
            for k, v in mod.named_parameters():
                v.copy_(params[k][i])
            for k, v in mod.named_buffers():
                v.copy_(buffers[k][i])
    return losses


def _update(p, g, state, lr, wd, config: EnsembleConfig, step: int) -> None:
    """One in-place SGD-momentum or AdamW step; ``lr``/``wd`` broadcast per model (or scalars)."""
    a, b = state
    if config.optimizer == "sgd":
        if wd is not None:
            g = g + wd * p  # L2 through the momentum, as torch.optim.SGD's weight_decay
        a.mul_(config.momentum).add_(g)
        p.sub_(lr * a)
    else:
        if wd is not None:
            p.mul_(1 - lr * wd)  # decoupled, as torch.optim.AdamW
        a.mul_(0.9).add_(g, alpha=0.1)
        b.mul_(0.999).addcmul_(g, g, value=0.001)
        t = step + 1
        denom = (b / (1 - 0.999 ** t)).sqrt_().add_(1e-8)
        p.sub_(lr * (a / (1 - 0.9 ** t)) / denom)


def train_single(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], config: EnsembleConfig, lr: float,
                 weight_decay: float, seed: int, aug: float = 0.0) -> list[float]:
    """The same training as :func:`train_ensemble` for one model, without vmap."""
    model.train()
    decays = _decays(model)
    stream = _Stream(data[0], data[1], config.batch_size, seed, aug)
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    state = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
    losses = []
    for step in range(config.steps):
        x, y = stream.next()
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        grads = {k: p.grad for k, p in params.items()}
        if config.grad_clip > 0:
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
            clip = (config.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            grads = {k: g * clip for k, g in grads.items()}
        f = onecycle_factor(step, config.steps, config.pct_start, config.div_factor, config.final_div_factor)
        with torch.no_grad():
            for k, p in params.items():
                _update(p, grads[k], state[k], lr * f, weight_decay if decays[k] else None, config, step)
        losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> None:
    """Exact BatchNorm statistics of ``model`` on inputs ``x`` (cumulative average over batches)."""
    bns = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    was = model.training
    model.train()
    with torch.random.fork_rng(devices=[]):  # dropout etc. must not touch the caller's RNG
        dev = next(model.parameters()).device
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(dev))
    for bn, (mom, _) in zip(bns, saved):
        bn.momentum = mom
    model.train(was)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (eval mode, restored afterwards) on (x, y)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = sum(int((model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was)
    return correct / max(1, len(y))


def weight_cosines(model: nn.Module, init: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine of every Linear/Conv2d weight of ``model`` to the same weight in ``init`` (a state dict)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            out[name] = cosine(mod.weight.cpu(), init[f"{name}.weight"].cpu())
    return out
