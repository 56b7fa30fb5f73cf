"""Target matching, banking, exactness, trainability, accounting, export and merge of recast models."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import weightgen as wg
from weightgen.config import default_preset
from weightgen.layers import RecastConv2d, RecastLayer, RecastLinear
from weightgen.recasting import BANKS_ATTR, find_targets, recast_layers


VIT_BLOCKS = range(6)  # test_vit has blocks.0 .. blocks.5
VIT_QKV = [f"blocks.{i}.attn.qkv" for i in VIT_BLOCKS]
VIT_MLP = [f"blocks.{i}.mlp.fc{j}" for i in VIT_BLOCKS for j in (1, 2)]
RESNET_RESIDUAL_CONVS = [
    "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
    "layer3.0.conv1", "layer3.0.conv2", "layer3.0.conv3", "layer4.0.conv1", "layer4.0.conv2",
]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """timm zero-inits the last BN of every residual block, which would make the residual convs
    (the ones recast-conv rewrites) invisible in the logits: give every norm layer random stats."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(timm.create_model("test_resnet"))


def vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", **kwargs).eval()


def image_batch(n: int = 2, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def vit_batch(n: int = 2) -> torch.Tensor:
    return image_batch(n, 160)  # test_vit has a fixed 160x160 input


class ConvZoo(nn.Module):
    """Every Conv2d flavour RecastConv2d must reproduce, chained with per-step standardisation."""

    def __init__(self, bias: bool):
        super().__init__()
        self.k1 = nn.Conv2d(8, 8, 1, bias=bias)
        self.k3 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.k5_stride2_pad2 = nn.Conv2d(8, 8, 5, stride=2, padding=2, bias=bias)
        self.dilated_grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=bias)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=bias)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=bias)
        self.k3_again = nn.Conv2d(8, 8, 3, padding=1, bias=bias)  # shares a bank with k3 / reflect

    def forward(self, x):
        for conv in (self.k1, self.k3, self.k5_stride2_pad2, self.dilated_grouped, self.depthwise,
                     self.reflect, self.k3_again):
            x = conv(x)
            x = x / x.std()
        return x.flatten(1)


def names_for(model: nn.Module, config) -> list[str]:
    return find_targets(model, config)


# ---------------------------------------------------------------- matching


@pytest.mark.parametrize("preset, expected", [
    ("recast-attn", VIT_QKV),
    ("recast-mlp", VIT_MLP),
    ("recast-attn-mlp", VIT_QKV + VIT_MLP),
])
def test_vit_presets_match_exactly_the_paper_layers(preset, expected):
    model = vit()
    assert sorted(names_for(model, wg.preset_config(preset))) == sorted(expected)


def test_resnet_conv_preset_keeps_stem_and_downsample_dense():
    model = resnet()
    names = names_for(model, wg.preset_config("recast-conv"))
    assert names == RESNET_RESIDUAL_CONVS
    assert not any(n.startswith("conv1.") or "downsample" in n for n in names)
    wg.recast(model, preset="recast-conv")
    assert type(model.conv1[0]) is nn.Conv2d
    assert type(model.layer2[0].downsample[1]) is nn.Conv2d
    assert isinstance(model.layer2[0].conv1, RecastConv2d)


def test_all_preset_excludes_the_head():
    model = resnet()
    names = names_for(model, wg.preset_config("all"))
    assert "fc" not in names
    assert "conv1.0" in names and "layer2.0.downsample.1" in names
    vmodel = vit()
    vnames = names_for(vmodel, wg.preset_config("all"))
    assert "head" not in vnames
    assert {"patch_embed.proj", "blocks.0.attn.proj"} <= set(vnames)
    # exclude_head=False really is what lets the head in
    assert "head" in names_for(vmodel, wg.preset_config("all", exclude_head=False))
    wg.recast(vmodel, preset="all")
    assert type(vmodel.head) is nn.Linear


