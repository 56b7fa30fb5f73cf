"""scripts/adapt.py and scripts/pretrain.py: a real small run, --evaluate from the files alone, bad input."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import matplotlib
import pytest
import timm
import torch

import weightgen as wg
from weightgen.cli import run_cli

from _plots import count_colour, plot_pixels

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--epochs", "1", "--steps", "0", "--img-size", "32", "--max-train", "64", "--max-eval", "32", "--batch-size", "32"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


adapt = load_script("adapt")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_cli(lambda: adapt.main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def make_backbone(path: Path, arch: str = "test_resnet", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model(arch, in_chans=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wg.recast(model)
    wg.save(model, path, wg.fit(model, state), arch=arch, model_kwargs={"in_chans": 1})
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt_cli")
    backbone = make_backbone(root / "backbone")
    out = root / "results"
    code = run_cli(lambda: adapt.main(["--backbone", str(backbone), "--tasks", "digits,mnist", "--seeds", "0",
                                       "--out", str(out), *SMALL]))
    assert code == 0
    return root, backbone, out


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_run_writes_every_output(results):
    _, _, out = results
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"results.csv", "results.md", "accuracy_matrix.csv", "accuracy_matrix.md", "adapt.png", "adapt.json",
            "tasks/digits-s0.safetensors", "tasks/mnist-s0.safetensors"} <= names
    rows = read(out / "results.csv")
    assert [(r["task"], r["seed"]) for r in rows] == [("digits", "0"), ("mnist", "0")]
    assert all(r["exact_switch"] == "True" for r in rows)
    assert all(int(r["task_file_bytes"]) == (out / r["task_file"]).stat().st_size for r in rows)
    assert all(int(r["trainable"]) < int(r["trainable_with_head"]) for r in rows)
    # the figure (10 x 4 in at 120 dpi): bars in matplotlib's first colour, each accuracy-matrix cell in viridis
    rgb = plot_pixels(out / "adapt.png", (1200, 480))
    assert count_colour(rgb, "C0") > 1000
    for value in (float(r["test_acc"]) for r in rows):  # one seed: the diagonal of the mean matrix
        assert count_colour(rgb, matplotlib.colormaps["viridis"](value)) > 1000, value


def test_evaluate_reproduces_the_test_accuracies_from_the_files_alone(results, capsys):
    _, backbone, out = results
    code, _, err = run(["--backbone", backbone, "--evaluate", out], capsys)
    assert code == 0, err
    trained = read(out / "results.csv")
    evaluated = read(out / "evaluate.csv")
    assert [(r["task"], r["method"], r["seed"], float(r["test_acc"])) for r in evaluated] == \
           [(r["task"], r["method"], r["seed"], float(r["test_acc"])) for r in trained]
    # the new file is listed in the manifest, so a later --overwrite may replace the directory
    assert "evaluate.csv" in wg.io.read_manifest(out)["files"]


def expect_error(argv, capsys, needle: str, out: Path | None = None):
    code, _, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_unknown_task_method_and_not_an_artifact(results, capsys, tmp_path):
    _, backbone, _ = results
    out = tmp_path / "o"
    expect_error(["--backbone", backbone, "--tasks", "digits,nope", "--out", out], capsys, "unknown task", out)
    expect_error(["--backbone", backbone, "--method", "magic", "--out", out], capsys, "unknown method", out)
    expect_error(["--backbone", backbone, "--method", "recast+adaptformer", "--out", out], capsys,
                 "does not apply", out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    expect_error(["--backbone", tmp_path / "notes", "--out", out], capsys, "not a weightgen artifact", out)
    expect_error(["--backbone", backbone, "--seeds", "1,x", "--out", out], capsys, "bad --seeds", out)


def test_output_not_written_by_weightgen_is_left_alone(results, capsys, tmp_path):
    _, backbone, _ = results
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    expect_error(["--backbone", backbone, "--out", out, "--overwrite", *SMALL], capsys, "not written by weightgen")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_evaluate_refuses_another_backbone(results, capsys):
    root, _, out = results
    other = make_backbone(root / "other", seed=1)
    before = sorted(p.name for p in out.iterdir())
    expect_error(["--backbone", other, "--evaluate", out], capsys, "another backbone")
    expect_error(["--backbone", other, "--evaluate", root], capsys, "not an adapt.py results directory")
    assert sorted(p.name for p in out.iterdir()) == before


def test_missing_optional_dataset_and_ctrl_c_leave_nothing(results, capsys, tmp_path, monkeypatch):
    _, backbone, _ = results
    out = tmp_path / "o"
    from weightgen.data import sources

    def not_installed(*args):
        raise sources.missing("animal-mnist", "animals")

    monkeypatch.setattr(sources, "load_animals", not_installed)
    expect_error(["--backbone", backbone, "--tasks", "digits,animals", "--out", out], capsys,
                 "pip install --no-deps animal-mnist", out)

    def interrupted(*args, **kwargs):
        (Path(args[5]) / "tasks").mkdir()  # something partial inside the temporary directory
        raise KeyboardInterrupt

    monkeypatch.setattr(adapt, "run_sequence", interrupted)  # the name the script calls
    expect_error(["--backbone", backbone, "--out", out, *SMALL], capsys, "interrupted", out)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        adapt.parse_args(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in ["--backbone", "--tasks", "--method", "--seeds", "--out", "--evaluate", "--logdir", "--epochs",
                   "--batch-size", "--lr", "--img-size", "--device", "--accelerator", "--devices", "--overwrite"]:
        assert option in text
    assert "42,1998,3142592" in text and "default: 3" in text


def test_pretrain_is_cached_and_its_input_size_reaches_adaptation(tmp_path, capsys):
    """pretrain.py's backbone -> the printed generate command's artifact -> adapt reads img_size 24 from it."""
    pretrain = load_script("pretrain")
    out = tmp_path / "src"
    argv = ["--arch", "test_resnet", "--out", str(out), "--epochs", "1", "--img-size", "24", "--max-train", "64",
            "--max-eval", "64"]
    assert run_cli(lambda: pretrain.main(argv)) == 0
    first = capsys.readouterr().out
    info = wg.io.read_json(out / "pretrain.json")
    assert info["img_size"] == 24 and info["model_kwargs"]["num_classes"] == info["source_task"]["classes"] >= 30
    assert run_cli(lambda: pretrain.main(argv)) == 0
    assert "reused" in capsys.readouterr().out and "reused" not in first
    command = next(line.strip() for line in first.splitlines() if "generate_weights.py" in line)
    assert f"--checkpoint {out / 'model.safetensors'}" in command and "in_chans=1" in command

    from weightgen.adapt.incremental import open_backbone
    from weightgen.generate import GenerateOptions, generate

    artifact, _ = generate(GenerateOptions(arch="test_resnet", checkpoint=str(out / "model.safetensors"),
                                           model_kwargs=info["model_kwargs"], out=str(tmp_path / "artifact")))
    backbone = open_backbone(artifact)
    assert (backbone.img_size, backbone.channels) == (24, 1)


def make_folder(root: Path, per_class: int = 12) -> Path:
    """Two colour classes (reddish / bluish PNGs) in class folders, 20x20."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-30, 30, (20, 20, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype("uint8"), "RGB").save(root / label / f"{i}.png")
    return root


