"""Images for adaptation through one pipeline: the backbone's own transforms (timm.data), images
decoded lazily in DataLoader workers, ``imagefolder:``/``csv:`` sources, a bad-image scan, and the
built-in in-memory tasks fed through the same transforms.

Typical use::

    cfg = image_config(model)                       # mean/std/size/crop from the model's pretrained_cfg
    data = open_task("imagefolder:/photos", seed=0) # or csv:FILE, or any get_task name
    train = make_loader(data.dataset("train", cfg, augment="flip-crop", seed=0), 64, train=True,
                        workers=2, seed=0, device=device)
"""
from __future__ import annotations

import csv
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from ..io import WeightgenError
from ..models import first_conv, input_size
from .base import ImageTask, carve_val, stratified_split, subsample

log = logging.getLogger(__name__)

AUGMENTS = ("none", "flip-crop", "timm")
# timm's full training recipe (as in its "ResNet strikes back"/DeiT hparams): RandAugment, random
# erasing, random interpolation, plus the flip + random-resized-crop every recipe has
TIMM_RECIPE = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="random")
# a folder this small is fully decoded by the scan (a truncated JPEG passes PIL's verify());
# larger ones get a header check, and a decode error later names the file
DECODE_ALL_BELOW = 5000
SPLITS = ("train", "val", "test")


# ---- transforms from the backbone --------------------------------------------------------------

@dataclass(frozen=True)
class ImageConfig:
    """What a backbone expects: channels, size (H, W), normalisation, resize interpolation, crop."""

    channels: int
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to before the transform."""
        return "L" if self.channels == 1 else "RGB"

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, *self.img_size)

    def to_dict(self) -> dict:
        return asdict(self)

    def transform(self, train: bool = False, augment: str = "none") -> Callable:
        """A timm transform: PIL image (any mode) -> normalised (channels, H, W) float tensor.

        Evaluation (and ``augment='none'`` training): resize to ``img_size / crop_pct``, centre crop.
        ``'flip-crop'``: random-resized-crop + horizontal flip. ``'timm'``: timm's full recipe.
        """
        from timm.data import create_transform

        if augment not in AUGMENTS:
            raise WeightgenError(f"unknown augmentation {augment!r}; choose from {', '.join(AUGMENTS)}")
        common = dict(input_size=self.input_size, mean=self.mean, std=self.std)
        if not train or augment == "none":
            # the eval transform for training too: 'none' sees exactly what evaluation sees
            tf = create_transform(**common, is_training=False, interpolation=self.interpolation,
                                  crop_pct=self.crop_pct, crop_mode=self.crop_mode)
        elif augment == "flip-crop":
            tf = create_transform(**common, is_training=True, hflip=0.5, color_jitter=None,
                                  interpolation=self.interpolation)
        else:
            tf = create_transform(**common, is_training=True, hflip=0.5, **TIMM_RECIPE)
        return _Compose(ToMode(self.mode), tf)


class ToMode:
    """Convert a PIL image to ``mode`` ('L' or 'RGB'): grayscale into an RGB backbone becomes RGB."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, im: Image.Image) -> Image.Image:
        if im.mode == self.mode:
            return im
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale, don't clip
            arr = np.asarray(im, dtype=np.float64)
            top = max(float(arr.max()), 1.0)
            im = Image.fromarray(np.round(arr * (255.0 / (65535.0 if top > 255 else 255.0))).clip(0, 255)
                                 .astype(np.uint8), "L")
        return im.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


class _Compose:
    def __init__(self, *steps: Callable):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return "\n".join(repr(s) for s in self.steps)


def _per_channel(values: Sequence[float] | float, channels: int, what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else [values]))
    if len(vals) == channels:
        return vals
    if len(vals) == 1:
        return vals * channels
    if channels == 1:
        # an RGB-trained cfg on a 1-channel backbone (timm sums the first conv over RGB): one average value
        return (sum(vals) / len(vals),)
    raise WeightgenError(f"{what} has {len(vals)} values but the backbone takes {channels} channels")