def test_default_preset_per_family():
    assert default_preset(vit()) == "recast-attn-mlp"
    assert default_preset(resnet()) == "recast-conv"
    assert default_preset(timm.create_model("test_efficientnet")) == "all"
    assert default_preset(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == "all"
    # recast() without config or preset uses it
    model = vit()
    wg.recast(model)
    assert model.recast_config.preset == "recast-attn-mlp"
    assert sorted(recast_layers(model)) == sorted(VIT_QKV + VIT_MLP)


@pytest.mark.parametrize("target, exclude, expected", [
    (["blocks.0.attn.qkv", "blocks.3.mlp.fc2"], [], ["blocks.0.attn.qkv", "blocks.3.mlp.fc2"]),  # exact names
    (["attn.qkv"], [], VIT_QKV),  # dotted suffix in a list
    (r"blocks\.[01]\.mlp\.fc1", [], ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]),  # regex
    ("qkv", [], VIT_QKV),  # a plain string is also a suffix
    ("mlp.fc2", [], [f"blocks.{i}.mlp.fc2" for i in VIT_BLOCKS]),
    ("qkv", [r"blocks\.[0-2]\..*"], VIT_QKV[3:]),  # exclude by regex
    ("qkv", ["blocks.5.attn.qkv", "blocks.0.attn.qkv"], VIT_QKV[1:5]),  # exclude by name
    (None, [r".*\.qkv", r".*\.mlp\..*", "patch_embed.proj"], [f"blocks.{i}.attn.proj" for i in VIT_BLOCKS]),
])
def test_target_and_exclude_forms(target, exclude, expected):
    config = wg.RecastConfig(target_modules=target, exclude_modules=exclude)
    assert sorted(names_for(vit(), config)) == sorted(expected)


def test_layer_types_filter():
    model = vit()
    linear_only = names_for(model, wg.RecastConfig(layer_types=("linear",)))
    conv_only = names_for(model, wg.RecastConfig(layer_types=("conv",)))
    assert conv_only == ["patch_embed.proj"]
    assert "patch_embed.proj" not in linear_only and len(linear_only) == 24
    with pytest.raises(ValueError, match="unknown layer types"):
        wg.RecastConfig(layer_types=("lstm",))


@pytest.mark.parametrize("target", ["kv", r"blocks\.9\.attn\.qkv", ["nothing.here"], "(unclosed"])
def test_pattern_matching_nothing_raises_and_leaves_model_untouched(target):
    model = vit()
    keys = list(model.state_dict())
    x = vit_batch()
    before = model(x)
    with pytest.raises(ValueError) as info:
        wg.recast(model, wg.RecastConfig(target_modules=target))
    message = str(info.value)
    if target != "(unclosed":
        assert "matched no layer" in message and "patch_embed.proj" in message and "blocks.0.attn.qkv" in message
    else:
        assert "invalid module pattern" in message
    assert list(model.state_dict()) == keys
    assert not hasattr(model, BANKS_ATTR) and not recast_layers(model)
    assert torch.equal(model(x), before)


def test_type_restriction_matching_nothing_names_the_types():
    model = resnet()
    with pytest.raises(ValueError, match=r"types \['linear'\].*conv1\.0"):
        wg.recast(model, wg.RecastConfig(target_modules=r"layer1.*", layer_types=("linear",)))
    assert not hasattr(model, BANKS_ATTR)


# ---------------------------------------------------------------- banking


def test_layers_per_group_splits_banks_in_model_order():
    model = vit()
    wg.recast(model, wg.preset_config("recast-attn", layers_per_group=4))
    assert [g.members for g in model.recast_groups] == [tuple(VIT_QKV[:4]), tuple(VIT_QKV[4:])]
    banks = getattr(model, BANKS_ATTR)
    assert [b.num_templates for b in banks.values()] == [4, 2]
    assert model.blocks[0].attn.qkv.bank is banks["g0"] and model.blocks[5].attn.qkv.bank is banks["g1"]

    single = vit()
    wg.recast(single, wg.preset_config("recast-attn", layers_per_group=1))
    assert len(getattr(single, BANKS_ATTR)) == 6


def test_equal_shapes_share_one_bank_stored_once():
    model = vit()
    wg.recast(model, preset="recast-attn-mlp")
    banks = getattr(model, BANKS_ATTR)
    # qkv (192, 64) and fc1 (192, 64) have the same shape: one bank; fc2 (64, 192) gets its own
    assert list(banks) == ["g0", "g1"]
    assert banks["g0"].weight_shape == (192, 64) and len(banks["g0"].members) == 12
    assert banks["g1"].weight_shape == (64, 192) and len(banks["g1"].members) == 6
    assert model.blocks[0].attn.qkv.bank is model.blocks[4].mlp.fc1.bank is banks["g0"]
    state = model.state_dict()
    bank_keys = [k for k in state if "recast_banks" in k]
    assert sorted(bank_keys) == ["recast_banks.g0.templates", "recast_banks.g1.templates"]
    assert not any(k.endswith("templates") for k in state if not k.startswith("recast_banks."))
    assert "blocks.0.attn.qkv.coefficients" in state and "blocks.0.attn.qkv.weight" not in state
    assert state["blocks.0.attn.qkv.coefficients"].shape == (2, 12)  # K=2 sets over 12 templates
    # the bank is one object: the templates are counted once in parameters() as well
    assert sum(1 for n, _ in model.named_parameters() if "templates" in n) == 2


