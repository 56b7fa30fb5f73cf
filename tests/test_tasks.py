"""Per-task files: train coefficients (+ head) for two tasks, store them tiny, switch between them."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from safetensors.torch import load_file, save_file

import weightgen as wg
from weightgen.io import WeightgenError
from weightgen.recasting import BANKS_ATTR, recast_layers
from weightgen.tasks import TASK_FORMAT, task_metadata



def make_vit(num_classes: int = 10):
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=num_classes).eval()


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(seed))


def train_task(model, num_classes: int, seed: int, steps: int = 3) -> None:
    """A few SGD steps on random labels, coefficients and head only."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 160, 160, generator=gen)
    y = torch.randint(0, num_classes, (4,), generator=gen)
    wg.mark_only_coefficients_trainable(model, train_head=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    model = make_vit(10)
    wg.recast(model)
    templates = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(BANKS_ATTR)}
    base_coefficients = {n: l.coefficients.detach().clone() for n, l in recast_layers(model).items()}
    x = inputs()

    train_task(model, 10, seed=1)
    with torch.no_grad():
        logits_a = model(x)
    size_a = wg.save_task(model, root / "a.safetensors", name="a")

    model.reset_classifier(5)
    train_task(model, 5, seed=2)
    with torch.no_grad():
        logits_b = model(x)
    size_b = wg.save_task(model, root / "b.safetensors", name="b")
    return dict(model=model, root=root, x=x, logits=(logits_a, logits_b), sizes=(size_a, size_b),
                templates=templates, base_coefficients=base_coefficients)


def test_training_changed_coefficients_but_not_templates(two_tasks):
    model = two_tasks["model"]
    for key, value in two_tasks["templates"].items():
        assert torch.equal(model.state_dict()[key], value)
    moved = [n for n, l in recast_layers(model).items()
             if not torch.equal(l.coefficients, two_tasks["base_coefficients"][n])]
    assert len(moved) == len(recast_layers(model))
    logits_a, logits_b = two_tasks["logits"]
    assert logits_a.shape == (4, 10) and logits_b.shape == (4, 5)


def test_task_files_are_tiny_and_sizes_are_honest(two_tasks):
    root = two_tasks["root"]
    model_bytes = sum(p.numel() * p.element_size() for p in make_vit(10).parameters())
    for name, size in zip("ab", two_tasks["sizes"]):
        path = root / f"{name}.safetensors"
        assert size == path.stat().st_size
        assert size < model_bytes / 50
    # what is inside: every layer's coefficients and the head, nothing else
    state = load_file(str(root / "b.safetensors"))
    coefficient_keys = {f"{n}.coefficients" for n in recast_layers(two_tasks["model"])}
    assert set(state) == coefficient_keys | {"head.weight", "head.bias"}
    assert state["head.weight"].shape == (5, 64)
    meta = task_metadata(root / "b.safetensors")
    assert {k: meta[k] for k in ("format", "task", "method")} == {"format": TASK_FORMAT, "task": "b", "method": "recast"}
    assert meta["parts"] == {"coefficients": sorted(coefficient_keys), "trainable": [], "buffers": [],
                             "head": ["head.bias", "head.weight"]}


def test_load_task_switches_and_restores_exact_logits(two_tasks):
    model, root, x = two_tasks["model"], two_tasks["root"], two_tasks["x"]
    logits_a, logits_b = two_tasks["logits"]
    for _ in range(2):  # a -> b -> a -> b
        wg.load_task(model, root / "a.safetensors")
        with torch.no_grad():
            assert torch.equal(model(x), logits_a)
        wg.load_task(model, root / "b.safetensors")
        with torch.no_grad():
            assert torch.equal(model(x), logits_b)
    for key, value in two_tasks["templates"].items():
        assert torch.equal(model.state_dict()[key], value)


