"""Colour tasks built offline: classes that differ only in hue, and patches of the RGB photos that
ship inside scikit-learn and scikit-image, split by region.

Images are float (N, 3, H, W) in [0, 1]; ``weightgen.data.images`` serves them through the
backbone's transforms. ``TASKS`` names them for :func:`weightgen.data.get_task` (via ``build``).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import WeightgenError
from .base import ImageTask, as_split, make_task, subsample

TASKS = {
    "hue": "5 classes of random colour textures that differ only in hue (equal luminance statistics, 32x32 RGB)",
    "photo-patches": "32x32 RGB patches of 10 photos (scikit-learn + scikit-image), split by region; "
                     "needs scikit-image",
}

# ---- hue: colour is the only signal ------------------------------------------------------------

HUE_CLASSES = 5
HUE_PER_CLASS = 400
HUE_SIDE = 32
HUE_DATA_SEED = 0  # the images are fixed; ``seed`` chooses the split, as for every built-in task
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, the weights PIL's convert("L") uses


def _chroma_basis() -> tuple[np.ndarray, np.ndarray]:
    """Two orthonormal RGB directions with zero luma: adding them changes colour, never luminance."""
    u = np.array([1.0, -1.0, 0.0])
    u -= LUMA * (LUMA @ u) / (LUMA @ LUMA)  # orthogonal to the luma weights...
    u /= np.linalg.norm(u)
    v = np.cross(LUMA, u)  # ...and to u
    return u, v / np.linalg.norm(v)


def _smooth_field(rng: np.random.Generator, n: int, side: int, sigma: float) -> np.ndarray:
    """n zero-mean, unit-std smooth random fields (side x side), Gaussian-filtered white noise."""
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.standard_normal((n, side, side)), sigma=(0, sigma, sigma), mode="wrap")
    x -= x.mean(axis=(1, 2), keepdims=True)
    return x / x.std(axis=(1, 2), keepdims=True)


def hue_images(per_class: int = HUE_PER_CLASS, side: int = HUE_SIDE, classes: int = HUE_CLASSES,
               seed: int = HUE_DATA_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, side, side) float32 in [0, 1] and labels: class c has hue c * 360/classes +- 30% of a band.

    Luminance and saturation textures are drawn from one distribution for every class, and the
    chroma lies in the plane of zero luma, so a grayscale image carries no class information.
    """
    rng = np.random.default_rng(seed)
    n = per_class * classes
    labels = np.repeat(np.arange(classes), per_class)
    luma = np.clip(0.5 + 0.12 * _smooth_field(rng, n, side, 1.5), 0.25, 0.75)  # (N, S, S)
    sat = np.clip(0.13 + 0.04 * _smooth_field(rng, n, side, 2.5), 0.05, 0.2)
    band = 2 * np.pi / classes
    hue = labels * band + rng.uniform(-0.3, 0.3, n) * band  # per image, within its class band
    hue = hue[:, None, None] + 0.08 * band * _smooth_field(rng, n, side, 3.0)  # a little per-pixel drift
    u, v = _chroma_basis()
    chroma = sat[..., None] * (np.cos(hue)[..., None] * u + np.sin(hue)[..., None] * v)  # (N, S, S, 3)
    rgb = luma[..., None] + chroma
    # the bounds above keep every channel inside [0, 1]: no clipping, so luma stays exact
    assert rgb.min() >= 0 and rgb.max() <= 1
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32), labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _hue_pool() -> tuple[np.ndarray, np.ndarray]:
    return hue_images()


def hue_task(seed: int = 0, max_train: int | None = None, max_eval: int | None = None) -> ImageTask:
    images, labels = _hue_pool()
    classes = [f"hue{round(c * 360 / HUE_CLASSES):03d}" for c in range(HUE_CLASSES)]
    return make_task("hue", classes, images, labels, seed, TASKS["hue"], max_train=max_train, max_eval=max_eval)


# ---- photo patches, split by region ------------------------------------------------------------

