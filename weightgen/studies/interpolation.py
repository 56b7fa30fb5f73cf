"""Interpolation study: two checkpoints in, task accuracy and weight cosines along each path out.

The path maths lives in :mod:`weightgen.vae.paths`; this driver loads the checkpoints (or zoo
models, whose records give the architecture, kwargs and task), evaluates every point on the held-out
test split of a :mod:`weightgen.data` task (BatchNorm re-estimated) and writes ``interpolation.csv``, ``interpolation.png``, ``summary.json``
and optionally TensorBoard.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from ..classifier import evaluate, reestimate_batchnorm
from ..data import ImageTask, get_task, model_splits
from ..io import WeightgenError, atomic_directory, check_output_dir, load_checkpoint, write_json
from ..models import create_model, example_batch, fixed_input_size, input_size, load_into, resolve_device
from ..recasting import head_names
from ..vae.codec import weight_layers
from ..vae.paths import METHODS, InterpolationPath, weight_cosine
from ..vae.prior import default_vae_dir, load_vae_bundle, vae_on
from ..zoo import ZOO_DATA_SEED, ZOO_IMAGE_SIZE
from .align import align_state, function_change

ALIGNED = "_aligned"  # method-name suffix of the paths to the weight-matched copy of b

log = logging.getLogger(__name__)

COLUMNS = ("alpha", "method", "accuracy", "cosine_a", "cosine_b")

__all__ = ["COLUMNS", "METHODS", "interpolate", "resolve_checkpoint"]


def resolve_checkpoint(ref, zoo=None) -> tuple[Path, dict | None]:
    """(checkpoint file, zoo record or None) for a file path or, with ``zoo``, a zoo model id.

    A ``.safetensors`` file with a zoo record beside it (``<id>.json`` with arch and model_kwargs)
    brings its record too, so its architecture and kwargs need not be typed.
    """
    path = Path(ref)
    if zoo is not None and not path.suffix:
        path = Path(zoo) / f"{ref}.safetensors"
        if not path.is_file():
            ids = sorted(p.stem for p in Path(zoo).glob("*.safetensors"))
            raise WeightgenError(f"no model {ref!r} in zoo {zoo} (models: {', '.join(ids) or 'none'})")
    record_file = path.with_suffix(".json")
    if path.suffix == ".safetensors" and record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError) as err:
            raise WeightgenError(f"unreadable zoo record {record_file}: {err}") from None
        if isinstance(record, dict) and "arch" in record and "model_kwargs" in record:
            return path, record
    return path, None


def _architecture(arch, model_kwargs, records) -> tuple[str, dict]:
    """arch and kwargs from the arguments, else from the zoo records of the two ends (which must agree)."""
    found = [(r["arch"], r["model_kwargs"]) for r in records if r is not None]
    if len(found) == 2 and found[0] != found[1]:
        raise WeightgenError(f"the two zoo models differ in architecture: {found[0][0]} {found[0][1]} vs "
                             f"{found[1][0]} {found[1][1]}")
    if arch is None:
        if not found:
            raise WeightgenError("--arch is required unless --a/--b are zoo models (ids with --zoo, or zoo files)")
        arch = found[0][0]
    if model_kwargs is None:
        model_kwargs = dict(found[0][1]) if found and found[0][0] == arch else {}
    return arch, dict(model_kwargs)


DEFAULT_TASK = "digits"


def _task(records, task: str | None) -> str:
    """The evaluation task: ``task``, else the zoo models' (a record without one: the default zoo's
    digits), else digits. Zoo models are scored on the task they were trained on."""
    trained = {r.get("task") or DEFAULT_TASK for r in records if r is not None}
    if len(trained) > 1:
        raise WeightgenError(f"the two zoo models were trained on different tasks: {sorted(trained)}")
    if task is not None and trained and task.strip() not in trained:
        raise WeightgenError(f"the zoo models were trained on task {next(iter(trained))!r}, not {task!r}")
    return (task or next(iter(trained), DEFAULT_TASK)).strip()


class _TaskEval:
    """Test accuracy on a weightgen.data task with BatchNorm re-estimated on training batches."""

    def __init__(self, model: nn.Module, task: str, image_size: int, in_chans: int, seed: int):
        self.model, self.seed = model, seed
        # split seed ZOO_DATA_SEED: zoo models are then tested on images they were not trained on
        data = model_splits(task, ZOO_DATA_SEED, image_size, in_chans)
        device = next(model.parameters()).device
        self.train, self.test = (TensorDataset(*(t.to(device) for t in split.tensors)) for split in (data.train, data.test))

    def __call__(self, state: dict, reestimate: bool = True) -> float:
        self.model.load_state_dict(state, strict=True)
        if reestimate:
            with torch.random.fork_rng(devices=[]):  # dropout / drop-path run in train mode here
                torch.manual_seed(self.seed)
                reestimate_batchnorm(self.model, self.train)
        return evaluate(self.model, self.test)


def _eval_setup(model: nn.Module, image_size: int | None, task: ImageTask, zoo_models: bool) -> tuple[int, int] | str:
    """(image_size, in_chans) for ``task``'s accuracy, or why accuracy does not apply."""
    classes = getattr(model, "num_classes", None)
    if classes != task.num_classes:
        return f"the head has {classes} classes, task {task.name} has {task.num_classes}"
    try:
        chans = input_size(model)[0]
    except WeightgenError as err:
        return str(err)
    if chans not in (1, 3):
        return f"the model takes {chans} input channels, {task.name} has 1 (or 3 repeated)"
    fixed = fixed_input_size(model)
    if fixed is not None:  # ViT-like: the size is part of the architecture
        if fixed[0] != fixed[1]:
            return f"the model takes {fixed[0]}x{fixed[1]} inputs, {task.name} images are square"
        if image_size is not None and image_size != fixed[0]:
            raise WeightgenError(f"--image-size {image_size} does not match the model's fixed input size {fixed[0]}")
        return fixed[0], chans
    # CNNs accept any size; timm's pretrained_cfg size (e.g. 224) is not what a small-image model was
    # trained at, so use the zoo's training size unless told otherwise.
    size = ZOO_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 8:
        raise WeightgenError(f"--image-size must be >= 8, got {size}")
    if zoo_models and size != ZOO_IMAGE_SIZE:
        raise WeightgenError(f"zoo models are evaluated at {ZOO_IMAGE_SIZE}, not --image-size {size}")
    return size, chans


