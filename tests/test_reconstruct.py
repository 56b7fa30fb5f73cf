"""scripts/reconstruct.py end to end, in-process: every layer through the VAE, files that agree with the
report, mimic beating encode (weights alone, and on the model's outputs), --probe-task, --keep-head,
determinism, clean failures."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from _scripts import load_script
from weightgen.cli import run_cli
from weightgen.mimicry.fidelity import cosine
from weightgen.models import example_batch
from weightgen.reconstruct import DEFAULT_BEHAVIOUR_WEIGHT
from weightgen.vae.codec import decode_layer, weight_layers
from weightgen.vae.prior import default_vae_dir, load_vae_bundle

script = load_script("scripts/reconstruct.py")
KWARGS = {"test_resnet": {"num_classes": 10}, "test_vit": {"num_classes": 10}}
FILES = [".weightgen.json", "latents.safetensors", "report.json", "weights.safetensors"]


def _state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch, **KWARGS[arch])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial BN statistics: they must be copied, not re-initialised
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# The method's effects (mimic beats encode, the behaviour term recovers the task) are pinned on the first,
# compressive VAE (16 latents per 64 weights), where they are large; the shipped latent-56 VAE rebuilds these
# tiny models almost exactly from encode alone (docs/bench_reconstruct.md measures it on a real model).
VAE16 = Path(__file__).parent / "data" / "vae_mlp16"


def run(arch: str, checkpoint: Path, out: Path, *extra) -> int:
    vae = [] if "--vae" in extra else ["--vae", VAE16]
    argv = ["--arch", arch, "--checkpoint", checkpoint, "--out", out, "--model-kwargs", "num_classes=10", *vae, *extra]
    return run_cli(lambda: script.main([str(a) for a in argv]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconstruct")
    ckpt = {arch: root / f"{arch}.safetensors" for arch in KWARGS}
    for arch, path in ckpt.items():
        save_file(_state(arch), str(path))
    rng = torch.get_rng_state()
    codes = {
        "encode": run("test_resnet", ckpt["test_resnet"], root / "encode"),
        "again": run("test_resnet", ckpt["test_resnet"], root / "again"),
        # no --behaviour-weight: without a probe task the default fits the weights alone
        "mimic": run("test_resnet", ckpt["test_resnet"], root / "mimic", "--mode", "mimic", "--steps", "15"),
        "behaviour": run("test_resnet", ckpt["test_resnet"], root / "behaviour", "--mode", "mimic", "--steps", "15",
                         "--probe-size", "256", "--behaviour-weight", str(DEFAULT_BEHAVIOUR_WEIGHT)),
        # a learning rate that wrecks every step: the kept state must be encode's start
        "wild": run("test_resnet", ckpt["test_resnet"], root / "wild", "--mode", "mimic", "--steps", "3",
                    "--lr", "300", "--probe-size", "64"),
        "head": run("test_resnet", ckpt["test_resnet"], root / "head", "--keep-head"),
        "vit": run("test_vit", ckpt["test_vit"], root / "vit", "--mode", "mimic", "--steps", "2", "--probe-size", "16"),
    }
    assert torch.equal(rng, torch.get_rng_state()), "the global RNG was drawn from"
    return root, ckpt, codes


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name, arch", [("encode", "test_resnet"), ("vit", "test_vit")])
def test_every_weight_layer_is_reconstructed(runs, name, arch):
    root, ckpt, codes = runs
    assert codes[name] == 0 and sorted(os.listdir(root / name)) == FILES
    report, original = _report(root / name), load_file(str(ckpt[arch]))
    model = timm.create_model(arch, **KWARGS[arch])
    assert [r["name"] for r in report["layers"]] == [s["name"] for s in weight_layers(model)]
    assert report["kept"] == []
    weights = load_file(str(root / name / "weights.safetensors"))
    model.load_state_dict(weights, strict=True)
    for row in report["layers"]:
        assert not torch.equal(weights[f"{row['name']}.weight"], original[f"{row['name']}.weight"]), row["name"]
    replaced = {f"{r['name']}.weight" for r in report["layers"]}
    for key, value in original.items():  # biases, norms, BN statistics, position embeddings: copied
        if key not in replaced:
            assert torch.equal(weights[key], value), key


@pytest.mark.parametrize("name, arch", [("encode", "test_resnet"), ("mimic", "test_resnet"), ("vit", "test_vit")])
def test_report_matches_the_files(runs, name, arch):
    root, ckpt, _ = runs
    report, original = _report(root / name), load_file(str(ckpt[arch]))
    weights = load_file(str(root / name / "weights.safetensors"))
    latents = load_file(str(root / name / "latents.safetensors"))
    vae, _ = load_vae_bundle(VAE16)
    cosines = []
    for row in report["layers"]:
        key = f"{row['name']}.weight"
        assert cosine(weights[key], original[key]) == pytest.approx(row["cosine"], abs=1e-6)
        err = (weights[key] - original[key]).norm() / original[key].norm()
        assert err.item() == pytest.approx(row["rel_error"], rel=1e-4)
        z, scale = latents[f"{row['name']}.latents"], latents[f"{row['name']}.scale"]
        assert z.numel() + scale.numel() == row["latent_numbers"]
        with torch.no_grad():  # the latents alone rebuild the weight, as the report says
            decoded = decode_layer(vae, z, row["shape"], row["kind"], row["depth"], scale)
        torch.testing.assert_close(decoded, weights[key], rtol=1e-5, atol=1e-7)
        cosines.append(row["cosine"])
    totals = report["totals"]
    assert totals["mean_cosine"] == pytest.approx(sum(cosines) / len(cosines))
    assert totals["min_cosine"] == min(cosines)
    assert totals["compression"] == pytest.approx(sum(v.numel() for v in latents.values()) / sum(
        original[f"{r['name']}.weight"].numel() for r in report["layers"]))
    assert 0 < totals["compression"] < 0.5  # 16 latents per 64-value token, plus padding and one scale
    fn = report["function"]
    assert fn["batch_size"] == 8 and fn["logits_rel_error"] > 0


def test_mimic_beats_encode(runs):
    root, _, codes = runs
    encode, mimic = _report(root / "encode"), _report(root / "mimic")
    assert codes["mimic"] == 0 and mimic["mode"] == "mimic" and mimic["steps"] == 15
    assert mimic["totals"]["mean_cosine"] > encode["totals"]["mean_cosine"] + 0.01
    assert mimic["totals"]["mean_rel_error"] < encode["totals"]["mean_rel_error"]
    history = mimic["loss_history"]
    assert len(history) == 15 and min(history) < history[0]
    assert mimic["behaviour_weight"] == 0 and mimic["probe"] is None and mimic["decode_dtype"] in ("float32", "bfloat16")


def test_mimic_never_ends_worse_than_encode(runs):
    """Every step of a wild learning rate is worse than the start: mimic keeps encode's weights exactly."""
    root, _, codes = runs
    assert codes["wild"] == 0
    report = _report(root / "wild")
    selection = report["selection"]
    assert selection["kept_step"] == 0, selection
    steps = [step for step, _ in selection["scores"]]
    assert steps[0] == 0 and steps[-1] == 3
    assert max(score for _, score in selection["scores"][1:]) < selection["scores"][0][1]
    encode = load_file(str(root / "encode" / "weights.safetensors"))
    wild = load_file(str(root / "wild" / "weights.safetensors"))
    assert all(torch.equal(wild[k], encode[k]) for k in encode)
    mimic = _report(root / "mimic")["selection"]  # a sane fit improves, so it keeps a later state
    assert mimic["kept_step"] > 0 and mimic["scores"][0][0] == 0


