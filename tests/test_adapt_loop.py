"""The task trainer and the task-incremental loop, on test_resnet (BatchNorm) and test_vit, small data."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import weightgen as wg
from weightgen.adapt import get_method
from weightgen.adapt.incremental import open_backbone, run_sequence
from weightgen.adapt.trainer import TrainConfig, predict, train_task
from weightgen.data import get_task, to_model_input
from weightgen.recasting import recast_layers

KWARGS = {"test_resnet": {"in_chans": 1}, "test_vit": {"in_chans": 1, "img_size": 32, "patch_size": 8}}
SMALL = {"max_train": 96, "max_eval": 48}


def backbone_dir(root, arch: str):
    """An artifact of a seeded random-init model (timm init, closed-form fit: exact)."""
    out = root / arch
    if not out.exists():
        torch.manual_seed(0)
        model = timm.create_model(arch, **KWARGS[arch])
        state = {k: v.clone() for k, v in model.state_dict().items()}
        wg.recast(model)
        report = wg.fit(model, state)
        wg.save(model, out, report, arch=arch, model_kwargs=KWARGS[arch])
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapt_loop")


def test_coefficient_only_training_lowers_the_loss(root):
    """Head and templates frozen, only the coefficients move: a teacher's labels (the same backbone with
    other coefficients) are learnable by coefficients alone, and the loss falls."""
    backbone = open_backbone(backbone_dir(root, "test_vit"))
    model = backbone.model()
    model.reset_classifier(10)
    wg.mark_only_coefficients_trainable(model, train_head=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("coefficients") for n in trainable)
    teacher = backbone.model()
    teacher.reset_classifier(10)
    teacher.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in recast_layers(teacher).values():
            layer.coefficients.mul_(1 + 0.5 * torch.randn(layer.coefficients.shape, generator=gen))
    x = to_model_input(get_task("digits", 0, max_train=256, max_eval=64).train[0], 1, 32)
    y = predict(teacher, x).argmax(1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("coefficients")}
    before = F.cross_entropy(predict(model, x), y).item()
    rng = torch.get_rng_state()
    train_task(model, (x, y), (x[:64], y[:64]), TrainConfig(epochs=3, batch_size=32, lr=2e-2), seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    after = F.cross_entropy(predict(model, x), y).item()
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # templates and head unchanged


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_switching_back_is_exact_after_three_tasks(root, arch):
    """Each earlier task file reproduces its logits bit for bit after later tasks trained (BN: train mode)."""
    default = open_backbone(backbone_dir(root, arch))  # the model's own size: its pretrained_cfg / img_size
    assert default.img_size == {"test_resnet": 160, "test_vit": 32}[arch] and default.channels == 1
    backbone = open_backbone(backbone_dir(root, arch), 32)
    assert backbone.img_size == 32 and backbone.channels == 1
    config = TrainConfig(epochs=1, batch_size=32)
    result = run_sequence(backbone, "recast", ["digits", "mnist", "latin"], [0], config, root / f"run-{arch}", **SMALL)
    assert result["exact_switch"] and all(r["exact_switch"] for r in result["rows"])
    matrix = result["matrices"][0]
    for i in range(3):  # zero forgetting: the accuracy on task j never changes after later tasks
        assert all(matrix[i][j] == matrix[j][j] for j in range(i + 1))
        assert [r["test_acc"] for r in result["rows"]][i] == matrix[i][i]
    assert {r["trainable"] for r in result["rows"]} == {sum(
        layer.coefficients.numel() for layer in recast_layers(backbone.model()).values())}
    assert all((root / f"run-{arch}" / r["task_file"]).is_file() for r in result["rows"])


def test_same_seed_same_result_and_tasks_start_from_the_backbone(root):
    """Deterministic in the seed; the second task's result does not depend on the first task."""
    backbone = open_backbone(backbone_dir(root, "test_resnet"), 32)
    config = TrainConfig(epochs=1, batch_size=32)
    a = run_sequence(backbone, "recast", ["digits", "mnist"], [3], config, root / "det-a", **SMALL)
    b = run_sequence(backbone, "recast", ["mnist"], [3], config, root / "det-b", **SMALL)
    ta = load_file(str(root / "det-a" / "tasks" / "mnist-s3.safetensors"))
    tb = load_file(str(root / "det-b" / "tasks" / "mnist-s3.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["rows"][1]["test_acc"] == b["rows"][0]["test_acc"]


def test_full_fine_tuning_runs_on_the_dense_model_and_counts_every_parameter(root):
    backbone = open_backbone(backbone_dir(root, "test_resnet"), 32)
    result = run_sequence(backbone, "full", ["digits"], [0], TrainConfig(epochs=1, batch_size=32),
                          root / "full", **SMALL)
    dense = timm.create_model("test_resnet", num_classes=10, **KWARGS["test_resnet"])
    row = result["rows"][0]
    assert row["trainable_with_head"] == sum(p.numel() for p in dense.parameters())
    assert row["task_file_bytes"] > 4 * row["trainable_with_head"]  # the whole model is stored
    assert result["exact_switch"]
    assert get_method("full").needs_recast is False
