"""Task-incremental adaptation: learn tasks one after another from one backbone, each a task file.

Every task starts from the backbone (not from the previous task): its head is reset to the task's
class count, the method's parameters are trained, the task file is written. After each new task,
every earlier task file is loaded back and evaluated: the accuracy matrix (zero forgetting is
expected, since tasks share nothing trainable) and a bit-for-bit check of the logits recorded
right after that task was trained (``exact_switch``).

Every task, built-in or a user's ``imagefolder:``/``csv:`` data, goes through one pipeline
(:mod:`weightgen.data.images`): the backbone's own input size and normalisation, timm transforms,
DataLoaders. Evaluation transforms are deterministic, so a task file reproduces its logits exactly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..artifact import CONFIG_FILE, RECAST_FILE, REPORT_FILE, load
from ..bank import BANKS_ATTR, banks_of
from ..data import MAX_EVAL, MAX_TRAIN
from ..data.images import AUGMENTS, ImageConfig, image_config, make_loader, open_task
from ..io import WeightgenError, read_json
from ..models import fixed_input_size
from ..recasting import head_names, merge_and_unload
from ..tasks import load_task, save_task
from .methods import get_method, trainable_counts
from .trainer import TrainConfig, train_task

log = logging.getLogger(__name__)
RUN_FILE = "adapt.json"  # in a results directory: what --evaluate needs to rebuild every model
USER_DATA = ("imagefolder:", "csv:")  # a user's data: no caps unless asked
# pretrain.py before it recorded its normalisation fed inputs as (x - 0.5) / 0.5
LEGACY_PRETRAIN_NORM = (0.5, 0.5)

# Per-method defaults, chosen on the validation splits of built-in tasks (latin, mnist; 300 training
# images, a 150-step budget) by benchmarks/bench_adapt_defaults.py -> docs/adapt_defaults.md: the lr
# with the best mean validation accuracy, on banks of 2 templates (recast-resnet's min_templates);
# lora and full in docs/adapt_defaults_lora_full.md.
# Methods it did not sweep (recast+*) get FALLBACK_DEFAULTS.
# ``steps``: a training budget in optimizer steps; a task trains max(epochs, ceil(steps / batches per
# epoch)) epochs, so a 200-image task still gets enough updates.
METHOD_DEFAULTS: dict[str, dict] = {
    "linear": {"lr": 3e-2},
    "recast": {"lr": 3e-2},
    "recast-norm": {"lr": 1e-2},
    "lora": {"lr": 3e-2},
    "full": {"lr": 3e-2},
}
FALLBACK_DEFAULTS = {"lr": 1e-2}
DEFAULT_EPOCHS = 3
DEFAULT_STEPS = 150  # the budget bench_adapt_defaults.py chose the lrs under


def method_defaults(method: str) -> dict:
    """The method's default hyperparameters (lr), for anything not given explicitly."""
    return dict(METHOD_DEFAULTS.get(method) or FALLBACK_DEFAULTS)