def _logit_error(weights: dict, original: dict, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        logits = [_model("test_resnet", state)(inputs) for state in (weights, original)]
    return ((logits[0] - logits[1]).norm() / logits[1].norm()).item()


def _model(arch: str, state: dict) -> nn.Module:
    model = timm.create_model(arch, **KWARGS[arch])
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_behaviour_mimic_matches_the_outputs(runs):
    """Fitting the outputs on probe noise lowers the logit error far below encode's and weights-only mimic's,
    on the probe inputs and on the held-out noise batch of the function check."""
    root, ckpt, codes = runs
    assert codes["behaviour"] == 0
    report = _report(root / "behaviour")
    assert report["behaviour_weight"] == DEFAULT_BEHAVIOUR_WEIGHT and report["probe_task"] is None
    assert report["probe"] == {"source": "seeded noise (weightgen.models.example_batch)", "task": None, "size": 256,
                               "batch": 128, "image_side": 32, "batchnorm": "eval mode (the checkpoint's statistics)"}
    assert report["accuracy"] is None and report["batchnorm"] == "copied from the checkpoint"
    assert "not the probe" in report["function"]["inputs"]
    original = load_file(str(ckpt["test_resnet"]))
    probe = example_batch(_model("test_resnet", original), 256, 1, max_side=32)  # seed + 1: the probe's noise
    errors = {name: _logit_error(load_file(str(root / name / "weights.safetensors")), original, probe)
              for name in ("encode", "mimic", "behaviour")}
    assert errors["behaviour"] < 0.5 * min(errors["encode"], errors["mimic"]), errors
    held_out = {name: _report(root / name)["function"]["logits_rel_error"] for name in ("encode", "behaviour")}
    assert held_out["behaviour"] < 0.5 * held_out["encode"], held_out
    assert _report(root / "behaviour")["function"]["top1_agreement"] >= _report(root / "encode")["function"][
        "top1_agreement"]


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
    """test_resnet trained briefly on digits, then encode and behaviour mimic probing digits' train split."""
    from weightgen.classifier import train_classifier
    from weightgen.data import model_splits

    root = tmp_path_factory.mktemp("task")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=10)
    train_classifier(model, model_splits("digits", 0, 32, 3), 60, lr=3e-3)
    save_file(model.state_dict(), str(root / "digits.safetensors"))
    codes = {"encode": run("test_resnet", root / "digits.safetensors", root / "encode", "--probe-task", "digits"),
             "mimic": run("test_resnet", root / "digits.safetensors", root / "mimic", "--probe-task", "digits",
                          "--mode", "mimic", "--steps", "20", "--probe-size", "512")}
    return root, codes


