"""Several devices through Lightning: adapt.py and train_vae.py with --accelerator cpu --devices 2 (DDP, gloo).

Lightning's ddp strategy re-runs the script once per extra device, so these run the scripts as
subprocesses (in-process, the second rank would re-run pytest itself).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from weightgen.cli import run_cli

from _scripts import load_script

REPO = Path(__file__).resolve().parents[1]
adapt = load_script("scripts/adapt.py")
# one seed, a small split, a learning rate that trains test_resnet's every weight in a few dozen steps
ARGS = ["--tasks", "digits", "--seeds", "0", "--method", "full", "--lr", "1e-2", "--epochs", "5",
        "--max-train", "512", "--max-eval", "256", "--batch-size", "32"]


def script(name: str, *argv, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run(argv: list, capsys) -> tuple[int, str, str]:
    """scripts/adapt.py in this process (one device)."""
    code = run_cli(lambda: adapt.main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def make_backbone(path: Path) -> Path:
    """A recast test_resnet artifact, made the way a user makes one: a checkpoint through generate_weights.py."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        checkpoint = path.parent / "test_resnet.safetensors"
        save_file(timm.create_model("test_resnet", in_chans=1).state_dict(), str(checkpoint))
    generate = load_script("scripts/generate_weights.py")
    assert generate.main(["--arch", "test_resnet", "--checkpoint", str(checkpoint), "--model-kwargs", "in_chans=1",
                          "--out", str(path)]) == 0
    return path


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return make_backbone(tmp_path_factory.mktemp("ddp") / "backbone")


def test_adapt_on_two_cpu_devices_writes_once_and_matches_one_device(backbone, tmp_path, capsys):
    out1, out2 = tmp_path / "one" / "results", tmp_path / "two" / "results"
    code, _, err = run(["--backbone", backbone, "--out", out1, *ARGS], capsys)
    assert code == 0, err
    proc = script("adapt.py", "--backbone", backbone, "--out", out2, *ARGS, "--accelerator", "cpu", "--devices", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone prints and writes: one results directory, no stray temporary sibling, each task file once
    assert proc.stdout.count(f"wrote {out2}") == 1
    assert [p.name for p in out2.parent.iterdir()] == ["results"]
    assert sorted(p.name for p in (out2 / "tasks").iterdir()) == ["digits-s0.safetensors"]
    one, two = read(out1 / "results.csv"), read(out2 / "results.csv")
    assert len(two) == 1 and two[0]["exact_switch"] == "True"
    # the global batch is split over the devices: as many steps as on one device
    assert two[0]["steps"] == one[0]["steps"]
    acc1, acc2 = float(one[0]["test_acc"]), float(two[0]["test_acc"])
    assert acc2 > 0.6, acc2  # trained (chance: 0.1)
    assert abs(acc1 - acc2) < 0.1, (acc1, acc2)  # seeds alone move it by ~0.02-0.03 here
    # the task file rank 0 wrote holds the state the run reports
    code, _, err = run(["--backbone", backbone, "--evaluate", out2], capsys)
    assert code == 0, err
    assert float(read(out2 / "evaluate.csv")[0]["test_acc"]) == acc2


def test_adapt_refuses_a_batch_that_does_not_split_over_the_devices(backbone, tmp_path, capsys):
    code, _, err = run(["--backbone", backbone, "--out", tmp_path / "r", *ARGS[:-2], "--batch-size", "33",
                        "--devices", "2"], capsys)
    assert code == 2 and "error: --batch-size 33 does not split evenly over --devices 2" in err
    assert not (tmp_path / "r").exists()


def test_train_vae_on_a_rank_other_than_zero_neither_exports_nor_prints(tmp_path, capsys, monkeypatch):
    """The rank-zero guard of train_vae.py --devices N: a process that is not rank 0 trains, then
    returns without fitting priors, exporting or printing (rank 0 does that, once)."""
    import pytorch_lightning as pl

    from test_train_vae import make_patterned_zoo

    make_patterned_zoo(tmp_path / "zoo", n_models=3)
    train_vae = load_script("scripts/train_vae.py")
    ranks = []

    def global_rank(self):
        ranks.append(self.state.finished)  # read after fit, when the guard decides
        return 1

    monkeypatch.setattr(pl.Trainer, "global_rank", property(global_rank))
    code = run_cli(lambda: train_vae.main(["--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "vae"),
                                           "--max-epochs", "1", "--batch-size", "64", "--hidden", "16",
                                           "--latent-dim", "2"]))
    out, _ = capsys.readouterr()
    assert code == 0 and True in ranks
    # (the progress bar is there: Lightning itself still sees rank 0)
    assert "wrote" not in out and "vae_mean_cosine" not in out and not (tmp_path / "vae").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["zoo"]
