"""scripts/generate_weights.py end to end, in-process: outputs, determinism, options, clean failures."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import weightgen as wg
from weightgen.cli import run_cli
from weightgen.io import WeightgenError


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generate_weights.py"
OUTPUT_FILES = ["recast.safetensors", "recast_config.json", "report.json", "weights.safetensors"]
MANIFEST = ".weightgen.json"


def _load_script():
    spec = importlib.util.spec_from_file_location("generate_weights_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_weights = _load_script()


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the script's main as its __main__ block does; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run_cli(lambda: generate_weights.main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def resnet_state(num_classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """A test_resnet state dict whose residual branches matter (timm zero-inits their last BN)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits_of(state: dict, num_classes: int = 1000) -> torch.Tensor:
    model = timm.create_model("test_resnet", num_classes=num_classes).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet.safetensors"
    save_file(resnet_state(), str(path))
    return path


@pytest.fixture(scope="module")
def two_runs(checkpoint, tmp_path_factory):
    """The same command twice, into two output directories."""
    root = tmp_path_factory.mktemp("runs")
    results = []
    for name in ("first", "second"):
        out = root / name
        code = run_cli(lambda: generate_weights.main(
            ["--arch", "test_resnet", "--checkpoint", str(checkpoint), "--out", str(out)]))
        results.append((code, out))
    return results


# ---------------------------------------------------------------- success


def test_generate_writes_the_artifact(two_runs):
    code, out = two_runs[0]
    assert code == 0
    assert sorted(os.listdir(out)) == [MANIFEST] + OUTPUT_FILES
    config = json.loads((out / "recast_config.json").read_text())
    assert config["arch"] == "test_resnet" and config["recast"]["preset"] == "recast-conv"
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "closed_form" and report["source"] == "checkpoint"
    assert report["min_cosine"] > 0.99999
    assert report["function"]["top1_agreement"] == 1.0
    assert len(report["layers"]) == 9
    assert report["seconds_total"] >= report["seconds"]  # the whole run, the fit included, is in the file


def test_dense_weights_reproduce_the_original_logits(two_runs, checkpoint):
    _, out = two_runs[0]
    original = logits_of(load_file(str(checkpoint)))
    generated = logits_of(load_file(str(out / "weights.safetensors")))  # strict load inside
    assert (original.argmax(-1) == generated.argmax(-1)).all()
    torch.testing.assert_close(generated, original, atol=1e-4, rtol=1e-4)
    # and the recast artifact itself loads and agrees
    model = wg.load(out)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), original, atol=1e-4, rtol=1e-4)


