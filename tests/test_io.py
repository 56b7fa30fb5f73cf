"""Checkpoint loading (formats, unwrapping, refusal of unsafe or broken files), atomic writes, artifacts."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import weightgen as wg
from weightgen.artifact import CONFIG_FILE, RECAST_FILE, REPORT_FILE, WEIGHTS_FILE
from weightgen.io import MANIFEST_FILE, WeightgenError, atomic_directory, load_checkpoint, read_manifest



def small_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(4, 3, generator=gen), "layer.bias": torch.randn(4, generator=gen),
            "bn.num_batches_tracked": torch.tensor(7)}


def assert_same_state(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


class _MakesDirectory:
    """Unpickling this runs os.mkdir(path): the kind of payload weights_only must refuse."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ---------------------------------------------------------------- formats and unwrapping


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_load_checkpoint_formats(tmp_path, suffix):
    state = small_state()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    assert_same_state(load_checkpoint(path), state)
    assert_same_state(load_checkpoint(str(path)), state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_nested_state_dicts_are_unwrapped(tmp_path, wrapper):
    state = small_state()
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    assert_same_state(load_checkpoint(path), state)


def test_nested_twice_and_bookkeeping_dropped(tmp_path):
    state = small_state()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"state_dict": {**state, "step": 5}}, "epoch": 1}, path)
    assert_same_state(load_checkpoint(path), state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    state = small_state()
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, path)
    assert_same_state(load_checkpoint(path), state)
    # and in safetensors files too
    spath = tmp_path / "ddp.safetensors"
    save_file({prefix + k: v for k, v in state.items()}, str(spath))
    assert_same_state(load_checkpoint(spath), state)


def test_prefix_only_stripped_at_the_start(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"encoder.module.weight": torch.ones(2)}, str(path))
    assert list(load_checkpoint(path)) == ["encoder.module.weight"]


# ---------------------------------------------------------------- refusals


def test_missing_file(tmp_path):
    with pytest.raises(WeightgenError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["weights.ckpt", "weights.txt", "weights"])
def test_wrong_suffix(tmp_path, name):
    path = tmp_path / name
    torch.save(small_state(), path)
    with pytest.raises(WeightgenError, match=r"\.safetensors"):
        load_checkpoint(path)


def test_directory_refused(tmp_path):
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(WeightgenError, match="unsupported checkpoint"):
        load_checkpoint(tmp_path / "dir.pt")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightgenError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(WeightgenError, match="corrupt or truncated safetensors file"):
        load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_garbage_pickle(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(os.urandom(512))
    with pytest.raises(WeightgenError, match="cannot read checkpoint"):
        load_checkpoint(path)
    good = tmp_path / f"good{suffix}"
    torch.save(small_state(), good)
    good.write_bytes(good.read_bytes()[:100])  # truncated zip
    with pytest.raises(WeightgenError, match="cannot read checkpoint"):
        load_checkpoint(good)


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _MakesDirectory(str(marker))}, path)
    with pytest.raises(WeightgenError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    # control: the payload is live, so the refusal above is what protected us
    torch.load(path, weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_finite_values_refused(tmp_path, bad, suffix):
    state = small_state()
    state["layer.weight"][1, 2] = bad
    path = tmp_path / f"bad{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    with pytest.raises(WeightgenError, match="non-finite.*layer.weight"):
        load_checkpoint(path)


def test_half_precision_overflowing_sum_is_not_flagged(tmp_path):
    # fp16 values whose sum overflows but every element is finite: must load
    path = tmp_path / "half.safetensors"
    save_file({"w": torch.full((64,), 60000.0, dtype=torch.float16)}, str(path))
    assert load_checkpoint(path)["w"].dtype == torch.float16


def test_timm_training_checkpoint_with_namespace_args(tmp_path):
    import argparse

    state = small_state()
    path = tmp_path / "checkpoint-9.pth.tar.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 9,
                "args": argparse.Namespace(lr=0.1, model="resnet50")}, path)
    assert_same_state(load_checkpoint(path), state)


@pytest.mark.parametrize("content", [{}, {"epoch": 3}, [torch.zeros(1)], torch.zeros(3)])
def test_no_state_dict_inside(tmp_path, content):
    path = tmp_path / "empty.pt"
    torch.save(content, path)
    with pytest.raises(WeightgenError, match="holds no"):
        load_checkpoint(path)


# ---------------------------------------------------------------- atomic directories


def test_atomic_directory_success(tmp_path):
    out = tmp_path / "run"
    with atomic_directory(out, kind="test") as tmp:
        assert tmp != out and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    assert os.listdir(tmp_path) == ["run"]
    manifest = read_manifest(out)
    assert manifest["kind"] == "test" and manifest["files"] == ["a.txt"]
    assert sorted(os.listdir(out)) == [MANIFEST_FILE, "a.txt"]


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    out = tmp_path / "nested" / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert not out.exists()
    assert os.listdir(tmp_path / "nested") == []  # no temp directories left behind