@dataclass
class DataOptions:
    """How tasks become loaders: caps, augmentation, workers, bad images, batch sizes."""

    max_train: int | None = None  # None: MAX_TRAIN for a built-in task, every image of a user's data
    max_eval: int | None = None   # None: MAX_EVAL for a built-in task, every image of a user's data
    augment: str = "none"
    workers: int = 0
    skip_bad: bool = False
    eval_batch_size: int = 256

    def validate(self) -> None:
        if self.augment not in AUGMENTS:
            raise WeightgenError(f"unknown augmentation {self.augment!r}; choose from {', '.join(AUGMENTS)}")
        if self.workers < 0:
            raise WeightgenError("workers must be >= 0", cli="--workers must be >= 0")
        for cap, flag in ((self.max_train, "max-train"), (self.max_eval, "max-eval")):
            if cap is not None and cap < 1:
                raise WeightgenError(f"{flag} must be positive", cli=f"--{flag} must be positive")

    def caps(self, task: str) -> tuple[int | None, int | None]:
        """(max_train, max_eval) for ``task``: built-in tasks keep their caps by default."""
        if task.strip().startswith(USER_DATA):
            return self.max_train, self.max_eval
        return (MAX_TRAIN if self.max_train is None else self.max_train,
                MAX_EVAL if self.max_eval is None else self.max_eval)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    """An artifact directory and what adaptation needs to know about it."""

    path: Path
    arch: str | None
    model_kwargs: dict
    data: ImageConfig  # channels, input size, mean/std, interpolation, crop: what the backbone expects
    fingerprint: str  # sha256 of its recast.safetensors: a results directory names its backbone by it
    report: dict = field(repr=False, default_factory=dict)
    # applied to every fresh copy (e.g. extend_banks for extra templates); not recorded for --evaluate
    transform: Callable[[nn.Module], object] | None = field(repr=False, default=None)

    @property
    def img_size(self) -> int:
        return self.data.img_size[0]

    @property
    def channels(self) -> int:
        return self.data.channels

    @property
    def label(self) -> str:
        """``<directory name>-<fingerprint[:8]>``: names the backbone in TensorBoard paths."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.path.resolve().name).strip("_") or "backbone"
        return f"{name}-{self.fingerprint[:8]}"

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


def recorded_norm(report: dict) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    """(mean, std) that pretrain.py recorded (a record without them used 0.5/0.5), else the
    pretrained_cfg generate_weights.py recorded for hub weights or a --pretrained-file."""
    pre = report.get("pretrain")
    if not isinstance(pre, dict):
        cfg = report.get("pretrained_cfg") or {}
        return cfg.get("mean"), cfg.get("std")
    if "mean" in pre and "std" in pre:
        return pre["mean"], pre["std"]
    return LEGACY_PRETRAIN_NORM


def open_backbone(path: str | Path, img_size: int | None = None, *, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> Backbone:
    """Check that ``path`` is an artifact directory and resolve what its model expects.

    Input size: ``img_size``, else the size pretrain.py recorded, else the model's own (its
    ``pretrained_cfg``: a 224-px ImageNet backbone adapts at 224). Mean/std: ``mean``/``std``, else
    pretrain.py's record, else the model's ``pretrained_cfg``.
    """
    path = Path(path)
    if not path.is_dir():
        raise WeightgenError(f"backbone directory not found: {path}")
    if not (path / CONFIG_FILE).is_file() or not (path / RECAST_FILE).is_file():
        raise WeightgenError(f"{path} is not a weightgen artifact (no {CONFIG_FILE} / {RECAST_FILE}); "
                             f"make one with scripts/generate_weights.py")
    if img_size is not None and img_size < 8:
        raise WeightgenError("img_size must be >= 8", cli="--img-size must be >= 8")
    config = read_json(path / CONFIG_FILE)
    report = read_json(path / REPORT_FILE) if (path / REPORT_FILE).is_file() else {}
    kwargs = dict(config.get("model_kwargs") or {})
    model = load(path)  # validates the artifact; reused below only for its input shape and cfg
    rec_mean, rec_std = recorded_norm(report)
    pre = report.get("pretrain") if isinstance(report.get("pretrain"), dict) else (report.get("pretrained_cfg") or {})
    data = image_config(model, img_size=img_size or recorded_img_size(report, kwargs),
                        mean=mean if mean is not None else rec_mean, std=std if std is not None else rec_std,
                        interpolation=pre.get("interpolation"), crop_pct=pre.get("crop_pct"))
    fixed = fixed_input_size(model)  # the one rule (weightgen.models); None: any size
    if fixed and tuple(data.img_size) != tuple(fixed):
        what = f"{path} is a {fixed[0]}x{fixed[1]} ViT"
        raise WeightgenError(f"{what}; img_size={data.img_size[0]} does not fit it",
                             cli=f"{what}; --img-size {data.img_size[0]} does not fit it")
    return Backbone(path, config.get("arch"), kwargs, data, fingerprint(path / RECAST_FILE), report)


def task_filename(task: str, seed: int) -> str:
    """``tasks/<task>-s<seed>.safetensors``; a task name like ``imagefolder:/x/y`` is made file-safe."""
    return f"tasks/{_safe(task)}-s{seed}.safetensors"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


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


# ---- data ----------------------------------------------------------------------------------------

def open_tasks(names: list[str], seed: int, options: DataOptions):
    """Every task through :func:`weightgen.data.images.open_task` (user data scanned for bad images)."""
    return [open_task(name, seed, max_train=options.caps(name)[0], max_eval=options.caps(name)[1],
                      skip_bad=options.skip_bad) for name in names]


def task_loaders(task, cfg: ImageConfig, batch_size: int, seed: int, options: DataOptions,
                 device: str | torch.device = "cpu") -> dict[str, DataLoader]:
    """train (shuffled by ``seed``, augmented as asked), val and test loaders (deterministic).

    A last training batch of one image is dropped: BatchNorm cannot train on it."""
    loaders = {}
    for stage in ("train", "val", "test"):
        train = stage == "train"
        data = task.dataset(stage, cfg, options.augment if train else "none", seed)
        size = batch_size if train else options.eval_batch_size
        loaders[stage] = make_loader(data, size, train=train, workers=options.workers, seed=seed, device=device,
                                     drop_last=train and len(data) > size and len(data) % size == 1)
    return loaders


def model_batch(name: str, backbone: Backbone, seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training images of task ``name`` as the backbone takes them (timing benchmarks)."""
    task = open_task(name, seed, max_train=size, max_eval=8)
    loader = make_loader(task.dataset("train", backbone.data), size, train=False)
    return next(iter(loader))