def image_config(model: torch.nn.Module | None = None, *, img_size: int | Sequence[int] | None = None,
                 mean: Sequence[float] | float | None = None, std: Sequence[float] | float | None = None,
                 channels: int | None = None, interpolation: str | None = None,
                 crop_pct: float | None = None) -> ImageConfig:
    """The backbone's data config (``timm.data.resolve_model_data_config`` on ``model`` and its
    ``pretrained_cfg``), with explicit arguments overriding it.

    Channels and size follow the model itself (its first conv; a ViT's patch embedding), so a model
    built with ``in_chans=1`` or ``img_size=32`` is fed what it takes. Without a model, ``img_size``
    is required and the rest falls back to timm's defaults (ImageNet mean/std, 3 channels).
    """
    from timm.data import resolve_data_config, resolve_model_data_config

    if model is not None:
        data = resolve_model_data_config(model)
        try:
            c, h, w = input_size(model)
        except WeightgenError:  # not a timm model: its first conv tells the channels, img_size the rest
            if img_size is None:
                raise
            first = first_conv(model)
            c, h, w = first.in_channels if first is not None else data["input_size"][0], 0, 0
    else:
        if img_size is None:
            raise WeightgenError("image_config needs a model or an explicit img_size")
        data = resolve_data_config(args={"img_size": 224})
        c, h, w = data["input_size"]
    if channels is not None:
        c = channels
    if c not in (1, 3):
        raise WeightgenError(f"images can feed a backbone with 1 or 3 input channels, not {c}")
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2:
            raise WeightgenError(f"img_size must be one side or (height, width), got {img_size!r}")
        h, w = size
    if min(h, w) < 1:
        raise WeightgenError(f"image size must be positive, got {(h, w)}")
    mean_c = _per_channel(data["mean"] if mean is None else mean, c, "mean")
    std_c = _per_channel(data["std"] if std is None else std, c, "std")
    if min(std_c) <= 0:
        raise WeightgenError(f"std must be positive, got {std_c}")
    pct = float(crop_pct if crop_pct is not None else data.get("crop_pct") or 1.0)
    if not 0 < pct <= 1:
        raise WeightgenError(f"crop_pct must be in (0, 1], got {pct}")
    interp = interpolation or data.get("interpolation") or "bilinear"
    return ImageConfig(int(c), (int(h), int(w)), mean_c, std_c, interp, pct, data.get("crop_mode") or "center")


# ---- reading images, the bad-image scan ---------------------------------------------------------

class BadImageError(WeightgenError):
    """An image that cannot be decoded (unreadable, truncated, or too large), naming the file.

    A DataLoader worker's exception comes back to the main process as ``type(msg)`` where ``msg``
    wraps the worker's traceback; keep only our own line so scripts still print one clean line.
    """

    def __init__(self, message: str = "", **kw):
        if "Original Traceback" in message:
            tag = f"{type(self).__name__}: "
            last = [ln for ln in message.splitlines() if tag in ln]
            if last:
                message = last[-1].split(tag, 1)[1]
        super().__init__(message, **kw)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _check_pixels(im: Image.Image, path: str) -> None:
    """PIL warns between MAX_IMAGE_PIXELS and twice that, and raises above: both are errors here."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.size[0] * im.size[1] > limit:
        raise Image.DecompressionBombError(
            f"{im.size[0]}x{im.size[1]} pixels exceeds the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode one image, or raise :class:`BadImageError` naming it."""
    path = os.fsdecode(path)
    try:
        with Image.open(path) as im:
            _check_pixels(im, path)
            im.load()  # pixels now in memory: leaving the block closes only the file
            return im
    except Exception as exc:  # any decoder failure: the user needs the file's name, not a traceback
        raise BadImageError(f"cannot read image {path}: {_reason(exc)}") from None


def check_image(path: str | os.PathLike, decode: bool = False) -> str | None:
    """Why ``path`` is not a usable image (None when it is): header + ``verify()`` + pixel limit,
    and with ``decode`` a full decode too (catches a truncated JPEG, which verify() passes)."""
    path = os.fsdecode(path)
    try:
        with Image.open(path) as im:
            _check_pixels(im, path)
            im.verify()
        if decode:
            with Image.open(path) as im:
                im.load()
    except Exception as exc:
        return _reason(exc)
    return None


