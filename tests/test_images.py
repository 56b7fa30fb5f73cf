"""The image pipeline: transforms from the backbone's pretrained_cfg, folder/CSV sources streamed from
disk, the bad-image scan, in-memory tasks through the same path, and the offline colour tasks."""
from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from weightgen.data import get_task, photos
from weightgen.data.images import (AUGMENTS, BadImageError, FileImages, MemoryImages, image_config, make_loader,
                                   open_task, scan_images)
from weightgen.io import WeightgenError

MEAN, STD = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)


def overlay_model(**kw):
    return timm.create_model("test_resnet", pretrained_cfg_overlay=dict(mean=MEAN, std=STD, input_size=(3, 40, 40)),
                             **kw)


def write_images(folder, n, rng, colour=(255, 0, 0), size=(24, 20), fmt="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.{fmt}")


def make_folder(root, per_class=10, seed=0):
    rng = np.random.default_rng(seed)
    for name, colour in (("red", (230, 20, 20)), ("green", (20, 230, 20)), ("blue", (20, 20, 230))):
        write_images(root / name, per_class, rng, colour)
    return root


# ---- transforms ---------------------------------------------------------------------------------

def test_config_follows_pretrained_cfg_and_overrides_win():
    cfg = image_config(overlay_model())
    assert cfg.mean == MEAN and cfg.std == STD and cfg.img_size == (40, 40) and cfg.channels == 3
    assert cfg.interpolation == "bilinear"
    other = image_config(overlay_model(), img_size=24, mean=0.5, std=(0.25, 0.25, 0.25))
    assert other.img_size == (24, 24) and other.mean == (0.5,) * 3 and other.std == (0.25,) * 3
    # a ViT built at 32 px is fed 32 px, whatever its pretrained_cfg says
    assert image_config(timm.create_model("test_vit", img_size=32)).img_size == (32, 32)
    with pytest.raises(WeightgenError, match="2 values"):
        image_config(overlay_model(), mean=(0.1, 0.2))


def test_eval_transform_normalises_with_the_backbones_mean_and_std():
    cfg = image_config(overlay_model())
    colour = (255, 0, 128)
    x = cfg.transform()(Image.new("RGB", (50, 70), colour))
    assert x.shape == (3, 40, 40)
    expect = [(c / 255 - m) / s for c, m, s in zip(colour, MEAN, STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expect), atol=1e-4)  # RGB kept, channel by channel


@pytest.mark.parametrize("augment", AUGMENTS)
def test_channels_follow_the_backbone(augment):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 36, 3), dtype=np.uint8))
    gray_cfg = image_config(timm.create_model("test_resnet", in_chans=1), img_size=24)
    assert gray_cfg.channels == 1 and len(gray_cfg.mean) == 1  # RGB stats averaged for one channel
    for im in (rgb, rgb.convert("L")):
        assert gray_cfg.transform(True, augment)(im).shape == (1, 24, 24)
    rgb_cfg = image_config(overlay_model(), img_size=24)
    x = rgb_cfg.transform(True, augment)(rgb.convert("L"))  # grayscale into an RGB backbone: 3 channels
    assert x.shape == (3, 24, 24)
    if augment == "none":  # the three channels carry the same gray, normalised per channel
        gray = (x * torch.tensor(STD)[:, None, None]) + torch.tensor(MEAN)[:, None, None]
        assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)


def test_unknown_augment_is_one_clear_error():
    with pytest.raises(WeightgenError, match="unknown augmentation"):
        image_config(overlay_model()).transform(True, "mixup")


# ---- sources ----------------------------------------------------------------------------------

def _split_paths(data: FileImages):
    return {s: data.paths(s) for s in ("train", "val", "test")}


def test_folder_splits_are_disjoint_complete_and_seeded(tmp_path):
    root = make_folder(tmp_path / "imgs")
    a, b, c = (open_task(f"imagefolder:{root}", seed=s) for s in (0, 0, 1))
    assert a.classes == ["blue", "green", "red"] and a.sizes() == {"train": 21, "val": 3, "test": 6}
    pa, pb, pc = _split_paths(a), _split_paths(b), _split_paths(c)
    assert pa == pb and pa != pc
    sets = [set(pa[s]) for s in pa]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == {str(p) for p in root.rglob("*.png")}
    for s in pa:  # every class in every split
        assert set(a.labels(s).tolist()) == {0, 1, 2}
    capped = open_task(f"imagefolder:{root}", seed=0, max_train=6)
    assert np.bincount(capped.labels("train")).tolist() == [2, 2, 2]  # stratified cap


def test_folder_streams_colour_through_the_loader(tmp_path):
    root = make_folder(tmp_path / "imgs")
    data = open_task(f"imagefolder:{root}", seed=0)
    cfg = image_config(overlay_model(), img_size=16)
    for workers in (0, 2):
        loader = make_loader(data.dataset("test", cfg), batch_size=4, train=False, workers=workers)
        xs, ys = zip(*loader)
        x, y = torch.cat(xs), torch.cat(ys)
        assert x.shape == (6, 3, 16, 16) and torch.equal(y, torch.as_tensor(data.labels("test")))
        rgb = x.mean(dim=(2, 3)) * torch.tensor(STD) + torch.tensor(MEAN)
        assert torch.equal(rgb.argmax(1), torch.tensor([2, 1, 0])[y])  # class = its dominant channel