def _load_end(model: nn.Module, path, label: str) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    load_into(model, state, f"checkpoint {label} ({path})")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}  # in the model's dtypes


def interpolate(arch: str | None, a, b, steps: int, out, vae_dir=None, model_kwargs: dict | None = None,
                seed: int = 0, overwrite: bool = False, logdir=None, progress: bool = False,
                image_size: int | None = None, skip: set[str] | None = None, residual: bool = True,
                zoo=None, device: str | torch.device = "cpu", align: bool = False,
                task: str | None = None) -> tuple[Path, list[dict]]:
    """Interpolate checkpoints ``a`` -> ``b`` along every method in :data:`METHODS`.

    ``a``/``b``: checkpoint files, or zoo model ids with ``zoo``; zoo models bring ``arch`` and
    ``model_kwargs`` from their records (``None`` = take them from there).
    Writes ``interpolation.csv`` (one row per point and method, :data:`COLUMNS`), ``interpolation.png``
    and ``summary.json`` to ``out`` atomically; with ``logdir`` also TensorBoard: scalars
    ``interpolation_vs_alpha_percent/<method>/{accuracy,cosine_a,cosine_b}`` at step = round(100 * alpha)
    and the plot as a figure. Accuracy: on the test split of ``task`` (a :mod:`weightgen.data` task;
    default: the zoo models' own task, else digits), split seed ``ZOO_DATA_SEED``, BatchNorm
    re-estimated on training batches; only when the head has the task's number of classes.
    ``image_size`` defaults to the model's fixed input size, else the zoo's 32.
    ``skip``: Linear/Conv2d module names interpolated in weight space (default: the head).
    ``device``: where the model, the VAE and the evaluation run (a seed gives the same path on any device).
    ``align``: also every path to b with its hidden units permuted to match a (weight matching,
    :func:`weightgen.studies.align.align_state`; same function as b), as methods ``<method>_aligned``
    whose ``cosine_b`` is to the aligned b; ``summary.json["alignment"]`` has the permutation report.
    Returns (out dir, rows); raises WeightgenError on bad input before anything is written.
    """
    start = time.perf_counter()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise WeightgenError(f"--steps must be an integer >= 2 (the two end points), got {steps!r}")
    device = resolve_device(str(device))
    out = Path(out)
    check_output_dir(out, overwrite, kind="interpolation")
    (a, record_a), (b, record_b) = resolve_checkpoint(a, zoo), resolve_checkpoint(b, zoo)
    arch, model_kwargs = _architecture(arch, model_kwargs, (record_a, record_b))
    task = _task((record_a, record_b), task)
    data_task = get_task(task, ZOO_DATA_SEED, image_size=image_size or ZOO_IMAGE_SIZE)  # bad names fail here
    vae, meta = load_vae_bundle(vae_dir)
    vae = vae_on(vae, device)
    with torch.random.fork_rng(devices=[]):  # deterministic in seed; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = create_model(arch, model_kwargs).to(device)
        state_a, state_b = _load_end(model, a, "a"), _load_end(model, b, "b")
        heads = head_names(model)
        skip = _check_skip(model, arch, heads if skip is None else set(skip))
        setup = _eval_setup(model, image_size, data_task, zoo_models=(record_a, record_b) != (None, None))
        kinds = {n: "head" if n in heads else "skipped" for n in skip}
        path = InterpolationPath(model, state_a, state_b, vae, meta, kinds, residual)
        paths, alignment = {"": path}, None
        if align:
            paths[ALIGNED], alignment = _aligned_path(model, arch, path, state_a, state_b, vae, meta, kinds,
                                                      residual, setup, seed, device)
        evaluator = None if isinstance(setup, str) else _TaskEval(model, task, *setup, seed=seed)
        if evaluator is None:
            log.info("no accuracy: %s", setup)
        _warn_unseen(path)
        rows = _walk(paths, steps, evaluator, progress)
        recon, checkpoint_accuracy = _ends(path, state_a, state_b, evaluator)
        if alignment is not None:
            state, _ = paths[ALIGNED].reconstruction("b")
            alignment["recon_cosine_b_aligned"] = weight_cosine(path.flatten(state), paths[ALIGNED].flat_b)
            alignment["recon_accuracy_b_aligned"] = evaluator(state) if evaluator else None

    summary = _summary(arch, model_kwargs, a, b, steps, seed, vae_dir, setup, path, rows, recon,
                       checkpoint_accuracy, task)
    if alignment is not None:
        summary["alignment"] = alignment
    _write_outputs(out, overwrite, rows, recon, arch, logdir, summary, start)
    log.info("interpolated %s in %.1fs: %s", arch, summary["seconds"], out)
    return out, rows