def test_templates_and_coef_sets_shape_the_parameters():
    model = vit()
    wg.recast(model, wg.preset_config("recast-attn", templates=3, coef_sets=4))
    bank = getattr(model, BANKS_ATTR)["g0"]
    assert bank.templates.shape == (3, 192, 64)
    assert model.blocks[2].attn.qkv.coefficients.shape == (4, 3)
    # W = (1/K) sum_k sum_i c[k, i] T[i]
    layer = model.blocks[2].attn.qkv
    expected = torch.einsum("ki,ide->de", layer.coefficients, bank.templates) / 4
    torch.testing.assert_close(layer.weight, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- exactness


def _assert_exact_and_live(model: nn.Module, x: torch.Tensor, config=None, **kw) -> None:
    """Recast with a closed-form fit reproduces the logits, and the recast layers do matter."""
    with torch.no_grad():
        before = model(x)
        wg.recast(model, config, **kw)
        after = model(x)
    assert before.abs().max() > 1e-2  # a non-trivial output, so atol means something
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bank in getattr(model, BANKS_ATTR).values():
            bank.templates.add_(torch.randn(bank.templates.shape, generator=gen) * bank.templates.std())
        changed = model(x)
    assert (changed - before).abs().max() > 1e-3, "recast layers do not influence the output"


def test_exact_fit_test_resnet():
    _assert_exact_and_live(resnet(), image_batch(2, 64))


def test_exact_fit_test_vit():
    _assert_exact_and_live(vit(), vit_batch())


@pytest.mark.parametrize("bias", [True, False])
def test_exact_fit_conv_variants(bias):
    torch.manual_seed(1)
    model = ConvZoo(bias).eval()
    x = torch.randn(2, 8, 17, 17, generator=torch.Generator().manual_seed(0))
    _assert_exact_and_live(model, x, wg.RecastConfig())
    layers = recast_layers(model)
    assert len(layers) == 7 and all(isinstance(m, RecastConv2d) for m in layers.values())
    assert model.reflect.padding_mode == "reflect" and model.depthwise.groups == 8
    assert (model.k3.bias is None) is (not bias)
    assert model.k3.bank is model.reflect.bank is model.k3_again.bank


def test_padding_mode_actually_matters_in_conv_zoo():
    # guards the test above: a recast layer that ignored padding_mode would give other logits
    torch.manual_seed(1)
    model = ConvZoo(True).eval()
    x = torch.randn(2, 8, 17, 17)
    ref = model(x)
    model.reflect.padding_mode = "zeros"
    assert (model(x) - ref).abs().max() > 1e-3


def test_hand_written_linear_model_exact_and_bias_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16, bias=False), nn.GELU(),
                          nn.Linear(16, 16), nn.Linear(16, 3)).eval()
    _assert_exact_and_live(model, torch.randn(5, 16))
    assert sorted(recast_layers(model)) == ["0", "2", "4"]  # "5" is the head (last Linear)
    assert isinstance(model[0], RecastLinear) and model[2].bias is None and model[0].bias is not None
    # merging gives back plain layers
    x = torch.randn(3, 16)
    expected = model(x)
    merged = wg.merge_and_unload(model)
    assert len(merged) == 6 and all(type(m) in (nn.Linear, nn.GELU) for m in merged)
    torch.testing.assert_close(merged(x), expected, atol=1e-6, rtol=1e-6)


