"""Extra templates (issue 7 (d)): the start point is unchanged, the new directions are what each source
promises, the artifact records them, and generate_weights exposes them."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import weightgen as wg
from weightgen.adapt import extend_banks
from weightgen.io import WeightgenError
from weightgen.layers import recast_layers


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=5).eval()
    wg.recast(model, wg.preset_config("recast-attn-mlp", layers_per_group=2))  # 3 banks per shape, 2 templates
    return model


def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("source", ["random", "pca", "vae"])
def test_extra_templates_keep_the_function_and_add_trainable_directions(vit, source):
    model = copy.deepcopy(vit)
    with torch.no_grad():
        before = model(x())
    sizes = {k: b.num_templates for k, b in model.recast_banks.items()}
    counts = wg.parameter_counts(model)["per_task_trainable"]
    used = extend_banks(model, 2, source, seed=3)
    assert set(used.values()) == {source}
    with torch.no_grad():  # zero coefficients add exact zeros, but the BLAS may group a longer sum differently
        torch.testing.assert_close(model(x()), before, rtol=1e-6, atol=1e-6 * before.abs().max().item())
    assert {k: b.num_templates for k, b in model.recast_banks.items()} == {k: n + 2 for k, n in sizes.items()}
    layers = recast_layers(model)
    assert wg.parameter_counts(model)["per_task_trainable"] == counts + 2 * 2 * len(layers)  # K=2 per layer
    assert all(layer.coefficients.requires_grad and not layer.bank.templates.requires_grad for layer in layers.values())
    for key, bank in model.recast_banks.items():
        old, new = vit.recast_banks[key].templates, bank.templates[-2:]
        assert torch.equal(bank.templates[:-2], old)
        rms = old.pow(2).mean().sqrt()
        torch.testing.assert_close(new.flatten(1).pow(2).mean(1).sqrt(), rms.expand(2), rtol=1e-4, atol=0)
        if source == "pca":  # orthogonal to what the bank already spans, inside the neighbours' span
            flat_old, flat_new = old.flatten(1).double(), new.flatten(1).double()
            assert (flat_new @ flat_old.T).abs().max() < 1e-4 * flat_new.norm() * flat_old.norm()
            others = torch.cat([b.flatten(1) for k, b in ((k, vit.recast_banks[k].templates) for k in vit.recast_banks)
                                if k != key and b.shape == old.shape]).double()
            span = torch.cat([others, flat_old])
            q = torch.linalg.qr(span.T).Q
            torch.testing.assert_close(q @ (q.T @ flat_new.T), flat_new.T, rtol=0, atol=1e-5 * flat_new.abs().max().item())
    # a coefficient on a new template changes the function: the directions are really there
    with torch.no_grad():
        next(iter(layers.values())).coefficients[:, -1] = 1.0
        assert (model(x()) - before).abs().max() > 1e-3 * before.abs().max()


def test_same_seed_same_templates_and_pca_fallback_is_reported(vit):
    a, b = copy.deepcopy(vit), copy.deepcopy(vit)
    extend_banks(a, 1, "random", seed=5)
    extend_banks(b, 1, "random", seed=5)
    assert all(torch.equal(a.recast_banks[k].templates, b.recast_banks[k].templates) for k in a.recast_banks)
    torch.manual_seed(0)
    resnet = timm.create_model("test_resnet")
    wg.recast(resnet, preset="recast-conv")  # every bank has its own shape: no neighbours for PCA
    assert set(extend_banks(resnet, 1, "pca").values()) == {"random (no pca directions)"}


def test_bad_arguments():
    with pytest.raises(WeightgenError, match="source"):
        extend_banks(timm.create_model("test_vit", img_size=32), 1, "svd")
    with pytest.raises(WeightgenError, match="not recast"):
        extend_banks(timm.create_model("test_vit", img_size=32), 1, "random")


def test_generate_with_extra_templates_round_trips_through_the_artifact(tmp_path):
    from weightgen.generate import GenerateOptions, generate

    opts = GenerateOptions(arch="test_vit", model_kwargs={"img_size": 32}, preset="recast-attn", layers_per_group=2,
                           extra_templates=2, extra_source="pca", out=str(tmp_path / "art"))
    out, report = generate(opts)
    assert report["extra_templates"]["count"] == 2
    assert report["params"]["per_task_trainable"] == 6 * 2 * (2 + 2)  # 6 qkv layers, K=2, 2 fitted + 2 extra
    model = wg.load(out)
    assert model.recast_config.extra_templates == 2
    assert all(b.num_templates == 4 for b in model.recast_banks.values())
    with pytest.raises(WeightgenError, match="extra-templates"):
        generate(GenerateOptions(arch="test_vit", extra_templates=-1, out=str(tmp_path / "bad")))
