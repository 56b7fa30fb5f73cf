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
    """An artifact of a seeded random-init model (timm init, live residual branches; closed-form fit: exact)."""
    out = root / arch
    if not out.exists():
        torch.manual_seed(0)
        model = timm.create_model(arch, **KWARGS[arch])
        with torch.no_grad():  # timm zero-inits each block's last BN: no gradient would reach the branch convs
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
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


# the methods that apply to each tiny backbone (recast and full are covered above)
LOOP_METHODS = [("test_resnet", m) for m in ("linear", "recast-norm", "lora", "recast+melo", "recast+clr",
                                             "recast+piggyback")] + \
               [("test_vit", m) for m in ("lora", "recast+melo", "recast+adaptformer")]


@pytest.mark.parametrize("arch,method", LOOP_METHODS)
def test_every_method_through_the_loop(root, arch, method):
    """Each method through the real Lightning loop on two tasks: its task file holds exactly what the method
    trains (plus BatchNorm statistics), training moved every trained body tensor, switching back is exact, and
    a fresh backbone copy with the file alone reproduces the recorded accuracy."""
    from weightgen.adapt.base import Wrapper
    from weightgen.adapt.incremental import DataOptions, open_tasks, predict_loader, prepare_model, task_loaders
    from weightgen.adapt.trainer import accuracy
    from weightgen.recasting import head_names
    from weightgen.tasks import load_task

    backbone = open_backbone(backbone_dir(root, arch))
    out = root / f"loop-{arch}-{method}"
    result = run_sequence(backbone, method, ["digits", "mnist"], [0], TrainConfig(epochs=1, batch_size=32), out,
                          max_train=64, max_eval=32)
    rows, matrix = result["rows"], result["matrices"][0]
    # after mnist trained, digits' file gave its recorded logits bit for bit: mnist's training touched
    # nothing outside its own file (the body is not restored between training and switching back)
    assert result["exact_switch"] and all(r["exact_switch"] for r in rows)
    assert [r["method"] for r in rows] == [method] * 2 and all(r["steps"] == 2 for r in rows)
    assert [r["test_acc"] for r in rows] == [matrix[0][0], matrix[1][1]] and matrix[1][0] == matrix[0][0]
    assert all(0 <= r["test_acc"] <= 1 for r in rows)

    fresh = prepare_model(backbone, get_method(method), 10, 0)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    heads = head_names(fresh)

    def is_head(key: str) -> bool:
        return key.rpartition(".")[0] in heads

    trained = {n for n, p in fresh.named_parameters() if p.requires_grad}
    stats = {k for k in init if k.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")}
    injected = {f"{name}.{k}" for name, m in fresh.named_modules() if isinstance(m, Wrapper)
                for k, _ in m.named_parameters() if not k.startswith("base_layer.")}
    assert bool(injected) == (get_method(method).adapter is not None)
    assert injected <= trained
    assert any(is_head(k) for k in trained) and (method == "linear") == all(is_head(k) for k in trained)
    for row in rows:
        saved = load_file(str(out / row["task_file"]))
        assert set(saved) == trained | stats, row["task"]
        body = {k for k in trained if not is_head(k)}
        moved = {k for k in body if not torch.equal(saved[k], init[k])}
        assert moved == body, (row["task"], sorted(body - moved))
    # the first task's file on a fresh copy of the backbone: the accuracy the loop recorded
    options = DataOptions(max_train=64, max_eval=32)
    task = open_tasks(["digits"], 0, options)[0]
    test = task_loaders(task, backbone.data, 32, 0, options)["test"]
    load_task(fresh, out / rows[0]["task_file"])
    assert accuracy(*predict_loader(fresh, test)) == rows[0]["test_acc"]


def test_single_template_banks_are_flagged():
    """One template per bank: a coefficient only rescales its layer, and the BatchNorm after it undoes that."""
    import weightgen
    from weightgen.adapt.incremental import single_template_banks

    def recast_with(templates: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model("resnet18", num_classes=10, channels=[8, 8, 8, 8])
        weightgen.recast(model, weightgen.preset_config("recast-resnet", templates=templates), init="empty")
        return model

    assert single_template_banks(recast_with(1))
    assert not single_template_banks(recast_with(2))
    assert not single_template_banks(timm.create_model("test_resnet"))
