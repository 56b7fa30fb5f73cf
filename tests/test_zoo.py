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
from weightgen.classifier import evaluate
from weightgen.io import WeightgenError
from weightgen.models import small_input_kwargs as digits_model_kwargs
from weightgen.zoo import (
    FIELD_TASKS, PRESETS, ZooError, ZooSpec, build_zoo, default_zoo_specs, field_zoo_specs, layer_records,
    load_zoo_model, quick_zoo_specs, zoo_data,
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
    assert evaluate(loaded, zoo_data(None).test) == meta["test_accuracy"]


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
    # timm's own error, raised after the first model was trained into the temporary directory
    with pytest.raises(RuntimeError, match=r"Unknown model \(no_such_arch_xyz\)"):
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


# ---- the field preset -------------------------------------------------------------------------

def test_field_specs_span_the_field():
    specs = field_zoo_specs(0)
    assert PRESETS["field"] is field_zoo_specs
    assert len(specs) >= 64  # final models; each also has checkpoints
    families = {s.family for s in specs}
    assert len(families) >= 8 and None not in families
    tasks = {s.task for s in specs}
    assert len(tasks) >= 3 and tasks <= set(FIELD_TASKS) and "fashion" not in tasks
    held = [s for s in specs if s.split == "heldout"]
    assert len(held) >= 8 and len({s.family for s in held}) >= 4
    assert {s.split for s in specs} == {"train", "heldout"}
    ids = [i for s in specs for i in s.entry_ids()]
    assert len(ids) == len(set(ids)) == 3 * len(specs)
    train_runs = {(s.arch, json.dumps(s.model_kwargs, sort_keys=True), s.task, s.seed)
                  for s in specs if s.split == "train"}
    train_configs = {r[:2] for r in train_runs}
    for s in specs:
        assert len(s.checkpoints) == 2 and 0 < s.checkpoints[0] < s.checkpoints[1] < s.steps
        assert s.model_kwargs["in_chans"] == 1 and s.model_kwargs["num_classes"] == 10
        assert 150 <= s.steps <= 400 and s.batch_size == 64
    for s in held:  # a new seed of an architecture the zoo trains on, never a trained run itself
        key = (s.arch, json.dumps(s.model_kwargs, sort_keys=True))
        assert key in train_configs and key + (s.task, s.seed) not in train_runs
    archs = {s.arch for s in specs}
    # benchmarks elsewhere initialise these and rely on them being absent from the zoo
    assert not archs & {"resnet34", "resnet50", "efficientnet_b0", "deit_tiny_patch16_224", "convnext_atto",
                        "convnext_nano", "mobilenetv3_large_100", "regnety_002", "ghostnet_100", "mobilevit_xxs"}
    assert field_zoo_specs(3)[0].seed == 3 and field_zoo_specs(3)[0].model_id.endswith("-s3")


def test_field_archs_build_and_run_at_32px():
    seen = {}
    for s in field_zoo_specs(0):  # one per distinct config (17); a forward pass of two images each
        seen.setdefault((s.arch, json.dumps(s.model_kwargs, sort_keys=True)), s)
    assert len({s.family for s in seen.values()}) >= 8
    x = torch.randn(2, 1, 32, 32)
    for s in seen.values():
        model = timm.create_model(s.arch, **s.model_kwargs).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 10), s.model_id
        assert layer_records(model)


def _tiny_field_specs():
    kw = {**digits_model_kwargs("resnet18"), "layers": [1, 1, 1, 1], "channels": [4, 8, 8, 16]}
    vit = {**digits_model_kwargs("vit_tiny_patch16_224"), "embed_dim": 16, "depth": 1, "num_heads": 2,
           "global_pool": "avg"}
    return [
        ZooSpec("r-mnist-s0", "resnet18", kw, 0, 6, task="mnist", split="train", family="resnet",
                checkpoints=(2, 4)),
        ZooSpec("v-greek-s1", "vit_tiny_patch16_224", vit, 1, 6, 2e-3, task="greek", split="heldout",
                family="vit", checkpoints=(3,)),
        ZooSpec("r-digits-s1", "resnet18", kw, 1, 4, task="digits", split="train", family="resnet"),
    ]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each worker runs with: the bytes then match
    yield
    torch.set_num_threads(threads)