def plain_train_loader(task, cfg: ImageConfig, seed: int, options: DataOptions,
                       device: str | torch.device = "cpu") -> DataLoader:
    """The training split with the evaluation transform, in order (for the probe's features)."""
    return make_loader(task.dataset("train", cfg, "none", seed), options.eval_batch_size, train=False,
                       workers=options.workers, seed=seed, device=device)


@torch.no_grad()
def _over_loader(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
                 loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(``fn(inputs)`` over ``loader`` on the CPU as float, labels), the model in eval mode on its device."""
    model.eval()
    device = next(model.parameters()).device
    outs, labels = [], []
    for x, y in loader:
        outs.append(fn(x.to(device, non_blocking=True)).float().flatten(1).cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def predict_loader(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits on the CPU, labels) over ``loader``, the model in eval mode on its own device."""
    return _over_loader(model, model, loader)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).sum().item() / max(1, len(labels))


def features(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (timm's ``forward_head(pre_logits=True)``) and labels, in eval mode."""
    return _over_loader(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), model, loader)


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3,
              max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L2 ``l2`` on the weights) by full-batch L-BFGS: (W, b)."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mu) / sd).double()
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w.detach() / sd.double())  # undo the standardisation: logits on the raw features
    b_raw = b.detach() - w_raw @ mu.double()
    return w_raw.float(), b_raw.float()


