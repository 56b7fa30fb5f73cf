"""Colour reaches the backbone: on the hue task (classes that differ only in hue, equal luminance),
full fine-tuning through adapt.py on an RGB backbone reaches >= 0.95 test accuracy; through a
grayscale (1-channel) backbone the same task stays near chance. And coefficient-only RECAST beats
linear on hue when the frozen features have lost colour, given banks that reach the stem and extra
random templates (generate_weights.py --preset all --extra-templates 16)."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import timm
import torch

import weightgen as wg
from weightgen.adapt import extend_banks
from weightgen.cli import run_cli
from weightgen.data.photos import LUMA, hue_images

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("script_adapt_colour", REPO / "scripts" / "adapt.py")
adapt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(adapt)
# hue images are 32 px; 400 training images and a 60-step budget keep this to seconds
RUN = ["--tasks", "hue", "--seeds", "0", "--img-size", "32", "--epochs", "1", "--steps", "60", "--batch-size", "64",
       "--max-train", "400", "--max-eval", "200"]


def backbone(path: Path, in_chans: int) -> Path:
    torch.manual_seed(0)
    kwargs = {"in_chans": in_chans, "zero_init_last": False}
    model = timm.create_model("test_resnet", **kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wg.recast(model)
    wg.save(model, path, wg.fit(model, state), arch="test_resnet", model_kwargs=kwargs)
    return path


def test_full_learns_a_colour_only_task_on_an_rgb_backbone(tmp_path):
    rows = {}
    for chans in (3, 1):
        out = tmp_path / f"c{chans}"
        code = run_cli(lambda: adapt.main(["--backbone", str(backbone(tmp_path / f"bb{chans}", chans)), "--method",
                                           "full", "--out", str(out), *RUN]))
        assert code == 0
        with open(out / "results.csv") as f:
            rows[chans] = next(csv.DictReader(f))
        assert wg.io.read_json(out / "adapt.json")["data_config"]["channels"] == chans
    assert float(rows[3]["test_acc"]) >= 0.95, rows[3]
    assert float(rows[1]["test_acc"]) < 0.5, rows[1]  # 5 classes; luminance carries no class information


def luma_only_backbone(path: Path, extra: int) -> Path:
    """test_resnet whose stem conv sees only luma (each filter is one kernel times the luma weights, the
    input std undone), fitted into banks of every conv (preset 'all', exact) plus ``extra`` random
    templates per bank: its features cannot tell hues apart, but its coefficients can add colour filters."""
    torch.manual_seed(0)
    kwargs = {"in_chans": 3, "zero_init_last": False}
    model = timm.create_model("test_resnet", **kwargs)
    with torch.no_grad():
        stem = model.conv1[0]
        std = torch.tensor(model.pretrained_cfg["std"], dtype=torch.float32)
        luma = torch.tensor(LUMA, dtype=torch.float32)
        stem.weight.copy_(stem.weight.sum(1, keepdim=True) * (luma * std).view(1, 3, 1, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wg.recast(model, preset="all")
    report = wg.fit(model, state)
    extend_banks(model, extra, "random", seed=0)
    wg.save(model, path, report, arch="test_resnet", model_kwargs=kwargs)
    return path


def test_recast_beats_linear_on_hue_when_the_frozen_features_lose_colour(tmp_path):
    bb = luma_only_backbone(tmp_path / "bb", extra=16)
    # the premise: the backbone's function ignores chroma (an image recoloured to another class's hue,
    # luma unchanged, gives the same features), so linear, which trains only the head, cannot beat chance
    model = wg.load(bb).eval()
    images, labels = hue_images(per_class=2)
    first, other = (torch.from_numpy(images[labels == c][:1]) for c in (0, 3))
    luma = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    chroma = lambda x: x - (x * luma).sum(1, keepdim=True)  # the luma weights sum to 1: zero-luma part
    recoloured = first - chroma(first) + chroma(other)
    cfg = model.pretrained_cfg
    norm = lambda x: (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = model.forward_features(norm(torch.cat([first, recoloured])))
    assert (first - recoloured).abs().max() > 0.05
    torch.testing.assert_close(feats[0], feats[1], rtol=1e-4, atol=1e-4)
    acc = {}
    for method in ("linear", "recast"):  # each at adapt.py's default lr
        out = tmp_path / method
        assert run_cli(lambda: adapt.main(["--backbone", str(bb), "--method", method, "--out", str(out), *RUN])) == 0
        with open(out / "results.csv") as f:
            acc[method] = float(next(csv.DictReader(f))["test_acc"])
    # measured on a 2-core AMD EPYC, seed 0: linear 0.200, recast 0.900 (1 thread) / 0.930 (2 threads).
    # Seeds 0-4 gave recast - linear 0.70, 0.66, 0.74, 0.53, 0.67 (1 thread) and 0.73, 0.70, 0.70, 0.48,
    # 0.68 (2 threads), linear 0.185-0.200: the margin below is far from every one of them. Without the
    # random templates recast stays at 0.200 and this test fails.
    assert acc["linear"] < 0.3, acc  # 5 classes: chance
    assert acc["recast"] - acc["linear"] > 0.3, acc