def _check_skip(model: nn.Module, arch: str, skip: set[str]) -> set[str]:
    unknown = skip - {layer["name"] for layer in weight_layers(model)}
    if unknown:
        raise WeightgenError(f"skip names no Linear/Conv2d layer of {arch}: {sorted(unknown)[:3]}")
    return skip


def _aligned_path(model, arch, path, state_a, state_b, vae, meta, kinds, residual, setup, seed,
                  device) -> tuple[InterpolationPath, dict]:
    """The path to b with its hidden units permuted to match a, and the permutation report."""
    state_b_aligned, alignment = align_state(model, state_a, state_b)
    if not alignment["groups"]:
        log.warning("no permutable blocks in %s: the aligned paths equal the unaligned ones", arch)
    # the permuted b must be the same function; a block variant align.py misreads would show here
    gen = torch.Generator().manual_seed(seed)
    batch = (example_batch(model, 8, seed=seed) if isinstance(setup, str)
             else torch.randn(8, setup[1], setup[0], setup[0], generator=gen)).to(device)
    alignment["max_logit_change"] = function_change(model, state_b, state_b_aligned, batch)
    if not alignment["max_logit_change"] < 1e-4:
        raise WeightgenError(f"weight matching changed model b's outputs (relative "
                             f"{alignment['max_logit_change']:.2g}); run without --align")
    aligned = InterpolationPath(model, state_a, state_b_aligned, vae, meta, kinds, residual)
    alignment["path_cosine_before"] = weight_cosine(path.flat_a, path.flat_b)
    alignment["path_cosine_after"] = weight_cosine(path.flat_a, aligned.flat_b)
    return aligned, alignment