@torch.no_grad()
def probe_head(model: nn.Module, train_loader: DataLoader, num_classes: int) -> bool:
    """LP-FT: set the (linear) head to a logistic-regression probe on the frozen starting features.
    Returns False (head unchanged) when the head is not one nn.Linear."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        log.warning("probe head init skipped: the head is %s, not nn.Linear", type(head).__name__)
        return False
    was_training = model.training
    x, y = features(model, train_loader)
    w, b = fit_probe(x, y, num_classes)
    head.weight.copy_(w.to(head.weight))
    if head.bias is not None:
        head.bias.copy_(b.to(head.bias))
    model.train(was_training)
    return True


def epochs_for(config: TrainConfig, batches: int, steps: int | None) -> int:
    """max(epochs, enough epochs to reach ``steps`` optimizer steps)."""
    if not steps:
        return config.epochs
    return max(config.epochs, math.ceil(steps / max(1, batches)))


def single_template_banks(model: nn.Module) -> bool:
    """True when every bank of a recast ``model`` holds one template: each coefficient can then only
    rescale its layer, which a following BatchNorm undoes, so coefficient-only training learns ~nothing."""
    if model.__dict__.get(BANKS_ATTR) is None:
        return False
    counts = [bank.num_templates for bank in banks_of(model).values()]
    return bool(counts) and max(counts) == 1


def check_run(backbone: Backbone, method_name: str, tasks: list[str], seeds: list[int],
              options: DataOptions | None = None):
    """Every check that needs no training: the method exists and fits the backbone, the tasks load
    (user data scanned for bad images). Returns the tasks opened with the first seed."""
    if not tasks:
        raise WeightgenError("no tasks given")
    if len(set(tasks)) != len(tasks):
        raise WeightgenError(f"a task is listed twice in {','.join(tasks)}")
    if not seeds:
        raise WeightgenError("no seeds given")
    options = options or DataOptions()
    options.validate()
    method = get_method(method_name)
    model = backbone.model(recast_model=method.needs_recast)
    method.check(model)
    if method.needs_recast and single_template_banks(model):
        log.warning("every bank of %s holds 1 template: its coefficients can only rescale layers, which the "
                    "BatchNorm after them undoes; method %s will learn little beyond what it adds. Fit the "
                    "backbone with more templates per bank (generate_weights.py --templates 2; a backbone fitted "
                    "with the recast-resnet preset today gets at least 2) or use recast-norm", backbone.path, method_name)
    return open_tasks(tasks, seeds[0], options)


def run_sequence(backbone: Backbone, method_name: str, tasks: list[str], seeds: list[int], config: TrainConfig,
                 out_dir: str | Path, *, device: str = "cpu", max_train: int | None = None,
                 max_eval: int | None = None, options: DataOptions | None = None, steps: int | None = None,
                 head_init: str = "random", opened: list | None = None) -> dict:
    """Learn ``tasks`` in order for every seed; task files go to ``out_dir/tasks/``.

    ``options`` (or the ``max_train``/``max_eval`` shorthand) says how tasks become loaders;
    ``steps``: train each task for max(``config.epochs``, enough epochs for ``steps`` steps);
    ``head_init='probe'``: start the head from a logistic-regression probe on the frozen features.
    ``opened``: what :func:`check_run` returned for these arguments (saves a second scan of user data).
    Returns ``{"rows": [...], "matrices": {seed: [[acc after task i on task j]]}, "exact_switch",
    "run": {what --evaluate needs}}``. All task names and the method are checked before training.
    """
    if options is None:
        options = DataOptions(max_train=max_train, max_eval=max_eval)
    if head_init not in ("random", "probe"):
        raise WeightgenError(f"head_init must be random or probe, not {head_init!r}")
    first = opened if opened is not None else check_run(backbone, method_name, tasks, seeds, options)
    method = get_method(method_name)
    out_dir = Path(out_dir)
    rows, matrices, exact = [], {}, True
    skipped: dict[str, int] = {}
    for seed in seeds:
        task_list = first if seed == seeds[0] else open_tasks(tasks, seed, options)
        for t in task_list:
            skipped[t.name] = max(skipped.get(t.name, 0), len(t.skipped))
        loaders = [task_loaders(t, backbone.data, config.batch_size, seed, options, device) for t in task_list]
        model = prepare_model(backbone, method, task_list[0].num_classes, seed)
        start = _body_state(model)  # every task starts here, not from the previous task
        matrix: list[list[float | None]] = []
        reference: dict[int, torch.Tensor] = {}
        seed_rows, switch_ok = [], [True] * len(task_list)
        for i, task in enumerate(task_list):
            _restore_body(model, start)
            # the head's init depends on (seed, task), not on the task's position in the sequence
            _reset_head(model, task.num_classes, seed * 1000 + zlib.crc32(task.name.encode()) % 1000)
            if head_init == "probe":
                model.to(device)
                probe_head(model, plain_train_loader(task, backbone.data, seed, options, device), task.num_classes)
                model.to("cpu")
            trainable, trainable_head = trainable_numbers(model)
            task_config = replace(config, epochs=epochs_for(config, len(loaders[i]["train"]), steps))
            log.info("seed %d, task %s (%d/%d): %d trainable numbers (%d with the head), %d epochs",
                     seed, task.name, i + 1, len(task_list), trainable, trainable_head, task_config.epochs)
            summary = train_task(model, loaders[i]["train"], loaders[i]["val"], task_config, seed=seed,
                                 run_name=f"{backbone.label}/{method_name}",
                                 version=f"{Path(task_filename(task.name, seed)).stem}")
            if summary.get("rank", 0) != 0:  # another DDP process: it trains beside rank 0, which alone writes
                continue
            model.to(device)
            path = out_dir / task_filename(task.name, seed)
            nbytes = save_task(model, path, name=task.name, overwrite=False)
            reference[i], test_labels = predict_loader(model, loaders[i]["test"])
            test_acc = accuracy(reference[i], test_labels)
            seed_rows.append({"task": task.name, "method": method_name, "seed": seed, "val_acc": summary["val_acc"],
                              "test_acc": test_acc, "trainable": trainable, "trainable_with_head": trainable_head,
                              "task_file_bytes": nbytes, "train_seconds": summary["train_seconds"],
                              "seconds_per_step": summary["seconds_per_step"], "steps": summary["steps"],
                              "epochs": task_config.epochs, "best_epoch": summary["best_epoch"],
                              "train_images": task.sizes()["train"], "skipped_images": len(task.skipped),
                              "task_file": task_filename(task.name, seed)})
            # switch back to every task so far, from its file alone
            matrix.append([None] * len(task_list))
            for j in range(i + 1):
                switch_start = time.perf_counter()
                load_task(model, out_dir / task_filename(task_list[j].name, seed))
                logits, labels = predict_loader(model, loaders[j]["test"])
                same = torch.equal(logits, reference[j])
                if not same:
                    switch_ok[j] = exact = False
                    log.warning("task %s (seed %d) does not switch back exactly: max |dlogit| %.3g", task_list[j].name,
                                seed, (logits - reference[j]).abs().max().item())
                matrix[i][j] = accuracy(logits, labels)
                log.debug("switched to %s in %.3fs", task_list[j].name, time.perf_counter() - switch_start)
            model.to("cpu")
        for row, ok in zip(seed_rows, switch_ok):
            row["exact_switch"] = ok  # its file gave the recorded logits bit for bit after every later task
        rows += seed_rows
        matrices[seed] = matrix
    run = {"method": method_name, "tasks": list(tasks), "seeds": list(seeds), "img_size": backbone.img_size,
           "channels": backbone.channels, "data_config": backbone.data.to_dict(), "backbone": str(backbone.path),
           "backbone_sha256": backbone.fingerprint, "arch": backbone.arch, "max_train": options.max_train,
           "max_eval": options.max_eval, "data": options.to_dict(), "steps": steps, "head_init": head_init,
           "skipped_images": skipped, "train": config.to_dict()}
    return {"rows": rows, "matrices": matrices, "exact_switch": exact, "run": run}


def evaluate_results(backbone_path: str | Path, results_dir: str | Path, device: str = "cpu",
                     workers: int = 0) -> list[dict]:
    """Reload every task file of a results directory onto the backbone and measure test accuracy.

    Needs only the backbone and the files (``adapt.json`` says which tasks, seeds, method, input
    size and normalisation; the task data is rebuilt from the seed). Refuses a results directory of
    another backbone.
    """
    results_dir = Path(results_dir)
    if not (results_dir / RUN_FILE).is_file():
        raise WeightgenError(f"{results_dir} is not an adapt.py results directory (no {RUN_FILE})")
    run = read_json(results_dir / RUN_FILE)
    cfg = run.get("data_config") or {}
    backbone = open_backbone(backbone_path, run.get("img_size"), mean=cfg.get("mean"), std=cfg.get("std"))
    if backbone.fingerprint != run.get("backbone_sha256"):
        raise WeightgenError(f"{results_dir} was trained on another backbone ({run.get('backbone')}, "
                             f"{run.get('arch')}) than {backbone.path}; pass that backbone")
    if cfg:  # exactly the transforms the run used
        backbone.data = ImageConfig(cfg["channels"], tuple(cfg["img_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                                    cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"])
    saved = run.get("data") or {"max_train": run.get("max_train"), "max_eval": run.get("max_eval")}
    options = DataOptions(max_train=saved.get("max_train"), max_eval=saved.get("max_eval"),
                          skip_bad=bool(saved.get("skip_bad")), workers=workers,
                          eval_batch_size=int(saved.get("eval_batch_size") or 256))
    method = get_method(run["method"])
    batch = int((run.get("train") or {}).get("batch_size") or 64)
    rows = []
    for seed in run["seeds"]:
        task_list = open_tasks(run["tasks"], seed, options)
        model = prepare_model(backbone, method, task_list[0].num_classes, seed).to(device)
        for task in task_list:
            path = results_dir / task_filename(task.name, seed)
            if not path.is_file():
                raise WeightgenError(f"missing task file {path}")
            load_task(model, path)
            logits, labels = predict_loader(model, task_loaders(task, backbone.data, batch, seed, options, device)["test"])
            rows.append({"task": task.name, "method": run["method"], "seed": seed, "test_acc": accuracy(logits, labels)})
    return rows