def test_folder_bad_image_is_an_error_or_skipped_and_counted(tmp_path, capsys):
    """imagefolder: streamed, uncapped by default; a truncated image is one error line before training,
    or with --skip-bad-images dropped and counted in results.csv."""
    folder = make_folder(tmp_path / "photos")
    (folder / "red" / "broken.png").write_bytes((folder / "red" / "0.png").read_bytes()[:60])
    backbone = make_backbone(tmp_path / "bb")
    small = ["--epochs", "1", "--steps", "0", "--img-size", "16", "--batch-size", "8", "--seeds", "0"]
    out = tmp_path / "o"
    expect_error(["--backbone", backbone, "--tasks", f"imagefolder:{folder}", "--out", out, *small], capsys,
                 "broken.png", out)
    code, _, err = run(["--backbone", backbone, "--tasks", f"imagefolder:{folder}", "--out", out,
                        "--skip-bad-images", "--workers", "1", *small], capsys)
    assert code == 0, err
    row = read(out / "results.csv")[0]
    assert row["skipped_images"] == "1"
    sizes = int(row["train_images"])
    assert sizes >= 14  # 24 good images, none capped: ~70% of them train
    assert "skipped" in (out / "results.md").read_text()


def test_logdir_names_the_backbone_and_the_run(results, tmp_path, capsys):
    _, backbone, _ = results
    logdir = tmp_path / "tb"
    code, _, err = run(["--backbone", backbone, "--tasks", "digits", "--seeds", "0", "--out", tmp_path / "o",
                        "--logdir", logdir, *SMALL], capsys)
    assert code == 0, err
    from weightgen.adapt.incremental import open_backbone
    label = open_backbone(backbone, 32).label
    assert label.startswith("backbone-") and len(label) == len("backbone-") + 8
    assert (logdir / label / "recast" / "digits-s0").is_dir()


def test_max_steps_cuts_the_epoch_short(results, capsys, tmp_path):
    _, backbone, _ = results
    out = tmp_path / "capped"
    small = ["--epochs", "1", "--steps", "0", "--img-size", "32", "--max-train", "256", "--max-eval", "32",
             "--batch-size", "32", "--seeds", "0", "--tasks", "digits"]
    code, _, err = run(["--backbone", backbone, "--out", out, "--max-steps", "3", *small], capsys)
    assert code == 0, err
    assert [int(r["steps"]) for r in read(out / "results.csv")] == [3]  # an epoch would be 8 steps
    expect_error(["--backbone", backbone, "--out", tmp_path / "bad", "--max-steps", "0", *small], capsys,
                 "--max-steps must be >= 1", tmp_path / "bad")
