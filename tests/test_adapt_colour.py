"""Colour reaches the backbone: on the hue task (classes that differ only in hue, equal luminance),
full fine-tuning through adapt.py on an RGB backbone reaches >= 0.95 test accuracy; through a
grayscale (1-channel) backbone the same task stays near chance."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import timm
import torch

import weightgen as wg
from weightgen.cli import run_cli

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
