"""Neural Mimicry: closed form (exact and balanced), gradient recipes, reports, function fidelity."""
from __future__ import annotations

import copy
import math
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import weightgen as wg
from weightgen.generate import GenerateOptions, generate
from weightgen.mimicry import fit, function_fidelity, solve_bank
from weightgen.mimicry.closed_form import least_squares_coefficients
from weightgen.vae.prior import load_vae_bundle
from weightgen.recasting import BANKS_ATTR, recast_layers



def row_cosines(weights: torch.Tensor, templates: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity((coefficients @ templates).double(), weights.double(), dim=1)


def mlp(width: int = 32, depth: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)], nn.Linear(width, 4)).eval()


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def recast_for_fit(model: nn.Module, **config) -> dict[str, torch.Tensor]:
    target = dense_state(model)
    wg.recast(model, wg.RecastConfig(**config), init="empty")
    return target


# ---------------------------------------------------------------- closed form


@pytest.mark.parametrize("extra_templates", [0, 3])
def test_closed_form_exact_when_templates_cover_layers(extra_templates):
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(6, 500, generator=gen) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.5])[:, None]
    templates, coefficients = solve_bank(weights, 6 + extra_templates)
    assert templates.shape == (6 + extra_templates, 500) and coefficients.shape == (6, 6 + extra_templates)
    cos = row_cosines(weights, templates, coefficients)
    assert cos.min() > 0.99999
    torch.testing.assert_close(coefficients @ templates, weights, atol=1e-4, rtol=1e-4)


def test_closed_form_exact_on_rank_deficient_and_zero_layers():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 200, generator=gen)
    weights = torch.stack([base[0], base[1], 2 * base[0] - base[1], torch.zeros(200), base[2]])  # rank 3
    templates, coefficients = solve_bank(weights, 5)
    assert torch.isfinite(templates).all() and torch.isfinite(coefficients).all()
    torch.testing.assert_close(coefficients @ templates, weights, atol=1e-4, rtol=1e-4)
    # fewer templates than layers but >= rank: still exact
    templates, coefficients = solve_bank(weights, 3)
    torch.testing.assert_close(coefficients @ templates, weights, atol=1e-4, rtol=1e-4)


def test_closed_form_more_templates_than_weight_entries():
    # three Linear(2, 1) layers share a bank of 3 templates of only 2 numbers each
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList([nn.Linear(2, 1) for _ in range(3)])
            self.head = nn.Linear(1, 1)

        def forward(self, x):
            return self.head(sum(b(x) for b in self.branches))

    model = Tiny().eval()
    x = torch.randn(4, 2)
    expected = model(x)
    target = dense_state(model)
    wg.recast(model)
    assert getattr(model, BANKS_ATTR)["g0"].templates.shape == (3, 1, 2)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert fit(model, target, "closed_form+gradient", steps=3)["min_cosine"] > 0.99999


def test_closed_form_via_fit_is_exact_on_a_model():
    model = mlp()
    target = recast_for_fit(model)
    report = fit(model, target, "closed_form")
    assert report["min_cosine"] > 0.99999 and report["mean_cosine"] > 0.99999
    assert max(row["rel_error"] for row in report["layers"]) < 1e-4
    assert report["loss_history"] == []


