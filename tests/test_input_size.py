"""One rule for a model's fixed input size (weightgen.models.fixed_input_size), used everywhere."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from weightgen.models import example_batch, fixed_input_size, input_side, input_size
from weightgen.zoo import FIELD_FAMILIES

FIXED = {"vit", "mixer"}  # the field zoo's families whose size is part of the architecture
SIDE = 48  # neither timm's default (224) nor the zoo's (32)


@pytest.mark.parametrize("family", sorted(FIELD_FAMILIES))
def test_every_field_family_at_a_non_default_size(family):
    """Each family's first zoo config: a ViT/Mixer built at 48 px is fixed at 48 px, CNNs take any size."""
    _, arch, _, _, kw = FIELD_FAMILIES[family][0]
    kwargs = {**kw, "num_classes": 10, "in_chans": 1}
    if family in FIXED:
        kwargs["img_size"] = SIDE
        kwargs.setdefault("patch_size", 8) if family == "vit" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(arch, **kwargs).eval()
    want = SIDE if family in FIXED else 40
    assert fixed_input_size(model) == ((SIDE, SIDE) if family in FIXED else None)
    assert input_side(model, 40) == want
    assert input_size(model)[0] == 1
    with torch.no_grad():
        assert model(torch.zeros(2, 1, want, want)).shape == (2, 10)
        if family in FIXED:
            assert example_batch(model, 2).shape == (2, 1, SIDE, SIDE)


def test_dynamic_img_size_is_not_fixed():
    kw = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=1)
    vit = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, **kw)
    assert fixed_input_size(vit) is None and input_side(vit, 40) == 40
    assert fixed_input_size(timm.create_model("vit_tiny_patch16_224", **kw)) == (32, 32)
    assert fixed_input_size(timm.create_model("test_vit")) is None  # timm builds test_vit with dynamic_img_size


def test_pretrained_cfg_alone_fixes_the_size():
    """No patch embedding: timm's pretrained_cfg decides, with the model's own img_size first."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.pretrained_cfg = {"fixed_input_size": True, "input_size": (3, 40, 40)}
    assert fixed_input_size(model) == (40, 40)
    model.img_size = 56
    assert fixed_input_size(model) == (56, 56)
    model.pretrained_cfg = {"fixed_input_size": False, "input_size": (3, 40, 40)}
    assert fixed_input_size(model) is None


def test_reconstruct_probes_a_mixer_at_its_own_size():
    """MlpMixer(img_size=64) keeps its PatchEmbed on ``stem``: reconstruct's probe batch was 32 px."""
    from weightgen.reconstruct import ReconstructOptions, _task_data

    mixer = timm.create_model("mixer_s16_224", img_size=64, num_classes=10, mlp_ratio=(0.0625, 0.0625)).eval()
    opts = ReconstructOptions(arch="mixer_s16_224", checkpoint="unused", out="unused", probe_task="digits",
                              probe_size=4)
    data = _task_data(opts, mixer, torch.device("cpu"))
    assert data["side"] == 64 and data["probe"].shape == (4, 3, 64, 64)
    with torch.no_grad():
        assert mixer(data["probe"]).shape == (4, 10)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_a_recast_stem_still_tells_the_input_channels(in_chans):
    """With every conv recast (preset 'all'), the stem is a RecastConv2d: its channels, not timm's
    default of 3 nor a later conv's, are what the model takes (a 1-channel backbone was fed RGB)."""
    import weightgen as wg
    from weightgen.data.images import image_config

    model = timm.create_model("test_resnet", in_chans=in_chans)
    wg.recast(model, preset="all")
    assert isinstance(model.conv1[0] if isinstance(model.conv1, nn.Sequential) else model.conv1, wg.layers.RecastConv2d)
    assert input_size(model)[0] == in_chans
    assert image_config(model, img_size=32).channels == in_chans