def scan_images(paths: Sequence[str | os.PathLike], decode: bool | None = None,
                threads: int | None = None) -> list[tuple[str, str]]:
    """``(path, reason)`` for every unusable image in ``paths``, in order.

    ``decode=None``: decode fully when there are at most ``DECODE_ALL_BELOW`` images (header check
    only above that: a later decode error still names the file). Runs on a few threads (PIL releases
    the GIL while reading and decoding).
    """
    paths = [os.fsdecode(p) for p in paths]
    full = len(paths) <= DECODE_ALL_BELOW if decode is None else bool(decode)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = threads or min(8, cpus)
    if threads <= 1 or len(paths) < 64:
        reasons = [check_image(p, full) for p in paths]
    else:
        reasons = []
        with ThreadPoolExecutor(threads) as pool:  # a block at a time: map() makes every future up front
            for start in range(0, len(paths), 1024):
                reasons += pool.map(lambda p: check_image(p, full), paths[start:start + 1024])
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


# ---- datasets ----------------------------------------------------------------------------------

class _Augmented(Dataset):
    """Applies a transform; random augmentation draws from a private RNG stream, never the caller's.

    timm/torchvision transforms draw from the global torch, ``random`` and numpy generators. Around
    each random transform those are swapped for this dataset's own state (per process: a worker's
    stream starts from its DataLoader-given seed, the main process's from ``seed``) and swapped back.
    """

    def __init__(self, transform: Callable, random_transform: bool, seed: int):
        self.transform = transform
        self.random_transform = random_transform
        self.seed = int(seed)
        self._rng = None  # (owner key, torch state, python state, numpy state)

    def _apply(self, im: Image.Image) -> torch.Tensor:
        if not self.random_transform:
            return self.transform(im)
        info = get_worker_info()
        key = (os.getpid(), None if info is None else info.seed)
        if self._rng is None or self._rng[0] != key:
            s = self.seed if info is None else info.seed
            self._rng = (key, torch.Generator().manual_seed(s % 2**63).get_state(), random.Random(s).getstate(),
                         np.random.RandomState(s % 2**32).get_state())
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.set_rng_state(self._rng[1])
        random.setstate(self._rng[2])
        np.random.set_state(self._rng[3])
        try:
            return self.transform(im)
        finally:
            self._rng = (key, torch.get_rng_state(), random.getstate(), np.random.get_state())
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class FileImageDataset(_Augmented):
    """Images on disk, decoded one at a time in ``__getitem__`` (so in DataLoader workers).

    Paths and labels are numpy arrays, not lists of Python objects, so forked workers do not copy
    them page by page as reference counts change: memory stays flat whatever the dataset's size.
    ``skip_bad``: an image that fails to decode gives ``None`` (dropped by :func:`collate_images`)
    instead of a :class:`BadImageError`.
    """

    def __init__(self, paths: Sequence[str] | np.ndarray, labels: Sequence[int] | np.ndarray, transform: Callable,
                 random_transform: bool = False, seed: int = 0, skip_bad: bool = False):
        super().__init__(transform, random_transform, seed)
        self.paths = _path_array(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.fsdecode(bytes(self.paths[i]))

    def __getitem__(self, i: int):
        try:
            im = read_image(self.path(i))
        except BadImageError as err:
            if not self.skip_bad:
                raise
            log.warning("skipping %s", err)
            return None
        return self._apply(im), int(self.labels[i])


class TensorImageDataset(_Augmented):
    """An in-memory split (float (N, C, H, W) in [0, 1], C = 1 or 3) through the same PIL transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable,
                 random_transform: bool = False, seed: int = 0):
        super().__init__(transform, random_transform, seed)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(images.shape)}")
        # uint8 HWC once, as an image file would hold them (the transform rescales to [0, 1] itself)
        self.images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        self.labels = labels.detach().long().cpu()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        arr = self.images[i].numpy()
        im = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")
        return self._apply(im), int(self.labels[i])


def collate_images(batch: list):
    """default_collate without the samples a ``skip_bad`` dataset could not decode (None)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        raise BadImageError(f"every image of a batch of {len(batch)} failed to decode (see the warnings above)")
    return default_collate(kept)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int = 0, seed: int = 0,
                device: torch.device | str | None = None, drop_last: bool = False,
                pin_memory: bool | None = None, persistent_workers: bool | None = None) -> DataLoader:
    """A DataLoader for one split: the training split shuffled by its own seeded generator (which
    also seeds the workers, hence their augmentation); ``pin_memory`` and ``persistent_workers``
    default to on when ``device`` is CUDA."""
    if workers < 0:
        raise WeightgenError(f"workers must be >= 0, got {workers}")
    if batch_size < 1:
        raise WeightgenError(f"batch size must be positive, got {batch_size}")
    cuda = device is not None and torch.device(device).type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=gen, num_workers=workers,
                      collate_fn=collate_images, drop_last=drop_last,
                      pin_memory=cuda if pin_memory is None else pin_memory,
                      persistent_workers=(cuda if persistent_workers is None else persistent_workers) and workers > 0)