def test_a_sequential_root_keeps_its_structure():
    def make(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).eval()

    config = wg.RecastConfig(target_modules=r"^[02]$")
    seq = make(0)
    plain_keys = [k for k in seq.state_dict()]
    wg.recast(seq, config)
    # banks are no child of the root: length, indexing, iteration and children are as before
    assert len(seq) == 5 and isinstance(seq[-1], nn.Linear) and isinstance(seq[0], RecastLinear)
    assert [type(m).__name__ for m in seq] == ["RecastLinear", "GELU", "RecastLinear", "GELU", "Linear"]
    assert [name for name, _ in seq.named_children()] == ["0", "1", "2", "3", "4"]
    # ...yet saved once under the artifact key, and counted once in parameters()
    keys = list(seq.state_dict())
    assert [k for k in keys if "templates" in k] == ["recast_banks.g0.templates"] and keys[-1] == "recast_banks.g0.templates"
    assert [k for k in keys if k.endswith("coefficients")] == ["0.coefficients", "2.coefficients"]
    assert [k for k in plain_keys if k not in ("0.weight", "2.weight")] == [
        k for k in keys if not k.endswith(("coefficients", "templates"))]
    assert sum(1 for n, _ in seq.named_parameters() if n.endswith("templates")) == 1
    # the saved keys load into a fresh recast model
    fresh = make(1)
    wg.recast(fresh, config, init="empty")
    fresh.load_state_dict(seq.state_dict(), strict=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), seq(x))
    wg.merge_and_unload(seq)
    assert list(seq.state_dict()) == plain_keys and len(seq) == 5