def test_probe_task_reports_accuracy_and_reestimates_batchnorm(task_runs):
    root, codes = task_runs
    assert codes == {"encode": 0, "mimic": 0}
    encode, mimic = _report(root / "encode"), _report(root / "mimic")
    assert mimic["probe_task"] == "digits" and mimic["probe"]["source"] == "digits train split"
    assert mimic["probe"]["size"] == 512 and mimic["probe"]["batchnorm"] == "train mode (batch statistics)"
    assert encode["probe"] is None  # encode fits nothing, but still reports the task's accuracy
    for report in (encode, mimic):
        assert report["batchnorm"] == "re-estimated on the digits train split"
        assert report["function"]["inputs"].startswith("digits val split (179 images")
        assert report["function"]["batch_size"] == 179
        acc = report["accuracy"]
        assert set(acc) == {"test_images", "original", "original_after_bn_reestimation", "reconstructed"}
        assert acc["test_images"] == 359 and acc["original"] > 0.5  # the brief training learnt something
    assert encode["accuracy"]["original"] == mimic["accuracy"]["original"]
    # the statistics written are the reconstruction's own, not the checkpoint's
    original, weights = load_file(str(root / "digits.safetensors")), load_file(str(root / "mimic" / "weights.safetensors"))
    means = [k for k in original if k.endswith("running_mean")]
    assert means and all(not torch.equal(weights[k], original[k]) for k in means)
    # behaviour mimic recovers the task: far closer to the original than encode, on held-out images
    assert mimic["accuracy"]["reconstructed"] > encode["accuracy"]["reconstructed"] + 0.1
    assert mimic["accuracy"]["reconstructed"] > mimic["accuracy"]["original_after_bn_reestimation"] - 0.15
    assert mimic["function"]["logits_rel_error"] < 0.5 * encode["function"]["logits_rel_error"]


def test_keep_head_leaves_the_head_bit_identical(runs):
    root, ckpt, codes = runs
    report, original = _report(root / "head"), load_file(str(ckpt["test_resnet"]))
    weights = load_file(str(root / "head" / "weights.safetensors"))
    assert codes["head"] == 0
    assert [k["name"] for k in report["kept"]] == ["fc"] and "head" in report["kept"][0]["reason"]
    assert "fc" not in {r["name"] for r in report["layers"]}
    assert torch.equal(weights["fc.weight"], original["fc.weight"])
    assert len(report["layers"]) == len(_report(root / "encode")["layers"]) - 1


