"""Tests for weightgen.zoo and scripts/build_zoo.py on one tiny spec (seconds, not minutes)."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from weightgen.cli import run_cli
from weightgen.io import WeightgenError
from weightgen.digits import digits_model_kwargs, evaluate, load_digits_data
from weightgen.zoo import (
    ZooError, ZooSpec, build_zoo, default_zoo_specs, layer_records, load_zoo_model, quick_zoo_specs,
)


ROOT = Path(__file__).resolve().parents[1]
TINY = ZooSpec(
    "tiny-resnet-s0", "resnet18",
    {**digits_model_kwargs("resnet18"), "layers": [1, 1, 1, 1], "channels": [4, 8, 8, 16]},
    seed=0, steps=4,
)


def _script():
    spec = importlib.util.spec_from_file_location("build_zoo_script", ROOT / "scripts" / "build_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("zoo")
    index = build_zoo(base / "a", [TINY], progress=False)
    return base, index


def test_build_writes_files(built):
    base, index = built
    out = base / "a"
    names = sorted(p.name for p in out.iterdir())
    assert names == [".weightgen.json", "tiny-resnet-s0.json", "tiny-resnet-s0.safetensors", "zoo.json"]
    assert [p.name for p in base.iterdir()] == ["a"]  # temp dir renamed away
    on_disk = json.loads((out / "zoo.json").read_text())
    assert on_disk == index and index["version"] == 1 and index["models"] == [TINY.model_id]
    meta = json.loads((out / "tiny-resnet-s0.json").read_text())
    for key in ("model_id", "arch", "model_kwargs", "seed", "steps", "test_accuracy", "params", "layers"):
        assert key in meta
    assert meta["model_kwargs"] == TINY.model_kwargs and 0 <= meta["test_accuracy"] <= 1
    assert index["total_params"] == meta["params"]


def test_layers_and_state_match_model(built):
    base, _ = built
    meta = json.loads((base / "a" / "tiny-resnet-s0.json").read_text())
    model = timm.create_model(meta["arch"], **meta["model_kwargs"])
    state = load_file(base / "a" / "tiny-resnet-s0.safetensors")
    model.load_state_dict(state, strict=True)
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [layer["name"] for layer in meta["layers"]] == expected
    for layer in meta["layers"]:
        assert list(state[layer["name"] + ".weight"].shape) == layer["shape"]
    depths = [layer["depth"] for layer in meta["layers"]]
    assert depths[0] == 0.0 and depths[-1] == 1.0 and depths == sorted(depths)
    assert {tuple(layer["shape"][2:]) for layer in meta["layers"]} >= {(7, 7), (3, 3), (1, 1), ()}
    # The stored accuracy is reproducible from the stored weights.
    loaded, _ = load_zoo_model(base / "a", "tiny-resnet-s0")
    assert evaluate(loaded, load_digits_data().test) == meta["test_accuracy"]


def test_same_seed_identical_bytes(built, tmp_path):
    base, _ = built
    build_zoo(tmp_path / "b", [TINY], progress=False)
    for name in ("tiny-resnet-s0.safetensors", "tiny-resnet-s0.json"):
        assert (base / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_training_leaves_the_global_rng_alone(built, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_zoo(tmp_path / "z", [TINY], progress=False)
    assert torch.equal(torch.rand(3), expected)
    base, _ = built  # and the seed alone still decides the bytes
    name = "tiny-resnet-s0.safetensors"
    assert (tmp_path / "z" / name).read_bytes() == (base / "a" / name).read_bytes()


def test_existing_dir_and_overwrite(built, tmp_path):
    out = tmp_path / "zoo"
    shutil.copytree(built[0] / "a", out)
    before = (out / "zoo.json").read_text()
    with pytest.raises(WeightgenError, match="already exists"):
        build_zoo(out, [TINY], progress=False)
    assert (out / "zoo.json").read_text() == before
    build_zoo(out, [TINY], progress=False, overwrite=True)
    assert json.loads((out / "zoo.json").read_text())["models"] == [TINY.model_id]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]  # old + temp dirs cleaned up
    # A non-empty directory weightgen did not write is never wiped, even with overwrite ...
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "zoo.json").write_text("{}")
    with pytest.raises(WeightgenError, match="not written by weightgen"):
        build_zoo(tmp_path / "mine", [TINY], progress=False, overwrite=True)
    assert (tmp_path / "mine" / "zoo.json").read_text() == "{}"
    # ... nor a zoo holding a file the user added.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(WeightgenError, match="notes.txt"):
        build_zoo(out, [TINY], progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_failure_leaves_nothing(tmp_path):
    bad = ZooSpec("bad-s0", "no_such_arch_xyz", {}, seed=0, steps=1)
    with pytest.raises(Exception):
        build_zoo(tmp_path / "zoo", [TINY, bad], progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ZooError, match="duplicate"):
        build_zoo(tmp_path / "zoo", [TINY, TINY], progress=False)


def test_script_bad_out_exits_2(tmp_path, capsys):
    main = _script().main
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert run_cli(lambda: main(["--out", str(f), "--quick"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0] and err[0].startswith("error: ")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    assert run_cli(lambda: main(["--out", str(tmp_path / "d"), "--quick", "--no-progress"])) == 2
    assert (tmp_path / "d" / "x").read_text() == "x"


def test_zoo_specs_are_valid():
    default, quick = default_zoo_specs(0), quick_zoo_specs(0)
    assert 3 <= len(quick) <= 4 and len(default) >= 10
    for specs in (default, quick):
        assert len({s.model_id for s in specs}) == len(specs)
    archs = {s.arch for s in default}
    assert not archs & {"resnet26", "resnet50"}  # benchmarks rely on these being held out
    assert default_zoo_specs(1)[0].seed == 1 and default_zoo_specs(1)[0].model_id.endswith("-s1")
    # Together the default zoo covers every layer kind the VAE must see.
    kinds = set()
    for s in default:
        with torch.device("meta"):
            model = timm.create_model(s.arch, **s.model_kwargs)
        for r in layer_records(model):
            k = tuple(r["shape"][2:])
            depthwise = r["groups"] > 1 and r["groups"] == r["shape"][0]
            kinds.add("linear" if not k else "depthwise" if depthwise else k)
    assert kinds >= {"linear", "depthwise", (1, 1), (3, 3), (7, 7)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_build_zoo_refuses_cuda_without_a_gpu(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "zoo"
    proc = subprocess.run([sys.executable, "scripts/build_zoo.py", "--quick", "--out", str(out), "--device", "cuda"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()] and "CUDA is not available" in errors[0]
    assert not out.exists()