def test_same_command_twice_is_byte_identical(two_runs):
    (code_a, a), (code_b, b) = two_runs
    assert code_a == code_b == 0
    for name in ("recast.safetensors", "weights.safetensors", "recast_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_prints_a_summary(checkpoint, tmp_path, capsys):
    code, out, err = cli(["--arch", "test_resnet", "--checkpoint", checkpoint, "--out", tmp_path / "o",
                          "--templates", "1"], capsys)
    assert code == 0, err
    assert "total: 9 layers" in out and f"wrote {tmp_path / 'o'}" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["min_cosine"] < 0.999  # one template per bank really compresses
    assert "compressed fit: 2 of 7 banks have fewer templates (1) than layers" in out
    for name in OUTPUT_FILES:  # where the files are
        assert f"  {name} " in out
    assert "--method closed_form+gradient" in out and "tensorboard --logdir" in out


def test_exact_fit_is_explained(two_runs, checkpoint, tmp_path, capsys):
    code, out, err = cli(["--arch", "test_resnet", "--checkpoint", checkpoint, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "mean cos 1.000000" in out and "exact fit" in out and "by construction" in out
    assert f"--templates 1 --out {tmp_path / 'o'}-t1" in out  # the next run does not collide with this one


def test_preset_template_ratio_is_a_compressed_fit(tmp_path, capsys):
    """recast-resnet fits half as many templates as layers: the summary must not claim an exact fit."""
    kwargs = {"channels": [8, 8, 16, 16], "num_classes": 10}  # resnet18 layout, narrow
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", **kwargs).state_dict(), str(tmp_path / "r18.safetensors"))
    code, out, err = cli(["--arch", "resnet18", "--checkpoint", tmp_path / "r18.safetensors", "--model-kwargs",
                          "channels=[8,8,16,16]", "num_classes=10", "--preset", "recast-resnet",
                          "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    layers = {g: sum(r["group"] == g for r in report["layers"]) for g in report["templates_per_bank"]}
    assert layers and all(report["templates_per_bank"][g] == -(-n // 2) < n for g, n in layers.items())
    assert "exact fit" not in out
    assert f"compressed fit: {len(report['templates_per_bank'])} of {len(report['templates_per_bank'])} banks" in out
    assert report["seconds_total"] > 0  # set before report.json is written


# ---------------------------------------------------------------- first-hour details


def test_default_output_name_includes_the_source():
    from weightgen.generate import GenerateOptions

    names = {GenerateOptions(arch="resnet50").output_dir().name,
             GenerateOptions(arch="resnet50", pretrained=True).output_dir().name,
             GenerateOptions(arch="resnet50", checkpoint="dl/r50_tuned.pth").output_dir().name}
    assert names == {"resnet50-prior-closed_form-s0", "resnet50-pretrained-closed_form-s0",
                     "resnet50-r50_tuned-closed_form-s0"}


def test_input_errors_come_before_already_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "outputs" / "resnet5-missing-closed_form-s0"
    taken.mkdir(parents=True)
    (taken / "x").write_text("x")
    code, _, err = cli(["--arch", "resnet5", "--checkpoint", "missing.safetensors"], capsys)
    assert code == 2 and "unknown architecture" in err
    code, _, err = cli(["--arch", "test_resnet", "--checkpoint", "missing.safetensors",
                        "--out", taken], capsys)
    assert code == 2 and "checkpoint not found" in err


def test_pretrained_without_network_fails_fast_in_one_sentence(tmp_path, monkeypatch, capsys):
    import time

    import huggingface_hub.constants

    import weightgen.models

    monkeypatch.setattr(weightgen.models, "reachable", lambda host, timeout=3.0: False)  # no network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    start = time.perf_counter()
    code, out, err = cli(["--arch", "test_resnet", "--pretrained", "--out", tmp_path / "o"], capsys)
    assert time.perf_counter() - start < 10  # was 51 s of retries
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: could not fetch pretrained weights for test_resnet: huggingface.co")
    assert lines[0].endswith("(--checkpoint FILE).")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline mode was for that call only
    assert not (tmp_path / "o").exists()


def test_head_mismatch_names_both_shapes_and_hints_num_classes(tmp_path, capsys):
    path = tmp_path / "ten.safetensors"
    save_file(resnet_state(num_classes=10), str(path))
    code, _, err = cli(["--arch", "test_resnet", "--checkpoint", path, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "fc.weight checkpoint (10, 96) vs model (1000, 96)" in err
    assert "pass --model-kwargs num_classes=10" in err
    code, _, err = cli(["--arch", "test_resnet", "--checkpoint", path, "--out", tmp_path / "o",
                        "--model-kwargs", "num_classes=10"], capsys)
    assert code == 0, err
    from weightgen.models import load_into

    with pytest.raises(wg.io.WeightgenError, match=r"pass model_kwargs=\{'num_classes': 10\}"):
        load_into(timm.create_model("test_resnet"), resnet_state(num_classes=10), "checkpoint")


def test_model_kwargs(tmp_path, capsys):
    ckpt = tmp_path / "five.pt"
    state = resnet_state(num_classes=5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    out = tmp_path / "o"
    code, _, err = cli(["--arch", "test_resnet", "--model-kwargs", "num_classes=5", "--checkpoint", ckpt,
                        "--out", out], capsys)
    assert code == 0, err
    weights = load_file(str(out / "weights.safetensors"))
    assert weights["fc.weight"].shape == (5, 96)
    torch.testing.assert_close(logits_of(weights, 5), logits_of(state, 5), atol=1e-4, rtol=1e-4)
    config = json.loads((out / "recast_config.json").read_text())
    assert config["model_kwargs"] == {"num_classes": 5}
    assert wg.load(out).fc.out_features == 5


def test_closed_form_plus_gradient(checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = cli(["--arch", "test_resnet", "--checkpoint", checkpoint, "--out", out,
                        "--method", "closed_form+gradient", "--steps", "5", "--templates", "1"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    code, _, err = cli(["--arch", "test_resnet", "--checkpoint", checkpoint, "--out", tmp_path / "cf",
                        "--templates", "1"], capsys)
    assert code == 0, err
    closed = json.loads((tmp_path / "cf" / "report.json").read_text())
    assert report["method"] == "closed_form+gradient" and closed["method"] == "closed_form"
    history = report["loss_history"]
    assert len(history) == 6
    # the descent starts at the closed-form fit (its loss is 1 - mean cosine) and keeps the best state seen,
    # so its mean cosine never ends below the closed-form one (with one template that fit is already the
    # optimum); single layers may trade a little (min cosine -3e-5 with ATEN_CPU_CAPABILITY=default)
    assert history[0] == pytest.approx(1 - closed["mean_cosine"], abs=1e-5)
    assert report["mean_cosine"] >= closed["mean_cosine"] - 1e-6


def test_logdir_writes_tensorboard_events(checkpoint, tmp_path, capsys):
    logdir = tmp_path / "tb"
    code, _, err = cli(["--arch", "test_resnet", "--checkpoint", checkpoint, "--out", tmp_path / "o",
                        "--logdir", logdir], capsys)
    assert code == 0, err
    events = list(logdir.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 100 for e in events)


def test_overwrite_replaces_an_existing_output(two_runs, checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(two_runs[0][1], out)
    (out / "report.json").write_text("{}")  # a file weightgen wrote, edited: still replaced
    code, _, err = cli(["--arch", "test_resnet", "--checkpoint", checkpoint, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == [MANIFEST] + OUTPUT_FILES
    assert json.loads((out / "report.json").read_text())["mean_cosine"] > 0.999
    assert os.listdir(tmp_path) == ["o"]


# ---------------------------------------------------------------- failures


def _assert_clean_failure(code: int, err: str, out_parent: Path) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert not out_parent.exists() or os.listdir(out_parent) == [], "left output or temp directories behind"
    return lines[0]


@pytest.fixture
def bad_files(tmp_path):
    vit_ckpt = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(vit_ckpt))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + os.urandom(64))
    nan = tmp_path / "nan.pt"
    state = resnet_state()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, nan)
    return {"vit": vit_ckpt, "corrupt": corrupt, "nan": nan, "missing": tmp_path / "missing.safetensors"}


@pytest.mark.parametrize("case, expect", [
    ("unknown_arch", ["unknown architecture", "resnet5", "did you mean", "resnet50"]),
    ("other_arch", ["does not fit", "missing", "unexpected", "conv1.0.weight", "blocks.0"]),
    ("missing", ["not found", "missing.safetensors"]),
    ("corrupt", ["corrupt", "corrupt.safetensors"]),
    ("nan", ["non-finite", "layer1.0.conv1.weight"]),
    ("no_match", ["matched no layer", "nothing_here", "conv1.0"]),
    ("steps_closed_form", ["--steps", "closed_form+gradient"]),
    ("bad_kwargs", ["model-kwargs", "num_classes"]),
    ("bad_regex", ["invalid module pattern"]),
    ("bad_kwarg_value", ["model-kwargs", "test_resnet", "nope"]),
    ("bad_kwarg_assert", ["model-kwargs", "test_resnet", "AssertionError"]),
    ("zero_lr", ["--lr"]),
    ("zero_templates", ["templates"]),
])
def test_bad_inputs_fail_cleanly(case, expect, checkpoint, bad_files, tmp_path, capsys):
    out = tmp_path / "outs" / "run"
    argv = {
        "unknown_arch": ["--arch", "resnet5", "--checkpoint", checkpoint],
        "other_arch": ["--arch", "test_resnet", "--checkpoint", bad_files["vit"]],
        "missing": ["--arch", "test_resnet", "--checkpoint", bad_files["missing"]],
        "corrupt": ["--arch", "test_resnet", "--checkpoint", bad_files["corrupt"]],
        "nan": ["--arch", "test_resnet", "--checkpoint", bad_files["nan"]],
        "no_match": ["--arch", "test_resnet", "--checkpoint", checkpoint, "--target", r"nothing_here\d"],
        "steps_closed_form": ["--arch", "test_resnet", "--checkpoint", checkpoint, "--steps", "10"],
        "bad_kwargs": ["--arch", "test_resnet", "--checkpoint", checkpoint, "--model-kwargs", "num_classes"],
        "bad_regex": ["--arch", "test_resnet", "--checkpoint", checkpoint, "--target", "(unclosed"],
        "bad_kwarg_value": ["--arch", "test_resnet", "--checkpoint", checkpoint, "--model-kwargs", "act_layer=nope"],
        "bad_kwarg_assert": ["--arch", "test_resnet", "--checkpoint", checkpoint, "--model-kwargs", "output_stride=7"],
        "zero_lr": ["--arch", "test_resnet", "--checkpoint", checkpoint, "--method", "gradient", "--lr", "0"],
        "zero_templates": ["--arch", "test_resnet", "--checkpoint", checkpoint, "--templates", "0"],
    }[case]
    code, _, err = cli(argv + ["--out", out], capsys)
    line = _assert_clean_failure(code, err, out.parent)
    for fragment in expect:
        assert fragment in line, (fragment, line)


def test_existing_out_without_overwrite_is_untouched(checkpoint, tmp_path, capsys):
    out = tmp_path / "outs" / "run"
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(["--arch", "test_resnet", "--checkpoint", checkpoint, "--out", out] + extra, capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert "not written by weightgen" in err
        assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep"
        assert os.listdir(out.parent) == ["run"]


@pytest.mark.parametrize("extra", [["--preset", "all", "--target", "fc"], ["--pretrained"]])
def test_argparse_conflicts_exit_2(extra, checkpoint, tmp_path, capsys):
    out = tmp_path / "outs" / "run"
    with pytest.raises(SystemExit) as info:
        cli(["--arch", "test_resnet", "--checkpoint", checkpoint, "--out", out] + extra, capsys)
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    assert not out.parent.exists()


def test_run_cli_prints_one_line_even_for_a_multiline_message(capsys):
    def fails():
        raise wg.io.WeightgenError("first\nsecond", cli="first\n  second --flag")

    assert run_cli(fails) == 2
    assert capsys.readouterr().err == "error: first second --flag\n"


def test_suggested_next_commands_carry_the_run_s_model_kwargs_and_preset():
    import shlex

    from _scripts import load_script

    script = load_script("scripts/generate_weights.py")
    args = script.parse_args(["--arch", "resnet34", "--checkpoint", "b/model.safetensors", "--model-kwargs",
                              "channels=[16,32,64,128]", "in_chans=1", "--preset", "recast-resnet"])
    lines = [line for line in script.next_steps(args, "outputs/r34").splitlines() if "generate_weights.py" in line]
    argv = shlex.split(lines[0].split(":  ", 1)[1])
    reparsed = script.parse_args(argv[2:])  # the suggestion is a command the script accepts as is
    assert reparsed.model_kwargs == ["channels=[16,32,64,128]", "in_chans=1"]
    assert reparsed.preset == "recast-resnet" and reparsed.templates == 1


def test_user_errors_turns_a_core_value_error_into_one_user_error():
    from weightgen.cli import user_errors

    with pytest.raises(WeightgenError, match="unknown preset 'nope'") as info:
        with user_errors(cli="pass --preset NAME"):
            wg.preset_config("nope")
    assert info.value.cli == "pass --preset NAME" and info.value.__cause__ is None
    own = WeightgenError("as it was", cli="--flag")
    with pytest.raises(WeightgenError) as info:
        with user_errors(cli="ignored"):
            raise own
    assert info.value is own  # a user error passes through untouched
    with pytest.raises(TypeError):
        with user_errors():
            raise TypeError("a bug stays a bug")


@pytest.mark.parametrize("script", ["scripts/generate_weights.py", "scripts/reconstruct.py"])
@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_scripts_let_idle_openmp_threads_sleep(script, preset):
    """The two decoding scripts set OMP_WAIT_POLICY=PASSIVE before torch loads (spinning OpenMP threads made two
    threads 3.6x slower than one on a busy machine: docs/bench_generate_speed.md), and leave a user's own setting alone."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": preset} if preset else {})
    code = ("import os, runpy, sys\n"  # what OMP_WAIT_POLICY is when torch is first looked for
            "seen = []\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' and not seen:\n"
            "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "sys.meta_path.insert(0, Hook())\n"
            "runpy.run_path(sys.argv[1], run_name='x')\n"
            "print(seen[0], os.environ.get('OMP_WAIT_POLICY'))\n")
    out = subprocess.run([sys.executable, "-c", code, script], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.split()
    assert out == [preset or "PASSIVE"] * 2


def test_keep_freed_memory_applies_on_glibc():
    import platform

    from weightgen.cli import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    assert keep_freed_memory() is True