def _nearly_orthogonal_bank(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    norms = torch.logspace(-2, 1, 12)[torch.randperm(12, generator=gen)]  # 0.01 .. 10, shuffled
    return torch.randn(12, 2048, generator=gen) * norms[:, None]


def test_balanced_closed_form_beats_plain_svd_under_compression():
    gaps = []
    for seed in range(4):
        weights = _nearly_orthogonal_bank(seed)
        balanced = row_cosines(weights, *solve_bank(weights, 4, balance=True))
        plain = row_cosines(weights, *solve_bank(weights, 4, balance=False))
        # 4 templates for 12 nearly orthogonal layers: the best worst case is ~ sqrt(4/12) = 0.577
        assert balanced.min() > 0.55, seed
        assert balanced.min() > plain.min() + 0.05, seed
        assert balanced.mean() >= plain.mean() - 1e-6, seed
        gaps.append((balanced.min() - plain.min()).item())
    assert sum(gaps) / len(gaps) > 0.15


def test_balanced_closed_form_is_deterministic():
    weights = _nearly_orthogonal_bank(0)
    first = solve_bank(weights, 4, seed=3)
    second = solve_bank(weights, 4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------- gradient


def _paper_run(steps: int = 60, lr: float = 1e-2):
    model = mlp()
    target = recast_for_fit(model, templates=3)
    report = fit(model, target, "gradient", steps=steps, lr=lr, seed=7)
    return model, target, report


def test_gradient_paper_recipe_lowers_its_loss_and_keeps_the_best():
    model, target, report = _paper_run()
    history = report["loss_history"]
    assert len(history) == 61
    assert history[-1] < 0.5 * history[0]
    # the model ends at the best state seen: its SmoothL1 loss is the history's minimum
    losses = []
    layers = recast_layers(model)
    for bank in getattr(model, BANKS_ATTR).values():
        fitted = torch.stack([layers[n].weight.reshape(-1) for n in bank.members])
        wanted = torch.stack([target[f"{n}.weight"].reshape(-1) for n in bank.members])
        losses.append(F.smooth_l1_loss(fitted, wanted))
    assert sum(losses).item() == pytest.approx(min(history), rel=1e-4)
    # from its random start (mean cosine ~0) most of the way to the closed-form fit of the same bank size
    start = _paper_run(steps=0)[2]["mean_cosine"]
    bound = mlp()
    closed = fit(bound, recast_for_fit(bound, templates=3), "closed_form")["mean_cosine"]
    assert abs(start) < 0.1 and report["mean_cosine"] > 0.85 * closed, (start, report["mean_cosine"], closed)


def test_gradient_paper_recipe_is_deterministic():
    model_a, _, report_a = _paper_run(steps=20)
    model_b, _, report_b = _paper_run(steps=20)
    assert report_a["loss_history"] == report_b["loss_history"]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # and the seed matters
    model_c = mlp()
    target = recast_for_fit(model_c, templates=3)
    report_c = fit(model_c, target, "gradient", steps=20, lr=1e-2, seed=8)
    assert report_c["loss_history"] != report_a["loss_history"]


@pytest.mark.parametrize("lr", [None, 1.0])  # default, and a step size that would wreck the state
def test_closed_form_plus_gradient_never_ends_below_closed_form(lr):
    model = mlp()
    target = recast_for_fit(model, templates=3)
    closed = fit(model, target, "closed_form")
    model2 = mlp()
    target2 = recast_for_fit(model2, templates=3)
    refined = fit(model2, target2, "closed_form+gradient", steps=15, lr=lr)
    assert closed["mean_cosine"] < 0.9  # a real compression, so there is something to lose
    history = refined["loss_history"]
    assert len(history) == 16
    if lr == 1.0:  # the optimiser did wander off: only keeping the best state saves the result
        assert max(history) > history[0] + 0.01
    # float32 rounding of the cosines is ~1e-7; anything beyond that would be a real regression
    assert refined["mean_cosine"] >= closed["mean_cosine"] - 1e-6


@pytest.mark.parametrize("method", ["closed_form", "closed_form+gradient", "gradient"])
def test_fit_a_bfloat16_model(method):
    model = mlp().to(torch.bfloat16)
    target = recast_for_fit(model)
    report = fit(model, target, method, steps=None if method == "closed_form" else 3)
    assert getattr(model, BANKS_ATTR)["g0"].templates.dtype == torch.bfloat16
    assert model[0].coefficients.dtype == torch.bfloat16
    if method != "gradient":
        assert report["min_cosine"] > 0.999  # exact up to bfloat16 rounding
    assert len(report["layers"]) == 6


def _ill_conditioned_bank(condition: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 bank (6, 4000) of condition number ~``condition`` and weights (5, 4000) in its span."""
    gen = torch.Generator().manual_seed(seed)
    directions, _ = torch.linalg.qr(torch.randn(4000, 6, generator=gen, dtype=torch.float64))  # (D, n)
    mixing, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    spread = torch.logspace(0, -math.log10(condition), 6, dtype=torch.float64)
    bank = ((mixing * spread) @ directions.T).float()  # (n, D)
    weights = (torch.randn(5, 6, generator=gen, dtype=torch.float64) @ bank.double()).float()  # (L, D)
    return weights, bank


def test_least_squares_keeps_float64_accuracy_on_ill_conditioned_templates(monkeypatch):
    """float32 normal equations square the condition number at float32 precision: at 1e4 their
    relative residual was ~1e-3 on weights that lie in the templates' span; float64 accumulation
    (with refinement) stays at float32 rounding."""
    weights, bank = _ill_conditioned_bank(1e4)
    reference = torch.linalg.lstsq(bank.double().T, weights.double().T, driver="gelsd").solution.T  # (L, n)

    def worst_residual(coefficients):
        error = weights.double() - coefficients.double() @ bank.double()
        return (error.norm(dim=1) / weights.double().norm(dim=1)).max().item()

    solved = least_squares_coefficients(weights, bank)
    assert solved.dtype == torch.float32 and solved.shape == (5, 6)
    assert worst_residual(solved) < 1e-6
    torch.testing.assert_close(solved.double(), reference, atol=1e-5, rtol=1e-5)
    # blocked over the columns (the path of large layers), the same answer
    monkeypatch.setattr("weightgen.mimicry.closed_form._LSQ_CHUNK", 512)
    torch.testing.assert_close(least_squares_coefficients(list(weights), bank), solved, atol=1e-6, rtol=1e-6)


def test_library_calls_leave_the_global_rng_alone(tmp_path):
    model, other = mlp(seed=0), mlp(seed=1)
    target, other_target = recast_for_fit(model, templates=3), recast_for_fit(other, templates=3)
    vae = load_vae_bundle()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    fit(model, target, "gradient", steps=3)
    fit(other, other_target, "decoder", steps=2, vae=vae)
    generate(GenerateOptions(arch="test_resnet", out=str(tmp_path / "out")))
    assert torch.equal(torch.get_rng_state(), state)
    # and the global RNG does not steer a fit either
    again = mlp(seed=0)
    again_target = recast_for_fit(again, templates=3)
    torch.manual_seed(99)
    fit(again, again_target, "gradient", steps=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_progress_bar_ends_at_its_total(capsys):
    model = mlp()
    target = recast_for_fit(model, templates=3)
    fit(model, target, "gradient", steps=4, progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "/5" not in err


def test_fit_rejects_bad_arguments():
    model = mlp()
    target = recast_for_fit(model)
    with pytest.raises(ValueError, match="unknown method"):
        fit(model, target, "annealing")
    with pytest.raises(ValueError, match="steps"):
        fit(model, target, "gradient", steps=-1)
    with pytest.raises(ValueError, match="VAE"):
        fit(model, target, "decoder")


# ---------------------------------------------------------------- report and function fidelity


def test_report_layout():
    model = mlp()
    target = recast_for_fit(model, layers_per_group=4)
    start = time.perf_counter()
    report = fit(model, target, "closed_form")
    elapsed = time.perf_counter() - start
    assert {"mean_cosine", "min_cosine", "seconds", "layers", "params"} <= set(report)
    assert isinstance(report["seconds"], float) and 0 < report["seconds"] <= elapsed  # the fit's own wall time
    assert {"model", "templates", "coefficients", "per_task_trainable"} <= set(report["params"])
    assert report["params"]["model"] == sum(p.numel() for p in mlp().parameters())
    assert report["params"]["per_task_trainable"] == 4 * 2 * 4 + 2 * 2 * 2  # banks of 4 and 2 layers, K=2
    rows = report["layers"]
    assert [row["name"] for row in rows] == [str(i) for i in range(6)]
    assert [row["group"] for row in rows] == ["g0"] * 4 + ["g1"] * 2
    layers = recast_layers(model)
    for row in rows:
        assert set(row) >= {"name", "shape", "group", "cosine", "rel_error"}
        assert row["shape"] == [32, 32]
        # each row measures the model's weight against the target
        fitted, wanted = layers[row["name"]].weight.detach().flatten(), target[f"{row['name']}.weight"].flatten()
        assert row["cosine"] == pytest.approx(F.cosine_similarity(fitted, wanted, dim=0).item(), abs=1e-5)
        assert row["rel_error"] == pytest.approx(((fitted - wanted).norm() / wanted.norm()).item(), rel=1e-4)
    assert report["mean_cosine"] == pytest.approx(sum(r["cosine"] for r in rows) / 6)
    assert report["min_cosine"] == min(r["cosine"] for r in rows)


def test_report_reflects_a_bad_fit():
    model = mlp()
    target = recast_for_fit(model)  # init="empty": zero templates
    report = wg.mimicry.build_report(model, target, "none", 0.0)
    assert report["mean_cosine"] == 0.0 and all(r["rel_error"] == pytest.approx(1.0) for r in report["layers"])


def _resnet_with_live_residuals() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # timm zero-inits the last BN of each block; make every branch count
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def test_function_fidelity_exact_fit_agrees():
    reference = _resnet_with_live_residuals()
    candidate = copy.deepcopy(reference)
    wg.recast(candidate)
    batch = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = function_fidelity(reference, candidate, batch)
    assert result["top1_agreement"] == 1.0
    assert result["logits_max_abs_diff"] < 1e-4
    assert result["min_block_cosine"] > 0.9999 and result["batch_size"] == 8
    assert "layer1.0" in result["block_cosine"] and "recast_banks" not in result["block_cosine"]


def test_function_fidelity_sees_a_lossy_fit():
    reference = _resnet_with_live_residuals()
    candidate = copy.deepcopy(reference)
    wg.recast(candidate, wg.preset_config("recast-conv", templates=1))
    batch = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = function_fidelity(reference, candidate, batch)
    assert result["logits_max_abs_diff"] > 1e-3
    assert result["min_block_cosine"] < 0.9999


@pytest.mark.parametrize("templates", [None, 2])  # exact, and compressed (balanced) banks
def test_release_target_fits_the_same_and_lets_go_bank_by_bank(templates):
    """fit(release_target=True) gives the same banks, coefficients and report rows, and removes exactly the
    wrapped layers' entries from the target (what lets generate free them bank by bank)."""
    kept, released = mlp(seed=3), mlp(seed=3)
    target = recast_for_fit(kept, templates=templates)
    other = recast_for_fit(released, templates=templates)
    members = {f"{n}.weight" for bank in released.recast_banks.values() for n in bank.members}
    plain = fit(kept, target, "closed_form", seed=0)
    lean = fit(released, other, "closed_form", seed=0, release_target=True)
    assert lean["layers"] == plain["layers"] and lean["mean_cosine"] == plain["mean_cosine"]
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), released.state_dict().values()))
    assert members and not members & set(other) and set(other) == set(target) - members
    with pytest.raises(ValueError, match="release_target"):
        fit(mlp(), recast_for_fit(mlp()), "gradient", steps=1, release_target=True)