def make_loaders(data: "FileImages | MemoryImages", cfg: ImageConfig, batch_size: int, *, augment: str = "none",
                 workers: int = 0, seed: int = 0, device: torch.device | str | None = None,
                 eval_batch_size: int | None = None) -> dict[str, DataLoader]:
    """``{"train", "val", "test"}`` loaders of one task: only training is shuffled and augmented."""
    return {stage: make_loader(data.dataset(stage, cfg, augment if stage == "train" else "none", seed),
                               batch_size if stage == "train" else (eval_batch_size or batch_size),
                               train=stage == "train", workers=workers, seed=seed, device=device)
            for stage in SPLITS}


# ---- sources: a folder, a CSV, or a built-in task ------------------------------------------------

def _path_array(paths) -> np.ndarray:
    if isinstance(paths, np.ndarray) and paths.dtype.kind == "S":
        return paths
    encoded = [os.fsencode(os.fspath(p)) for p in paths]
    return np.array(encoded, dtype=f"S{max((len(e) for e in encoded), default=1)}")


@dataclass
class FileImages:
    """A task whose images stay on disk: per split, file paths and int labels."""

    name: str
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # stage -> (paths as bytes, labels int64)
    description: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) dropped by the scan
    skip_bad: bool = False  # also drop images that fail to decode later (the scan may check headers only)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.splits[s][1]) for s in SPLITS}

    def labels(self, stage: str) -> np.ndarray:
        return self.splits[_stage(stage)][1]

    def paths(self, stage: str) -> list[str]:
        return [os.fsdecode(bytes(p)) for p in self.splits[_stage(stage)][0]]

    def dataset(self, stage: str, cfg: ImageConfig, augment: str = "none", seed: int = 0,
                skip_bad: bool | None = None) -> FileImageDataset:
        """One split as a lazily decoding dataset; only ``train`` is augmented."""
        train = _stage(stage) == "train"
        paths, labels = self.splits[stage]
        return FileImageDataset(paths, labels, cfg.transform(train, augment), train and augment != "none", seed,
                                skip_bad=self.skip_bad if skip_bad is None else skip_bad)


@dataclass
class MemoryImages:
    """A built-in in-memory task (weightgen.data.get_task) served through the same transforms."""

    task: ImageTask
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    @property
    def description(self) -> str:
        return self.task.description

    def sizes(self) -> dict[str, int]:
        return self.task.sizes()

    def labels(self, stage: str) -> np.ndarray:
        return self.task.split(stage)[1].numpy()

    def dataset(self, stage: str, cfg: ImageConfig, augment: str = "none", seed: int = 0,
                skip_bad: bool | None = None) -> TensorImageDataset:
        train = _stage(stage) == "train"
        images, labels = self.task.split(stage)
        return TensorImageDataset(images, labels, cfg.transform(train, augment), train and augment != "none", seed)


def _stage(stage: str) -> str:
    if stage not in SPLITS:
        raise ValueError(f"stage must be train, val or test, not {stage!r}")
    return stage


