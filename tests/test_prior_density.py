"""Latent density of the weight VAE: the old diagonal Gaussian and the Gaussian mixture prior."""
from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch

from weightgen.vae.codec import fit_latent_density, latent_log_prob, sample_latents
from weightgen.vae.prior import trained_kinds

DIM = 8


def _bimodal_layers(n_layers: int, seed: int, tokens: int = 256) -> list[tuple[str, float, torch.Tensor]]:
    """Linear-layer latents from two well separated modes (+-2.5 on every axis), 30% / 70%."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n_layers):
        sign = torch.where(torch.rand(tokens, 1, generator=g) < 0.3, -1.0, 1.0)
        layers.append(("linear", (i % 8) / 8 + 0.01, sign * 2.5 + 0.4 * torch.randn(tokens, DIM, generator=g)))
    return layers


def _mean_loglik(density, layers) -> float:
    return float(np.mean([latent_log_prob(density, kind, depth, mu).mean().item() for kind, depth, mu in layers]))


@pytest.fixture(scope="module")
def fitted():
    train = _bimodal_layers(32, seed=0)
    return train, fit_latent_density(train, DIM), fit_latent_density(train, DIM, family="mixture", seed=0)


def test_mixture_beats_gaussian_on_held_out_bimodal_latents(fitted):
    _, gaussian, mixture = fitted
    held_out = _bimodal_layers(16, seed=1)
    gauss_ll, mix_ll = _mean_loglik(gaussian, held_out), _mean_loglik(mixture, held_out)
    # the mixture should be near the true density: 2 modes of std 0.4 -> about -0.19 nats/dim - 0.61 nats
    true_ll = DIM * (-0.5 * math.log(2 * math.pi * 0.16) - 0.5) + 0.3 * math.log(0.3) + 0.7 * math.log(0.7)
    assert mix_ll > gauss_ll + 5.0, (mix_ll, gauss_ll)
    assert abs(mix_ll - true_ll) < 0.5, (mix_ll, true_ll)
    cells = mixture["linear"]["mixture"]
    assert mixture["linear"]["type"] == "mixture" and len(cells) == 4
    assert all(len(c["weights"]) >= 2 for c in cells)
    # the Gaussian's moments stay beside the mixture (readers that know only the Gaussian still work)
    assert mixture["linear"]["mean"] == gaussian["linear"]["mean"]
    assert mixture["linear"]["std"] == gaussian["linear"]["std"]


def test_mixture_samples_follow_the_modes(fitted):
    _, _, mixture = fitted
    x = sample_latents(mixture, "linear", 0.3, 20000, DIM, torch.Generator().manual_seed(0))
    cell = mixture["linear"]["mixture"][1]
    fitted_negative = sum(w for w, m in zip(cell["weights"], cell["means"]) if np.mean(m) < 0)
    negative = (x.mean(1) < 0).float().mean().item()
    assert abs(fitted_negative - 0.3) < 0.05 and abs(negative - fitted_negative) < 0.01
    assert abs(x[x.mean(1) > 0].std(0).mean().item() - 0.4) < 0.05
    # temperature 0: every draw is exactly one component's mean (mean + 0 * noise), compared element by element
    # (torch.cdist goes through a matrix product on some CPUs: 0.0024 on an AMD EPYC for identical rows)
    cold = sample_latents(mixture, "linear", 0.3, 100, DIM, torch.Generator().manual_seed(0), temperature=0.0)
    means = torch.tensor(mixture["linear"]["mixture"][1]["means"], dtype=torch.float32)
    hits = (cold[:, None, :] == means[None]).all(-1)
    assert hits.any(1).all() and hits.any(0).all()  # each draw is a mean, and both modes are drawn


def test_mixture_sampling_is_deterministic_and_leaves_global_rngs_alone(fitted):
    train, _, mixture = fitted
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    refit = json.loads(json.dumps(fit_latent_density(train, DIM, family="mixture", seed=0)))  # JSON round trip
    assert refit == json.loads(json.dumps(mixture))
    a = sample_latents(refit, "linear", 0.6, 5000, DIM, torch.Generator().manual_seed(7))
    b = sample_latents(mixture, "linear", 0.6, 5000, DIM, torch.Generator().manual_seed(7))
    c = sample_latents(mixture, "linear", 0.6, 5000, DIM, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]


def test_mixture_falls_back_for_empty_cells_and_unseen_kinds():
    layers = [("conv", 0.9, torch.randn(300, DIM, generator=torch.Generator().manual_seed(0)) + 3.0)]
    density = fit_latent_density(layers, DIM, family="mixture")
    conv = density["conv"]["mixture"]
    assert conv[0] == conv[1] == conv[2]  # empty buckets take the kind's pooled mixture
    assert abs(np.mean(conv[0]["means"]) - 3.0) < 0.3
    assert density["linear"]["mixture"][0] == {"weights": [1.0], "means": [[0.0] * DIM], "stds": [[1.0] * DIM]}
    assert trained_kinds({"latent_density": density}) == {"conv"}


def test_log_prob_of_one_component_matches_torch_normal():
    mean, std = torch.linspace(-1, 1, DIM, dtype=torch.float64), torch.linspace(0.5, 2, DIM, dtype=torch.float64)
    density = {"linear": {"mean": [mean.tolist()] * 4, "std": [std.tolist()] * 4, "tokens": [1.0] * 4, "seen": True}}
    x = torch.randn(50, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.distributions.Normal(mean, std).log_prob(x).sum(1)
    assert torch.allclose(latent_log_prob(density, "linear", 0.5, x), expected)
    mixture = {"linear": {**density["linear"], "type": "mixture",
                          "mixture": [{"weights": [1.0], "means": [mean.tolist()], "stds": [std.tolist()]}] * 4}}
    assert torch.allclose(latent_log_prob(mixture, "linear", 0.5, x), expected)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family"):
        fit_latent_density([("conv", 0.5, torch.zeros(4, DIM))], DIM, family="flow")


def test_old_format_density_samples_exactly_as_before():
    """The first shipped VAE's density (no "type": the diagonal Gaussian; tests/data/vae_mlp16) draws what it drew
    before the mixture existed."""
    density = json.loads((Path(__file__).parent / "data" / "vae_mlp16" / "vae.json").read_text())["latent_density"]
    assert all("type" not in cell for cell in density.values())
    for kind, depth, temperature, first, total in (
            ("conv", 0.3, 1.0, [-0.06710914522409439, 0.3490024209022522, -0.7591260075569153, 0.11594784259796143],
             214.65969848632812),
            ("linear", 0.9, 0.7, [0.02375161647796631, 0.21453824639320374, -0.3696766793727875, -0.013848911970853806],
             -72.40272521972656)):
        x = sample_latents(density, kind, depth, 1000, 16, torch.Generator().manual_seed(3), temperature)
        # the values the pre-mixture code drew for this seed (on an x86 CPU with AVX2 kernels): torch's CPU
        # normal sampler is vectorised differently per CPU, so they hold to float rounding, not bit for bit;
        # any change in what is drawn, or in what order, moves them by O(0.1)
        assert x[0, :4].tolist() == pytest.approx(first, abs=1e-5) and x.sum().item() == pytest.approx(total, abs=0.05)
        # the formula, bit for bit against the same noise drawn here
        noise = torch.randn(1000, 16, generator=torch.Generator().manual_seed(3)) * temperature
        cell = density[kind]
        expected = torch.tensor(cell["mean"][1 if kind == "conv" else 3]) + noise * torch.tensor(
            cell["std"][1 if kind == "conv" else 3])
        assert torch.equal(x, expected)
    noise = sample_latents(None, "conv", 0.3, 10, 16, torch.Generator().manual_seed(3), 0.5)
    assert torch.equal(noise, torch.randn(10, 16, generator=torch.Generator().manual_seed(3)) * 0.5)


def test_mixture_draws_components_in_proportion_to_their_weights():
    """The alias-method component draw: uneven weights (one tiny, unnormalised) come out in proportion."""
    weights = [0.5, 3.0, 0.01, 1.2, 2.0, 0.29, 1.0, 2.0]
    means = [[10.0 * k] + [0.0] * (DIM - 1) for k in range(8)]
    cell = {"weights": weights, "means": means, "stds": [[1e-3] * DIM] * 8}
    density = {"linear": {"type": "mixture", "mixture": [cell] * 4, "seen": True}}
    n = 400_000
    x = sample_latents(density, "linear", 0.5, n, DIM, torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.round(x[:, 0] / 10).long(), minlength=8).double()
    expected = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() < 5 * sigma).all(), (counts / n, expected)


def test_fit_priors_mixture_default_and_sample_weights_with_it(tmp_path):
    """fit_priors fits the mixture by default (the Gaussian on request); sample_weights draws from it
    deterministically per seed, without touching the global RNG."""
    from torch import nn

    from test_train_vae import make_patterned_zoo
    from weightgen.vae.data import list_zoo
    from weightgen.vae.model import VAEConfig, WeightVAE
    from weightgen.vae.prior import sample_weights
    from weightgen.vae.train import fit_priors

    make_patterned_zoo(tmp_path / "zoo", n_models=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = WeightVAE(VAEConfig(hidden=32, layers=2, latent_dim=4)).eval()
        model = nn.Sequential(nn.Conv2d(3, 48, 3), nn.Flatten(), nn.Linear(64, 32))
    models = list_zoo(tmp_path / "zoo")
    scale, mixture = fit_priors(vae, models)
    _, gaussian = fit_priors(vae, models, density="gaussian")
    assert {kind for kind in mixture if mixture[kind]["seen"]} == {"linear", "conv"}
    assert all(mixture[kind]["type"] == "mixture" for kind in mixture)
    assert all("type" not in cell for cell in gaussian.values())
    meta = {"scale_model": scale, "latent_density": mixture}
    state = torch.get_rng_state()
    a, stats, fallback = sample_weights(model, vae, meta, seed=3)
    b, _, _ = sample_weights(model, vae, meta, seed=3)
    c, _, _ = sample_weights(model, vae, {**meta, "latent_density": gaussian}, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert not fallback and set(a) == {"0.weight", "2.weight"}
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() and not torch.equal(a[k], c[k]) for k in a)


def test_mixture_backstop_weight_follows_the_number_of_models():
    """With model ids, each cell gets an N(0, I) component of weight 1 / (models + 1); without, none."""
    g = torch.Generator().manual_seed(0)
    records = [("conv", 0.1, torch.randn(200, DIM, generator=g) + 4.0, f"m{i % 3}") for i in range(6)]
    records.append(("conv", 0.9, torch.randn(200, DIM, generator=g) + 4.0, "m0"))
    density = fit_latent_density(records, DIM, family="mixture")
    near, far = density["conv"]["mixture"][0], density["conv"]["mixture"][3]
    for cell, models in ((near, 3), (far, 1)):
        assert cell["weights"][-1] == pytest.approx(1 / (models + 1))
        assert cell["means"][-1] == [0.0] * DIM and cell["stds"][-1] == [1.0] * DIM
        assert sum(cell["weights"]) == pytest.approx(1.0)
    plain = fit_latent_density([r[:3] for r in records], DIM, family="mixture")["conv"]["mixture"][0]
    assert plain["weights"] == pytest.approx([w / (1 - 0.25) for w in near["weights"][:-1]])
    # a held-out layer far from the training cell: the backstop keeps its likelihood from collapsing
    odd = torch.randn(100, DIM, generator=g)
    assert latent_log_prob(density, "conv", 0.1, odd).mean() > latent_log_prob(
        {"conv": {"type": "mixture", "mixture": [plain] * 4}}, "conv", 0.1, odd).mean() + 10
