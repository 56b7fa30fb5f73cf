"""weightgen.classifier (training loop, evaluation, BN re-estimation) on weightgen.data's model splits,
and the one digits stack: model_splits follows get_task's split and to_model_input's normalisation."""
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

from weightgen.classifier import evaluate, reestimate_batchnorm, train_classifier
from weightgen.data import get_task, model_splits, to_model_input
from weightgen.models import small_input_kwargs as digits_model_kwargs


@pytest.fixture(scope="module")
def data():
    return model_splits("digits", seed=0, image_size=32, in_chans=1)


def test_shapes_and_split_sizes(data):
    sizes = [len(data.train), len(data.val), len(data.test)]
    n = sum(sizes)
    assert 1700 < n <= 1797  # exact duplicates dropped
    assert sizes == pytest.approx([0.7 * n, 0.1 * n, 0.2 * n], abs=6)
    x, y = data.train.tensors
    assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and set(y.tolist()) == set(range(10))
    assert (data.image_size, data.in_chans) == (32, 1)
    # Stratified: every class is in every split in roughly the same proportion.
    for split in (data.val, data.test):
        counts = torch.bincount(split.tensors[1], minlength=10)
        assert counts.min() > 0.7 * counts.float().mean()


def test_one_split_rule_and_one_normalisation():
    """The model inputs are get_task's splits through to_model_input: nothing digits-specific."""
    d = model_splits("digits", seed=1, image_size=16, in_chans=3)
    task = get_task("digits", 1)
    for stage in ("train", "val", "test"):
        images, labels = task.split(stage)
        x, y = getattr(d, stage).tensors
        assert torch.equal(y, labels) and torch.equal(x, to_model_input(images, 3, 16))
    x = d.train.tensors[0]
    assert x.shape[1:] == (3, 16, 16) and torch.equal(x[:, 0], x[:, 2])
    assert -1.0 <= x.min().item() and x.max().item() <= 1.0  # (x - 0.5) / 0.5 of images in [0, 1]


def test_deterministic_and_disjoint(data):
    again = model_splits("digits", seed=0, image_size=32, in_chans=1)
    for a, b in zip((data.train, data.val, data.test), (again.train, again.val, again.test)):
        assert all(torch.equal(t, u) for t, u in zip(a.tensors, b.tensors))
    other = model_splits("digits", seed=1, image_size=32, in_chans=1)
    assert not torch.equal(data.test.tensors[0], other.test.tensors[0])
    # No test image is also in train (exact duplicates are dropped before splitting).
    tr = {tuple(r) for r in data.train.tensors[0].flatten(1).tolist()}
    assert not any(tuple(r) in tr for r in data.test.tensors[0].flatten(1).tolist())


def test_train_classifier_learns(data):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", **digits_model_kwargs("test_resnet"))
    state = torch.get_rng_state()
    losses = train_classifier(model, data, steps=60, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # caller's RNG untouched
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    acc = evaluate(model, data.test)
    assert not model.training
    assert 0.6 < acc <= 1.0  # chance is 0.1; measured ~0.95


def test_train_classifier_deterministic(data):
    def run():
        torch.manual_seed(3)
        m = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 10))
        return m, train_classifier(m, data, steps=25, seed=5)

    (m1, l1), (m2, l2) = run(), run()
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_reestimate_batchnorm_changes_stats(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(data.train.tensors[0][:2])  # materialise the lazy layer
    bn = model[1]
    bn.reset_running_stats()
    before = (bn.running_mean.clone(), bn.running_var.clone())
    reestimate_batchnorm(model, data.train, batches=3, batch_size=32)
    assert not model.training and bn.momentum == 0.1
    assert not torch.equal(before[0], bn.running_mean) and not torch.equal(before[1], bn.running_var)
    # Cumulative average over 3 batches of 32 = exact stats of those 96 images, drawn in a seeded order.
    order = torch.randperm(len(data.train.tensors[0]), generator=torch.Generator().manual_seed(0))[:96]
    with torch.no_grad():
        h = model[0](data.train.tensors[0][order])
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_reestimate_batchnorm_sees_every_class_of_a_class_sorted_split():
    """weightgen.data's splits are sorted by class: the first batches alone would hold one class."""
    x = torch.cat([torch.full((640, 1, 2, 2), float(c)) for c in range(4)])  # class c: inputs all c
    model = nn.Sequential(nn.BatchNorm2d(1))
    reestimate_batchnorm(model, TensorDataset(x), batches=20, batch_size=64)
    assert abs(float(model[0].running_mean) - 1.5) < 0.15  # the mean over classes 0..3, not 0


def test_reestimate_batchnorm_noop_without_bn(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reestimate_batchnorm(model, data.train)
    assert model.training  # untouched, mode included
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_small_input_kwargs():
    assert digits_model_kwargs("resnet18") == {"num_classes": 10, "in_chans": 1}
    kw = digits_model_kwargs("vit_tiny_patch16_224", image_size=32, in_chans=3)
    assert kw["img_size"] == 32 and 32 % kw["patch_size"] == 0 and kw["in_chans"] == 3
    assert "patch_size" not in digits_model_kwargs("test_convnext")
    assert digits_model_kwargs("test_vit", patch_size=4)["patch_size"] == 4
    m = timm.create_model("test_vit", **digits_model_kwargs("test_vit"))
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