def test_load_task_into_a_fresh_copy_from_an_artifact(two_tasks, tmp_path):
    # templates travel in an artifact, tasks in task files: together they rebuild each task
    model, root, x = two_tasks["model"], two_tasks["root"], two_tasks["x"]
    wg.load_task(model, root / "a.safetensors")
    out = wg.save(model, tmp_path / "art", {}, arch="test_vit", model_kwargs={"num_classes": 10})
    fresh = wg.load(out)
    wg.load_task(fresh, root / "b.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), two_tasks["logits"][1])


def test_save_task_refuses_overwrite_unless_asked(two_tasks, tmp_path):
    model = two_tasks["model"]
    path = tmp_path / "t.safetensors"
    wg.save_task(model, path)
    before = path.read_bytes()
    with pytest.raises(WeightgenError, match="already exists"):
        wg.save_task(model, path)
    assert path.read_bytes() == before
    assert wg.save_task(model, path, overwrite=True) == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp files left


def test_task_without_head(two_tasks, tmp_path):
    model = two_tasks["model"]
    path = tmp_path / "nohead.safetensors"
    wg.save_task(model, path, include_head=False)
    assert not any(k.startswith("head.") for k in load_file(str(path)))


def test_task_file_for_another_model_is_refused(two_tasks, tmp_path):
    model, root, x = two_tasks["model"], two_tasks["root"], two_tasks["x"]
    wg.load_task(model, root / "a.safetensors")
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    resnet = timm.create_model("test_resnet")
    wg.recast(resnet)
    foreign = tmp_path / "resnet.safetensors"
    wg.save_task(resnet, foreign)
    with pytest.raises(WeightgenError, match="does not fit"):
        wg.load_task(model, foreign)

    # same architecture, other banking (templates=3): coefficient shapes differ
    other = make_vit(10)
    wg.recast(other, wg.preset_config("recast-attn-mlp", templates=3))
    other_path = tmp_path / "other.safetensors"
    wg.save_task(other, other_path)
    with pytest.raises(WeightgenError, match="shapes"):
        wg.load_task(model, other_path)

    # ... also when its head has another class count: the refusal must not rebuild our head first
    other.reset_classifier(5)
    wg.save_task(other, other_path, overwrite=True)
    with pytest.raises(WeightgenError, match="shapes"):
        wg.load_task(model, other_path)
    assert model.head.out_features == 10

    # a task file missing some layers' coefficients
    partial_path = tmp_path / "partial.safetensors"
    state = load_file(str(root / "a.safetensors"))
    save_file({k: v for k, v in state.items() if ".mlp." not in k}, str(partial_path))
    with pytest.raises(WeightgenError, match="lacks coefficients"):
        wg.load_task(model, partial_path)

    with pytest.raises(WeightgenError, match="missing file"):
        wg.load_task(model, tmp_path / "missing.safetensors")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state_before.items())
    with torch.no_grad():
        assert torch.equal(model(x), two_tasks["logits"][0])


def test_task_of_an_unrecast_model_is_refused(tmp_path):
    with pytest.raises(WeightgenError, match="recast it first"):
        wg.save_task(make_vit(), tmp_path / "x.safetensors")


def test_task_with_a_head_holding_batchnorm_buffers_round_trips(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
            self.head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))

        def get_classifier(self):
            return self.head

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    model = Net()
    wg.recast(model, wg.RecastConfig())
    model.train()
    model(torch.randn(16, 8))  # moves the head's BN running statistics
    wg.save_task(model, tmp_path / "t.safetensors")
    saved_mean = model.head[1].running_mean.clone()
    model.head[1].reset_running_stats()
    wg.load_task(model, tmp_path / "t.safetensors")
    assert torch.equal(model.head[1].running_mean, saved_mean)


# --- exact switching whatever the next task trains (issue 6 section 2, issue 7 protocol) ----------------

SWITCH = [  # (arch, how it is recast, adaptation method)
    ("test_resnet", "recast-conv", "recast"),  # BatchNorm statistics move in train mode
    ("test_resnet", "recast-conv", "recast+clr"),
    ("test_resnet", None, "lora"),  # not recast: LoRA over plain convs
    ("test_vit", "recast-attn-mlp", "recast-norm"),  # LayerNorm affine parameters train
    ("test_vit", "recast-attn-mlp", "recast+melo"),
]


def small_model(arch: str, preset: str | None, method: str):
    from weightgen.adapt import get_method

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, **({"img_size": 32} if arch == "test_vit" else {}))
    if preset:
        wg.recast(model, preset=preset)
    return get_method(method).apply(model).eval()