def open_task(name: str, seed: int = 0, *, max_train: int | None = None, max_eval: int | None = None,
              skip_bad: bool = False, decode: bool | None = None, test_fraction: float = 0.2,
              val_fraction: float = 0.1) -> FileImages | MemoryImages:
    """Any task by name: ``imagefolder:PATH`` and ``csv:PATH`` stay on disk (scanned for bad images
    first: one :class:`BadImageError` naming the file, or with ``skip_bad`` those files dropped and
    listed in ``.skipped``); every other name is :func:`weightgen.data.get_task`'s, held in memory.

    ``max_train``/``max_eval``: stratified, seeded caps (None: every image).
    """
    name = name.strip()
    kind, sep, path = name.partition(":")
    if sep and kind in ("imagefolder", "csv"):
        if not path:
            raise WeightgenError(f"{kind} task needs a path: {kind}:PATH")
        lister = _folder_lists if kind == "imagefolder" else _csv_lists
        classes, lists, description = lister(Path(path).expanduser())
        splits = _split(lists, classes, seed, test_fraction, val_fraction, max_train, max_eval, path)
        data = FileImages(name, classes, splits, description, skip_bad=skip_bad)
        _scan(data, skip_bad, decode)
        log.info("%s: %d classes, sizes %s, %d bad images skipped", name, len(classes), data.sizes(), len(data.skipped))
        return data
    from . import get_task
    return MemoryImages(get_task(name, seed, max_train=max_train, max_eval=max_eval))


Lists = dict[str, tuple[list[str], list[int]]]  # stage -> (paths, labels); stages absent when not given


def _extensions() -> set[str]:
    from timm.data.readers.img_extensions import get_img_extensions
    return {e.lower() for e in get_img_extensions(as_set=True)}


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_by_class(root: Path, classes: list[str], exts: set[str]) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        found = sorted(str(p) for p in folder.rglob("*")
                       if p.suffix.lower() in exts and not p.name.startswith(".") and p.is_file())
        paths += found
        labels += [label] * len(found)
    return paths, labels


def _folder_lists(root: Path) -> tuple[list[str], Lists, str]:
    if not root.is_dir():
        raise WeightgenError(f"imagefolder path {root} is not a directory")
    exts = _extensions()
    if (root / "train").is_dir():
        classes = _class_dirs(root / "train")
        for stage in ("val", "test"):
            if (root / stage).is_dir():
                extra = sorted(set(_class_dirs(root / stage)) - set(classes))
                if extra:
                    raise WeightgenError(f"{root / stage} has classes that {root / 'train'} lacks: {', '.join(extra)}")
        lists = {s: _files_by_class(root / s, classes, exts) for s in SPLITS if (root / s).is_dir()}
    else:
        classes = _class_dirs(root)
        lists = {"all": _files_by_class(root, classes, exts)}
    if len(classes) < 2:
        raise WeightgenError(f"{root} needs at least two class folders (one folder of images per class), "
                             f"found {len(classes)}")
    if not any(lists[s][0] for s in lists):
        raise WeightgenError(f"no images ({', '.join(sorted(exts))}) under {root}")
    return classes, lists, f"images under {root}"


