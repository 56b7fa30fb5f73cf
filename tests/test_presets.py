"""Presets reproduce the paper's per-task counts (issue 7); the template-ratio knob."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

import weightgen as wg


def per_task(arch: str, config: wg.RecastConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model(arch)
    wg.recast(model, config, init="empty")
    return wg.parameter_counts(model)["per_task_trainable"]


@pytest.mark.parametrize("preset,count", [("recast-attn", 48), ("recast-mlp", 96), ("recast-attn-mlp", 144)])
def test_vit_small_paper_counts(preset, count):
    # 6 groups of 2 blocks, 2 templates, K=2: 4 numbers per layer
    config = wg.preset_config(preset, layers_per_group=2, templates=2, coef_sets=2)
    assert per_task("vit_small_patch16_224", config) == count


def test_recast_resnet_on_resnet34_is_168():
    # stages of 3, 4, 6, 3 blocks; first block dense; conv1/conv2 of the others: 4, 6, 10, 4 layers
    # in one bank per stage with blocks-1 = 2, 3, 5, 2 templates; K=2 -> 16 + 36 + 100 + 16
    config = wg.preset_config("recast-resnet")
    assert per_task("resnet34", config) == 168
    with torch.device("meta"):
        model = timm.create_model("resnet34")
    wg.recast(model, config, init="empty")
    banks = model.recast_banks
    assert [(b.num_templates, len(b.members)) for b in banks.values()] == [(2, 4), (3, 6), (5, 10), (2, 4)]
    assert not any(".0." in name for b in banks.values() for name in b.members)


def test_template_ratio_rule_and_checks():
    config = wg.RecastConfig(template_ratio=0.5)
    assert [config.templates_for(n) for n in (1, 2, 3, 4, 10)] == [1, 1, 2, 2, 5]
    # the floor, capped at the bank's layers (a 1-layer bank keeps 1 template)
    floor = wg.RecastConfig(template_ratio=0.5, min_templates=2)
    assert [floor.templates_for(n) for n in (1, 2, 3, 4, 10)] == [1, 2, 2, 2, 5]
    assert wg.RecastConfig().templates_for(7) == 7 and wg.RecastConfig(templates=3).templates_for(7) == 3
    # an explicit template count replaces the preset's ratio and its floor
    explicit = wg.preset_config("recast-resnet", templates=1)
    assert explicit.template_ratio is None and explicit.min_templates == 1 and explicit.templates_for(4) == 1
    with pytest.raises(ValueError, match="min_templates must be >= 1"):
        wg.RecastConfig(template_ratio=0.5, min_templates=0)
    with pytest.raises(ValueError, match="floor of template_ratio"):
        wg.RecastConfig(templates=2, min_templates=2)
    with pytest.raises(ValueError, match="template_ratio"):
        wg.RecastConfig(template_ratio=0)
    with pytest.raises(ValueError, match="not both"):
        wg.RecastConfig(templates=2, template_ratio=0.5)
    again = wg.RecastConfig.from_dict(wg.preset_config("recast-resnet").to_dict())
    assert (again.template_ratio, again.min_templates) == (0.5, 2)


def resnet18_like(**kwargs) -> torch.nn.Module:
    # ResNet-18 geometry (stages of 2 blocks), one width per stage so that every stage is its own bank;
    # zero_init_last=False: timm's zero last BatchNorm would block every residual-branch gradient
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("resnet18", num_classes=5, channels=[4, 8, 12, 16], zero_init_last=False, **kwargs)


def test_recast_resnet_on_resnet18_gives_two_templates_per_bank():
    # conv1/conv2 of the second block of each stage: banks of 2 layers; half of 2 is 1, the floor makes it 2
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    wg.recast(model, wg.preset_config("recast-resnet"), init="empty")
    assert [(b.num_templates, len(b.members)) for b in model.recast_banks.values()] == [(2, 2)] * 4
    assert wg.parameter_counts(model)["per_task_trainable"] == 32  # 8 layers x 2 templates x K=2


@pytest.mark.parametrize("overrides,moves", [({"templates": 1}, False), ({}, True)])
def test_coefficients_get_gradients_through_batchnorm(overrides, moves):
    """One template: a coefficient only rescales its conv, and the BatchNorm after it (batch statistics)
    undoes that, so its gradient is ~0. The preset's two templates change the weight's direction."""
    model = resnet18_like()
    wg.recast(model, wg.preset_config("recast-resnet", **overrides))
    model.train()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    F.cross_entropy(model(x), y).backward()
    coefs = [p for n, p in model.named_parameters() if n.endswith("coefficients")]
    assert len(coefs) == 8
    relative = [float(p.grad.norm() / p.detach().norm()) for p in coefs]
    if moves:
        assert min(relative) > 1e-3, relative  # measured 0.02-0.3
    else:
        assert max(relative) < 1e-3, relative  # measured 2e-6-4e-5 (BatchNorm's eps)


def test_artifact_without_min_templates_loads_with_one_template(tmp_path):
    """Artifacts written before min_templates was recorded were fitted with a floor of 1: they load as such."""
    model = resnet18_like(in_chans=1)
    wg.recast(model, wg.preset_config("recast-resnet", min_templates=1))
    wg.save(model, tmp_path / "art", {"method": "closed_form"}, arch="resnet18",
            model_kwargs={"num_classes": 5, "channels": [4, 8, 12, 16], "zero_init_last": False, "in_chans": 1})
    config_file = tmp_path / "art" / "recast_config.json"
    config = json.loads(config_file.read_text())
    del config["recast"]["min_templates"]
    config_file.write_text(json.dumps(config))
    loaded = wg.load(tmp_path / "art")
    assert loaded.recast_config.min_templates == 1
    assert [b.num_templates for b in loaded.recast_banks.values()] == [1] * 4
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
