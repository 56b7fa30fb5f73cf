"""Checkpoint interpolation in weight space and through the VAE's latent space (scripts/interpolate.py)."""
from __future__ import annotations

import csv
import importlib.util
import json
import pathlib

import pytest
import torch

from weightgen.cli import run_cli
from weightgen.classifier import evaluate, reestimate_batchnorm, train_classifier
from weightgen.data import model_splits
from weightgen.models import small_input_kwargs
from weightgen.io import WeightgenError, load_checkpoint, save_tensors
from weightgen.models import create_model, load_into
from weightgen.studies.interpolation import COLUMNS, interpolate, resolve_checkpoint
from weightgen.vae.codec import decode_layer, encode_layer, fit_latent_density, weight_layers
from weightgen.vae.paths import METHODS, InterpolationPath, slerp, weight_cosine
from weightgen.vae.model import VAEConfig, WeightVAE
from weightgen.vae.prior import load_vae_bundle
from weightgen.vae.store import fit_scale_model, save_vae

from _plots import count_colour, plot_pixels

_SPEC = importlib.util.spec_from_file_location(
    "interpolate_script", pathlib.Path(__file__).parents[1] / "scripts" / "interpolate.py")
script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(script)

ARCH = "test_resnet"
KWARGS = small_input_kwargs(ARCH)  # num_classes=10, in_chans=1; CNN: evaluated at the zoo's 32x32
STEPS = 3