def _warn_unseen(path: InterpolationPath) -> None:
    unseen = {n: why for n, why in path.weight_space.items() if why.startswith("VAE never")}
    if unseen:
        log.warning("%d layer(s) of kinds the VAE never saw are interpolated in weight space (e.g. %s)",
                    len(unseen), next(iter(unseen)))


def _walk(paths: dict[str, InterpolationPath], steps: int, evaluator, progress: bool) -> list[dict]:
    """One row per alpha, path and method: accuracy and the cosines to both ends."""
    def measure(state: dict, along: InterpolationPath) -> dict:
        cos_a, cos_b = along.cosines(state)
        return {"accuracy": evaluator(state) if evaluator else None, "cosine_a": cos_a, "cosine_b": cos_b}

    alphas = torch.linspace(0, 1, steps, dtype=torch.float64).tolist()
    rows: list[dict] = []
    ends: dict[tuple, dict] = {}  # every method of a path is the original checkpoint at 0 and 1
    for alpha in tqdm(alphas, desc="interpolating", disable=not progress):
        for suffix, along in paths.items():
            for method in METHODS:
                if alpha in (0.0, 1.0):
                    end = (alpha, suffix if alpha == 1.0 else "")  # a is the same on every path
                    if end not in ends:
                        ends[end] = measure(along.state(alpha, method), along)
                    metrics = ends[end]
                else:
                    metrics = measure(along.state(alpha, method), along)
                rows.append({"alpha": alpha, "method": method + suffix, **metrics})
    return rows


def _ends(path: InterpolationPath, state_a: dict, state_b: dict, evaluator) -> tuple[dict, dict]:
    """The VAE reconstructions of both ends (cosine, accuracy) and the checkpoints' stored-BN accuracy."""
    recon = {}
    for end, source in (("a", state_a), ("b", state_b)):
        state, layer_cos = path.reconstruction(end)
        flat = path.flatten(state)
        recon[end] = {"cosine": weight_cosine(flat, path.flatten(source)),
                      "accuracy": evaluator(state) if evaluator else None, "layer_cosines": layer_cos}
    checkpoint_accuracy = {end: evaluator(s, reestimate=False) if evaluator else None
                           for end, s in (("a", state_a), ("b", state_b))}
    return recon, checkpoint_accuracy


def _write_outputs(out: Path, overwrite: bool, rows: list[dict], recon: dict, arch: str, logdir,
                   summary: dict, start: float) -> None:
    with atomic_directory(out, overwrite, kind="interpolation") as tmp:
        _write_csv(tmp / "interpolation.csv", rows)
        figure = _plot(rows, recon, arch)
        figure.savefig(tmp / "interpolation.png", dpi=110)
        if logdir:
            _tensorboard(logdir, rows, figure)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        write_json(tmp / "summary.json", summary)


def _summary(arch, model_kwargs, a, b, steps, seed, vae_dir, setup, path, rows, recon, checkpoint_accuracy,
             task: str) -> dict:
    methods = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        acc = [r["accuracy"] for r in mine]
        entry = {"accuracy": acc, "cosine_a": [r["cosine_a"] for r in mine], "cosine_b": [r["cosine_b"] for r in mine]}
        if acc[0] is not None:
            # barrier: how far the worst point falls below the mean of the two ends
            entry.update(min_accuracy=min(acc), barrier=(acc[0] + acc[-1]) / 2 - min(acc))
        methods[method] = entry
    return {
        "arch": arch, "model_kwargs": dict(model_kwargs or {}), "a": str(a), "b": str(b), "steps": steps,
        "seed": seed, "vae": str(vae_dir or default_vae_dir()),
        "residual_corrected": path.residual_corrected,
        "alphas": [r["alpha"] for r in rows if r["method"] == METHODS[0]],
        "accuracy": ({"applies": False, "reason": setup} if isinstance(setup, str) else
                     {"applies": True, "task": task,
                      "data": f"weightgen.data task {task!r}, split seed {ZOO_DATA_SEED} (the zoo's), test set",
                      "image_size": setup[0],
                      "in_chans": setup[1], "batchnorm": "re-estimated on training batches at every point",
                      "checkpoint_a_stored_bn": checkpoint_accuracy["a"],
                      "checkpoint_b_stored_bn": checkpoint_accuracy["b"]}),
        "endpoints": "alpha 0 and 1 are the original checkpoints for every method (not VAE reconstructions)",
        "recon_cosine_a": recon["a"]["cosine"], "recon_cosine_b": recon["b"]["cosine"],
        "recon_accuracy_a": recon["a"]["accuracy"], "recon_accuracy_b": recon["b"]["accuracy"],
        "vae_layers": [{"name": layer.name, "kind": layer.kind, "recon_cosine_a": ca, "recon_cosine_b": cb}
                       for layer, ca, cb in zip(path.layers, recon["a"]["layer_cosines"], recon["b"]["layer_cosines"])],
        "weight_space_layers": [{"name": n, "reason": why} for n, why in path.weight_space.items()],
        "methods": methods,
    }


