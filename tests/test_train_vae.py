"""scripts/train_vae.py end to end on a fake zoo: export, priors, PCA comparison, TensorBoard, bad input."""
from __future__ import annotations

import glob
import importlib.util
import pathlib

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_vae_data import make_fake_zoo
from weightgen.cli import run_cli
from weightgen.vae.prior import load_vae_bundle, trained_kinds

_SPEC = importlib.util.spec_from_file_location(
    "train_vae_script", pathlib.Path(__file__).parents[1] / "scripts" / "train_vae.py")
script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(script)


def test_train_vae_exports_a_loadable_vae_with_priors(tmp_path, capsys):
    make_fake_zoo(tmp_path / "zoo", n_models=4)
    out, logs = tmp_path / "vae", tmp_path / "logs"
    code = run_cli(lambda: script.main(["--zoo", str(tmp_path / "zoo"), "--out", str(out), "--logdir", str(logs),
                                        "--max-epochs", "2", "--batch-size", "64", "--hidden", "32"]))
    assert code == 0
    vae, meta = load_vae_bundle(out)  # loads without Lightning, from safetensors + JSON
    assert {"linear", "conv"} <= trained_kinds(meta)
    recon = meta["training"]["reconstruction"]
    assert 0 < recon["layers"] and -1 <= recon["vae_mean_cosine"] <= 1 and -1 <= recon["pca_mean_cosine"] <= 1
    assert set(meta["training"]["train_models"]).isdisjoint(meta["training"]["val_models"])
    events = sorted(glob.glob(str(logs / "vae" / "version_*" / "events*")))
    tags = set()
    for path in events:
        acc = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"]) | set(acc.Tags()["scalars"])
    assert "train/loss" in tags and any(t.startswith("reconstruction/conv/") for t in tags)
    printed = capsys.readouterr().out
    assert '"vae_mean_cosine"' in printed and f"wrote {out}" in printed


def test_train_vae_refuses_an_empty_zoo_and_an_existing_output(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli(lambda: script.main(["--zoo", str(tmp_path / "empty"), "--out", str(tmp_path / "v")])) == 2
    assert "no usable models" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    make_fake_zoo(tmp_path / "zoo")
    assert run_cli(lambda: script.main(["--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "taken")])) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