def _run(argv):
    return run_cli(lambda: script.main(argv))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny untrained VAE that has 'seen' only conv layers (so linear layers take the fallback)."""
    torch.manual_seed(0)
    config = VAEConfig(hidden=64, layers=2, latent_dim=8)
    density = fit_latent_density([("conv", 0.5, torch.randn(32, 8))], 8)
    scale = fit_scale_model([("conv", (16, 16, 3, 3), 0.2, 0.1), ("conv", (32, 16, 1, 1), 0.8, 0.2),
                             ("linear", (10, 96), 1.0, 0.1)])
    return save_vae(WeightVAE(config), tmp_path_factory.mktemp("vae") / "vae",
                    extra={"scale_model": scale, "latent_density": density})


@pytest.fixture(scope="module")
def digits():
    return model_splits("digits", 0, 32, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, digits):
    """Two test_resnets trained briefly on digits from different seeds."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(ARCH, KWARGS)
        train_classifier(model, digits, steps=15, seed=seed)
        paths.append(root / f"{ARCH}-s{seed}.safetensors")
        save_tensors(paths[-1], model.state_dict())
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoints, vae_dir):
    """One run through the script: (out dir, CSV rows, summary, logdir, exit code)."""
    root = tmp_path_factory.mktemp("run")
    out, logdir = root / "out", root / "tb"
    argv = ["--arch", ARCH, "--model-kwargs", *[f"{k}={v}" for k, v in KWARGS.items()],
            "--a", str(checkpoints[0]), "--b", str(checkpoints[1]), "--steps", str(STEPS),
            "--out", str(out), "--vae", str(vae_dir), "--seed", "3", "--logdir", str(logdir)]
    code = _run(argv)
    with open(out / "interpolation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, json.loads((out / "summary.json").read_text()), logdir, code


def _own_accuracy(path, digits) -> float:
    """The checkpoint evaluated the way interpolate() evaluates every point."""
    model = create_model(ARCH, KWARGS)
    load_into(model, load_checkpoint(path), str(path))
    torch.manual_seed(3)
    reestimate_batchnorm(model, digits.train)
    return evaluate(model, digits.test)


def test_slerp_ends_parallel_and_norm():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert torch.equal(slerp(u, v, 0.0), u) and torch.equal(slerp(u, v, 1.0), v)
    e1, e2 = torch.eye(2)[:1], torch.eye(2)[1:]
    mid = slerp(e1, e2, 0.5)
    assert torch.allclose(mid.norm(), torch.tensor(1.0)) and torch.allclose(mid, torch.full((1, 2), 0.5 ** 0.5))
    # parallel, anti-parallel and zero rows have no great circle: lerp, never NaN
    odd = torch.stack([u[0], -u[0], torch.zeros(8)])
    other = torch.stack([2 * u[0], u[0], u[1]])
    out = slerp(odd, other, 0.3)
    assert torch.isfinite(out).all() and torch.allclose(out, torch.lerp(odd, other, 0.3), atol=1e-6)


def _loaded_ends(checkpoints, vae_dir):
    vae, meta = load_vae_bundle(vae_dir)
    model = create_model(ARCH, KWARGS)
    ends = []
    for p in checkpoints:
        load_into(model, load_checkpoint(p), str(p))
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
    return vae, meta, model, ends


def test_paths_reproduce_the_inputs_at_both_ends(checkpoints, vae_dir):
    vae, meta, model, ends = _loaded_ends(checkpoints, vae_dir)
    path = InterpolationPath(model, *ends, vae, meta, skip={"fc": "head"})
    assert [layer.name for layer in path.layers][:2] == ["conv1.0", "conv1.3"] and path.weight_space == {"fc": "head"}
    for method in METHODS:
        for alpha, end in ((0.0, ends[0]), (1.0, ends[1])):
            state = path.state(alpha, method)
            assert all(torch.equal(state[k], end[k]) for k in end), (method, alpha)
    lerp, latent = path.state(0.5, "weight_lerp"), path.state(0.5, "latent_slerp")
    assert not torch.equal(lerp["conv1.0.weight"], latent["conv1.0.weight"])  # decoded by the VAE
    for key in ("fc.weight", "fc.bias", "bn1.weight", "conv1.1.running_mean"):  # head, biases, norms: lerp
        assert torch.equal(lerp[key], latent[key])
    assert torch.equal(lerp["fc.weight"], torch.lerp(ends[0]["fc.weight"], ends[1]["fc.weight"], 0.5))


def test_script_run_csv_png_summary_tensorboard(run, checkpoints, digits, capsys):
    out, rows, summary, logdir, code = run
    assert code == 0
    assert len(rows) == STEPS * len(METHODS) and list(rows[0]) == list(COLUMNS)
    assert {r["method"] for r in rows} == set(METHODS)
    assert sorted({float(r["alpha"]) for r in rows}) == [0.0, 0.5, 1.0]
    acc_a, acc_b = _own_accuracy(checkpoints[0], digits), _own_accuracy(checkpoints[1], digits)
    for r in rows:
        if float(r["alpha"]) == 0.0:
            assert abs(float(r["cosine_a"]) - 1) < 1e-6 and float(r["accuracy"]) == pytest.approx(acc_a, abs=1e-12)
        if float(r["alpha"]) == 1.0:
            assert abs(float(r["cosine_b"]) - 1) < 1e-6 and float(r["accuracy"]) == pytest.approx(acc_b, abs=1e-12)
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    # accuracy and cosine panels (5.5 x 5.2 in each, 110 dpi): each method's line, the VAE ends' red crosses
    rgb = plot_pixels(out / "interpolation.png", (1210, 572))
    assert all(count_colour(rgb, c) > 50 for c in ("tab:gray", "tab:blue", "tab:orange", "tab:red"))
    assert summary["accuracy"]["applies"] and summary["accuracy"]["image_size"] == 32
    # the reported reconstruction is the VAE's own decoding of each end (conv layers; the head as is)
    vae, _ = load_vae_bundle(summary["vae"])
    for end, ckpt in (("a", checkpoints[0]), ("b", checkpoints[1])):
        state = load_checkpoint(ckpt)
        layers = [layer for layer in weight_layers(create_model(ARCH, KWARGS)) if layer["name"] != "fc"]
        keys = [f"{layer['name']}.weight" for layer in layers] + ["fc.weight"]
        decoded = dict(state)
        for layer in layers:
            mu, scale = encode_layer(vae, state[f"{layer['name']}.weight"], layer["kind"], layer["depth"])
            decoded[f"{layer['name']}.weight"] = decode_layer(vae, mu, layer["shape"], layer["kind"], layer["depth"], scale).detach()
        flat = [torch.cat([d[k].reshape(-1).double() for k in keys]) for d in (decoded, state)]
        assert summary[f"recon_cosine_{end}"] == pytest.approx(weight_cosine(*flat), abs=1e-6)
        assert summary[f"recon_cosine_{end}"] < 0.99  # an untrained VAE does not reproduce the end
    assert len(summary["vae_layers"]) == 15 and summary["weight_space_layers"] == [{"name": "fc", "reason": "head"}]
    assert set(summary["methods"]) == set(METHODS) and "barrier" in summary["methods"]["latent_lerp"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    tag = "interpolation_vs_alpha_percent/{}/{}"
    assert {tag.format(m, k) for m in METHODS for k in ("accuracy", "cosine_a", "cosine_b")} <= tags
    # x axis = alpha in percent, not the point index
    assert [e.step for e in events.Scalars(tag.format("latent_slerp", "accuracy"))] == [0, 50, 100]
    assert "interpolation/plot_vs_alpha" in events.Tags()["images"]


def test_deterministic_in_seed(run, checkpoints, vae_dir, tmp_path):
    out, *_ = run
    again, rows = interpolate(ARCH, *checkpoints, STEPS, tmp_path / "again", vae_dir=vae_dir,
                              model_kwargs=KWARGS, seed=3)
    assert (again / "interpolation.csv").read_bytes() == (out / "interpolation.csv").read_bytes()
    assert len(rows) == STEPS * len(METHODS)


def test_unseen_kind_and_no_accuracy_head(checkpoints, vae_dir, tmp_path):
    # the head through the VAE too (skip=set()): the VAE never saw linear layers -> weight space
    _, rows = interpolate(ARCH, *checkpoints, 2, tmp_path / "noskip", vae_dir=vae_dir, model_kwargs=KWARGS,
                          skip=set())
    summary = json.loads((tmp_path / "noskip" / "summary.json").read_text())
    assert summary["weight_space_layers"] == [{"name": "fc", "reason": "VAE never saw linear layers"}]
    # a 5-class head: no digits accuracy, cosines only
    kw = {"num_classes": 5, "in_chans": 1}
    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ends.append(tmp_path / f"c5-{seed}.safetensors")
        save_tensors(ends[-1], create_model(ARCH, kw).state_dict())
    _, rows = interpolate(ARCH, *ends, 3, tmp_path / "c5", vae_dir=vae_dir, model_kwargs=kw)
    assert all(r["accuracy"] is None for r in rows) and len(rows) == 9
    lines = (tmp_path / "c5" / "interpolation.csv").read_text().splitlines()
    assert lines[1].split(",")[2] == "" and (tmp_path / "c5" / "interpolation.png").is_file()


def test_bad_inputs_exit_2_and_write_nothing(checkpoints, vae_dir, tmp_path, capsys):
    other = tmp_path / "resnet18.safetensors"
    save_tensors(other, create_model("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64],
                                                  **KWARGS}).state_dict())
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    a, b = str(checkpoints[0]), str(checkpoints[1])
    out = tmp_path / "out"
    base = ["--arch", ARCH, "--model-kwargs", "num_classes=10", "in_chans=1", "--out", str(out), "--vae", str(vae_dir)]
    cases = {
        "steps": (["--a", a, "--b", b, "--steps", "1"], "--steps"),
        "missing": (["--a", a, "--b", str(tmp_path / "nope.safetensors"), "--steps", "3"], "not found"),
        "corrupt": (["--a", str(corrupt), "--b", b, "--steps", "3"], "corrupt"),
        "other arch": (["--a", a, "--b", str(other), "--steps", "3"], f"checkpoint b ({other}) does not fit"),
        "kwargs": (["--a", a, "--b", b, "--steps", "3", "--model-kwargs", "num_classes=5"], "checkpoint a"),
        "no vae": (["--a", a, "--b", b, "--steps", "3", "--vae", str(tmp_path / "novae")], "not found"),
    }
    for name, (extra, message) in cases.items():
        assert _run(base + extra) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (name, err)
        assert not out.exists(), name
    out.mkdir()
    (out / "keep").write_text("x")
    assert _run(base + ["--a", a, "--b", b, "--steps", "3"]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep").read_text() == "x"
    with pytest.raises(WeightgenError, match="steps"):
        interpolate(ARCH, a, b, 2.5, tmp_path / "x", vae_dir=vae_dir, model_kwargs=KWARGS)


def test_residual_correction_makes_latent_paths_continuous(checkpoints, vae_dir):
    vae, meta, model, ends = _loaded_ends(checkpoints, vae_dir)
    key = "conv1.0.weight"
    near = {}
    for residual in (True, False):
        path = InterpolationPath(model, *ends, vae, meta, skip={"fc": "head"}, residual=residual)
        near[residual] = (path.state(1e-4, "latent_lerp")[key] - ends[0][key]).norm() / ends[0][key].norm()
    assert near[True] < 1e-2  # next to the end point, as weight-space lerp would be
    assert near[False] > 10 * near[True]  # raw decoding jumps by the VAE's reconstruction error


def test_zoo_models_bring_arch_and_kwargs(checkpoints, vae_dir, tmp_path, capsys):
    """--zoo DIR --a ID --b ID (or zoo files) needs neither --arch nor --model-kwargs."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for seed, ckpt in enumerate(checkpoints):
        (zoo / f"m-s{seed}.safetensors").write_bytes(ckpt.read_bytes())
        (zoo / f"m-s{seed}.json").write_text(json.dumps({"arch": ARCH, "model_kwargs": KWARGS}))
    out = tmp_path / "out"
    assert _run(["--zoo", str(zoo), "--a", "m-s0", "--b", "m-s1", "--steps", "2", "--out", str(out),
                 "--vae", str(vae_dir)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == ARCH and summary["model_kwargs"] == KWARGS
    # a zoo file brings its record too (no --zoo needed)
    path, record = resolve_checkpoint(zoo / "m-s0.safetensors")
    assert path == zoo / "m-s0.safetensors" and record["arch"] == ARCH and record["model_kwargs"] == KWARGS
    assert resolve_checkpoint(checkpoints[0]) == (checkpoints[0], None)  # a plain checkpoint: no record
    capsys.readouterr()
    (zoo / "m-s1.json").write_text(json.dumps({"arch": ARCH, "model_kwargs": {**KWARGS, "num_classes": 5}}))
    for argv, message in ((["--a", "m-s0", "--b", "m-s1"], "differ in architecture"),
                          (["--a", "m-s0", "--b", "nope"], "no model 'nope' in zoo")):
        assert _run(["--zoo", str(zoo), *argv, "--steps", "2", "--out", str(tmp_path / "bad"),
                     "--vae", str(vae_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert _run(["--a", str(checkpoints[0]), "--b", str(checkpoints[1]), "--steps", "2", "--out",
                 str(tmp_path / "bad"), "--vae", str(vae_dir)]) == 2
    assert "--arch is required" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_align_adds_paths_to_the_weight_matched_b(checkpoints, vae_dir, digits, tmp_path, capsys):
    """--align: every method again to b permuted to match a (same function, closer weights)."""
    out = tmp_path / "aligned"
    argv = ["--arch", ARCH, "--model-kwargs", *[f"{k}={v}" for k, v in KWARGS.items()],
            "--a", str(checkpoints[0]), "--b", str(checkpoints[1]), "--steps", "3", "--out", str(out),
            "--vae", str(vae_dir), "--seed", "3", "--align", "--no-residual"]
    assert _run(argv) == 0
    printed = capsys.readouterr().out
    assert "weight matching:" in printed and "latent_slerp_aligned" in printed
    with open(out / "interpolation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    aligned = [f"{m}_aligned" for m in METHODS]
    assert list(dict.fromkeys(r["method"] for r in rows)) == [*METHODS, *aligned]
    assert set(summary["methods"]) == {*METHODS, *aligned} and not summary["residual_corrected"]
    info = summary["alignment"]
    assert info["max_logit_change"] < 1e-4 and info["units_moved"] > 0 and info["skipped"] == []
    assert info["path_cosine_after"] > info["path_cosine_before"] + 0.02
    at = {(float(r["alpha"]), r["method"]): r for r in rows}
    acc_b = _own_accuracy(checkpoints[1], digits)
    for method, twin in zip(METHODS, aligned):
        assert {**at[0.0, twin], "method": method} == at[0.0, method]  # both paths start at a
        end = at[1.0, twin]  # ... and end at b and at its permuted copy: same accuracy, other weights
        assert float(end["accuracy"]) == pytest.approx(acc_b, abs=2 / len(digits.test))
        assert float(end["cosine_b"]) == pytest.approx(1.0, abs=1e-9)
        assert float(end["cosine_a"]) == pytest.approx(info["path_cosine_after"], abs=1e-9)
        assert float(at[1.0, method]["cosine_a"]) == pytest.approx(info["path_cosine_before"], abs=1e-9)
    assert float(at[0.5, "weight_lerp_aligned"]["cosine_a"]) > float(at[0.5, "weight_lerp"]["cosine_a"])
    rgb = plot_pixels(out / "interpolation.png", (1815, 572))  # a third panel: cosine to a and to b apart
    assert all(count_colour(rgb, c) > 50 for c in ("tab:gray", "tab:blue", "tab:orange", "tab:red"))


def test_field_zoo_models_are_evaluated_on_their_task(checkpoints, vae_dir, tmp_path, capsys):
    """A record's "task" (field zoos) picks the evaluation data; two tasks in one study are refused."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for seed, (ckpt, task) in enumerate(zip(checkpoints, ("digits", "greek"))):
        (zoo / f"m-s{seed}.safetensors").write_bytes(ckpt.read_bytes())
        (zoo / f"m-s{seed}.json").write_text(json.dumps({"arch": ARCH, "model_kwargs": KWARGS, "task": task}))
    base = ["--zoo", str(zoo), "--a", "m-s0", "--steps", "2", "--vae", str(vae_dir)]
    assert _run([*base, "--b", "m-s1", "--out", str(tmp_path / "bad")]) == 2
    assert "different tasks" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert _run([*base, "--b", "m-s0", "--out", str(tmp_path / "ok")]) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["accuracy"]["data"] == "weightgen.data task 'digits', split seed 0 (the zoo's), test set"


def test_task_names_the_evaluation_data_of_a_users_checkpoints(checkpoints, vae_dir, tmp_path, capsys):
    """--task scores plain checkpoints on that weightgen.data task's test split (split seed 0), the same
    data and normalisation the zoo uses; a zoo model's own task cannot be overridden by another."""
    latin = model_splits("latin", 0, 32, 1)
    base = ["--arch", ARCH, "--model-kwargs", "num_classes=10", "in_chans=1", "--a", str(checkpoints[0]),
            "--b", str(checkpoints[1]), "--steps", "2", "--vae", str(vae_dir)]
    assert _run([*base, "--task", "latin", "--out", str(tmp_path / "latin")]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "latin" / "summary.json").read_text())
    assert summary["accuracy"]["task"] == "latin" and "'latin'" in summary["accuracy"]["data"]
    rows = list(csv.DictReader((tmp_path / "latin" / "interpolation.csv").open()))
    end = next(r for r in rows if float(r["alpha"]) == 1.0)
    assert float(end["accuracy"]) == pytest.approx(_own_accuracy(checkpoints[1], latin), abs=2 / len(latin.test))
    assert _run([*base, "--task", "nope", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for seed, ckpt in enumerate(checkpoints):
        (zoo / f"m-s{seed}.safetensors").write_bytes(ckpt.read_bytes())
        (zoo / f"m-s{seed}.json").write_text(json.dumps({"arch": ARCH, "model_kwargs": KWARGS, "task": "digits"}))
    assert _run(["--zoo", str(zoo), "--a", "m-s0", "--b", "m-s1", "--steps", "2", "--vae", str(vae_dir),
                 "--task", "latin", "--out", str(tmp_path / "zoo-latin")]) == 2
    assert "trained on task 'digits', not 'latin'" in capsys.readouterr().err
