import pytest
import torch

from weightgen.metrics import cosine, linear_cka, prediction_agreement


def test_prediction_agreement_counts_matching_top1():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    assert prediction_agreement(a, b) == pytest.approx(0.5)
    assert prediction_agreement(a, a * 7.0) == 1.0  # scale does not change a prediction
    assert prediction_agreement(a.argmax(-1), b) == pytest.approx(0.5)  # labels or logits


def test_prediction_agreement_refuses_different_inputs():
    with pytest.raises(ValueError, match="same inputs"):
        prediction_agreement(torch.zeros(4, 3), torch.zeros(5, 3))


def test_linear_cka_invariances_and_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    # orthogonal maps, isotropic scale, a shift and a unit permutation leave it at 1
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x[:, torch.randperm(16, generator=g)]) == pytest.approx(1.0, abs=1e-9)
    # independent features of 200 inputs: far from 1 (expected ~ p/N-ish), and a partial mix in between
    y = torch.randn(200, 16, generator=g)
    independent = linear_cka(x, y)
    assert independent < 0.3
    mixed = linear_cka(x, x + y)
    assert independent < mixed < 1.0
    # a non-isotropic linear map is not an invariance: CKA drops below 1
    stretch = torch.diag(torch.tensor([10.0] + [0.1] * 15))
    assert linear_cka(x, x @ stretch) < 0.5
    assert linear_cka(x, torch.ones(200, 4)) == 0.0


def test_linear_cka_gram_and_feature_forms_agree():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    small = linear_cka(x, y + 0.5 * x)  # features fewer than inputs: feature form
    wide = linear_cka(torch.cat([x, torch.zeros(30, 40)], 1), y + 0.5 * x)  # zero columns change nothing; Gram form
    assert small == pytest.approx(wide, abs=1e-9)
    with pytest.raises(ValueError, match="same N"):
        linear_cka(x, y[:20])


def test_cosine_still_one_helper():
    assert cosine(torch.ones(3), 2 * torch.ones(3)) == pytest.approx(1.0)
