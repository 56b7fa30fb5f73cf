"""Task-incremental adaptation: learn tasks one after another from one backbone, each a task file.

Every task starts from the backbone (not from the previous task): its head is reset to the task's
class count, the method's parameters are trained, the task file is written. After each new task,
every earlier task file is loaded back and evaluated: the accuracy matrix (zero forgetting is
expected, since tasks share nothing trainable) and a bit-for-bit check of the logits recorded
right after that task was trained (``exact_switch``).
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..artifact import CONFIG_FILE, RECAST_FILE, REPORT_FILE, load
from ..data import MAX_EVAL, MAX_TRAIN, get_task, to_model_input
from ..io import WeightgenError, read_json
from ..models import fixed_input_size, input_size
from ..recasting import head_names, merge_and_unload
from ..tasks import load_task, save_task
from .methods import get_method, trainable_counts
from .trainer import TrainConfig, accuracy, predict, train_task

log = logging.getLogger(__name__)
DEFAULT_MAX_SIDE = 32  # a backbone with no recorded training size is adapted at most at this side
RUN_FILE = "adapt.json"  # in a results directory: what --evaluate needs to rebuild every model


@dataclass
class Backbone:
    """An artifact directory and what adaptation needs to know about it."""

    path: Path
    arch: str | None
    model_kwargs: dict
    img_size: int
    channels: int
    fingerprint: str  # sha256 of its recast.safetensors: a results directory names its backbone by it
    report: dict = field(repr=False, default_factory=dict)
    # applied to every fresh copy (e.g. extend_banks for extra templates); not recorded for --evaluate
    transform: Callable[[nn.Module], object] | None = field(repr=False, default=None)

    def model(self, recast_model: bool = True) -> nn.Module:
        """A fresh copy: the recast model, or (``recast_model=False``) its merged dense equivalent."""
        model = load(self.path)
        if self.transform is not None:
            self.transform(model)
        return model if recast_model else merge_and_unload(model)


def fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_img_size(report: dict, model_kwargs: dict) -> int | None:
    """The input side the backbone was trained at, when its artifact records it."""
    for source in (report.get("pretrain") or {}, model_kwargs):
        size = source.get("img_size")
        if isinstance(size, int):
            return size
        if isinstance(size, (list, tuple)) and size and isinstance(size[0], int):
            return size[0]
    return None


def open_backbone(path: str | Path, img_size: int | None = None) -> Backbone:
    """Check that ``path`` is an artifact directory and read its input size and channels."""
    path = Path(path)
    if not path.is_dir():
        raise WeightgenError(f"backbone directory not found: {path}")
    if not (path / CONFIG_FILE).is_file() or not (path / RECAST_FILE).is_file():
        raise WeightgenError(f"{path} is not a weightgen artifact (no {CONFIG_FILE} / {RECAST_FILE}); "
                             f"make one with scripts/generate_weights.py")
    config = read_json(path / CONFIG_FILE)
    report = read_json(path / REPORT_FILE) if (path / REPORT_FILE).is_file() else {}
    kwargs = dict(config.get("model_kwargs") or {})
    model = load(path)  # validates the artifact; reused below only for its input shape
    channels, height, _ = input_size(model)
    fixed = fixed_input_size(model)  # the one rule (weightgen.models); None: any size
    recorded = recorded_img_size(report, kwargs)
    if img_size is None:
        img_size = recorded or (height if fixed else min(height, DEFAULT_MAX_SIDE))
    elif img_size < 8:
        raise WeightgenError("img_size must be >= 8", cli="--img-size must be >= 8")
    if fixed and img_size != height:
        what = f"{path} is a {height}x{height} ViT"
        raise WeightgenError(f"{what}; img_size={img_size} does not fit it", cli=f"{what}; --img-size {img_size} does not fit it")
    return Backbone(path, config.get("arch"), kwargs, int(img_size), int(channels),
                    fingerprint(path / RECAST_FILE), report)


def task_filename(task: str, seed: int) -> str:
    """``tasks/<task>-s<seed>.safetensors``; a task name like ``imagefolder:/x/y`` is made file-safe."""
    return f"tasks/{re.sub(r'[^A-Za-z0-9_.-]+', '_', task).strip('_')}-s{seed}.safetensors"


def trainable_numbers(model: nn.Module) -> tuple[int, int]:
    """(trainable numbers without the head, with the head)."""
    counts = trainable_counts(model)
    return counts["without_head"], counts["with_head"]


def _reset_head(model: nn.Module, num_classes: int, seed: int) -> None:
    if not hasattr(model, "reset_classifier"):
        raise WeightgenError("adaptation needs a model with reset_classifier() (any timm model has one)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head's init is part of the run's seed, not the caller's RNG
        model.reset_classifier(num_classes)


def _body_state(model: nn.Module) -> dict[str, torch.Tensor]:
    heads = head_names(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.rpartition(".")[0] not in heads}


@torch.no_grad()
def _restore_body(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    for key, value in state.items():
        current[key].copy_(value)


def prepare_model(backbone: Backbone, method, num_classes: int, seed: int) -> nn.Module:
    """A fresh backbone copy with the task head and the method applied (deterministic in ``seed``)."""
    model = backbone.model(recast_model=method.needs_recast)
    method.check(model)  # before anything is changed: one clear error for a method that does not apply
    _reset_head(model, num_classes, seed)
    method.apply(model, seed=seed)  # adapter inits (LoRA A, AdaptFormer's down-projection) follow the run's seed
    return model


def check_run(backbone: Backbone, method_name: str, tasks: list[str], seeds: list[int],
              max_train: int | None = None, max_eval: int | None = None) -> None:
    """Every check that needs no training: the method exists and fits the backbone, the tasks load."""
    if not tasks:
        raise WeightgenError("no tasks given")
    if len(set(tasks)) != len(tasks):
        raise WeightgenError(f"a task is listed twice in {','.join(tasks)}")
    if not seeds:
        raise WeightgenError("no seeds given")
    method = get_method(method_name)
    method.check(backbone.model(recast_model=method.needs_recast))
    load_tasks(tasks, seeds[0], MAX_TRAIN if max_train is None else max_train,
               MAX_EVAL if max_eval is None else max_eval, backbone.img_size)


def load_tasks(names: list[str], seed: int, max_train: int | None, max_eval: int | None, img_size: int):
    return [get_task(name, seed, max_train=max_train, max_eval=max_eval, image_size=img_size) for name in names]


def model_inputs(task, backbone: Backbone) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {stage: (to_model_input(task.split(stage)[0], backbone.channels, backbone.img_size), task.split(stage)[1])
            for stage in ("train", "val", "test")}


def run_sequence(backbone: Backbone, method_name: str, tasks: list[str], seeds: list[int], config: TrainConfig,
                 out_dir: str | Path, *, device: str = "cpu", max_train: int | None = None,
                 max_eval: int | None = None) -> dict:
    """Learn ``tasks`` in order for every seed; task files go to ``out_dir/tasks/``.

    Returns ``{"rows": [...], "matrices": {seed: [[acc after task i on task j]]}, "exact_switch",
    "run": {what --evaluate needs}}``. All task names and the method are checked before training.
    """
    check_run(backbone, method_name, tasks, seeds, max_train, max_eval)
    method = get_method(method_name)
    max_train = MAX_TRAIN if max_train is None else max_train
    max_eval = MAX_EVAL if max_eval is None else max_eval
    out_dir = Path(out_dir)
    data = {seed: load_tasks(tasks, seed, max_train, max_eval, backbone.img_size) for seed in seeds}
    rows, matrices, exact = [], {}, True
    for seed in seeds:
        task_list = data[seed]
        model = prepare_model(backbone, method, task_list[0].num_classes, seed)
        start = _body_state(model)  # every task starts here, not from the previous task
        matrix: list[list[float | None]] = []
        reference: dict[int, torch.Tensor] = {}
        inputs = [model_inputs(t, backbone) for t in task_list]
        seed_rows, switch_ok = [], [True] * len(task_list)
        for i, task in enumerate(task_list):
            _restore_body(model, start)
            # the head's init depends on (seed, task), not on the task's position in the sequence
            _reset_head(model, task.num_classes, seed * 1000 + zlib.crc32(task.name.encode()) % 1000)
            trainable, trainable_head = trainable_numbers(model)
            log.info("seed %d, task %s (%d/%d): %d trainable numbers (%d with the head)",
                     seed, task.name, i + 1, len(task_list), trainable, trainable_head)
            summary = train_task(model, inputs[i]["train"], inputs[i]["val"], config, seed=seed,
                                 run_name=method_name, version=f"{Path(task_filename(task.name, seed)).stem}")
            if summary.get("rank", 0) != 0:  # another DDP process: it trains beside rank 0, which alone writes
                continue
            model.to(device)
            path = out_dir / task_filename(task.name, seed)
            nbytes = save_task(model, path, name=task.name, overwrite=False)
            reference[i] = predict(model, inputs[i]["test"][0])
            test_acc = accuracy(reference[i], inputs[i]["test"][1])
            seed_rows.append({"task": task.name, "method": method_name, "seed": seed, "val_acc": summary["val_acc"],
                         "test_acc": test_acc, "trainable": trainable, "trainable_with_head": trainable_head,
                         "task_file_bytes": nbytes, "train_seconds": summary["train_seconds"],
                         "seconds_per_step": summary["seconds_per_step"], "steps": summary["steps"],
                         "best_epoch": summary["best_epoch"], "task_file": task_filename(task.name, seed)})
            # switch back to every task so far, from its file alone
            matrix.append([None] * len(task_list))
            for j in range(i + 1):
                switch_start = time.perf_counter()
                load_task(model, out_dir / task_filename(task_list[j].name, seed))
                logits = predict(model, inputs[j]["test"][0])
                same = torch.equal(logits, reference[j])
                if not same:
                    switch_ok[j] = exact = False
                    log.warning("task %s (seed %d) does not switch back exactly: max |dlogit| %.3g", task_list[j].name,
                                seed, (logits - reference[j]).abs().max().item())
                matrix[i][j] = accuracy(logits, inputs[j]["test"][1])
                log.debug("switched to %s in %.3fs", task_list[j].name, time.perf_counter() - switch_start)
            model.to("cpu")
        for row, ok in zip(seed_rows, switch_ok):
            row["exact_switch"] = ok  # its file gave the recorded logits bit for bit after every later task
        rows += seed_rows
        matrices[seed] = matrix
    run = {"method": method_name, "tasks": list(tasks), "seeds": list(seeds), "img_size": backbone.img_size,
           "channels": backbone.channels, "backbone": str(backbone.path), "backbone_sha256": backbone.fingerprint,
           "arch": backbone.arch, "max_train": max_train, "max_eval": max_eval, "train": config.to_dict()}
    return {"rows": rows, "matrices": matrices, "exact_switch": exact, "run": run}


def evaluate_results(backbone_path: str | Path, results_dir: str | Path, device: str = "cpu") -> list[dict]:
    """Reload every task file of a results directory onto the backbone and measure test accuracy.

    Needs only the backbone and the files (``adapt.json`` says which tasks, seeds, method and input
    size; the task data is rebuilt from the seed). Refuses a results directory of another backbone.
    """
    results_dir = Path(results_dir)
    if not (results_dir / RUN_FILE).is_file():
        raise WeightgenError(f"{results_dir} is not an adapt.py results directory (no {RUN_FILE})")
    run = read_json(results_dir / RUN_FILE)
    backbone = open_backbone(backbone_path, run.get("img_size"))
    if backbone.fingerprint != run.get("backbone_sha256"):
        raise WeightgenError(f"{results_dir} was trained on another backbone ({run.get('backbone')}, "
                             f"{run.get('arch')}) than {backbone.path}; pass that backbone")
    method = get_method(run["method"])
    rows = []
    for seed in run["seeds"]:
        task_list = load_tasks(run["tasks"], seed, run["max_train"], run["max_eval"], backbone.img_size)
        model = prepare_model(backbone, method, task_list[0].num_classes, seed).to(device)
        for task in task_list:
            path = results_dir / task_filename(task.name, seed)
            if not path.is_file():
                raise WeightgenError(f"missing task file {path}")
            load_task(model, path)
            x, y = model_inputs(task, backbone)["test"]
            rows.append({"task": task.name, "method": run["method"], "seed": seed,
                         "test_acc": accuracy(predict(model, x), y)})
    return rows
