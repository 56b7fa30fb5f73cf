import math

import pytest
import torch
from torch import nn

from weightgen.vae.tokenize import (
    COND_DIM,
    COND_FIELDS,
    KINDS,
    TOKEN_SIZE,
    condition,
    detokenize,
    layer_kind,
    token_count,
    tokenize,
)


def _modules():
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(100, 30),
        "linear_exact": nn.Linear(128, 5),  # row length an exact multiple of token_size
        "linear_small": nn.Linear(3, 7),  # row shorter than one token
        "conv1x1": nn.Conv2d(16, 24, 1),
        "conv3x3": nn.Conv2d(8, 12, 3, padding=1),
        "conv7x7_strided": nn.Conv2d(3, 16, 7, stride=2, padding=3),
        "grouped": nn.Conv2d(16, 32, 3, groups=4),
        "depthwise": nn.Conv2d(24, 24, 3, groups=24),
        "rect": nn.Conv2d(5, 6, (1, 5)),
    }


@pytest.mark.parametrize("name", list(_modules()))
def test_round_trip(name):
    m = _modules()[name]
    w = m.weight.detach()
    kind = layer_kind(tuple(w.shape), getattr(m, "groups", 1))
    t = tokenize(w, kind, depth=0.5)
    out, row = w.shape[0], w[0].numel()
    cpr = math.ceil(row / TOKEN_SIZE)
    assert t.values.shape == (out * cpr, TOKEN_SIZE) == (token_count(w.shape), TOKEN_SIZE)
    assert t.values.dtype == torch.float32 and t.mask.dtype == torch.bool
    assert int(t.mask.sum()) == w.numel()
    assert torch.all(t.values[~t.mask] == 0)
    assert t.cond.shape == (token_count(w.shape), COND_DIM)
    assert t.shape == tuple(w.shape) and t.kind == kind and t.scale > 0
    # normalised by the power of two nearest the RMS: token RMS within a factor sqrt(2) of 1
    token_rms = float(t.values[t.mask].pow(2).mean().sqrt())
    assert 2 ** -0.5 - 1e-6 <= token_rms <= 2 ** 0.5 + 1e-6
    assert math.log2(t.scale) == round(math.log2(t.scale))
    back = detokenize(t.values, w.shape, t.scale)
    assert back.shape == w.shape
    assert torch.equal(back, w)  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_round_trip_keeps_dtype_bitwise(dtype):
    w = (torch.randn(7, 5, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.037).to(dtype)
    t = tokenize(w, "conv", 0.3)
    assert t.values.dtype == dtype
    back = detokenize(t.values, w.shape, t.scale)
    assert back.dtype == dtype and torch.equal(back, w)


def test_unit_scale_is_bitwise():
    w = torch.randn(9, 4, 3, 3)
    # zero-padded raw rows with scale 1.0 come back bit for bit
    raw = torch.zeros(token_count(w.shape), TOKEN_SIZE)
    raw.view(9, -1)[:, :36] = w.reshape(9, 36)
    assert torch.equal(detokenize(raw, w.shape, 1.0), w)
    t = tokenize(w, "conv", 0.0)
    assert torch.equal(detokenize(t.values, w.shape, 1.0) * t.scale, detokenize(t.values, w.shape, t.scale))


def test_zero_weight_scale_is_one():
    t = tokenize(torch.zeros(4, 10), "linear", 1.0)
    assert t.scale == 1.0
    assert torch.equal(detokenize(t.values, (4, 10), t.scale), torch.zeros(4, 10))


def test_condition_fields():
    shape = (6, 2, 3, 5)  # row length 30 -> one chunk per row
    c = condition(shape, "conv", 0.25)
    assert c.shape == (6, COND_DIM) and len(COND_FIELDS) == COND_DIM
    col = {f: c[:, i] for i, f in enumerate(COND_FIELDS)}
    assert torch.all(col["kind=conv"] == 1) and torch.all(col["kind=linear"] == 0)
    assert torch.allclose(col["log2_fan_in/12"], torch.full((6,), math.log2(30) / 12))
    assert torch.allclose(col["kernel_h/7"], torch.full((6,), 3 / 7))
    assert torch.allclose(col["kernel_w/7"], torch.full((6,), 5 / 7))
    assert torch.all(col["depth"] == 0.25)
    assert torch.allclose(col["row/out_features"], torch.arange(6) / 6)
    lin = condition((4, 130), "linear", 1.0)  # 3 chunks per row
    assert lin.shape == (12, COND_DIM)
    chunk = lin[:, COND_FIELDS.index("chunk/chunks_per_row")]
    assert torch.allclose(chunk[:3], torch.tensor([0, 1 / 3, 2 / 3]))
    assert torch.allclose(lin[:, COND_FIELDS.index("1/chunks_per_row")], torch.full((12,), 1 / 3))
    assert torch.allclose(lin[:, COND_FIELDS.index("kernel_h/7")], torch.full((12,), 1 / 7))
    assert lin.abs().max() <= 2.0  # all O(1)


def test_layer_kind_and_errors():
    assert layer_kind((10, 5)) == "linear"
    assert layer_kind((8, 4, 3, 3)) == "conv"
    assert layer_kind((8, 1, 3, 3), groups=8) == "dwconv"
    assert layer_kind((8, 1, 3, 3), groups=1) == "conv"  # 1 input channel, dense
    assert layer_kind((8, 2, 3, 3), groups=4) == "conv"  # grouped, not depthwise
    assert KINDS == ("linear", "conv", "dwconv")
    with pytest.raises(ValueError, match=r"unsupported weight shape \(10,\)"):
        layer_kind((10,))
    with pytest.raises(ValueError, match=r"unsupported weight shape \(4, 2, 3\)"):
        layer_kind((4, 2, 3))
    with pytest.raises(ValueError, match="unknown layer kind 'bogus'"):
        tokenize(torch.randn(4, 4), "bogus", 0.0)
    with pytest.raises(ValueError, match="kind 'conv' expects a 4-D weight"):
        tokenize(torch.randn(4, 4), "conv", 0.0)
    with pytest.raises(ValueError, match="depth must be a relative depth"):
        tokenize(torch.randn(4, 4), "linear", 1.5)
    with pytest.raises(ValueError, match=rf"expected values of shape \(4, {TOKEN_SIZE}\)"):
        detokenize(torch.zeros(3, TOKEN_SIZE), (4, 4), 1.0)


def test_other_token_size_and_dtype():
    w = torch.randn(5, 40, dtype=torch.float64)
    t = tokenize(w, "linear", 0.0, token_size=16)
    assert t.values.shape == (15, 16)
    assert torch.equal(detokenize(t.values, w.shape, t.scale, token_size=16), w)
