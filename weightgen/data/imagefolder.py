"""A user's own images on disk: ``PATH/<class>/*`` or ``PATH/{train,test}/<class>/*``."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..io import WeightgenError
from .base import ImageTask, as_split, carve_val, stratified_split, subsample

log = logging.getLogger(__name__)

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _read(path: Path, side: int) -> np.ndarray:
    """Any size and mode -> grayscale uint8, side x side (aspect ratio not kept, as a resize would)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L").resize((side, side), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise WeightgenError(f"cannot read image {path}: {exc}") from exc


def _load(root: Path, classes: list[str], side: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, name in enumerate(classes):
        files = _files(root / name) if (root / name).is_dir() else []
        images += [_read(f, side) for f in files]
        labels += [label] * len(files)
    if not images:
        raise WeightgenError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {root}")
    return np.stack(images), np.array(labels, dtype=np.int64)


def imagefolder_task(path: str, seed: int, max_train: int | None, max_eval: int | None, side: int = 32,
                     test_fraction: float = 0.2, val_fraction: float = 0.1) -> ImageTask:
    """One folder per class (split by ``seed``), or ``train/`` and ``test/`` each with one per class."""
    if not path:
        raise WeightgenError("imagefolder task needs a path: imagefolder:PATH")
    if side < 1:
        raise WeightgenError(f"image size must be positive, got {side}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise WeightgenError(f"imagefolder path {root} is not a directory")
    name = f"imagefolder:{path}"
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    if has_split:
        classes = [p.name for p in _class_dirs(root / "train")]
        extra = sorted({p.name for p in _class_dirs(root / "test")} - set(classes))
        if extra:
            raise WeightgenError(f"{root / 'test'} has classes that {root / 'train'} lacks: {', '.join(extra)}")
    else:
        classes = [p.name for p in _class_dirs(root)]
    if len(classes) < 2:
        raise WeightgenError(f"{root} needs at least two class folders (one folder of images per class), "
                             f"found {len(classes)}")
    if has_split:
        x_tr, y_tr = _load(root / "train", classes, side)
        x_te, y_te = _load(root / "test", classes, side)
        _check_counts(root / "train", classes, y_tr, 2)
        tr, va = carve_val(np.arange(len(y_tr)), y_tr, seed, val_fraction)
        te = subsample(np.arange(len(y_te)), y_te, max_eval, seed)
        splits = (as_split(x_tr, y_tr, subsample(tr, y_tr, max_train, seed)),
                  as_split(x_tr, y_tr, subsample(va, y_tr, max_eval, seed)), as_split(x_te, y_te, te))
    else:
        x, y = _load(root, classes, side)
        _check_counts(root, classes, y, 3)
        tr, va, te = stratified_split(y, seed, test_fraction, val_fraction, max_train, max_eval)
        splits = tuple(as_split(x, y, i) for i in (tr, va, te))
    log.info("imagefolder %s: %d classes, sizes %s", root, len(classes), [len(s[1]) for s in splits])
    return ImageTask(name, classes, *splits, side, f"images under {root}")


def _check_counts(root: Path, classes: list[str], y: np.ndarray, need: int) -> None:
    counts = np.bincount(y, minlength=len(classes))
    few = [f"{c} ({n})" for c, n in zip(classes, counts) if n < need]
    if few:
        raise WeightgenError(f"{root}: every class needs at least {need} images to split; too few in "
                             f"{', '.join(few[:5])}")
