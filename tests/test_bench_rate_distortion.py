"""The rate-distortion benchmark's storage accounting: what each linear code stores, and its front."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rate_distortion.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rate_distortion", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_svd_counts_rank_and_leaves_small_layers_dense(bench):
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    approx, stored = bench.svd_code(w, 0.25)
    r = int(0.25 * w.numel() / (32 + 48))
    assert stored == r * (32 + 48)
    sv = torch.linalg.svdvals(approx.double())
    assert sv[r - 1] > 1e-3 * sv[0] and sv[r] < 1e-5 * sv[0]  # rank r, to float32 rounding
    dense, stored = bench.svd_code(w, 0.01)  # rank 0 would be needed: kept as it is, counted in full
    assert stored == w.numel() and torch.equal(dense, w)
    conv = torch.randn(16, 1, 7, 7, generator=torch.Generator().manual_seed(1))  # depthwise: a 16 x 49 matrix
    approx, stored = bench.svd_code(conv, 0.5)
    assert approx.shape == conv.shape and stored == int(0.5 * conv.numel() / (16 + 49)) * (16 + 49)


def test_pca_full_basis_is_exact_and_counts_padding_and_scale(bench):
    w = torch.randn(16, 49, generator=torch.Generator().manual_seed(2))  # rows of 49: one padded token each
    spec = {"kind": "linear", "depth": 0.5}
    mean, basis = torch.zeros(64, dtype=torch.float64), torch.eye(64, dtype=torch.float64)
    rebuilt, stored = bench.pca_code(w, spec, mean, basis, 64)
    assert torch.allclose(rebuilt, w, atol=1e-6)
    assert stored == 16 * 64 + 1  # a padded token costs as much as a full one; one scale per layer
    _, stored = bench.pca_code(w, spec, mean, basis, 8)
    assert stored == 16 * 8 + 1


def test_recast_shares_templates_within_a_shape_group(bench):
    g = torch.Generator().manual_seed(3)
    weights = {f"l{i}": torch.randn(8, 8, generator=g) for i in range(4)}
    weights["alone"] = torch.randn(4, 8, generator=g)
    out, stored = bench.recast_code(weights, 0.5)
    n = int(0.5 * 4 * 64 / (64 + 4))  # templates of the 4-layer group
    assert sum(stored[f"l{i}"] for i in range(4)) == n * 64 + n * 4
    assert stored["alone"] == 32 and torch.equal(out["alone"], weights["alone"])  # a group of one stays dense
    stack = torch.stack([out[f"l{i}"].reshape(-1) for i in range(4)])
    sv = torch.linalg.svdvals(stack.double())
    assert sv[n] < 1e-5 * sv[0]  # rank n, to float32 rounding


def test_pareto_front_and_amortised_rate(bench):
    rows = [{"code": c, "rate_target": 0.25, "stored": s, "shared": sh, "weights": 100, "drop_points": d,
             "mean_cosine": 0.9} for c, s, sh, d in (("a", 25, 0, 10.0), ("b", 20, 0, 5.0), ("c", 30, 100, 1.0))]
    points = bench.aggregate(rows, zoo_weights=1000)
    by = {p["code"]: p for p in points}
    assert math.isclose(by["c"]["rate_amortised"], 1.3) and math.isclose(by["c"]["rate_amortised_zoo"], 0.4)
    assert bench.pareto(points, "rate") == {("b", 0.25), ("c", 0.25)}  # a: more storage and more drop than b
    assert bench.pareto(points, "rate_amortised") == {("b", 0.25), ("c", 0.25)}