def test_same_command_twice_gives_the_same_bytes(runs):
    root, _, _ = runs
    for name in ("weights.safetensors", "latents.safetensors"):
        assert (root / "encode" / name).read_bytes() == (root / "again" / name).read_bytes(), name
    first, second = _report(root / "encode"), _report(root / "again")
    for report in (first, second):
        for key in ("seconds", "fit_seconds", "cpu_seconds", "fit_cpu_seconds", "checkpoint"):
            report.pop(key)
    assert first == second


def test_a_kind_the_vae_never_saw_is_kept(runs, tmp_path):
    root, ckpt, _ = runs
    vae_dir = tmp_path / "vae"
    shutil.copytree(default_vae_dir(), vae_dir)
    meta = json.loads((vae_dir / "vae.json").read_text())
    meta["latent_density"]["linear"]["seen"] = False
    (vae_dir / "vae.json").write_text(json.dumps(meta))
    assert run("test_vit", ckpt["test_vit"], tmp_path / "out", "--vae", vae_dir) == 0
    report, original = _report(tmp_path / "out"), load_file(str(ckpt["test_vit"]))
    weights = load_file(str(tmp_path / "out" / "weights.safetensors"))
    assert [r["name"] for r in report["layers"]] == ["patch_embed.proj"]  # the only conv
    assert len(report["kept"]) == 25 and all("never saw linear" in k["reason"] for k in report["kept"])
    for row in report["kept"]:
        assert torch.equal(weights[f"{row['name']}.weight"], original[f"{row['name']}.weight"])


@pytest.mark.parametrize("case, expect", [
    ("unknown_arch", ["unknown architecture", "resnet5"]),
    ("missing", ["not found", "missing.safetensors"]),
    ("corrupt", ["corrupt", "corrupt.safetensors"]),
    ("other_arch", ["does not fit", "missing"]),
    ("bad_vae", ["VAE directory not found", "novae"]),
    ("bad_device", ["cuda"]),
    ("steps_encode", ["--steps", "--mode mimic"]),
    ("bad_task", ["unknown --probe-task", "nosuchtask", "digits"]),
    ("colour_task", ["--probe-task hue", "colour task"]),
    ("bad_probe_size", ["--probe-size", ">= 2"]),
    ("bad_behaviour_weight", ["--behaviour-weight", ">= 0"]),
    ("foreign_out", ["not written by weightgen"]),
])
def test_bad_inputs_fail_cleanly(runs, case, expect, tmp_path, capsys):
    _, ckpt, _ = runs
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    out = tmp_path / "outs" / "run"
    arch, checkpoint, extra = "test_resnet", ckpt["test_resnet"], []
    if case == "unknown_arch":
        arch = "resnet5"
    elif case == "missing":
        checkpoint = tmp_path / "missing.safetensors"
    elif case == "corrupt":
        checkpoint = corrupt
    elif case == "other_arch":
        checkpoint = ckpt["test_vit"]
    elif case == "bad_vae":
        extra = ["--vae", tmp_path / "novae"]
    elif case == "bad_device":
        extra = ["--device", "cuda:99"]
    elif case == "steps_encode":
        extra = ["--steps", "5"]
    elif case == "bad_task":
        extra = ["--probe-task", "nosuchtask"]
    elif case == "colour_task":
        extra = ["--probe-task", "hue"]
    elif case == "bad_probe_size":
        extra = ["--mode", "mimic", "--probe-size", "1"]
    elif case == "bad_behaviour_weight":
        extra = ["--mode", "mimic", "--behaviour-weight", "-1"]
    elif case == "foreign_out":
        out.mkdir(parents=True)
        (out / "precious.txt").write_text("keep")
    capsys.readouterr()
    code = run(arch, checkpoint, out, *extra)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])
    if case == "foreign_out":
        assert os.listdir(out) == ["precious.txt"] and os.listdir(out.parent) == ["run"]
    else:
        assert not out.parent.exists() or os.listdir(out.parent) == []