def test_jobs_give_identical_files_and_checkpoints(tmp_path, one_thread):
    specs = _tiny_field_specs()
    one = build_zoo(tmp_path / "j1", specs, progress=False, jobs=1)
    two = build_zoo(tmp_path / "j2", specs, progress=False, jobs=2)
    names = sorted(p.name for p in (tmp_path / "j1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "j2").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) == 6  # 3 finals + 3 checkpoints
    for name in names:
        if name != "zoo.json":  # it records timings
            assert (tmp_path / "j1" / name).read_bytes() == (tmp_path / "j2" / name).read_bytes(), name
    assert one["models"] == two["models"] == [
        "r-mnist-s0", "r-mnist-s0-t1", "r-mnist-s0-t2", "v-greek-s1", "v-greek-s1-t1", "r-digits-s1"]
    assert two["jobs"] == 2 and one["jobs"] == 1
    ckpt = json.loads((tmp_path / "j1" / "r-mnist-s0-t2.json").read_text())
    assert ckpt["checkpoint_of"] == "r-mnist-s0" and ckpt["step"] == 4 and ckpt["task"] == "mnist"
    assert ckpt["split"] == "train" and ckpt["family"] == "resnet" and ckpt["layers"]
    held = json.loads((tmp_path / "j1" / "v-greek-s1-t1.json").read_text())
    assert held["split"] == "heldout" and held["checkpoint_of"] == "v-greek-s1" and held["step"] == 3
    final = json.loads((tmp_path / "j1" / "r-mnist-s0.json").read_text())
    assert "checkpoint_of" not in final and final["task"] == "mnist" and final["split"] == "train"
    # a checkpoint is the weights of that step, not of the end
    a = load_file(tmp_path / "j1" / "r-mnist-s0-t1.safetensors")
    b = load_file(tmp_path / "j1" / "r-mnist-s0.safetensors")
    assert not torch.equal(a["fc.weight"], b["fc.weight"])
    # vae.data.list_zoo reads every entry, checkpoints included
    from weightgen.vae.data import list_zoo
    assert sorted(m["model_id"] for m in list_zoo(tmp_path / "j2")) == sorted(one["models"])


def test_checkpoints_leave_the_final_model_alone(tmp_path, one_thread):
    import dataclasses

    spec = _tiny_field_specs()[0]
    build_zoo(tmp_path / "with", [spec], progress=False)
    build_zoo(tmp_path / "without", [dataclasses.replace(spec, checkpoints=())], progress=False)
    name = "r-mnist-s0.safetensors"
    assert (tmp_path / "with" / name).read_bytes() == (tmp_path / "without" / name).read_bytes()
    assert not (tmp_path / "without" / "r-mnist-s0-t1.json").exists()


def test_default_zoo_json_has_no_field_keys(built):
    meta = json.loads((built[0] / "a" / "tiny-resnet-s0.json").read_text())
    assert not set(meta) & {"task", "split", "family", "checkpoint_of", "step"}


def test_bad_field_specs_and_flags(tmp_path, capsys):
    spec = _tiny_field_specs()[0]
    import dataclasses

    for bad, msg in ((dataclasses.replace(spec, checkpoints=(4, 2)), "checkpoints"),
                     (dataclasses.replace(spec, checkpoints=(6,)), "checkpoints"),
                     (dataclasses.replace(spec, split="test"), "split")):
        with pytest.raises(ZooError, match=msg):
            build_zoo(tmp_path / "z", [bad], progress=False)
    # a final id that collides with another spec's checkpoint id
    clash = dataclasses.replace(_tiny_field_specs()[2], model_id="r-mnist-s0-t1")
    with pytest.raises(ZooError, match="duplicate"):
        build_zoo(tmp_path / "z", [spec, clash], progress=False)
    with pytest.raises(ZooError, match="jobs"):
        build_zoo(tmp_path / "z", [spec], progress=False, jobs=0)
    main = _script().main
    for argv, msg in ((["--quick", "--preset", "field"], "contradicts"), (["--quick", "--jobs", "0"], "jobs")):
        assert run_cli(lambda: main(["--out", str(tmp_path / "z"), "--no-progress"] + argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0]
    assert not (tmp_path / "z").exists()