def test_train_val_test_subfolders_and_carved_val(tmp_path):
    rng = np.random.default_rng(0)
    for stage, n in (("train", 10), ("test", 3)):
        for cls, col in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
            write_images(tmp_path / stage / cls, n, rng, col)
    data = open_task(f"imagefolder:{tmp_path}", seed=0)
    assert data.sizes() == {"train": 18, "val": 2, "test": 6}
    assert all("/test/" in p for p in data.paths("test"))
    assert all("/train/" in p for p in data.paths("val"))
    write_images(tmp_path / "val" / "a", 2, rng)
    write_images(tmp_path / "val" / "b", 2, rng)
    given = open_task(f"imagefolder:{tmp_path}", seed=0)
    assert given.sizes() == {"train": 20, "val": 4, "test": 6} and all("/val/" in p for p in given.paths("val"))


def test_csv_source_relative_paths_labels_and_split_column(tmp_path):
    rng = np.random.default_rng(0)
    write_images(tmp_path / "pics", 12, rng)
    rows = ["path,label,split"] + [f"pics/{i:03d}.png,{'cat' if i % 2 else 'dog'},{'test' if i >= 10 else 'train'}"
                                   for i in range(12)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    data = open_task(f"csv:{tmp_path / 'list.csv'}", seed=0)
    assert data.classes == ["cat", "dog"] and data.sizes() == {"train": 8, "val": 2, "test": 2}
    assert data.paths("test") == [str(tmp_path / "pics" / f"{i:03d}.png") for i in (10, 11)]
    assert data.labels("test").tolist() == [1, 0]
    (tmp_path / "bad.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(WeightgenError, match="columns path,label"):
        open_task(f"csv:{tmp_path / 'bad.csv'}")
    (tmp_path / "nosplit.csv").write_text("path,label\n" + "\n".join(
        f"{tmp_path}/pics/{i:03d}.png,{i % 2}" for i in range(12)) + "\n")
    pooled = open_task(f"csv:{tmp_path / 'nosplit.csv'}", seed=3)
    assert sum(pooled.sizes().values()) == 12 and pooled.classes == ["0", "1"]


# ---- bad images -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # tens of KB on disk, 400 megapixels decoded
    return path


def _truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["text", "bomb", "truncated-png"])
def test_bad_image_raises_naming_the_file_or_is_skipped_with_a_count(tmp_path, bomb_png, kind):
    root = make_folder(tmp_path / "imgs")
    bad = root / "red" / ("zzz.jpg" if kind == "text" else "zzz.png")
    if kind == "text":
        bad.write_text("not an image")
    elif kind == "bomb":
        bad.write_bytes(bomb_png.read_bytes())
    else:
        _truncated(root / "red" / "000.png", bad)
    with pytest.raises(BadImageError, match=str(bad)) as err:
        open_task(f"imagefolder:{root}", seed=0)
    assert "\n" not in str(err.value)
    data = open_task(f"imagefolder:{root}", seed=0, skip_bad=True)
    assert [p for p, _ in data.skipped] == [str(bad)] and sum(data.sizes().values()) == 30
    assert str(bad) not in sum(_split_paths(data).values(), [])
    if kind == "bomb":
        assert "exceeds the limit" in data.skipped[0][1] or "Decompression" in data.skipped[0][1]


def test_truncated_jpeg_passes_the_header_check_and_fails_cleanly_at_load_time(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "trunc.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[:-len(good.read_bytes()) // 3])  # headers intact, scan data cut
    assert scan_images([good, bad], decode=False) == []  # verify() does not decode a JPEG
    assert [p for p, _ in scan_images([good, bad])] == [str(bad)]  # a small list is fully decoded
    data = FileImages("t", ["a", "b"], {s: (np.array([str(good).encode(), str(bad).encode()]), np.array([0, 1]))
                                        for s in ("train", "val", "test")})
    cfg = image_config(overlay_model(), img_size=16)
    for workers in (0, 1):  # from a worker process too, the error is one line naming the file
        loader = make_loader(data.dataset("test", cfg, skip_bad=False), 2, train=False, workers=workers)
        with pytest.raises(BadImageError) as err:
            next(iter(loader))
        assert str(err.value).startswith(f"cannot read image {bad}") and "\n" not in str(err.value)
    x, y = next(iter(make_loader(data.dataset("test", cfg, skip_bad=True), 2, train=False)))
    assert x.shape == (1, 3, 16, 16) and y.tolist() == [0]  # the bad one dropped from its batch


# ---- built-in tasks through the same pipeline ---------------------------------------------------

def test_builtin_task_goes_through_the_same_transforms():
    data = open_task("digits", seed=0, max_train=50, max_eval=20)
    assert isinstance(data, MemoryImages) and data.sizes()["train"] == 50
    rgb = image_config(overlay_model(), img_size=24)
    gray = image_config(timm.create_model("test_resnet", in_chans=1), img_size=24)
    x, y = data.dataset("test", rgb)[0]
    assert x.shape == (3, 24, 24) and torch.allclose(x[0] * STD[0] + MEAN[0], x[2] * STD[2] + MEAN[2], atol=1e-5)
    assert data.dataset("test", gray)[0][0].shape == (1, 24, 24)
    hue = open_task("hue", seed=0, max_train=20, max_eval=10)
    assert hue.dataset("train", rgb)[0][0].shape == (3, 24, 24)


def test_augmentation_is_seeded_and_leaves_the_global_rng_alone():
    data = open_task("digits", seed=0, max_train=16, max_eval=8)
    cfg = image_config(overlay_model(), img_size=16)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()

    def epoch(seed):
        return torch.cat([x for x, _ in make_loader(data.dataset("train", cfg, "timm", seed=seed), 8,
                                                     train=True, seed=seed)])
    a, b, c = epoch(0), epoch(0), epoch(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert np.array_equal(before[2], np.random.get_state()[1])


def test_loader_pins_memory_and_keeps_workers_on_cuda_only():
    ds = open_task("digits", seed=0, max_train=8, max_eval=8).dataset("val", image_config(overlay_model()))
    cpu, cuda = (make_loader(ds, 4, train=False, workers=2, device=d) for d in ("cpu", "cuda"))
    assert not cpu.pin_memory and not cpu.persistent_workers
    assert cuda.pin_memory and cuda.persistent_workers and cuda.num_workers == 2


# ---- colour tasks -----------------------------------------------------------------------------

def test_hue_task_same_seed_same_data_and_only_hue_differs():
    a, b, c = get_task("hue", seed=0), get_task("hue", seed=0), get_task("hue", seed=1)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.train[0], c.train[0])
    x, y = a.train
    assert x.shape[1:] == (3, 32, 32) and set(y.tolist()) == set(range(5))
    luma = torch.einsum("nchw,c->n", x, torch.tensor(photos.LUMA, dtype=torch.float32)) / (32 * 32)
    means = torch.stack([luma[y == k].mean() for k in range(5)])
    assert means.max() - means.min() < 0.01  # luminance does not tell classes apart...
    rgb = torch.stack([x[y == k].mean(dim=(0, 2, 3)) for k in range(5)])
    assert torch.cdist(rgb, rgb).add(torch.eye(5)).min() > 0.05  # ...colour does


def test_photo_patches_are_split_by_region():
    pytest.importorskip("skimage")
    task = get_task("photo-patches", seed=0, max_train=None, max_eval=None)
    assert task.num_classes == 10 and task.train[0].shape[1:] == (3, 32, 32)

    def boxes(stage):
        out = {}
        for g in task.groups[stage]:
            name, _, box = g.partition(":")
            out.setdefault(name, []).append(tuple(int(v) for v in box.split(",")))
        return out

    train = boxes("train")
    for stage in ("val", "test"):
        for name, held in boxes(stage).items():
            for (y, x, s) in held:
                for (ty, tx, ts) in train[name]:
                    assert y + s <= ty or ty + ts <= y or x + s <= tx or tx + ts <= x  # no overlap
    other = get_task("photo-patches", seed=1, max_train=None, max_eval=None)
    assert task.groups["test"] != other.groups["test"]
    again = photos.photo_patch_task(seed=0)
    assert torch.equal(again.test[0], task.test[0])


def test_photo_patches_without_scikit_image_name_the_install(monkeypatch):
    real = photos.importlib.util.find_spec
    monkeypatch.setattr(photos.importlib.util, "find_spec", lambda name: None if name == "skimage" else real(name))
    photos.load_photo.cache_clear()
    try:
        with pytest.raises(WeightgenError, match="pip install scikit-image"):
            photos.photo_patch_task(seed=0)
    finally:
        photos.load_photo.cache_clear()


def test_pixel_limit_counts_from_max_image_pixels_not_twice_it(tmp_path, monkeypatch):
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; the scan and the loader refuse both
    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    Image.new("L", (20, 20)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: PIL's warning range
    bad = scan_images([tmp_path / "small.png", tmp_path / "big.png"], decode=False)
    assert [p for p, _ in bad] == [str(tmp_path / "big.png")] and "exceeds the limit of 1000" in bad[0][1]
    from weightgen.data.images import read_image
    with pytest.raises(BadImageError, match="big.png"):
        read_image(tmp_path / "big.png")


def test_make_loaders_gives_three_splits_only_train_shuffled(tmp_path):
    from weightgen.data.images import make_loaders
    data = open_task(f"imagefolder:{make_folder(tmp_path / 'imgs')}", seed=0)
    loaders = make_loaders(data, image_config(overlay_model(), img_size=16), 4, augment="flip-crop")
    assert sorted(loaders) == ["test", "train", "val"]
    assert [len(loaders[s].dataset) for s in ("train", "val", "test")] == [21, 3, 6]
    assert loaders["train"].dataset.random_transform and not loaders["test"].dataset.random_transform
    y = torch.cat([b[1] for b in loaders["test"]])
    assert torch.equal(y, torch.as_tensor(data.labels("test")))  # evaluation keeps the file order
