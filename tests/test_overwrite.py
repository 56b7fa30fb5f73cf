"""--overwrite / overwrite=True replaces only what weightgen wrote, for every writer.

A folder weightgen did not write (no manifest), a user's file added to a weightgen folder, the
current directory and a file that is not a weightgen task file are refused with one error line
(exit 2 from a script) and left untouched.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import weightgen as wg
from _scripts import ROOT, load_script
from weightgen.cli import run_cli
from weightgen.io import (
    MANIFEST_FILE, WeightgenError, add_output_file, atomic_directory, atomic_file, check_output_dir, read_manifest,
)
from weightgen.tasks import TASK_FORMAT


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    return path


def untouched(path: Path) -> bool:
    return sorted(os.listdir(path)) == ["notes.txt"] and (path / "notes.txt").read_text() == "my notes"


def weightgen_folder(path: Path, kind: str = "test") -> Path:
    with atomic_directory(path, kind=kind) as tmp:
        (tmp / "result.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "deep.bin").write_bytes(b"1")
    return path


# ---------------------------------------------------------------- the rules, on io directly


def test_manifest_lists_every_file_written(tmp_path):
    out = weightgen_folder(tmp_path / "run")
    manifest = read_manifest(out)
    assert manifest["files"] == ["result.json", "sub/deep.bin"]
    assert manifest["kind"] == "test" and manifest["format"] == "weightgen-output/1"
    assert manifest["weightgen_version"] == wg.__version__


def test_a_folder_weightgen_did_not_write_is_never_replaced(tmp_path):
    out = user_folder(tmp_path / "mine")
    for overwrite in (False, True):
        with pytest.raises(WeightgenError, match="not written by weightgen"):
            with atomic_directory(out, overwrite=overwrite):
                pytest.fail("must not be entered")
        assert untouched(out)
    # a manifest that is not weightgen's (or not JSON) does not count
    (out / MANIFEST_FILE).write_text("not json")
    with pytest.raises(WeightgenError, match="not written by weightgen"):
        check_output_dir(out, overwrite=True)


@pytest.mark.parametrize("extra, named", [("notes.txt", "notes.txt"), ("sub/mine.txt", "sub/mine.txt"),
                                          ("mydir/a.txt", "mydir/")])
def test_a_user_file_inside_a_weightgen_folder_blocks_overwrite(tmp_path, extra, named):
    out = weightgen_folder(tmp_path / "run")
    (out / extra).parent.mkdir(exist_ok=True)
    (out / extra).write_text("mine")
    with pytest.raises(WeightgenError, match=named.replace(".", r"\.")):
        with atomic_directory(out, overwrite=True, kind="test"):
            pytest.fail("must not be entered")
    assert (out / extra).read_text() == "mine" and (out / "result.json").exists()


def test_overwrite_of_another_kind_is_refused(tmp_path):
    out = weightgen_folder(tmp_path / "run", kind="zoo")
    with pytest.raises(WeightgenError, match="holds a weightgen zoo, not a vae"):
        check_output_dir(out, overwrite=True, kind="vae")
    check_output_dir(out, overwrite=True, kind="zoo")
    check_output_dir(out, overwrite=True)  # no kind asked: any weightgen folder


def test_a_weightgen_folder_is_replaced_even_if_files_went_missing(tmp_path):
    out = weightgen_folder(tmp_path / "run")
    (out / "result.json").unlink()
    with atomic_directory(out, overwrite=True, kind="test") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == [MANIFEST_FILE, "new.txt"]


def test_an_empty_directory_is_used_and_permissions_are_normal(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    old = os.umask(0o022)
    try:
        with atomic_directory(out, kind="test") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors writes 0600
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((out / "w.safetensors").stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["empty"]


@pytest.mark.parametrize("target", [".", "..", "sub/.."])
def test_the_current_directory_and_its_parents_are_refused(tmp_path, monkeypatch, target):
    here = weightgen_folder(tmp_path / "work" / "run")  # even a weightgen folder
    (here / "sub").mkdir(exist_ok=True)
    monkeypatch.chdir(here)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(WeightgenError, match="current directory"):
        with atomic_directory(target, overwrite=True, kind="test"):
            pytest.fail("must not be entered")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_symlink_is_refused(tmp_path):
    real = weightgen_folder(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(WeightgenError, match="symbolic link"):
        check_output_dir(tmp_path / "link", overwrite=True)


def test_api_error_names_overwrite_true_and_the_cli_names_the_flag(tmp_path):
    out = weightgen_folder(tmp_path / "run")
    with pytest.raises(WeightgenError) as info:
        check_output_dir(out)
    assert "overwrite=True" in str(info.value) and "--overwrite" not in str(info.value)
    assert "--overwrite" in info.value.cli


def test_add_output_file_writes_into_weightgen_folders_only(tmp_path):
    out = weightgen_folder(tmp_path / "run")
    add_output_file(out, "extra.csv", "a,b\n")
    assert (out / "extra.csv").read_text() == "a,b\n"
    assert read_manifest(out)["files"] == ["extra.csv", "result.json", "sub/deep.bin"]
    add_output_file(out, "extra.csv", b"c\n", kind="test")  # its own file: replaced
    assert (out / "extra.csv").read_text() == "c\n"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(WeightgenError, match="weightgen did not write it"):
        add_output_file(out, "notes.txt", "x")
    with pytest.raises(WeightgenError, match="not a zoo"):
        add_output_file(out, "more.csv", "x", kind="zoo")
    mine = user_folder(tmp_path / "mine")
    with pytest.raises(WeightgenError, match="not written by weightgen"):
        add_output_file(mine, "extra.csv", "x")
    assert untouched(mine) and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    (out / "notes.txt").unlink()
    with atomic_directory(out, overwrite=True, kind="test"):  # listed, so overwrite may replace it
        pass
    assert os.listdir(out) == [MANIFEST_FILE]


# ---------------------------------------------------------------- single files (task files)


def test_atomic_file_replaces_only_its_own_format(tmp_path):
    path = tmp_path / "t.safetensors"
    with atomic_file(path, owned_format="fmt/1") as tmp:
        save_file({"w": torch.zeros(1)}, str(tmp), metadata={"format": "fmt/1"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    with pytest.raises(WeightgenError, match="already exists; pass overwrite=True"):
        with atomic_file(path, owned_format="fmt/1"):
            pytest.fail("must not be entered")
    with pytest.raises(WeightgenError, match="not a fmt/2 file"):
        with atomic_file(path, overwrite=True, owned_format="fmt/2"):
            pytest.fail("must not be entered")
    with pytest.raises(ValueError, match="does not carry format"):  # the writer forgot the marker
        with atomic_file(path, overwrite=True, owned_format="fmt/1") as tmp:
            save_file({"w": torch.ones(1)}, str(tmp))
    assert os.listdir(tmp_path) == ["t.safetensors"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def recast_model():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    wg.recast(model)
    return model


@pytest.mark.parametrize("content", ["text", "checkpoint"])
def test_save_task_never_replaces_a_file_that_is_not_a_task(recast_model, tmp_path, content):
    path = tmp_path / "task.safetensors"
    if content == "text":
        path.write_text("my notes")
    else:
        save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    before = path.read_bytes()
    with pytest.raises(WeightgenError, match=f"not a {TASK_FORMAT} file"):
        wg.save_task(recast_model, path, overwrite=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["task.safetensors"]


def test_save_task_replaces_a_task_file(recast_model, tmp_path):
    path = tmp_path / "task.safetensors"
    wg.save_task(recast_model, path, name="a")
    wg.save_task(recast_model, path, name="b", overwrite=True)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == TASK_FORMAT and meta["task"] == "b"


# ---------------------------------------------------------------- every script, in-process


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    return path


def _script_argv(script: str, out: Path, checkpoint: Path, tmp_path: Path) -> list[str]:
    zoo = tmp_path / "zoo"
    return {
        "generate_weights": ["--arch", "test_resnet", "--checkpoint", checkpoint],
        "build_zoo": ["--quick", "--no-progress"],
        "train_vae": ["--zoo", zoo],
        "interpolate": ["--arch", "test_resnet", "--a", checkpoint, "--b", checkpoint, "--steps", "3"],
        "pretrain": ["--arch", "test_resnet", "--epochs", "1", "--max-train", "64", "--max-eval", "32"],
    }[script] + ["--out", out, "--overwrite"]


SCRIPTS = ["generate_weights", "build_zoo", "train_vae", "interpolate", "pretrain"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_overwrite_keeps_a_user_folder(script, checkpoint, tmp_path, capsys):
    out = user_folder(tmp_path / "mine")
    main = load_script(f"scripts/{script}.py").main
    argv = [str(a) for a in _script_argv(script, out, checkpoint, tmp_path)]
    capsys.readouterr()
    assert run_cli(lambda: main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not written by weightgen" in err[0], err
    assert untouched(out)
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temp directories either


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_refuses_the_current_directory(script, checkpoint, tmp_path, monkeypatch, capsys):
    here = user_folder(tmp_path / "here")
    monkeypatch.chdir(here)
    main = load_script(f"scripts/{script}.py").main
    argv = [str(a) for a in _script_argv(script, Path("."), checkpoint, tmp_path)]
    capsys.readouterr()
    assert run_cli(lambda: main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert untouched(here)


def test_generate_weights_subprocess_exit_2_one_line_user_file_kept(checkpoint, tmp_path):
    out = user_folder(tmp_path / "mine")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_weights.py"), "--arch", "test_resnet",
                           "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not written by weightgen" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert untouched(out)


def test_generate_weights_overwrite_of_its_own_output_names_the_flag(checkpoint, tmp_path, capsys):
    main = load_script("scripts/generate_weights.py").main
    argv = ["--arch", "test_resnet", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "run")]
    assert run_cli(lambda: main(argv)) == 0
    capsys.readouterr()
    assert run_cli(lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and "overwrite=True" not in err
    manifest = json.loads((tmp_path / "run" / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "artifact"
    assert manifest["files"] == ["recast.safetensors", "recast_config.json", "report.json", "weights.safetensors"]
    assert run_cli(lambda: main(argv + ["--overwrite"])) == 0