def test_overwrite_replaces_only_a_reconstruction(runs, tmp_path, capsys):
    root, ckpt, _ = runs
    out = tmp_path / "out"
    shutil.copytree(root / "head", out)
    assert run("test_resnet", ckpt["test_resnet"], out) == 2  # exists: refused without --overwrite
    assert _report(out)["keep_head"] is True
    assert run("test_resnet", ckpt["test_resnet"], out, "--overwrite") == 0
    assert _report(out)["keep_head"] is False and sorted(os.listdir(out)) == FILES
    manifest = json.loads((out / ".weightgen.json").read_text())
    manifest["kind"] = "artifact"
    (out / ".weightgen.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run("test_resnet", ckpt["test_resnet"], out, "--overwrite") == 2
    assert "not a reconstruction" in capsys.readouterr().err and _report(out)["keep_head"] is False


def test_latents_file_names_its_format(runs):
    root, _, _ = runs
    with safe_open(str(root / "encode" / "latents.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "weightgen-latents/1"


def test_linear_and_conv_subclasses_are_reconstructed(tmp_path):
    """NFNet's ScaledStdConv2d transforms a plain weight in its forward: that weight is rebuilt too."""
    from weightgen.reconstruct import ReconstructOptions, reconstruct

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("test_nfnet", num_classes=10)
    save_file(model.state_dict(), str(tmp_path / "nf.safetensors"))
    _, report = reconstruct(ReconstructOptions(arch="test_nfnet", checkpoint=str(tmp_path / "nf.safetensors"),
                                               out=str(tmp_path / "out"), model_kwargs={"num_classes": 10}))
    modules = dict(model.named_modules())
    subclassed = [r["name"] for r in report["layers"] if type(modules[r["name"]]).__name__ == "ScaledStdConv2d"]
    assert report["kept"] == [] and len(report["layers"]) == len(weight_layers(model)) and len(subclassed) >= 10
    weights = load_file(str(tmp_path / "out" / "weights.safetensors"))
    timm.create_model("test_nfnet", num_classes=10).load_state_dict(weights, strict=True)
    assert not torch.equal(weights[f"{subclassed[0]}.weight"], model.get_parameter(f"{subclassed[0]}.weight"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["encode", "mimic"])
def test_on_gpu_matches_cpu(runs, mode, tmp_path):
    from weightgen.reconstruct import ReconstructOptions, reconstruct

    _, ckpt, _ = runs
    results = {}
    for device in ("cpu", "cuda"):
        opts = ReconstructOptions(arch="test_resnet", checkpoint=str(ckpt["test_resnet"]), out=str(tmp_path / device),
                                  model_kwargs=KWARGS["test_resnet"], mode=mode, steps=5 if mode == "mimic" else None,
                                  device=device, probe_size=64, decode_dtype="float32")  # bf16 rounds per device
        out, report = reconstruct(opts)
        assert report["device"].startswith(device)
        results[device] = (load_file(str(out / "weights.safetensors")), report)
    (cpu_w, cpu_r), (gpu_w, gpu_r) = results["cpu"], results["cuda"]
    for key in cpu_w:
        torch.testing.assert_close(gpu_w[key], cpu_w[key], rtol=1e-3, atol=1e-5)
    for a, b in zip(cpu_r["layers"], gpu_r["layers"]):
        assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-4)


@pytest.mark.parametrize("kind_shape", [(160, 3, 3, 3), (40, 256)])  # a padded conv (fan-in 27) and a linear
def test_chunked_step_gradients_match_one_graph(monkeypatch, kind_shape):
    """mimic's step builds one graph per chunk of tokens: its gradients equal one graph over the whole
    layer (weight error plus the behaviour push), with chunks that split the layer and padded tokens."""
    import weightgen.reconstruct as rec

    monkeypatch.setattr(rec, "GRAD_CHUNK", 64)  # several chunks, window-aligned (the VAE's window is 32)
    vae = load_vae_bundle()[0].eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(kind_shape, generator=gen) * 0.1
    spec = {"name": "w", "shape": kind_shape, "kind": "conv" if len(kind_shape) == 4 else "linear", "depth": 0.5}
    layer = rec._Layer(vae, spec, weight)
    assert layer.latents.shape[0] > 64 and (layer.mask is not None) == (len(kind_shape) == 4)
    with torch.no_grad():
        layer.latents.add_(0.3 * torch.randn(layer.latents.shape, generator=gen))  # away from encode's optimum
    push = torch.randn(kind_shape, generator=gen)
    value = layer.step_gradients(lambda: torch.autocast("cpu", enabled=False), 0.5, push)
    chunked = layer.latents.grad.clone(), layer.log_scale.grad.clone()
    decoded = layer.decode()
    term = 0.5 * layer.weight_error(decoded)
    expected = torch.autograd.grad(term + (decoded.reshape(kind_shape) * push).sum(), [layer.latents, layer.log_scale])
    assert value == pytest.approx(term.item(), rel=1e-4)
    torch.testing.assert_close(chunked[0], expected[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked[1], expected[1], rtol=1e-4, atol=1e-6)


def test_mimic_selects_on_val_images_of_every_class():
    """weightgen.data's splits are sorted by class: the first 512 val images would be 2 classes of 4."""
    from weightgen.reconstruct import FIDELITY_CAP, _val_subset

    y = torch.arange(4).repeat_interleave(300)
    x = y.float().view(-1, 1, 1, 1)
    xs, ys = _val_subset({"data": {"val": (x, y)}}, seed=0)
    assert len(ys) == FIDELITY_CAP and torch.equal(xs.view(-1).long(), ys)  # pairs kept together
    assert set(ys.tolist()) == {0, 1, 2, 3} and min(torch.bincount(ys).tolist()) > FIDELITY_CAP // 8
    assert torch.equal(_val_subset({"data": {"val": (x, y)}}, seed=0)[1], ys)  # seeded


@pytest.mark.parametrize("lr, patience", [(5e-2, None), (50.0, 1)])  # a fit that improves; one that stops early
def test_mimic_checks_reuse_the_step_pass(lr, patience):
    """A check scores the state a step starts from with that step's own weight error (no decode of its own):
    the same run as checks that decode (the same losses, stop and kept state; scores to float rounding),
    and the final state's weights, handed to the writer, are the bits the writer would decode."""
    import weightgen.reconstruct as rec

    vae = load_vae_bundle()[0].eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen) * 0.1 for shape in ((48, 16, 3, 3), (40, 256))]

    def layers():
        made = [rec._Layer(vae, {"name": f"l{i}", "shape": tuple(w.shape), "kind": "conv" if w.dim() == 4 else "linear",
                                 "depth": 0.5}, w) for i, w in enumerate(weights)]
        with torch.no_grad():
            for layer in made:  # away from encode's optimum, the same way for both runs
                layer.latents.add_(0.3 * torch.randn(layer.latents.shape, generator=torch.Generator().manual_seed(1)))
        return made

    plain, reused = layers(), layers()
    final: dict = {}
    runs = {
        "plain": rec._mimic(plain, 6, lr, False, score=lambda: rec._weight_score(None, plain, None, 0.0), checks=3,
                            patience=patience),
        "reused": rec._mimic(reused, 6, lr, False, score=rec._Score(
            lambda w, e: rec._weight_score(None, reused, None, 0.0, w, e)), checks=3, patience=patience, final=final),
    }
    (h_plain, s_plain), (h_reused, s_reused) = runs["plain"], runs["reused"]
    assert h_plain == h_reused
    assert (s_plain["kept_step"], s_plain["stopped_step"]) == (s_reused["kept_step"], s_reused["stopped_step"])
    assert [step for step, _ in s_plain["scores"]] == [step for step, _ in s_reused["scores"]]
    for (_, a), (_, b) in zip(s_plain["scores"], s_reused["scores"]):
        assert b == pytest.approx(a, rel=1e-5)
    for a, b in zip(plain, reused):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.log_scale, b.log_scale)
    if patience is None:  # the fit improves to its last step: kept, and its weights handed over
        assert s_reused["kept_step"] == 6 and set(final) == {"l0.weight", "l1.weight"}
        with torch.no_grad():  # as _write_back decodes
            for layer in reused:
                scale = layer.log_scale.detach().exp().float().reshape(1)
                assert torch.equal(final[f"{layer.name}.weight"], layer.decode(scale).reshape(layer.shape))
    else:  # every step is worse than the start: it stops after one check without gain, keeping the start
        assert s_reused["kept_step"] == 0 and s_reused["stopped_step"] < 6 and not final
