"""Train, evaluate and refresh the BatchNorm statistics of a classifier on model-ready tensor splits.

The data comes from :mod:`weightgen.data` (``model_splits``: one split rule, one normalisation); these
helpers know nothing about where it came from, so the zoo, the studies, reconstruction and the
benchmarks share them.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .data import TensorSplits

log = logging.getLogger(__name__)

__all__ = ["train_classifier", "evaluate", "reestimate_batchnorm"]


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """Yield ``steps`` index batches, cycling over fresh permutations (last partial batch dropped)."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for b in range(min(per_epoch, steps - done)):
            yield perm[b * batch_size:(b + 1) * batch_size]
        done += min(per_epoch, steps - done)


def train_classifier(
    model: nn.Module, data: TensorSplits, steps: int, batch_size: int = 64, lr: float = 1e-3,
    weight_decay: float = 0.05, seed: int = 0, progress: bool = False,
    on_step=None,
) -> list[float]:
    """Train on ``data.train`` with AdamW + warmup/cosine schedule for a fixed number of steps; return
    per-step losses.

    Deterministic given ``seed``: shuffling uses its own generator and any in-model randomness
    (dropout, drop-path) runs under a forked, seeded global RNG, so the caller's RNG is untouched.
    ``on_step(step, model, loss)`` (optional) runs after each step (1-based), e.g. to save checkpoints; it must
    leave the model, its mode and the global RNG as they were.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    x, y = data.train.tensors
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on 1-d tensors (biases, norm scales), as is standard.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
    )
    warmup = max(1, steps // 20)  # short warmup keeps tiny ViTs stable at lr=1e-3

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    device = next(model.parameters()).device  # data follows the model (batches move one at a time)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(total=steps, disable=not progress, desc="train", leave=False)
        for idx in _batches(len(y), batch_size, steps, gen):
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(len(losses), model, losses[-1])
            bar.update(1)
            if progress and len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
    log.debug("trained %d steps, final loss %.4f", steps, losses[-1])
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1]; leaves the model in eval mode."""
    model.eval()
    x, y = dataset.tensors
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        predicted = model(x[i:i + batch_size].to(device)).argmax(-1)
        correct += (predicted.to(y.device) == y[i:i + batch_size]).sum().item()  # data may sit on either device
    return correct / max(1, len(y))


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, dataset: TensorDataset, batches: int = 20,
                         batch_size: int = 64, seed: int = 0) -> None:
    """Recompute BN running stats as a cumulative average over ``batches`` batches drawn from
    ``dataset`` in a seeded random order (weightgen.data's splits are sorted by class: their first
    batches would hold only the first classes).

    Needed after weights are generated/reconstructed: their running stats are stale or missing.
    No-op (mode included) for models without batch norm.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    x = dataset.tensors[0]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:batches * batch_size]
    # BN in train mode cannot use a single sample: drop a last batch of one
    loader = [x[i] for i in order.split(batch_size) if len(i) >= 2]
    device = next(model.parameters()).device
    torch.optim.swa_utils.update_bn(loader, model, device=device)  # reset, cumulative average, momenta restored
    model.eval()