def test_atomic_directory_existing_refused_then_replaced(tmp_path):
    out = tmp_path / "run"
    with atomic_directory(out) as tmp:
        (tmp / "old.txt").write_text("keep me")
    with pytest.raises(WeightgenError, match="already exists; pass overwrite=True") as info:
        with atomic_directory(out):
            pytest.fail("must not be entered")
    assert "--overwrite" in info.value.cli and "--overwrite" not in str(info.value)
    assert (out / "old.txt").read_text() == "keep me"
    # a failure during an overwrite keeps the old directory
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == [MANIFEST_FILE, "old.txt"]
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == [MANIFEST_FILE, "new.txt"]
    assert os.listdir(tmp_path) == ["run"]  # no .tmp / .old leftovers


def test_atomic_directory_refuses_a_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("a file")
    with pytest.raises(WeightgenError, match="not a directory"):
        with atomic_directory(out, overwrite=True):
            pass
    assert out.read_text() == "a file"


# ---------------------------------------------------------------- artifacts


def _recast_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # timm zero-inits each block's last BN; make the recast convs count
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
    target = {k: v.clone() for k, v in model.state_dict().items()}
    wg.recast(model, init="empty")
    model.report = wg.fit(model, target, "closed_form")
    return model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = _recast_resnet()
    out = tmp_path_factory.mktemp("artifacts") / "resnet"
    assert wg.save(model, out, model.report, arch="test_resnet") == out
    return model, out


def batch() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_artifact_layout(artifact):
    model, out = artifact
    assert sorted(os.listdir(out)) == sorted([CONFIG_FILE, RECAST_FILE, WEIGHTS_FILE, REPORT_FILE, MANIFEST_FILE])
    assert sorted(os.listdir(out.parent)) == ["resnet"]
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["format_version"] == 1 and config["arch"] == "test_resnet"
    assert config["recast"]["preset"] == "recast-conv"
    assert config["groups"]["g0"]["members"] == ["layer1.0.conv1", "layer1.0.conv2"]
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["min_cosine"] > 0.99999
    assert set(load_file(str(out / RECAST_FILE))) == set(model.state_dict())


def test_artifact_round_trip_identical_logits(artifact):
    model, out = artifact
    loaded = wg.load(out)
    x = batch()
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert expected.abs().max() > 1e-2
    assert torch.equal(got, expected)
    assert not loaded.training
    assert set(loaded.state_dict()) == set(model.state_dict())
    # the dense weights load strictly into the plain architecture and compute the same function
    fresh = timm.create_model("test_resnet").eval()
    fresh.load_state_dict(load_file(str(out / WEIGHTS_FILE)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)


def test_save_refuses_existing_directory(artifact):
    model, out = artifact
    before = (out / RECAST_FILE).read_bytes()
    with pytest.raises(WeightgenError, match="already exists"):
        wg.save(model, out, {})
    assert (out / RECAST_FILE).read_bytes() == before


def _copy(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_load_refuses_wrong_format_version(artifact, tmp_path):
    _, out = artifact
    for version in (2, None, "1"):
        bad = _copy(out, tmp_path / f"v{version}")
        config = json.loads((bad / CONFIG_FILE).read_text())
        config["format_version"] = version
        (bad / CONFIG_FILE).write_text(json.dumps(config))
        with pytest.raises(WeightgenError, match="format"):
            wg.load(bad)


def test_load_refuses_truncated_or_missing_files(artifact, tmp_path):
    _, out = artifact
    bad = _copy(out, tmp_path / "cut")
    data = (bad / RECAST_FILE).read_bytes()
    (bad / RECAST_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightgenError, match="truncated"):
        wg.load(bad)
    (bad / RECAST_FILE).unlink()
    with pytest.raises(WeightgenError, match="missing"):
        wg.load(bad)
    (bad / CONFIG_FILE).write_text("{not json")
    with pytest.raises(WeightgenError, match="corrupt JSON"):
        wg.load(bad)
    with pytest.raises(WeightgenError, match="not found"):
        wg.load(tmp_path / "nowhere")


def test_load_refuses_tensors_of_another_shape(artifact, tmp_path):
    _, out = artifact
    bad = _copy(out, tmp_path / "shape")
    state = load_file(str(bad / RECAST_FILE))
    state["layer1.0.conv1.coefficients"] = torch.zeros(3, 2)
    save_file(state, str(bad / RECAST_FILE))
    with pytest.raises(WeightgenError, match="layer1.0.conv1.coefficients"):
        wg.load(bad)


def test_non_timm_artifact_needs_the_model(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)).eval()

    model = make()
    wg.recast(model)
    out = wg.save(model, tmp_path / "mlp", {})
    with pytest.raises(WeightgenError, match="model="):
        wg.load(out)
    loaded = wg.load(out, model=make())
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))
