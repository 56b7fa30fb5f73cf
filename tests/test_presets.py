"""Presets reproduce the paper's per-task counts (issue 7); the template-ratio knob."""
from __future__ import annotations

import pytest
import timm
import torch

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
    assert wg.RecastConfig().templates_for(7) == 7 and wg.RecastConfig(templates=3).templates_for(7) == 3
    # an explicit template count replaces the preset's ratio
    assert wg.preset_config("recast-resnet", templates=1).template_ratio is None
    with pytest.raises(ValueError, match="template_ratio"):
        wg.RecastConfig(template_ratio=0)
    with pytest.raises(ValueError, match="not both"):
        wg.RecastConfig(templates=2, template_ratio=0.5)
    assert wg.RecastConfig.from_dict(wg.preset_config("recast-resnet").to_dict()).template_ratio == 0.5
