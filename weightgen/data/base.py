"""The task container, deterministic stratified splits, and the model-input transform."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

Split = tuple[torch.Tensor, torch.Tensor]  # images float32 (N, 1, H, W) in [0, 1], labels int64 (N,)

# Default caps: adaptation trains 3 seeds x many tasks on a 2-core CPU.
MAX_TRAIN = 2000
MAX_EVAL = 1000


@dataclass(eq=False)  # tensors: compare splits explicitly
class ImageTask:
    """One classification task on small grayscale images, split into train/val/test."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    image_size: int  # native side H (= W)
    description: str = ""
    # Per split, what each sample was grouped by when splitting (the font of a glyph), if anything.
    groups: dict[str, list[str]] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, stage: str) -> Split:
        if stage not in ("train", "val", "test"):
            raise ValueError(f"stage must be train, val or test, not {stage!r}")
        return getattr(self, stage)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)[1]) for s in ("train", "val", "test")}

    def clone(self) -> "ImageTask":
        """A copy whose tensors a caller may modify without touching the cached task."""
        def c(split: Split) -> Split:
            return split[0].clone(), split[1].clone()

        groups = None if self.groups is None else {k: list(v) for k, v in self.groups.items()}
        return ImageTask(self.name, list(self.classes), c(self.train), c(self.val), c(self.test),
                         self.image_size, self.description, groups)


def to_model_input(images: torch.Tensor, channels: int = 3, img_size: int | None = 32,
                   mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> (N, channels, img_size, img_size), normalised; on the images' device.

    ``img_size=None`` keeps the native size.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 1, H, W), got {tuple(images.shape)}")
    x = images.float()
    if img_size is not None and tuple(x.shape[-2:]) != (img_size, img_size):
        # antialias only matters when shrinking; bilinear either way
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False,
                          antialias=img_size < max(x.shape[-2:]))
    x = (x - mean) / std
    return x.expand(-1, channels, -1, -1).contiguous()


def task_dataset(task: ImageTask, stage: str, channels: int = 3, img_size: int | None = 32) -> TensorDataset:
    """One split as a TensorDataset of model-ready inputs (transform applied once, up front)."""
    images, labels = task.split(stage)
    return TensorDataset(to_model_input(images, channels, img_size), labels)


@dataclass(eq=False)
class TensorSplits:
    """A task's train/val/test splits as model inputs (``to_model_input``: the one normalisation)."""

    train: TensorDataset  # (x, y); x float32 (N, in_chans, image_size, image_size), y int64
    val: TensorDataset
    test: TensorDataset
    image_size: int
    in_chans: int


def tensor_splits(task: ImageTask, image_size: int = 32, in_chans: int = 1) -> TensorSplits:
    """Every split of ``task`` as model-ready TensorDatasets (transform applied once, up front)."""
    splits = [task_dataset(task, stage, in_chans, image_size) for stage in ("train", "val", "test")]
    return TensorSplits(*splits, image_size=image_size, in_chans=in_chans)


def task_loader(task: ImageTask, stage: str, batch_size: int = 64, channels: int = 3,
                img_size: int | None = 32, seed: int = 0, **kwargs) -> DataLoader:
    """A DataLoader over one split; the training split is shuffled by its own seeded generator."""
    shuffle = stage == "train"
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(task_dataset(task, stage, channels, img_size), batch_size=batch_size,
                      shuffle=shuffle, generator=gen, **kwargs)


# ---- splitting -------------------------------------------------------------------------------

def subsample(idx: np.ndarray, y: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """At most ``cap`` of ``idx``, stratified by ``y[idx]``."""
    if cap is None or len(idx) <= cap:
        return idx
    perm = np.random.default_rng(seed).permutation(len(idx))
    labels = y[idx][perm]
    # each sample's rank within its class, as a fraction of the class: the cap smallest fractions
    # keep every class's share (sklearn's stratified split refuses caps that leave < 1 per class)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    rank = np.empty(len(labels))
    rank[order] = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    chosen = np.argsort(rank / counts[inverse], kind="stable")[:cap]
    return np.sort(idx[perm[chosen]])


def _per_class(y: np.ndarray, idx: np.ndarray, seed: int, fractions: tuple[float, ...]) -> list[np.ndarray]:
    """Cut each class of ``y[idx]`` (shuffled by ``seed``) into len(fractions)+1 parts; every part
    of a class with enough samples gets at least one (sklearn's splitter refuses small classes)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y[idx]):
        members = rng.permutation(idx[y[idx] == c])
        sizes = [max(1, round(f * len(members))) if len(members) > len(fractions) else 0 for f in fractions]
        cuts = np.cumsum(sizes)
        for i, chunk in enumerate(np.split(members, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def stratified_split(y: np.ndarray, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.1,
                     max_train: int | None = MAX_TRAIN, max_eval: int | None = MAX_EVAL):
    """Indices (train, val, test) of ``y``: stratified, deterministic in ``seed``, capped."""
    test, val, train = _per_class(y, np.arange(len(y)), seed, (test_fraction, val_fraction))
    return subsample(train, y, max_train, seed), subsample(val, y, max_eval, seed), subsample(test, y, max_eval, seed)


def carve_val(idx: np.ndarray, y: np.ndarray, seed: int, fraction: float = 0.1):
    """Split training indices into (train, val), stratified, deterministic in ``seed``."""
    val, train = _per_class(y, np.asarray(idx), seed, (fraction,))
    return train, val


def as_split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> Split:
    """Select ``idx``; images (uint8 0-255 or float in [0, 1]) become float32 (N, 1, H, W), labels int64."""
    chosen = images[idx]
    x = torch.from_numpy(np.ascontiguousarray(chosen, dtype=np.float32))
    if chosen.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x, torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))


def make_task(name: str, classes: list[str], images: np.ndarray, labels: np.ndarray, seed: int,
              description: str, test_fraction: float = 0.2, val_fraction: float = 0.1,
              max_train: int | None = MAX_TRAIN, max_eval: int | None = MAX_EVAL) -> ImageTask:
    """A task from one pool of (N, H, W) images in [0, 1], split by ``seed``."""
    tr, va, te = stratified_split(labels, seed, test_fraction, val_fraction, max_train, max_eval)
    return ImageTask(name, classes, as_split(images, labels, tr), as_split(images, labels, va),
                     as_split(images, labels, te), images.shape[-1], description)
