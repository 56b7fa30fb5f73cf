"""Offline tasks: deterministic stratified splits, no leaks between splits, clean errors."""
import numpy as np
import pytest
import torch

from weightgen.data import TASKS, ImageTask, get_task, source_task, to_model_input
from weightgen.io import WeightgenError


def _rows(images: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in images.reshape(len(images), -1).numpy()}


def _check_task(task: ImageTask, n_classes: int = 10):
    assert len(task.classes) == n_classes
    for stage in ("train", "val", "test"):
        x, y = task.split(stage)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, task.image_size, task.image_size) and len(x) == len(y)
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
        assert set(y.tolist()) == set(range(n_classes))  # every class in every split


def test_digits_shapes_balance_and_disjoint_splits():
    task = get_task("digits", seed=0)
    _check_task(task)
    assert task.image_size == 8
    counts = torch.bincount(task.train[1], minlength=10)
    assert counts.max() - counts.min() <= 8  # stratified: ~125 per class
    train, val, test = (_rows(task.split(s)[0]) for s in ("train", "val", "test"))
    assert not train & test and not train & val and not val & test


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = get_task("digits", seed=0), get_task("digits", seed=0), get_task("digits", seed=1)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.train[0], c.train[0])
    a.train[0].zero_()  # a caller's changes never reach the cache
    assert torch.equal(get_task("digits", seed=0).train[0], b.train[0])


def test_caps_are_stratified():
    task = get_task("digits", seed=3, max_train=100, max_eval=50)
    assert task.sizes() == {"train": 100, "val": 50, "test": 50}
    assert torch.bincount(task.train[1], minlength=10).tolist() == [10] * 10


def test_to_model_input_resizes_repeats_and_normalises():
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, :4] = 1.0  # top half white
    out = to_model_input(x, channels=3, img_size=32)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out[:, 0], out[:, 2])
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, -1, 0] == -1.0  # (v - 0.5) / 0.5
    small = to_model_input(torch.rand(1, 1, 28, 28), channels=1, img_size=14)
    assert small.shape == (1, 1, 14, 14) and -1 <= small.min() and small.max() <= 1
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(1, 3, 8, 8))


def test_unknown_task_names_the_known_ones():
    with pytest.raises(WeightgenError, match="unknown task 'nope'.*digits.*mnist"):
        get_task("nope")
    assert "digits" in TASKS and "imagefolder:PATH" in TASKS
