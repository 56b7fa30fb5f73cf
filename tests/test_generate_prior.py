"""Generation from the shipped VAE's prior, decoder mimicry, and VAE bad inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from weightgen.cli import run_cli
from weightgen.generate import GenerateOptions, generate
from weightgen.io import WeightgenError
from weightgen.vae.prior import default_vae_dir, load_vae_bundle, sample_weights, trained_kinds

import importlib.util
import pathlib

_SPEC = importlib.util.spec_from_file_location(
    "generate_weights_script", pathlib.Path(__file__).parents[1] / "scripts" / "generate_weights.py")
script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(script)


def _run(argv):
    return run_cli(lambda: script.main(argv))


def test_shipped_vae_loads_with_priors():
    vae, meta = load_vae_bundle()
    assert {"linear", "conv", "dwconv"} <= trained_kinds(meta)
    assert sum(p.numel() for p in vae.parameters()) * 4 < 20e6
    assert (default_vae_dir() / "vae.safetensors").stat().st_size < 20e6


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_prior_generation_is_finite_sane_and_loads_strictly(arch, tmp_path):
    out, report = generate(GenerateOptions(arch=arch, out=str(tmp_path / "a"), fidelity_batch=2))
    assert report["source"] == "vae_prior"
    dense = load_file(str(out / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in dense.values())
    model = timm.create_model(arch)
    model.load_state_dict(dense, strict=True)
    acts = report["activations"]
    assert acts["all_finite"]
    # block output std / input std within a factor 4 of timm's own init at both ends (measured
    # within 1.6x: test_resnet 0.26..1.00 vs 0.17..0.65, test_vit 0.16..1.13 vs 0.16..1.00)
    from weightgen.mimicry.fidelity import record_features
    from weightgen.models import example_batch
    from weightgen.vae.prior import activation_ranges

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = timm.create_model(arch).eval()
    batch = example_batch(init, 2, 0)
    with torch.no_grad():
        timm_acts = activation_ranges(record_features(init, batch), batch)
    assert timm_acts["min_ratio"] / 4 < acts["min_ratio"] and acts["max_ratio"] < 4 * timm_acts["max_ratio"]
    # each sampled layer has the RMS the scale model predicted for it
    for row in report["prior"]["layers"]:
        weight = dense[row["name"] + ".weight"]
        assert weight.pow(2).mean().sqrt().item() == pytest.approx(row["rms"], rel=1e-4), row["name"]
    # every generated layer has statistics next to timm's own init
    assert report["prior"]["layers"] and all("timm_init_rms" in row for row in report["prior"]["layers"])
    # generated weights are not timm's init
    fresh = timm.create_model(arch).state_dict()
    name = report["prior"]["layers"][0]["name"] + ".weight"
    assert not torch.equal(fresh[name], dense[name])


def test_prior_generation_is_deterministic_per_seed(tmp_path):
    paths = []
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        out, _ = generate(GenerateOptions(arch="test_resnet", seed=seed, out=str(tmp_path / tag), fidelity_batch=1))
        paths.append(out / "weights.safetensors")
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c


def test_sampling_falls_back_for_unseen_kinds():
    vae, meta = load_vae_bundle()
    meta = json.loads(json.dumps(meta))
    meta["latent_density"]["dwconv"]["seen"] = False
    model = timm.create_model("test_efficientnet")
    weights, stats, fallback = sample_weights(model, vae, meta, seed=0)
    assert fallback, "depthwise layers must be reported as falling back to timm init"
    assert all(f"{name}.weight" not in weights for name in fallback)
    assert all(row["kind"] != "dwconv" for row in stats)


def test_in_place_sampling_writes_the_model_and_keeps_no_copy():
    vae, meta = load_vae_bundle()
    model = timm.create_model("test_vit")
    copies, stats, fallback = sample_weights(model, vae, meta, seed=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    written, stats_in_place, fallback_in_place = sample_weights(model, vae, meta, seed=0, in_place=True)
    assert stats_in_place == stats and fallback_in_place == fallback  # timm-init statistics read before the write
    assert sorted(written) == sorted(copies)
    params = dict(model.named_parameters())
    for key, value in written.items():
        assert value is params[key]  # the model's own tensor: no second model-size copy
        assert torch.equal(value, copies[key]) and not torch.equal(value, init[key])
    untouched = set(init) - set(written)
    assert untouched and all(torch.equal(model.state_dict()[k], init[k]) for k in untouched)


def test_decoder_method_reports_storage_against_closed_form(tmp_path):
    model = timm.create_model("test_vit")
    ckpt = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), str(ckpt))
    _, report = generate(GenerateOptions(arch="test_vit", checkpoint=str(ckpt), method="decoder", steps=3,
                                         out=str(tmp_path / "out"), fidelity_batch=1))
    dec = report["decoder"]
    assert dec["closed_form_mean_cosine"] > 0.9999
    # every decoded template is stored as latent_dim latents per 64-value token plus one log scale
    import math

    from weightgen.vae.prior import load_vae_bundle
    from weightgen.vae.tokenize import token_count

    latent_dim = load_vae_bundle()[0].config.latent_dim
    shapes = [tuple(row["shape"]) for row in report["layers"]]
    templates = {shape: shapes.count(shape) for shape in set(shapes)}  # exact fit: one template per layer
    latents = sum(n * (latent_dim * token_count(shape) + 1) for shape, n in templates.items())
    assert dec["decoded_banks"] > 0 and dec["closed_form_banks"] == []
    assert dec["stored_numbers"] == latents
    assert dec["template_numbers"] == sum(n * math.prod(shape) for shape, n in templates.items())
    assert len(report["loss_history"]) >= 2


def test_decoder_beats_closed_form_at_equal_storage():
    """README: with a compressive VAE (the first shipped one, 16 latents per 64 values, kept in tests/data),
    the decoder at the storage of a quarter of the templates fits better than closed form."""
    import weightgen
    from weightgen.bank import banks_of

    def vit():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=4,
                                     num_heads=2, num_classes=10, in_chans=1)

    target = vit().state_dict()
    fits = {}
    for templates, method in ((1, "closed_form"), (4, "decoder")):  # one bank of the 4 qkv layers
        model = vit()
        weightgen.recast(model, weightgen.preset_config("recast-attn", layers_per_group=4, templates=templates),
                         init="empty")
        report = weightgen.fit(model, target, method, steps=50 if method == "decoder" else None,
                               vae=load_vae_bundle(Path(__file__).parent / "data" / "vae_mlp16") if method == "decoder"
                               else None)
        stored = report["decoder"]["stored_numbers"] if method == "decoder" else sum(
            b.templates.numel() for b in banks_of(model).values())
        fits[method] = (report["mean_cosine"], stored)
    (cf_cos, cf_stored), (dec_cos, dec_stored) = fits["closed_form"], fits["decoder"]
    assert dec_stored <= cf_stored + 4  # + one log scale per template
    assert dec_cos > cf_cos + 0.04  # measured 0.580 vs 0.505


def test_decoder_without_checkpoint_is_refused(tmp_path, capsys):
    assert _run(["--arch", "test_vit", "--method", "decoder", "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "version"])
def test_bad_vae_gives_one_line_and_writes_nothing(damage, tmp_path, capsys):
    vae_dir = tmp_path / "vae"
    shutil.copytree(default_vae_dir(), vae_dir)
    if damage == "missing":
        shutil.rmtree(vae_dir)
    elif damage == "truncated":
        data = (vae_dir / "vae.safetensors").read_bytes()
        (vae_dir / "vae.safetensors").write_bytes(data[: len(data) // 2])
    else:
        meta = json.loads((vae_dir / "vae.json").read_text())
        meta["format_version"] = 99
        (vae_dir / "vae.json").write_text(json.dumps(meta))
    code = _run(["--arch", "test_resnet", "--vae", str(vae_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_library_refuses_missing_vae(tmp_path):
    with pytest.raises(WeightgenError, match="VAE directory not found"):
        load_vae_bundle(tmp_path / "nope")


@pytest.mark.parametrize("arch", timm.list_models("test_*"))
def test_default_preset_matches_something_for_every_timm_test_model(arch):
    from weightgen.config import default_preset, preset_config
    from weightgen.recasting import find_targets

    model = timm.create_model(arch)
    assert find_targets(model, preset_config(default_preset(model)))


@pytest.mark.parametrize("arch", ["test_coatnet", "test_nfnet"])  # conv qkv; Conv2d subclasses
def test_prior_generation_of_unusual_families(arch, tmp_path):
    _, report = generate(GenerateOptions(arch=arch, out=str(tmp_path / "o"), fidelity_batch=1))
    assert report["activations"]["all_finite"] and report["mean_cosine"] > 0.9999
    # every weight layer but the head is sampled or listed as fallback (test_nfnet: 25 of its 33
    # are ScaledStdConv2d, a Conv2d subclass, which used to keep timm's init unreported)
    from weightgen.recasting import head_names

    model = timm.create_model(arch)
    layers = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    sampled = {row["name"] for row in report["prior"]["layers"]}
    assert sampled | set(report["prior"]["fallback_layers"]) == layers - head_names(model)
    if arch == "test_nfnet":
        from timm.layers import ScaledStdConv2d

        std = {n for n, m in model.named_modules() if isinstance(m, ScaledStdConv2d)}
        assert len(std) >= 20 and std - head_names(model) <= sampled


def test_parametrized_weights_are_fallback_with_a_warning(caplog):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 8),
                                torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 8)))
    vae, meta = load_vae_bundle()
    with caplog.at_level("WARNING", logger="weightgen"):
        weights, stats, fallback = sample_weights(model, vae, meta, seed=0)
    assert fallback == ["3"] and sorted(weights) == ["0.weight", "2.weight"]
    assert [row["name"] for row in stats] == ["0", "2"]
    assert "not a plain tensor" in caplog.text and "3" in caplog.text


def test_example_batch_follows_img_size_on_any_patch_embedding():
    """A Mixer built at 32 px keeps its PatchEmbed on ``stem``, not ``patch_embed``: the probe batch must be
    32 px all the same (it was 224 px, and the model refused it)."""
    from weightgen.models import example_batch, input_size

    mixer = timm.create_model("mixer_s16_224", img_size=32, in_chans=1, num_classes=10, mlp_ratio=(0.25, 1.0))
    assert input_size(mixer) == (1, 32, 32)
    assert mixer(example_batch(mixer, 2)).shape == (2, 10)
    assert input_size(timm.create_model("test_resnet")) == (3, 160, 160)  # no patch embedding: timm's data config


def test_residual_gates_open_timms_zero_init_branches(tmp_path):
    """timm's zero-init last BN of each block would leave every generated residual branch (and its banks) mute."""
    shut, _ = generate(GenerateOptions(arch="test_resnet", out=str(tmp_path / "timm"), fidelity_batch=1))
    out, report = generate(GenerateOptions(arch="test_resnet", out=str(tmp_path / "open"), fidelity_batch=1,
                                           residual_gates=0.25))
    zeros = [k for k, v in load_file(shut / "weights.safetensors").items()
             if k.rsplit(".", 2)[-2].startswith("bn") and k.endswith(".weight") and not v.any()]
    opened = load_file(out / "weights.safetensors")
    assert zeros and report["prior"]["residual_gates"] == {"value": 0.25, "opened": len(zeros)}
    assert all(torch.all(opened[k] == 0.25) for k in zeros)
    # and the ConvNeXt kind of gate, a layer scale at 1e-6
    from weightgen.models import open_residual_gates

    model = timm.create_model("test_convnext")  # layer scales start at 1e-6
    gammas = [n for n, _ in model.named_parameters() if n.endswith("gamma")]
    assert gammas and open_residual_gates(model, 1.0) == len(gammas)
    assert all(bool((p == 1.0).all()) for n, p in model.named_parameters() if n.endswith("gamma"))


def test_residual_gates_are_refused_for_a_given_model(tmp_path, capsys):
    ckpt = tmp_path / "m.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(ckpt))
    assert _run(["--arch", "test_resnet", "--checkpoint", str(ckpt), "--residual-gates", "0.25",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--residual-gates" in err and not (tmp_path / "o").exists()
