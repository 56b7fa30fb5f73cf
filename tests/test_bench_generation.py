"""The generation benchmark's own arithmetic: the gap it reports and the residual gates it opens."""
import pytest
import timm
import torch
from _scripts import load_script

bench = load_script("benchmarks/bench_generation.py")


def test_gap_closed_is_the_share_of_the_control_to_zoo_gap():
    control = [0.2] * 9 + [0.4]  # median 0.2
    samples = [0.6] * 10
    gap = bench.gap_closed(samples, control, zoo_median=0.8)
    assert gap["point"] == pytest.approx(2 / 3)  # (0.6 - 0.2) / (0.8 - 0.2)
    assert gap["met"] is True
    lo, hi = gap["ci95"]
    assert lo <= gap["point"] <= hi
    assert bench.gap_closed([0.2] * 10, control, 0.8)["met"] is False
    # a zoo no better than the control leaves the share undefined, not a division by zero
    assert bench.gap_closed(samples, control, zoo_median=0.2)["met"] is None


def test_revive_zero_norms_opens_residual_branches_and_nothing_else():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(x)
        w = model.layer1[0].conv1.weight
        w.mul_(-1.0)  # with a zero last BN, the residual branch's weights do not matter
        assert torch.allclose(model(x), y0)
        w.mul_(-1.0)
    assert bench.revive_zero_norms(model) == 4  # one zero-init BN per block
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"layer{i}.0.bn2.weight" for i in range(1, 5)}
    with torch.no_grad():
        y1 = model(x)
        model.layer1[0].conv1.weight.mul_(-1.0)
        assert not torch.allclose(model(x), y1)  # now they do
    assert bench.revive_zero_norms(model) == 0  # idempotent