_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _csv_lists(csv_path: Path) -> tuple[list[str], Lists, str]:
    if not csv_path.is_file():
        raise WeightgenError(f"CSV file {csv_path} does not exist")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            if "path" not in columns or "label" not in columns:
                raise WeightgenError(f"{csv_path} needs a header with columns path,label (and optionally split); "
                                     f"found {', '.join(reader.fieldnames or []) or 'none'}")
            rows = [(r[columns["path"]], r[columns["label"]], r[columns["split"]] if "split" in columns else "all",
                     n) for n, r in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WeightgenError(f"cannot read CSV {csv_path}: {_reason(exc)}") from None
    if not rows:
        raise WeightgenError(f"{csv_path} lists no images")
    base = csv_path.resolve().parent
    names = sorted({(lab or "").strip() for _, lab, _, _ in rows})
    if "" in names:
        line = next(n for _, lab, _, n in rows if not (lab or "").strip())
        raise WeightgenError(f"{csv_path} line {line}: empty label")
    if all(_is_int(n) for n in names):
        names.sort(key=int)
    index = {n: i for i, n in enumerate(names)}
    lists: Lists = {}
    for path, lab, split, line in rows:
        if not (path or "").strip():
            raise WeightgenError(f"{csv_path} line {line}: empty path")
        stage = "all" if split == "all" else _SPLIT_NAMES.get((split or "").strip().lower())
        if stage is None:
            raise WeightgenError(f"{csv_path} line {line}: split must be train, val or test, not {split!r}")
        p = Path(path.strip()).expanduser()
        ps, ls = lists.setdefault(stage, ([], []))
        ps.append(str(p if p.is_absolute() else base / p))
        ls.append(index[lab.strip()])
    if len(names) < 2:
        raise WeightgenError(f"{csv_path} needs at least two labels, found {len(names)}")
    if "all" not in lists and "train" not in lists:
        raise WeightgenError(f"{csv_path}: no row has split 'train'")
    return names, lists, f"images listed in {csv_path}"


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _split(lists: Lists, classes: list[str], seed: int, test_fraction: float, val_fraction: float,
           max_train: int | None, max_eval: int | None, where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified seeded splits: one pool cut into train/val/test, or given splits with val (and
    test) carved from train when absent; then the caps."""
    for cap, flag in ((max_train, "max_train"), (max_eval, "max_eval")):
        if cap is not None and cap < 1:
            raise WeightgenError(f"{flag} must be positive, got {cap}")
    if "all" in lists:
        paths, labels = lists["all"]
        y = np.asarray(labels, dtype=np.int64)
        _check_counts(y, classes, 3, where)
        tr, va, te = stratified_split(y, seed, test_fraction, val_fraction, max_train, max_eval)
        parts = {"train": (paths, y, tr), "val": (paths, y, va), "test": (paths, y, te)}
    else:
        paths, labels = lists["train"]
        y = np.asarray(labels, dtype=np.int64)
        idx = np.arange(len(y))
        need = 1 + ("val" not in lists) + ("test" not in lists)
        _check_counts(y, classes, need, where + "/train")
        parts = {}
        if "test" not in lists:
            te, idx = carve_val(idx, y, seed, test_fraction)
            parts["test"] = (paths, y, subsample(te, y, max_eval, seed))
        if "val" not in lists:
            idx, va = carve_val(idx, y, seed, val_fraction)
            parts["val"] = (paths, y, subsample(va, y, max_eval, seed))
        parts["train"] = (paths, y, subsample(idx, y, max_train, seed))
        for stage in ("val", "test"):
            if stage in lists:
                p, lab = lists[stage]
                ys = np.asarray(lab, dtype=np.int64)
                parts[stage] = (p, ys, subsample(np.arange(len(ys)), ys, max_eval, seed))
    out = {}
    for stage in SPLITS:
        p, y, idx = parts[stage]
        out[stage] = (_path_array([p[i] for i in idx]), y[idx])
    return out


def _check_counts(y: np.ndarray, classes: list[str], need: int, where: str) -> None:
    counts = np.bincount(y, minlength=len(classes))
    few = [f"{c} ({n})" for c, n in zip(classes, counts) if n < need]
    if few:
        raise WeightgenError(f"{where}: every class needs at least {need} images to split; too few in "
                             f"{', '.join(few[:5])}")


def _scan(data: FileImages, skip_bad: bool, decode: bool | None) -> None:
    """Check every chosen file before training: raise on the first bad one, or drop them all."""
    every = [p for s in SPLITS for p in data.paths(s)]
    bad = scan_images(every, decode=decode)
    if not bad:
        return
    if not skip_bad:
        path, reason = bad[0]
        more = f" ({len(bad) - 1} more bad images; skip_bad drops them)" if len(bad) > 1 else ""
        raise BadImageError(f"cannot read image {path}: {reason}{more}",
                            cli=f"cannot read image {path}: {reason}{more.replace('skip_bad', '--skip-bad-images')}")
    dropped = {os.fsencode(p) for p, _ in bad}
    for stage in SPLITS:
        paths, labels = data.splits[stage]
        keep = np.array([bytes(p) not in dropped for p in paths], dtype=bool)
        data.splits[stage] = (paths[keep], labels[keep])
    data.skipped = bad
    empty = [data.classes[c] for c in range(data.num_classes) if not (data.splits["train"][1] == c).any()]
    if empty:
        raise WeightgenError(f"after skipping {len(bad)} bad images, no training image is left for class "
                             f"{', '.join(empty[:5])}")
    log.warning("skipped %d unreadable images, e.g. %s (%s)", len(bad), bad[0][0], bad[0][1])
