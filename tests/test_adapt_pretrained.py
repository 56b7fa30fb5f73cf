"""A user's local pretrained file loads through timm's own mechanism and keeps its pretrained_cfg;
--pretrained honours HF_HUB_OFFLINE=1 without touching the network."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from weightgen.cli import run_cli
from weightgen.io import WeightgenError
from weightgen.models import create_model

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A timm checkpoint saved locally (safetensors), 10 classes."""
    torch.manual_seed(3)
    model = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path_factory.mktemp("pretrained") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def test_pretrained_file_keeps_the_weights_and_the_cfg(weights):
    path, source = weights
    model = create_model("test_resnet", {"num_classes": 10}, pretrained_file=path)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in source.state_dict().items())
    cfg = model.pretrained_cfg
    assert cfg["file"] == str(path) and tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and cfg["input_size"] == (3, 160, 160)
    # another class count than the file's: one error line naming the file
    with pytest.raises(WeightgenError, match="cannot load pretrained file"):
        create_model("test_resnet", {"num_classes": 5}, pretrained_file=path)
    with pytest.raises(WeightgenError, match="does not exist"):
        create_model("test_resnet", {}, pretrained_file=path.with_name("missing.safetensors"))


def test_generate_then_adapt_reads_the_file_s_cfg(weights, tmp_path, capsys):
    """generate_weights.py --pretrained-file -> artifact records the cfg -> adaptation uses its mean/std."""
    from weightgen.adapt.incremental import open_backbone
    from weightgen.io import read_json

    path, _ = weights
    gen = load_script("generate_weights")
    out = tmp_path / "art"
    code = run_cli(lambda: gen.main(["--arch", "test_resnet", "--pretrained-file", str(path), "--model-kwargs",
                                     "num_classes=10", "--out", str(out)]))
    assert code == 0, capsys.readouterr().err
    report = read_json(out / "report.json")
    assert report["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and report["pretrained_cfg"]["input_size"] == [3, 160, 160]
    backbone = open_backbone(out)
    assert backbone.data.mean == (0.5, 0.5, 0.5) and backbone.img_size == 160 and backbone.data.crop_pct == 0.95
    assert open_backbone(out, 32, mean=[0.4], std=[0.2]).data.mean == (0.4, 0.4, 0.4)


def test_pretrained_respects_hf_hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1: no connection is attempted; weights missing from the cache give one error line."""
    import weightgen.models as models

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network with HF_HUB_OFFLINE=1")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "reachable", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-weightgen-cache")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "/nonexistent-weightgen-cache")
    try:
        import huggingface_hub.constants as constants
        monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent-weightgen-cache")
    except ImportError:
        pass
    with pytest.raises(WeightgenError, match="HF_HUB_OFFLINE is set"):
        create_model("test_resnet", {}, pretrained=True)
