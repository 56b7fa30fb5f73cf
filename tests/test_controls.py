"""Controls for the VAE prior: RMS-matched timm init and the PPCA prior."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from weightgen.studies.controls import (
    PPCAPrior, fit_ppca, load_ppca, ppca_encode_weights, ppca_sample_weights, rms_matched_init, save_ppca)
from weightgen.vae.codec import rms, weight_layers
from weightgen.vae.prior import default_vae_dir, sample_weights
from weightgen.vae.store import predict_scale
from weightgen.vae.tokenize import tokenize


@pytest.fixture(scope="module")
def meta():
    return json.loads((default_vae_dir() / "vae.json").read_text())


def _model(arch="test_efficientnet", seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(arch, num_classes=10)


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_rms_matched_has_predicted_rms_and_timm_direction(arch, meta):
    model = _model(arch)
    before = copy.deepcopy(model.state_dict())
    weights, stats, fallback = rms_matched_init(model, meta, skip={"classifier", "head"})
    assert weights and not fallback
    for layer in weight_layers(model):
        key = f"{layer['name']}.weight"
        if layer["name"] in ("classifier", "head"):
            assert key not in weights
            continue
        target = predict_scale(meta["scale_model"], layer["kind"], layer["shape"], layer["depth"])
        assert rms(weights[key]) == pytest.approx(target, rel=1e-5)
        assert _cos(weights[key], before[key]) == pytest.approx(1.0, abs=1e-6)
    # not in place: the model keeps timm's init
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the statistics say the same as the weights
    assert [s["name"] + ".weight" for s in stats] == list(weights)
    assert all(s["rms"] == pytest.approx(rms(weights[s["name"] + ".weight"]), rel=1e-5) for s in stats)


def test_rms_matched_in_place_and_same_layers_as_the_prior(meta):
    # a VAE that never saw depthwise layers: both must keep timm's init for exactly those
    partial = copy.deepcopy(meta)
    partial["latent_density"]["dwconv"]["seen"] = False
    model = _model()
    init = copy.deepcopy(model.state_dict())
    weights, _, fallback = rms_matched_init(model, partial, skip={"classifier"}, in_place=True)
    dw = [l["name"] for l in weight_layers(model) if l["kind"] == "dwconv"]
    assert dw and fallback == dw
    state = model.state_dict()
    for name in dw:
        assert torch.equal(state[f"{name}.weight"], init[f"{name}.weight"])
    for key, w in weights.items():
        assert w.data_ptr() == state[key].data_ptr()  # written where it lives
        assert not torch.equal(w, init[key])
    from weightgen.vae.prior import load_vae_bundle

    vae, _ = load_vae_bundle()
    prior, _, prior_fallback = sample_weights(_model(), vae, partial, seed=0, skip={"classifier"})
    assert prior_fallback == fallback and set(prior) == set(weights)


def _planted(n=4000, dim=64, rank=3, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))[0]  # (dim, rank)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64)
    x = z @ basis.T + 0.3 + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x, basis


def test_ppca_recovers_a_planted_subspace():
    x, basis = _planted()
    ppca = fit_ppca([("linear", 0.1, x[:2000]), ("linear", 0.2, x[2000:])], latent_dim=3)
    cell = ppca.cell("linear", 0.1)
    assert cell.tokens == 4000
    comps = cell.components.double()  # (3, 64)
    # principal angles: the fitted subspace is the planted one
    singular = torch.linalg.svdvals(comps @ basis)
    assert singular.min().item() > 0.999
    assert cell.noise_variance == pytest.approx(0.05 ** 2, rel=0.1)
    assert cell.mean.double().mean().item() == pytest.approx(0.3, abs=0.02)
    # the model's covariance is the data's
    emp = torch.cov(x.T)
    assert torch.linalg.matrix_norm(cell.covariance() - emp) / torch.linalg.matrix_norm(emp) < 0.05
    # an empty depth cell falls back to the kind's pooled fit; an unseen kind has none
    assert ppca.cell("linear", 0.9) is ppca.cells["linear"][-1]
    assert ppca.cell("conv", 0.1) is None and ppca.kinds() == {"linear"}


def test_ppca_samples_have_the_fitted_covariance():
    from weightgen.studies.controls import _sample_tokens

    x, _ = _planted()
    cell = fit_ppca([("linear", 0.0, x)], latent_dim=3).cell("linear", 0.0)
    samples = _sample_tokens(cell, 20000, torch.Generator().manual_seed(1)).double()
    cov = torch.cov(samples.T)
    assert torch.linalg.matrix_norm(cov - cell.covariance()) / torch.linalg.matrix_norm(cell.covariance()) < 0.05


def test_ppca_reconstruct_keeps_the_planted_subspace_and_shrinks_noise():
    x, basis = _planted()
    cell = fit_ppca([("linear", 0.0, x)], latent_dim=3).cell("linear", 0.0)
    rec = cell.reconstruct(x.float()).double()
    # the posterior mean lies in mean + the fitted subspace, and keeps the planted signal
    centred = rec - cell.mean.double()
    assert (centred - centred @ basis @ basis.T).norm() / centred.norm() < 0.01
    signal = x - 0.3
    assert F.cosine_similarity((rec - 0.3).flatten(), (signal @ basis @ basis.T).flatten(), dim=0) > 0.999
    # off-subspace noise is dropped: the reconstruction is closer to the clean data than x is
    clean = signal @ basis @ basis.T + 0.3
    assert (rec - clean).norm() < 0.2 * (x - clean).norm()


def test_ppca_encode_changes_only_seen_layers_and_keeps_scale():
    ppca = _zoo_ppca(latent_dim=8)
    model = _model(seed=2)
    before = copy.deepcopy(model.state_dict())
    weights, stats, fallback = ppca_encode_weights(model, ppca, skip={"classifier"})
    assert torch.equal(model.state_dict()["classifier.weight"], before["classifier.weight"])
    assert weights and len(stats) == len(weights) and not fallback
    for name, w in weights.items():
        assert torch.equal(model.state_dict()[name], before[name])  # not in place: the model is untouched
        assert 0.3 < _cos(w, before[name]) <= 1.0 + 1e-6
    # a full-rank code (latent = token size, no noise left) gives the weights back
    full = _zoo_ppca(latent_dim=64)
    exact, _, _ = ppca_encode_weights(model, full, skip={"classifier"})
    for name, w in exact.items():
        assert torch.allclose(w, before[name], atol=1e-4 * before[name].abs().max().item())
    ppca_encode_weights(model, ppca, skip={"classifier"}, in_place=True)
    assert all(torch.equal(model.state_dict()[n], w) for n, w in weights.items())


def _zoo_ppca(latent_dim=8):
    """A PPCA fitted on the tokens of two tiny timm models (every kind present)."""
    records = []
    for arch in ("test_efficientnet", "test_vit"):
        model = _model(arch, seed=1)
        for layer in weight_layers(model):
            w = model.get_submodule(layer["name"]).weight
            records.append((layer["kind"], layer["depth"], tokenize(w, layer["kind"], layer["depth"]).values))
    return fit_ppca(records, latent_dim=latent_dim, info={"what": "test"})


def test_ppca_sampling_is_seeded_scaled_and_leaves_global_rng(meta):
    ppca = _zoo_ppca()
    state = torch.random.get_rng_state()
    a, stats, fallback = ppca_sample_weights(_model(), ppca, meta, seed=3, skip={"classifier"})
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _, _ = ppca_sample_weights(_model(seed=5), ppca, meta, seed=3, skip={"classifier"})
    c, _, _ = ppca_sample_weights(_model(), ppca, meta, seed=4, skip={"classifier"})
    assert not fallback and set(a) == set(b) == set(c) and "classifier.weight" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)  # the seed decides, not the model's init
    assert all(not torch.equal(a[k], c[k]) for k in a)
    model = _model()
    for s in stats:
        w = a[s["name"] + ".weight"]
        assert w.shape == model.get_submodule(s["name"]).weight.shape and torch.isfinite(w).all()
        assert rms(w) == pytest.approx(predict_scale(meta["scale_model"], s["kind"], s["shape"], s["depth"]), rel=1e-5)
    weights, _, _ = ppca_sample_weights(model, ppca, meta, seed=3, skip={"classifier"}, in_place=True)
    assert all(torch.equal(weights[k], a[k]) for k in a)
    assert all(torch.equal(model.state_dict()[k], a[k]) for k in a)


def test_ppca_save_load_round_trip(tmp_path, meta):
    ppca = _zoo_ppca()
    save_ppca(ppca, tmp_path / "p")
    back = load_ppca(tmp_path / "p")
    assert isinstance(back, PPCAPrior) and back.info == {"what": "test"}
    assert (back.token_size, back.latent_dim) == (ppca.token_size, ppca.latent_dim)
    assert set(back.cells) == set(ppca.cells)
    for kind, cells in ppca.cells.items():
        for c, d in zip(cells, back.cells[kind]):
            assert (c is None) == (d is None)
            if c is not None:
                assert torch.equal(c.components, d.components) and torch.equal(c.scales, d.scales)
                assert torch.equal(c.mean, d.mean) and c.noise_variance == d.noise_variance and c.tokens == d.tokens
    a, _, _ = ppca_sample_weights(_model(), ppca, meta, seed=2)
    b, _, _ = ppca_sample_weights(_model(), back, meta, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception):  # refuses to overwrite without overwrite=True
        save_ppca(ppca, tmp_path / "p")
    save_ppca(ppca, tmp_path / "p", overwrite=True)
    (tmp_path / "p" / "ppca.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_ppca(tmp_path / "p")
    with pytest.raises(ValueError, match="not a PPCA"):
        load_ppca(tmp_path)


def test_fit_ppca_on_zoo_leaves_held_out_models_out(tmp_path):
    from safetensors.torch import save_file

    from weightgen.studies.controls import fit_ppca_on_zoo

    tokens = {}
    for model_id, split, seed in (("a", "train", 1), ("a-t1", "train", 2), ("b", "heldout", 3)):
        model = _model("test_vit", seed=seed)
        layers = [{"name": l["name"], "shape": list(l["shape"]), "depth": l["depth"], "kind": l["kind"]}
                  for l in weight_layers(model)]
        save_file({f"{l['name']}.weight": model.get_submodule(l["name"]).weight.detach().clone() for l in layers},
                  str(tmp_path / f"{model_id}.safetensors"))
        (tmp_path / f"{model_id}.json").write_text(json.dumps({"arch": "test_vit", "layers": layers, "split": split}))
        tokens[model_id] = sum(min(512, tokenize(model.get_submodule(l["name"]).weight, l["kind"], l["depth"]).values.shape[0])
                               for l in layers if l["kind"] == "linear")
    ppca = fit_ppca_on_zoo(tmp_path, latent_dim=8)
    assert ppca.info["train_models"] == ["a", "a-t1"]
    assert ppca.kinds() == {"linear", "conv"}  # test_vit: its patch embedding is a conv
    assert ppca.cells["linear"][-1].tokens == tokens["a"] + tokens["a-t1"]