def train_steps(model, num_classes: int, seed: int, steps: int = 3) -> None:
    """A few SGD steps in train mode on whatever the method trains (BatchNorm statistics move too)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, num_classes, (8,), generator=gen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("arch,preset,method", SWITCH)
def test_every_earlier_task_file_reproduces_its_logits_bit_for_bit(tmp_path, arch, preset, method):
    model = small_model(arch, preset, method)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    logits = []
    for t, classes in enumerate((10, 5, 7)):  # T = 3 tasks, heads of different class counts
        if t:
            model.reset_classifier(classes)
        train_steps(model, classes, seed=t)
        with torch.no_grad():
            logits.append(model(x))
        wg.save_task(model, tmp_path / f"{t}.safetensors", name=f"t{t}")
    assert not torch.equal(logits[0][:, :5], logits[1])  # the tasks really differ
    for t in (0, 1, 2, 0):
        wg.load_task(model, tmp_path / f"{t}.safetensors")
        with torch.no_grad():
            assert torch.equal(model(x), logits[t]), f"task {t} after switching"
    meta = task_metadata(tmp_path / "0.safetensors")
    assert meta["method"] == method
    if arch == "test_resnet":  # every BatchNorm of the body is in the file
        bn = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        assert set(meta["parts"]["buffers"]) == {f"{n}.{b}" for n in bn
                                                for b in ("running_mean", "running_var", "num_batches_tracked")}


def test_a_task_of_another_method_or_without_statistics_is_refused_untouched(tmp_path):
    melo = small_model("test_vit", "recast-attn-mlp", "recast+melo")
    wg.save_task(melo, tmp_path / "melo.safetensors")
    plain = small_model("test_vit", "recast-attn-mlp", "recast")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(WeightgenError, match="trained with method 'recast\\+melo'.*apply it first"):
        wg.load_task(plain, tmp_path / "melo.safetensors")

    resnet = small_model("test_resnet", "recast-conv", "recast")
    train_steps(resnet, 10, seed=0)
    wg.save_task(resnet, tmp_path / "r.safetensors")
    state = load_file(str(tmp_path / "r.safetensors"))
    old = {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}  # today's files
    save_file(old, str(tmp_path / "old.safetensors"))
    snapshot = {k: v.clone() for k, v in resnet.state_dict().items()}
    with pytest.raises(WeightgenError, match="lacks .*running_mean"):
        wg.load_task(resnet, tmp_path / "old.safetensors")
    assert all(torch.equal(resnet.state_dict()[k], v) for k, v in snapshot.items())
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in before.items())


def test_head_rebuilt_on_the_heads_device_and_dtype(tmp_path):
    model = small_model("test_vit", "recast-attn-mlp", "recast")
    model.reset_classifier(5)
    wg.save_task(model, tmp_path / "five.safetensors")
    model.reset_classifier(10)
    model.double()
    wg.load_task(model, tmp_path / "five.safetensors")
    assert model.head.weight.dtype == torch.float64 and model.head.out_features == 5


def test_head_resize_leaves_the_callers_rng_alone(tmp_path):
    model = small_model("test_vit", "recast-attn-mlp", "recast")
    model.reset_classifier(5)
    wg.save_task(model, tmp_path / "five.safetensors")
    model.reset_classifier(10)
    rng = torch.get_rng_state()
    wg.load_task(model, tmp_path / "five.safetensors")  # rebuilds the head: 10 -> 5 classes
    assert model.head.out_features == 5
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_head_that_fits_only_in_part_is_refused_before_the_head_is_rebuilt(tmp_path):
    """weight for 5 classes, bias for 10: only rebuilding the head shows the bias no longer fits, so
    that check must run on a copy: the refused file leaves the model's head as it was."""
    model = small_model("test_vit", "recast-attn-mlp", "recast")
    path = tmp_path / "task.safetensors"
    wg.save_task(model, path)
    state = load_file(str(path))
    state["head.weight"] = state["head.weight"][:5].clone()
    save_file(state, str(path))
    head = model.head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightgenError, match="shapes that do not fit: head.bias"):
        wg.load_task(model, path)
    assert model.head is head and model.head.out_features == 10
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
