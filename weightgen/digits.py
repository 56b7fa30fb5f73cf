"""Offline real data (scikit-learn's bundled ``digits``) and a small, fast training loop.

The digits set (1,797 8x8 grey images, 10 classes) ships with scikit-learn, so the zoo of
trained models can be built without any download. Images are upsampled to ``image_size`` so
that standard timm architectures (stride-32 CNNs, patch-4 ViTs) fit them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)

NUM_CLASSES = 10
# Entry-point modules whose models take ``img_size``/``patch_size`` (ViT-like).
_VIT_MODULES = {
    "vision_transformer", "vision_transformer_relpos", "deit", "beit", "eva", "cait", "xcit",
    "vision_transformer_sam",
}


@dataclass
class DigitsData:
    train: TensorDataset  # (x, y); x float32 (N, C, S, S) normalised with train stats, y long
    val: TensorDataset
    test: TensorDataset
    image_size: int
    in_chans: int


def _split_indices(y: np.ndarray, seed: int, fractions=(0.7, 0.1, 0.2)) -> list[np.ndarray]:
    """Deterministic stratified split: each class is shuffled and cut by the same fractions."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def load_digits_data(image_size: int = 32, in_chans: int = 1, seed: int = 0) -> DigitsData:
    """Load sklearn digits, split 70/10/20 (stratified, deterministic), resize and normalise."""
    from sklearn.datasets import load_digits

    if image_size < 8 or in_chans not in (1, 3):
        raise ValueError(f"need image_size >= 8 and in_chans in (1, 3), got {image_size}, {in_chans}")
    raw = load_digits()
    x = torch.from_numpy(raw.images.astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(raw.target.astype(np.int64))
    tr, va, te = (torch.from_numpy(i) for i in _split_indices(raw.target, seed))
    # Scalar stats from the train split only, so val/test never leak into normalisation.
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).contiguous()
    if in_chans == 3:
        x = x.repeat(1, 3, 1, 1)
    return DigitsData(
        train=TensorDataset(x[tr], y[tr]), val=TensorDataset(x[va], y[va]),
        test=TensorDataset(x[te], y[te]), image_size=image_size, in_chans=in_chans,
    )


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
    model: nn.Module, data: DigitsData, steps: int, batch_size: int = 64, lr: float = 1e-3,
    weight_decay: float = 0.05, seed: int = 0, progress: bool = False,
    on_step=None,
) -> list[float]:
    """Train with AdamW + warmup/cosine schedule for a fixed number of steps; return per-step losses.

    Deterministic given ``seed``: shuffling uses its own generator and any in-model randomness
    (dropout, drop-path) runs under a forked, seeded global RNG, so the caller's RNG is untouched.
    ``on_step(step, model, loss)`` (optional) runs after each step (1-based), e.g. to save checkpoints; it must
    leave the model, its mode and the global RNG as they were.
    """
    from tqdm.auto import tqdm

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
                         batch_size: int = 64) -> None:
    """Recompute BN running stats as a cumulative average over the first batches of ``dataset``.

    Needed after weights are generated/reconstructed: their running stats are stale or missing.
    No-op (mode included) for models without batch norm.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    x = dataset.tensors[0]
    # BN in train mode cannot use a single sample: drop a last batch of one
    loader = [xb for xb in (x[b * batch_size:(b + 1) * batch_size] for b in range(batches)) if len(xb) >= 2]
    device = next(model.parameters()).device
    torch.optim.swa_utils.update_bn(loader, model, device=device)  # reset, cumulative average, momenta restored
    model.eval()


def _is_vit_like(arch: str) -> bool:
    name = arch.split(".")[0]
    try:
        module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    except Exception:  # unknown arch: fall back to the name
        return name.startswith(("vit", "deit"))
    # By module, not name: maxvit/mobilevit/levit contain "vit" but take no patch_size.
    return module in _VIT_MODULES


def digits_model_kwargs(arch: str, image_size: int = 32, in_chans: int = 1,
                        patch_size: int | None = None) -> dict:
    """kwargs for ``timm.create_model(arch, **kw)`` to fit digits (10 classes, given size/channels).

    ViT-like archs also get ``img_size`` and ``patch_size`` (default: a 4x4 token grid, i.e. 8 for
    32: each token sees 2x2 of the original 8x8 pixels; patch 4 costs ~4x more for lower accuracy).
    """
    kw: dict = {"num_classes": NUM_CLASSES, "in_chans": in_chans}
    if _is_vit_like(arch):
        if patch_size is None:
            patch_size = next(p for p in (image_size // 4, 4, 2, 1) if p > 0 and image_size % p == 0)
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        kw.update(img_size=image_size, patch_size=patch_size)
    return kw