def test_a_failing_fit_restores_the_original_model(monkeypatch):
    model = vit()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}

    def broken(*_args, **_kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr("weightgen.api.fit_closed_form", broken)
    with pytest.raises(RuntimeError, match="same device"):
        wg.recast(model, preset="all")
    assert dict(model.named_modules()) == modules  # the very same module objects, in the same places
    assert not hasattr(model, BANKS_ATTR) and not hasattr(model, "recast_config") and not recast_layers(model)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    monkeypatch.undo()
    _assert_exact_and_live(model, vit_batch())  # and it can be recast normally afterwards


def test_recast_does_not_import_the_fitting_code():
    """One direction only: mimicry imports the bank bookkeeping, recasting.py never imports mimicry
    (nor the adapters above it: it unloads them through their ``fold`` protocol)."""
    import ast
    from pathlib import Path

    root = Path(wg.__file__).parent

    def imported(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found.add("." * node.level + (node.module or ""))
        return found

    for low in ("recasting.py", "bank.py", "layers.py", "config.py"):
        assert not {m for m in imported(root / low) if "mimicry" in m or "vae" in m or "adapt" in m
                    or m in (".api", ".tasks")}, low
    for path in (root / "mimicry").glob("*.py"):
        assert not {m for m in imported(path) if m.endswith(".api")}, path.name


# ---------------------------------------------------------------- trainability and accounting


def test_only_coefficients_trainable_then_head_too():
    model = vit()
    wg.recast(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    coefficient_names = {f"{n}.coefficients" for n in VIT_QKV + VIT_MLP}
    assert trainable == coefficient_names
    wg.mark_only_coefficients_trainable(model, train_head=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == coefficient_names | {"head.weight", "head.bias"}
    # a training step moves coefficients only: templates and the rest stay bit-identical
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(vit_batch()).square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert "head.weight" in changed and "blocks.0.attn.qkv.coefficients" in changed


def test_parameter_accounting_vit_small():
    model = timm.create_model("vit_small_patch16_224")
    dense = sum(p.numel() for p in model.parameters())
    wg.recast(model, wg.preset_config("recast-attn", layers_per_group=2, templates=2, coef_sets=2), init="empty")
    counts = wg.parameter_counts(model)
    assert counts["per_task_trainable"] == 48  # 12 qkv layers x K=2 x n=2
    assert counts["coefficients"] == 48
    assert counts["templates"] == 6 * 2 * 1152 * 384  # 6 banks of 2 templates of (1152, 384)
    assert counts["model"] == dense
    assert counts["stored"] == dense - 12 * 1152 * 384 + counts["templates"] + 48
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 48


# ---------------------------------------------------------------- export, merge, twice


def test_export_dense_loads_strict_into_fresh_model():
    model = resnet()
    x = image_batch(2, 64)
    wg.recast(model)
    with torch.no_grad():
        for layer in recast_layers(model).values():  # a "trained" task, not just the fitted start
            layer.coefficients.add_(torch.randn(layer.coefficients.shape) * 0.1)
        expected = model(x)
    dense = wg.export_dense(model)
    fresh = timm.create_model("test_resnet").eval()
    assert set(dense) == set(fresh.state_dict())
    fresh.load_state_dict(dense, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)


def test_export_dense_vit_keeps_head_and_biases():
    model = vit()
    x = vit_batch()
    wg.recast(model)
    dense = wg.export_dense(model)
    fresh = timm.create_model("test_vit").eval()
    fresh.load_state_dict(dense, strict=True)
    torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(dense["blocks.0.attn.qkv.bias"], model.blocks[0].attn.qkv.bias.detach())


@pytest.mark.parametrize("make", ["resnet", "vit", "convzoo"])
def test_merge_and_unload(make):
    if make == "resnet":
        model, x = resnet(), image_batch(2, 64)
    elif make == "vit":
        model, x = vit(), vit_batch()
    else:
        torch.manual_seed(1)
        model, x = ConvZoo(True).eval(), torch.randn(2, 8, 17, 17)
    keys = set(model.state_dict())
    wg.recast(model, wg.RecastConfig() if make == "convzoo" else None)
    with torch.no_grad():
        for layer in recast_layers(model).values():
            layer.coefficients.mul_(0.9)
        expected = model(x)
    merged = wg.merge_and_unload(model)
    assert not any(isinstance(m, RecastLayer) for m in merged.modules())
    assert not hasattr(merged, BANKS_ATTR) and not hasattr(merged, "recast_config")
    assert set(merged.state_dict()) == keys
    assert all(p.device.type == "cpu" for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    if make == "convzoo":
        assert type(merged.reflect) is nn.Conv2d and merged.reflect.padding_mode == "reflect"
        assert merged.dilated_grouped.dilation == (2, 2) and merged.dilated_grouped.groups == 4
    # once merged, the model can be recast again
    wg.recast(merged, wg.RecastConfig() if make == "convzoo" else None)


def test_recasting_twice_raises():
    model = vit()
    wg.recast(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already recast"):
        wg.recast(model)
    with pytest.raises(ValueError, match="already recast"):
        wg.recast(model, preset="recast-mlp")
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        wg.recast(vit(), init="random")
    with pytest.raises(ValueError, match="not both"):
        wg.recast(vit(), wg.RecastConfig(), preset="all")
    with pytest.raises(ValueError, match="unknown preset"):
        wg.recast(vit(), preset="recast-everything")
    for bad in ({"coef_sets": 0}, {"templates": 0}, {"layers_per_group": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= 1"):
            wg.RecastConfig(**bad)


def test_init_empty_leaves_zeros_and_deepcopy_keeps_sharing():
    model = vit()
    wg.recast(model, init="empty")
    assert all(not b.templates.any() for b in getattr(model, BANKS_ATTR).values())
    clone = copy.deepcopy(model)
    assert clone.blocks[0].attn.qkv.bank is getattr(clone, BANKS_ATTR)["g0"]
    assert clone.blocks[0].attn.qkv.bank is not model.blocks[0].attn.qkv.bank


# ---------------------------------------------------------------- dtype and device


def test_banks_follow_the_model_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.Linear(16, 3)).eval()
    x = torch.randn(4, 16)
    expected = model(x)
    model = model.to(torch.bfloat16)
    wg.recast(model)
    bank = getattr(model, BANKS_ATTR)["g0"]
    assert bank.templates.dtype == torch.bfloat16 and model[0].coefficients.dtype == torch.bfloat16
    out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_no_package_attribute_hides_a_module():
    """``import weightgen.<module> as m`` gives the module (mock.patch relies on it): no function or
    class of the package's namespace carries the name of one of its modules."""
    import importlib
    import inspect
    import pkgutil

    for info in pkgutil.iter_modules(wg.__path__):
        module = importlib.import_module(f"weightgen.{info.name}")
        assert getattr(wg, info.name) is module, info.name
    assert callable(wg.recast) and not inspect.ismodule(wg.recast)  # the function keeps its name
    import weightgen.recasting as recasting

    assert inspect.ismodule(recasting) and recasting.merge_and_unload is wg.merge_and_unload


def test_own_imports_sit_at_the_top_of_the_module():
    """Function-local imports of weightgen's own modules only where they break a cycle: the files
    listed here have none."""
    import ast
    from pathlib import Path

    root = Path(wg.__file__).parent
    allowed: set[tuple[str, str]] = set()
    files = [root / f for f in ("recasting.py", "api.py", "config.py", "io.py", "cli.py", "tasks.py")]
    files += sorted((root / "adapt").glob("*.py"))
    found = []
    for path in files:
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and node.level > 0:
                    key = (str(path.relative_to(root)), "." * node.level + (node.module or ""))
                    if key not in allowed:
                        found.append(f"{key[0]}:{node.lineno} {key[1]}")
    assert not found, found