def _write_csv(file: Path, rows: list[dict]) -> None:
    with open(file, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})


def _plot(rows: list[dict], recon: dict, arch: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    has_acc = rows[0]["accuracy"] is not None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    aligned = any(m.endswith(ALIGNED) for m in methods)
    panels = has_acc + (2 if aligned else 1)  # with aligned paths: cosine to a and to b side by side
    fig = Figure(figsize=(5.5 * panels, 5.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange")))

    def style(method: str) -> dict:
        base = method.removesuffix(ALIGNED)
        return {"color": colors[base], "ls": "--" if base != method else "-", "marker": "s" if base != method else "o",
                "ms": 3}

    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        alphas = [r["alpha"] for r in mine]
        if has_acc:
            axes[0].plot(alphas, [r["accuracy"] for r in mine], label=method, **style(method))
        if aligned:
            axes[-2].plot(alphas, [r["cosine_a"] for r in mine], label=method, **style(method))
            axes[-1].plot(alphas, [r["cosine_b"] for r in mine], label=method, **style(method))
        else:
            axes[-1].plot(alphas, [r["cosine_a"] for r in mine], "-", color=colors[method], label=f"{method} cos to a")
            axes[-1].plot(alphas, [r["cosine_b"] for r in mine], "--", color=colors[method], label=f"{method} cos to b")
    if has_acc:
        axes[0].plot([0, 1], [recon["a"]["accuracy"], recon["b"]["accuracy"]], "x", ms=9, color="tab:red",
                     label="VAE reconstruction of the ends")
        title = f"{arch}: accuracy" + (" (dashed: b aligned to a)" if aligned else "")
        axes[0].set(xlabel="alpha", ylabel="held-out test accuracy", title=title, ylim=(0, 1.02))
        axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    label = "VAE recon cosine of the ends"
    if aligned:
        axes[-2].plot([0], [recon["a"]["cosine"]], "x", ms=9, color="tab:red", label=label)
        axes[-1].plot([1], [recon["b"]["cosine"]], "x", ms=9, color="tab:red", label=label)
        axes[-2].set(xlabel="alpha", ylabel="weight cosine (Linear/Conv2d)", title="cosine to a")
        axes[-1].set(xlabel="alpha", ylabel="weight cosine (Linear/Conv2d)",
                     title="cosine to b (aligned paths: to aligned b)")
        axes[-2].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    else:
        axes[-1].plot([0, 1], [recon["a"]["cosine"], recon["b"]["cosine"]], "x", ms=9, color="tab:red", label=label)
        axes[-1].set(xlabel="alpha", ylabel="weight cosine (Linear/Conv2d)", title="cosine to a (solid) / b (dashed)")
    axes[-1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def _tensorboard(logdir, rows: list[dict], figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(logdir)) as writer:
        for row in rows:
            # TensorBoard's x axis is an integer step: alpha in percent, named in the tag
            step = round(row["alpha"] * 100)
            for key in ("accuracy", "cosine_a", "cosine_b"):
                if row[key] is not None:
                    writer.add_scalar(f"interpolation_vs_alpha_percent/{row['method']}/{key}", row[key], step)
        writer.add_figure("interpolation/plot_vs_alpha", figure, close=False)