PHOTOS = {  # class -> (package, file under the package)
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
}
INSTALL = {"sklearn": "pip install scikit-learn", "skimage": "pip install scikit-image"}
PHOTO_SHORT_SIDE = 288  # every photo resized so its shorter side is this: comparable scales
BLOCK = 48  # regions: a grid of BLOCK x BLOCK cells; a cell's patches all go to one split
PATCH = 32
MIN_BLOCK_STD = 0.03  # cells flatter than this (black retina corners, empty sky) are not used
PATCHES = {"train": 160, "val": 30, "test": 60}  # per photo
REGION_FRACTIONS = {"test": 0.2, "val": 0.1}


def _package_file(package: str, rel: str, task: str) -> Path:
    spec = importlib.util.find_spec(package)  # located without importing it
    path = Path(list(spec.submodule_search_locations)[0]) / rel if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise WeightgenError(f"task {task!r} needs {package if package != 'sklearn' else 'scikit-learn'}, "
                             f"which is not installed: {INSTALL[package]}")
    return path


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One photo as float32 (H, W, 3) in [0, 1], its shorter side resized to ``PHOTO_SHORT_SIDE``."""
    package, rel = PHOTOS[name]
    with Image.open(_package_file(package, rel, "photo-patches")) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = PHOTO_SHORT_SIDE / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.LANCZOS)
        return np.asarray(im, dtype=np.float32) / 255.0


def _cells(photo: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners of the photo's usable (textured) grid cells."""
    luma = photo @ LUMA.astype(np.float32)
    h, w = luma.shape
    return [(y, x) for y in range(0, h - BLOCK + 1, BLOCK) for x in range(0, w - BLOCK + 1, BLOCK)
            if luma[y:y + BLOCK, x:x + BLOCK].std() >= MIN_BLOCK_STD]


def photo_patch_task(seed: int = 0, max_train: int | None = None, max_eval: int | None = None) -> ImageTask:
    """Classes = source photo. Each photo's grid cells are dealt to test/val/train by ``seed``; a
    patch lies inside one cell, so no test patch overlaps a training patch's region.

    ``groups[stage][i]`` is ``"photo:y,x,size"``, patch i's box in the resized photo.
    """
    rng = np.random.default_rng([seed, 0x9A7C])
    data = {s: ([], [], []) for s in PATCHES}  # stage -> (patches, labels, boxes)
    for label, name in enumerate(PHOTOS):
        photo = load_photo(name)
        cells = _cells(photo)
        order = rng.permutation(len(cells))
        n_test = max(1, round(REGION_FRACTIONS["test"] * len(cells)))
        n_val = max(1, round(REGION_FRACTIONS["val"] * len(cells)))
        dealt = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        for stage, count in PATCHES.items():
            chosen = dealt[stage]
            for k in range(count):
                y0, x0 = cells[chosen[k % len(chosen)]]
                dy, dx = rng.integers(0, BLOCK - PATCH + 1, size=2)
                y, x = y0 + int(dy), x0 + int(dx)
                data[stage][0].append(photo[y:y + PATCH, x:x + PATCH].transpose(2, 0, 1))
                data[stage][1].append(label)
                data[stage][2].append(f"{name}:{y},{x},{PATCH}")
    splits, groups = {}, {}
    for stage, (patches, labels, boxes) in data.items():
        x, y = np.stack(patches), np.array(labels, dtype=np.int64)
        idx = subsample(np.arange(len(y)), y, max_train if stage == "train" else max_eval, seed)
        splits[stage] = as_split(x, y, idx)
        groups[stage] = [boxes[i] for i in idx]
    return ImageTask("photo-patches", list(PHOTOS), splits["train"], splits["val"], splits["test"], PATCH,
                     TASKS["photo-patches"], groups)


def build(name: str, seed: int, max_train: int | None, max_eval: int | None) -> ImageTask:
    """The registration hook: ``weightgen.data.get_task`` builds any name in ``TASKS`` through this."""
    if name == "hue":
        return hue_task(seed, max_train, max_eval)
    if name == "photo-patches":
        return photo_patch_task(seed, max_train, max_eval)
    raise WeightgenError(f"unknown colour task {name!r}; known: {', '.join(TASKS)}")
