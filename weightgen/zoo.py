"""Zoos of small timm models trained offline on CPU (minutes), at 32x32 with one input channel.

Presets (``PRESETS``): ``default`` (16 models on scikit-learn's digits), ``quick`` (4 tiny models, for
tests), ``field`` (77 final models of 9 families on 4 tasks from ``weightgen.data``, each with two
checkpoints, some seeds held out; see ``field_zoo_specs``), ``structured`` (40 models of 3 families trained
with SGD/AdamW, OneCycle and strong weight decay until little of their init is left; each records its
cosine to its own init; see ``structured_zoo_specs``) and ``tiny_structured`` (4 tiny ones, for tests).

The structured presets build through :func:`build_zoo_resumable`: sharded (``shard=(K, N)``, joined by
:func:`merge_zoo_shards` into the bytes one run writes) and resumable (finished models wait in a staging
folder; a stopped build run again trains only what is missing).

Architectures in the zoos (timm entry point -> what it contributes); keep this list current, because
benchmarks elsewhere must pick an architecture that is NOT in any zoo:

* ``resnet18``   narrow (``channels``/``layers``): BasicBlock 3x3, 7x7 stem, 1x1 downsample
* ``resnet14t``  narrow (``channels``/``stem_width``/``layers``): Bottleneck 1x1/3x3, 3x3 stem
* ``test_resnet``  timm's tiny test ResNet (mixed Basic/Bottleneck blocks)
* ``vit_tiny_patch16_224``  (``img_size=32, patch_size=8|4, embed_dim, depth, num_heads``): linears
* ``test_vit``   timm's tiny test ViT
* ``test_efficientnet``  with ``channel_multiplier``/``depth_multiplier``: depthwise 3x3, SE 1x1 convs
* ``test_convnext``  (also with narrow ``dims``/``depths``): depthwise 7x7 convs + linear MLPs
* ``mobilenetv3_small_050``, ``mobilenetv3_small_075``  depthwise 3x3/5x5 convs, SE, hard-swish
* ``regnetx_002``  only narrow (``depth``/``w0``/``wa``/``wm``): grouped 3x3 convs
* ``densenet121``  only tiny (``growth_rate`` 8/12, ``block_config`` of 2-4 layers): concatenating 1x1/3x3
* ``mixer_s16_224``  (``img_size=32``, small ``mlp_ratio``): 2x2 tokens, token/channel MLPs
* ``test_byobnet``  timm's tiny test ByobNet (basic, bottleneck and depthwise blocks)

Not in any zoo (on purpose): ``resnet26``, ``resnet34``, ``resnet50``, any full-width ResNet,
``efficientnet_*``, ``deit_*``, ``convnext_*`` (``convnext_atto``/``_nano`` too), ``mobilenetv3_large_*``,
``regnety_*``, ``ghostnet_*``, ``mobilevit*``, ``levit_*``, full-size ``densenet*``/``mixer_*``.

On-disk format (version 1), per model: ``<model_id>.safetensors`` (the ``state_dict``) and
``<model_id>.json`` (spec, accuracies, params and every Linear/Conv2d layer in model order);
``zoo.json`` indexes the models. Structured models also record ``optimizer``, ``weight_decay``, ``aug``,
``cos_init_median`` and, per layer, ``cos_init`` (cosine of the trained weight to its init). Field models also record ``family``, ``task``, ``split`` (``train`` or
``heldout``: new seeds of zoo configs, for evaluation only) and, for a checkpoint ``<id>-t<i>`` saved
during the run of ``<id>``, ``checkpoint_of`` and ``step``; a model without ``split`` is ``train``.

Deterministic: a seed gives byte-identical model files for the same torch build and thread count
(float reductions reorder with the thread count), however many ``jobs`` build the zoo (each worker
process runs one torch thread: compare with a one-thread, one-job build). CPU cost of the default zoo
is ~300 single-thread CPU-seconds; on a busy shared machine ``torch.set_num_threads(1)`` is many times
faster than 2.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weightgen.classifier import evaluate, reestimate_batchnorm, train_classifier
from weightgen.data import TensorSplits, get_task, model_splits, to_model_input
from weightgen.ensemble import EnsembleConfig, train_single, weight_cosines
from weightgen.ensemble import evaluate as ensemble_evaluate
from weightgen.ensemble import reestimate_batchnorm as ensemble_reestimate_batchnorm
from weightgen.io import WeightgenError, atomic_directory, check_output_dir
from weightgen.models import small_input_kwargs

log = logging.getLogger(__name__)

ZOO_FORMAT_VERSION = 1
ZOO_KIND = "zoo"  # the kind in the output directory's manifest
ZOO_IMAGE_SIZE = 32
ZOO_DATA_SEED = 0  # one split per task for the whole zoo, so accuracies are comparable
SPLITS = ("train", "heldout")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class ZooError(WeightgenError):
    """Bad zoo specs; the script turns it into one error line and exit code 2."""


@dataclass(frozen=True)
class ZooSpec:
    model_id: str
    arch: str
    model_kwargs: dict  # complete kwargs for timm.create_model(arch, **model_kwargs); JSON-safe
    seed: int
    steps: int
    lr: float = 1e-3  # ViTs train better at 2e-3
    batch_size: int = 64
    # a weightgen.data task; None (default and quick zoos): "digits", with no task key in the JSON
    task: str | None = None
    split: str | None = None  # "train" or "heldout"; None (default zoo): not recorded, i.e. train
    family: str | None = None
    checkpoints: tuple[int, ...] = ()  # steps after which the run is also saved as <id>-t1, -t2, ...
    # Structured recipe (weightgen.ensemble): None keeps the legacy AdamW/cosine loop of the other presets.
    optimizer: str | None = None  # "sgd" (momentum 0.9) or "adamw", under a OneCycle lr
    weight_decay: float | None = None
    aug: float = 0.0  # random-affine augmentation strength (0: none)

    def checkpoint_id(self, i: int) -> str:
        return f"{self.model_id}-t{i + 1}"

    def entry_ids(self) -> list[str]:
        """The zoo entries this spec writes: the final model, then its checkpoints."""
        return [self.model_id] + [self.checkpoint_id(i) for i in range(len(self.checkpoints))]


def _spec(model_id: str, arch: str, seed: int, steps: int, lr: float = 1e-3, **kw) -> ZooSpec:
    kwargs = {**small_input_kwargs(arch, ZOO_IMAGE_SIZE, 1), **kw}
    return ZooSpec(f"{model_id}-s{seed}", arch, kwargs, seed, steps, lr)


def default_zoo_specs(seed: int = 0) -> list[ZooSpec]:
    """The default zoo: CNNs and ViTs of varied width, depth and seed (~300 CPU-seconds)."""
    s = seed
    vit = "vit_tiny_patch16_224"
    return [
        _spec("resnet18-w16-d1", "resnet18", s, 300, layers=[1, 1, 1, 1], channels=[16, 32, 64, 128]),
        _spec("resnet18-w16-d1", "resnet18", s + 1, 300, layers=[1, 1, 1, 1], channels=[16, 32, 64, 128]),
        _spec("resnet18-w24-d2", "resnet18", s, 300, layers=[2, 2, 2, 2], channels=[24, 48, 96, 192]),
        _spec("resnet18-w32-d1", "resnet18", s, 300, layers=[1, 1, 1, 1], channels=[32, 64, 128, 256]),
        _spec("resnet14t-w16-d1", "resnet14t", s, 300, channels=[16, 32, 64, 128], stem_width=16),
        _spec("resnet14t-w24-d2", "resnet14t", s, 300, layers=[1, 2, 2, 1], channels=[24, 48, 96, 192],
              stem_width=24),
        _spec("test_resnet", "test_resnet", s, 300),
        # Mean-pooled tokens train much better than a class token on 1,258 images (0.98 vs 0.93).
        _spec("vit-e64-d4", vit, s, 500, 2e-3, embed_dim=64, depth=4, num_heads=2, global_pool="avg"),
        _spec("vit-e64-d4", vit, s + 1, 500, 2e-3, embed_dim=64, depth=4, num_heads=2, global_pool="avg"),
        _spec("vit-e96-d6", vit, s, 500, 2e-3, embed_dim=96, depth=6, num_heads=3, global_pool="avg"),
        _spec("vit-e48-d2", vit, s, 500, 2e-3, embed_dim=48, depth=2, num_heads=2, global_pool="avg"),
        _spec("test_vit", "test_vit", s, 500, 2e-3, global_pool="avg"),
        _spec("effnet-c050", "test_efficientnet", s, 300, channel_multiplier=0.5),
        _spec("effnet-c100-d2", "test_efficientnet", s, 300, depth_multiplier=2.0),
        _spec("test_convnext", "test_convnext", s, 300),
        _spec("mobilenetv3_small_050", "mobilenetv3_small_050", s, 300),
    ]


def quick_zoo_specs(seed: int = 0) -> list[ZooSpec]:
    """A tiny zoo (well under a minute) covering linear, 3x3/7x7/1x1 and depthwise convs."""
    s = seed
    return [
        _spec("resnet18-w8-d1", "resnet18", s, 120, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64]),
        _spec("vit-e32-d1", "vit_tiny_patch16_224", s, 240, 2e-3, embed_dim=32, depth=1, num_heads=2,
              global_pool="avg"),
        # a second seed of the same ViT (~2 s): a pair for scripts/interpolate.py
        _spec("vit-e32-d1", "vit_tiny_patch16_224", s + 1, 240, 2e-3, embed_dim=32, depth=1, num_heads=2,
              global_pool="avg"),
        _spec("effnet-c025", "test_efficientnet", s, 90, channel_multiplier=0.25),
    ]


# The field preset's tasks: offline sources that the [dev]/[data] extras install (fashion needs a
# Debian package, animals a --no-deps install: left out).
FIELD_TASKS = ("digits", "mnist", "greek", "latin")
_VIT = "vit_tiny_patch16_224"
# family -> configs (name, arch, steps, lr, extra kwargs); the first config of a family also gets a
# held-out seed. Steps and widths keep each model at ~5-55 single-thread CPU-seconds.
FIELD_FAMILIES: dict[str, list[tuple[str, str, int, float, dict]]] = {
    "resnet": [
        ("resnet18-w8-d1", "resnet18", 240, 1e-3, dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])),
        ("resnet14t-w16", "resnet14t", 240, 1e-3, dict(channels=[16, 32, 64, 128], stem_width=16)),
    ],
    "vit": [
        ("vit-e64-d4-p8", _VIT, 300, 2e-3, dict(embed_dim=64, depth=4, num_heads=2, global_pool="avg")),
        ("vit-e48-d2-p4", _VIT, 300, 2e-3, dict(embed_dim=48, depth=2, num_heads=2, global_pool="avg",
                                                 patch_size=4)),
    ],
    "convnext": [
        ("convnext-w16", "test_convnext", 240, 1e-3, dict(dims=[16, 24, 32, 48], depths=[1, 1, 2, 1])),
        ("test_convnext", "test_convnext", 240, 1e-3, {}),
    ],
    "efficientnet": [
        ("effnet-c050", "test_efficientnet", 240, 1e-3, dict(channel_multiplier=0.5)),
        ("effnet-c075-d15", "test_efficientnet", 240, 1e-3, dict(channel_multiplier=0.75,
                                                                  depth_multiplier=1.5)),
    ],
    "mobilenetv3": [
        ("mobilenetv3_small_050", "mobilenetv3_small_050", 180, 1e-3, {}),
        ("mobilenetv3_small_075", "mobilenetv3_small_075", 150, 1e-3, {}),
    ],
    "regnet": [
        ("regnetx-d8-w16", "regnetx_002", 240, 1e-3, dict(depth=8, w0=16, wa=16.0, wm=2.0, group_size=8)),
        ("regnetx-d10-w24", "regnetx_002", 240, 1e-3, dict(depth=10, w0=24, wa=24.0, wm=2.5, group_size=8)),
    ],
    "densenet": [
        ("densenet-g8-b2", "densenet121", 240, 1e-3, dict(growth_rate=8, block_config=[2, 2, 2, 2])),
        ("densenet-g12-b3", "densenet121", 240, 1e-3, dict(growth_rate=12, block_config=[2, 3, 4, 3])),
    ],
    "mixer": [  # patch 16 is fixed by the entry point: 2x2 tokens; small token MLPs keep it cheap
        ("mixer-t32-c128", "mixer_s16_224", 240, 2e-3, dict(img_size=32, mlp_ratio=[0.0625, 0.25])),
        ("mixer-t64-c64", "mixer_s16_224", 240, 2e-3, dict(img_size=32, mlp_ratio=[0.125, 0.125])),
    ],
    "byobnet": [
        ("test_byobnet", "test_byobnet", 240, 1e-3, {}),
    ],
}


def field_zoo_specs(seed: int = 0) -> list[ZooSpec]:
    """A zoo spanning the field: 9 families x 1-2 configs x 2 tasks x 2 seeds (split ``train``), plus a
    third seed of each family's first config on its first task (split ``heldout``); every run is also
    saved after 1/3 and 2/3 of its steps. 77 final models, 154 checkpoints, ~20 CPU-minutes."""
    specs = []
    for f, (family, configs) in enumerate(FIELD_FAMILIES.items()):
        for c, (name, arch, steps, lr, kw) in enumerate(configs):
            # each family's two configs together see all four tasks; the pairing rotates over families
            tasks = [FIELD_TASKS[(f + 2 * c + k) % len(FIELD_TASKS)] for k in (0, 1)]
            runs = [(t, seed + k, "train") for t in tasks for k in (0, 1)]
            if c == 0:
                runs.append((tasks[0], seed + 2, "heldout"))
            kwargs = {**small_input_kwargs(arch, ZOO_IMAGE_SIZE, 1), **kw}
            for task, s, split in runs:
                specs.append(ZooSpec(f"{name}-{task}-s{s}", arch, kwargs, s, steps, lr, task=task,
                                     split=split, family=family, checkpoints=(steps // 3, 2 * steps // 3)))
    return specs


PRESETS = {"default": default_zoo_specs, "quick": quick_zoo_specs, "field": field_zoo_specs}


def preset_specs(name: str, seed: int = 0) -> list[ZooSpec]:
    if name not in PRESETS:
        raise ZooError(f"unknown zoo preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](seed)


def create_zoo_model(arch: str, model_kwargs: dict) -> nn.Module:
    """Build an untrained zoo architecture (offline: never pretrained)."""
    return timm.create_model(arch, pretrained=False, **model_kwargs)


def layer_records(model: nn.Module) -> list[dict]:
    """Every nn.Linear / nn.Conv2d in model order, with relative depth in [0, 1]."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    last = max(1, len(mods) - 1)
    return [
        {"name": n, "shape": list(m.weight.shape), "groups": int(getattr(m, "groups", 1)),
         "depth": i / last}
        for i, (n, m) in enumerate(mods)
    ]


def load_zoo_model(zoo_dir: str | os.PathLike, model_id: str) -> tuple[nn.Module, dict]:
    """Load one trained zoo model (eval mode) and its metadata."""
    zoo_dir = Path(zoo_dir)
    meta = json.loads((zoo_dir / f"{model_id}.json").read_text())
    model = create_zoo_model(meta["arch"], meta["model_kwargs"])
    model.load_state_dict(load_file(zoo_dir / f"{model_id}.safetensors"), strict=True)
    return model.eval(), meta


@functools.lru_cache(maxsize=8)
def zoo_data(task: str | None, in_chans: int = 1) -> TensorSplits:
    """The data a spec trains on: the ``weightgen.data`` task (None: ``digits``) split by
    ``ZOO_DATA_SEED``, as ``ZOO_IMAGE_SIZE`` model inputs. Cached: callers must not modify the tensors."""
    return model_splits(task or "digits", ZOO_DATA_SEED, ZOO_IMAGE_SIZE, in_chans)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2) + "\n")


def _save_entry(model: nn.Module, data: TensorSplits, spec: ZooSpec, losses: list[float], out_dir: Path,
                entry_id: str, step: int | None = None) -> dict:
    """BN re-estimation, accuracies and the two files of one zoo entry (``model`` is modified)."""
    # Exact BN stats for the saved weights: momentum-0.1 running stats lag badly on short runs.
    reestimate_batchnorm(model, data.train)
    recent = losses[-10:]
    meta = {
        "model_id": entry_id, "arch": spec.arch, "model_kwargs": spec.model_kwargs,
        "seed": spec.seed, "steps": spec.steps, "lr": spec.lr, "batch_size": spec.batch_size,
        "final_loss": sum(recent) / len(recent),
        "val_accuracy": evaluate(model, data.val), "test_accuracy": evaluate(model, data.test),
        "params": sum(p.numel() for p in model.parameters()), "layers": layer_records(model),
    }
    # Field keys only where set, so the default zoo's files stay byte-identical to earlier builds.
    extra = {"task": spec.task, "split": spec.split, "family": spec.family}
    meta.update({k: v for k, v in extra.items() if v is not None})
    if step is not None:
        meta.update(checkpoint_of=spec.model_id, step=step)
    # clone: safetensors refuses tensors that share storage.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / f"{entry_id}.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / f"{entry_id}.json", meta)
    return meta


def _train_entries(spec: ZooSpec, data: TensorSplits, out_dir: Path, progress: bool = False,
                   device: str | torch.device = "cpu") -> list[dict]:
    """Train one spec, write the final model and its checkpoints; return their metadata (final first)."""
    import copy

    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's global RNG is untouched
        torch.manual_seed(spec.seed)
        model = create_zoo_model(spec.arch, spec.model_kwargs).to(device)
    checkpoints: list[dict] = []
    seen: list[float] = []

    def on_step(step: int, m: nn.Module, loss: float) -> None:
        seen.append(loss)
        if step in spec.checkpoints:
            # BN re-estimation and evaluation on a copy, under a forked RNG: training goes on from
            # the untouched model, optimizer and RNG state, so checkpoints never change the final model
            with torch.random.fork_rng(devices=[]):
                i = spec.checkpoints.index(step)
                checkpoints.append(_save_entry(copy.deepcopy(m), data, spec, seen, out_dir,
                                               spec.checkpoint_id(i), step))

    losses = train_classifier(model, data, spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                              seed=spec.seed, progress=progress, on_step=on_step if spec.checkpoints else None)
    final = _save_entry(model, data, spec, losses, out_dir, spec.model_id)
    return [final] + checkpoints


def train_zoo_model(spec: ZooSpec, data: TensorSplits, out_dir: Path, progress: bool = False,
                    device: str | torch.device = "cpu") -> dict:
    """Train one spec on ``device``, write its safetensors + JSON (and its checkpoints') into out_dir,
    return the final model's metadata.

    The init is drawn on the CPU, then moved, so a seed gives the same model on any device.
    """
    return _train_entries(spec, data, out_dir, progress, device)[0]


def _check_specs(specs: list[ZooSpec]) -> None:
    if not specs:
        raise ZooError("no zoo specs given")
    ids = [i for s in specs for i in s.entry_ids()]
    if len(set(ids)) != len(ids):
        dups = sorted({i for i in ids if ids.count(i) > 1})
        raise ZooError(f"duplicate model ids in zoo specs: {dups}")
    for s in specs:
        if not _ID_RE.match(s.model_id) or s.model_id == "zoo":
            raise ZooError(f"bad model id {s.model_id!r} (want lowercase [a-z0-9_.-], not 'zoo')")
        if s.steps <= 0:
            raise ZooError(f"{s.model_id}: steps must be positive")
        if list(s.checkpoints) != sorted(set(s.checkpoints)) or any(not 0 < k < s.steps for k in s.checkpoints):
            raise ZooError(f"{s.model_id}: checkpoints must be increasing steps in 1..{s.steps - 1}")
        if s.split is not None and s.split not in SPLITS:
            raise ZooError(f"{s.model_id}: split must be one of {SPLITS}, not {s.split!r}")
        if s.optimizer is not None:
            if s.optimizer not in ("sgd", "adamw"):
                raise ZooError(f"{s.model_id}: optimizer must be sgd or adamw, not {s.optimizer!r}")
            if s.weight_decay is None or s.weight_decay < 0 or s.lr <= 0 or s.aug < 0 or s.task is None:
                raise ZooError(f"{s.model_id}: a structured spec needs a task, lr > 0, weight_decay >= 0, aug >= 0")
            if s.checkpoints:
                raise ZooError(f"{s.model_id}: structured specs save no checkpoints")


def _run_spec(spec: ZooSpec, out_dir: Path, progress: bool, device) -> tuple[list[dict], float, float]:
    """Train one spec (in this process or a worker): its entries' metadata, wall and CPU seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    metas = _train_entries(spec, zoo_data(spec.task, int(spec.model_kwargs.get("in_chans", 1))), out_dir,
                           progress=progress, device=device)
    # CPU seconds too: wall time swings a lot when other jobs share the cores.
    return metas, time.perf_counter() - t0, time.process_time() - c0


def _cost_guess(spec: ZooSpec) -> int:
    """Steps x parameters: a rough guess of a run's cost, only to order the work."""
    return spec.steps * _param_count(spec.arch, json.dumps(spec.model_kwargs, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _param_count(arch: str, kwargs_json: str) -> int:
    with torch.device("meta"):  # no memory, no init
        return sum(p.numel() for p in create_zoo_model(arch, json.loads(kwargs_json)).parameters())


def _worker_init() -> None:
    # One thread per worker: N workers on N cores, and the bytes match a one-thread, one-job build.
    torch.set_num_threads(1)


def build_zoo(out_dir: str | os.PathLike, specs: list[ZooSpec], progress: bool = True,
              overwrite: bool = False, device: str | torch.device = "cpu", jobs: int = 1) -> dict:
    """Train every spec and write the zoo to out_dir atomically; return the index (zoo.json).

    ``jobs`` > 1 trains specs in that many worker processes (spawned, one torch thread each), all
    writing into the same temporary directory; a model's files do not depend on ``jobs``.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    from tqdm.auto import tqdm

    out = Path(out_dir)
    _check_specs(specs)
    if jobs < 1:
        raise ZooError(f"jobs must be at least 1, got {jobs}")
    jobs = min(jobs, len(specs))
    t_start = time.perf_counter()
    results: dict[str, tuple[list[dict], float, float]] = {}

    def done(spec: ZooSpec, result) -> None:
        results[spec.model_id] = result
        metas, secs, cpu = result
        log.info("%s: %d params, test acc %.4f (%s), %.1fs (%.1f cpu-s)", spec.model_id, metas[0]["params"],
                 metas[0]["test_accuracy"], ", ".join(f"{m['test_accuracy']:.3f}" for m in metas[1:]) or "-",
                 secs, cpu)

    # overwrite replaces only a zoo weightgen wrote that holds nothing else
    with atomic_directory(out, overwrite, kind=ZOO_KIND) as tmp:
        bar = tqdm(total=len(specs), desc="zoo", disable=not progress)
        if jobs == 1:
            for spec in specs:
                done(spec, _run_spec(spec, tmp, progress, device))
                bar.update(1)
        else:
            # spawn: a fresh interpreter per worker (fork can deadlock in a parent's OpenMP pool)
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init)
            try:
                # the biggest runs first, so that no big one is left alone at the end
                futures = {pool.submit(_run_spec, spec, tmp, False, device): spec
                           for spec in sorted(specs, key=_cost_guess, reverse=True)}
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())  # re-raises a worker's error
                    bar.update(1)
            finally:
                # on error: drop queued specs, let running ones finish before the temp dir goes
                pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        records = []
        for spec in specs:
            metas, secs, cpu = results[spec.model_id]
            for k, meta in enumerate(metas):
                rec = {"model_id": meta["model_id"], "arch": spec.arch, "params": meta["params"],
                       "test_accuracy": meta["test_accuracy"]}
                rec.update({key: meta[key] for key in ("family", "task", "split", "checkpoint_of", "step")
                            if key in meta})
                if k == 0:  # the run's cost, checkpoints included, sits on its final model
                    rec.update(seconds=round(secs, 2), cpu_seconds=round(cpu, 2))
                records.append(rec)
        index = {
            "format": "weightgen-zoo", "version": ZOO_FORMAT_VERSION,
            "models": [r["model_id"] for r in records],
            "total_params": sum(r["params"] for r in records),
            "seconds": round(time.perf_counter() - t_start, 2),  # wall time of the whole build
            "torch_threads": 1 if jobs > 1 else torch.get_num_threads(), "jobs": jobs,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in records), 2), "records": records,
        }
        _write_json(tmp / "zoo.json", index)
    log.info("zoo of %d models (%d entries) written to %s in %.1fs", len(specs), len(records), out,
             index["seconds"])
    return index


# ---- the structured preset: trained to convergence with weight decay -------------------------------
#
# The zoos above train 150-500 steps and end at cosine 0.7-0.99 to their own init: mostly init noise.
# Here weight decay x lr x steps is large enough that little of the init survives (median cosine to init
# is recorded per model), with varied width, depth, lr, weight decay, augmentation, seed and task.
# Models train one by one (weightgen.ensemble.train_single): on CPU a vmap ensemble of the same
# architecture measured 1.5x the CPU time per model for the narrow ResNet and ConvNeXt and no gain for the
# ViT (docs/bench_zoo_structure.md), so parallel work goes to worker processes (--jobs).

STRUCTURED_TASKS = ("mnist", "greek", "latin", "digits")
STRUCTURED_BATCH = 64
# family -> configs (name, arch, extra kwargs, optimizer, steps, [(lr, weight decay, aug), ...]); each
# (config, recipe) trains on two tasks with seeds 0 and 1 (split train), and with seed 2 on its first
# task (split heldout: a new seed of a zoo config, for evaluation only).
_VIT8 = dict(img_size=32, patch_size=8, num_heads=2, global_pool="avg")
STRUCTURED_FAMILIES: dict[str, list[tuple[str, str, dict, str, int, list[tuple[float, float, float]]]]] = {
    "resnet": [
        ("resnet18-w8-d1", "resnet18", dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64]), "sgd", 400,
         [(0.1, 5e-2, 1.0), (0.05, 5e-2, 0.0)]),
        ("resnet18-w12-d1", "resnet18", dict(layers=[1, 1, 1, 1], channels=[12, 24, 48, 96]), "sgd", 400,
         [(0.1, 2e-2, 0.5)]),
    ],
    # ViTs need 800 steps: at 400 the e48 one reached 0.61-0.76 on greek, at 800 0.96 (same recipe)
    "vit": [
        ("vit-e48-d3-p8", _VIT, dict(_VIT8, embed_dim=48, depth=3), "adamw", 800,
         [(3e-3, 1.0, 0.0), (2e-3, 2.0, 0.5)]),
        ("vit-e32-d2-p8", _VIT, dict(_VIT8, embed_dim=32, depth=2), "adamw", 800, [(3e-3, 1.0, 0.5)]),
    ],
    # depthwise 7x7 convs + linear MLPs; mobilenetv3_small_050 cost 36 CPU-s for 400 steps and kept
    # cosine 0.97 to its init at wd 5e-3, so the depthwise family is a narrow ConvNeXt
    "convnext": [
        ("convnext-w16", "test_convnext", dict(dims=[16, 24, 32, 48], depths=[1, 1, 2, 1]), "adamw", 300,
         [(3e-3, 1.0, 0.0), (2e-3, 0.5, 1.0)]),
    ],
}


def structured_zoo_specs(seed: int = 0) -> list[ZooSpec]:
    """Small timm models of several families trained with SGD/AdamW, OneCycle and strong weight decay
    (see ``STRUCTURED_FAMILIES``); every model records its cosine to its own init."""
    specs = []
    t = 0
    for family, configs in STRUCTURED_FAMILIES.items():
        for name, arch, kw, opt, steps, recipes in configs:
            kwargs = {**small_input_kwargs(arch, ZOO_IMAGE_SIZE, 1), **kw}
            for r, (lr, wd, aug) in enumerate(recipes):
                # tasks rotate over configs and recipes, so each family sees every task
                tasks = [STRUCTURED_TASKS[(t + k) % len(STRUCTURED_TASKS)] for k in (0, 1)]
                t += 1
                runs = [(task, seed + k, "train") for task in tasks for k in (0, 1)]
                runs.append((tasks[0], seed + 2, "heldout"))
                for task, s, split in runs:
                    specs.append(ZooSpec(f"{name}-r{r}-{task}-s{s}", arch, kwargs, s, steps, lr,
                                         batch_size=STRUCTURED_BATCH, task=task, split=split, family=family,
                                         optimizer=opt, weight_decay=wd, aug=aug))
    return specs


def tiny_structured_specs(seed: int = 0) -> list[ZooSpec]:
    """Four tiny structured models (seconds): for tests of sharding, merging and resuming."""
    kw = {**small_input_kwargs("resnet18", ZOO_IMAGE_SIZE, 1), "layers": [1, 1, 1, 1], "channels": [4, 8, 8, 16]}
    vit = {**small_input_kwargs(_VIT, ZOO_IMAGE_SIZE, 1), **_VIT8, "embed_dim": 16, "depth": 1}
    return [
        ZooSpec(f"tiny-resnet-s{seed}", "resnet18", kw, seed, 6, 0.1, batch_size=32, task="digits", split="train",
                family="resnet", optimizer="sgd", weight_decay=5e-2, aug=1.0),
        ZooSpec(f"tiny-resnet-s{seed + 1}", "resnet18", kw, seed + 1, 6, 0.1, batch_size=32, task="digits",
                split="heldout", family="resnet", optimizer="sgd", weight_decay=5e-2),
        ZooSpec(f"tiny-vit-s{seed}", _VIT, vit, seed, 6, 3e-3, batch_size=32, task="digits", split="train",
                family="vit", optimizer="adamw", weight_decay=1.0),
        ZooSpec(f"tiny-vit-s{seed + 1}", _VIT, vit, seed + 1, 6, 3e-3, batch_size=32, task="digits", split="train",
                family="vit", optimizer="adamw", weight_decay=1.0, aug=0.5),
    ]


PRESETS.update(structured=structured_zoo_specs, tiny_structured=tiny_structured_specs)
RESUMABLE_PRESETS = ("structured", "tiny_structured")  # built through build_zoo_resumable


@functools.lru_cache(maxsize=6)
def structured_data(task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A ``weightgen.data`` task at ``ZOO_IMAGE_SIZE`` px, one channel, every training image (no cap),
    split by ``ZOO_DATA_SEED``: {stage: (inputs, labels)}. Cached: callers must not modify the tensors."""

    t = get_task(task, ZOO_DATA_SEED, max_train=None)
    return {stage: (to_model_input(t.split(stage)[0], 1, ZOO_IMAGE_SIZE), t.split(stage)[1])
            for stage in ("train", "val", "test")}


def _atomic_bytes(path: Path, data: bytes) -> None:
    """Write a file whole or not at all (a temp sibling, then rename)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode()


def _train_structured(spec: ZooSpec, out_dir: Path, device) -> dict:
    """Train one structured spec; write ``<id>.safetensors`` then ``<id>.json`` (each atomically)."""
    import statistics

    from safetensors.torch import save as st_save

    data = structured_data(spec.task)
    with torch.random.fork_rng(devices=[]):  # seeded init and in-model randomness; caller's RNG untouched
        torch.manual_seed(spec.seed)
        model = create_zoo_model(spec.arch, spec.model_kwargs)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.to(device)
        cfg = EnsembleConfig(steps=spec.steps, batch_size=spec.batch_size, optimizer=spec.optimizer)
        losses = train_single(model, data["train"], cfg, spec.lr, spec.weight_decay, spec.seed, spec.aug)
        ensemble_reestimate_batchnorm(model, data["train"][0])
    cos = weight_cosines(model, init)
    layers = [dict(rec, cos_init=round(cos[rec["name"]], 6)) for rec in layer_records(model)]
    recent = losses[-10:]
    meta = {
        "model_id": spec.model_id, "arch": spec.arch, "model_kwargs": spec.model_kwargs, "seed": spec.seed,
        "steps": spec.steps, "lr": spec.lr, "batch_size": spec.batch_size, "optimizer": spec.optimizer,
        "weight_decay": spec.weight_decay, "aug": spec.aug, "schedule": "onecycle",
        "task": spec.task, "split": spec.split, "family": spec.family,
        "final_loss": sum(recent) / len(recent),
        "val_accuracy": ensemble_evaluate(model, *data["val"]),
        "test_accuracy": ensemble_evaluate(model, *data["test"]),
        "cos_init_median": round(statistics.median(cos.values()), 6),
        "params": sum(p.numel() for p in model.parameters()), "layers": layers,
    }
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    _atomic_bytes(out_dir / f"{spec.model_id}.safetensors", st_save(state, metadata={"format": "pt"}))
    _atomic_bytes(out_dir / f"{spec.model_id}.json", _json_bytes(meta))
    return meta


# ---- sharded, resumable builds ----------------------------------------------------------------------

BUILD_FILE = "build.json"  # the staging folder's marker: which build it holds
_RECORD_KEYS = ("family", "task", "split", "checkpoint_of", "step", "optimizer", "lr", "weight_decay", "aug",
                "val_accuracy", "cos_init_median")
TIMING_KEYS = ("seconds", "cpu_seconds")  # the only record keys that differ between identical builds


def specs_fingerprint(specs: list[ZooSpec]) -> str:
    """A hash of the whole spec list (order included): shards and resumes must agree on it."""
    import dataclasses
    import hashlib

    blob = json.dumps([dataclasses.asdict(s) for s in specs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shard_specs(specs: list[ZooSpec], index: int, count: int) -> list[ZooSpec]:
    """The specs of shard ``index`` of ``count`` (0-based), in spec order: the largest-first greedy split
    by estimated cost, so shards take about equal time. Depends only on the spec list."""
    if count < 1 or not 0 <= index < count:
        raise ZooError(f"shard must be K/N with 0 <= K < N, got {index}/{count}")
    load = [0] * count
    owner = {}
    for i in sorted(range(len(specs)), key=lambda i: (-_cost_guess(specs[i]), i)):
        k = min(range(count), key=lambda j: (load[j], j))
        owner[i] = k
        load[k] += _cost_guess(specs[i])
    return [s for i, s in enumerate(specs) if owner[i] == index]


def _run_resumable(spec: ZooSpec, out_dir: Path, device) -> tuple[list[dict], float, float]:
    """Train one spec into the staging folder, then write its cost file: the mark that it is complete."""
    t0, c0 = time.perf_counter(), time.process_time()
    if spec.optimizer is not None:
        metas = [_train_structured(spec, out_dir, device)]
    else:
        metas = _train_entries(spec, zoo_data(spec.task, int(spec.model_kwargs.get("in_chans", 1))), out_dir,
                               progress=False, device=device)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    _atomic_bytes(out_dir / f"{spec.model_id}.cost.json",
                  _json_bytes({"seconds": round(secs, 2), "cpu_seconds": round(cpu, 2)}))
    return metas, secs, cpu


def _complete(staging: Path, spec: ZooSpec) -> bool:
    try:
        json.loads((staging / f"{spec.model_id}.cost.json").read_text())
        for eid in spec.entry_ids():
            json.loads((staging / f"{eid}.json").read_text())
            if not (staging / f"{eid}.safetensors").is_file():
                return False
    except (OSError, ValueError):
        return False
    return True


def staging_dir(out_dir: str | os.PathLike) -> Path:
    """Where a resumable build keeps its finished models until the whole shard is done."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.building"


def _records(specs: list[ZooSpec], folder: Path) -> list[dict]:
    records = []
    for spec in specs:
        cost = json.loads((folder / f"{spec.model_id}.cost.json").read_text())
        for k, eid in enumerate(spec.entry_ids()):
            meta = json.loads((folder / f"{eid}.json").read_text())
            rec = {"model_id": eid, "arch": spec.arch, "params": meta["params"],
                   "test_accuracy": meta["test_accuracy"]}
            rec.update({key: meta[key] for key in _RECORD_KEYS if key in meta})
            if k == 0:
                rec.update(cost)
            records.append(rec)
    return records


def _index(records: list[dict], fingerprint: str, build: dict, shard: tuple[int, int] | None,
           all_models: list[str] | None) -> dict:
    index = {
        "format": "weightgen-zoo", "version": ZOO_FORMAT_VERSION, "fingerprint": fingerprint,
        "models": [r["model_id"] for r in records], "total_params": sum(r["params"] for r in records),
        "cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in records), 2), "build": build,
        "records": records,
    }
    if shard is not None and shard[1] > 1:
        index.update(shard={"index": shard[0], "count": shard[1]}, all_models=all_models)
    return index


def build_zoo_resumable(out_dir: str | os.PathLike, specs: list[ZooSpec], shard: tuple[int, int] = (0, 1),
                        progress: bool = True, overwrite: bool = False, device: str | torch.device = "cpu",
                        jobs: int = 1, name: str | None = None) -> dict:
    """Train shard ``shard`` = (K, N) of ``specs`` and write it to ``out_dir``; return its index.

    Finished models go to a staging folder next to ``out_dir`` (:func:`staging_dir`), each file written
    atomically and each spec marked complete by its cost file; a build stopped part-way and run again with
    the same arguments trains only what is missing. When the shard is complete, ``out_dir`` is written
    at once (:func:`weightgen.io.atomic_directory`) and the staging folder removed. With N > 1 the index
    names the shard; :func:`merge_zoo_shards` joins the N outputs into the zoo one run would write (same
    model files byte for byte, same records but for timings).
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    from tqdm.auto import tqdm

    _check_specs(specs)
    if jobs < 1:
        raise ZooError(f"jobs must be at least 1, got {jobs}")
    k, n = shard
    mine = shard_specs(specs, k, n)
    fingerprint = specs_fingerprint(specs)
    out = Path(out_dir)
    check_output_dir(out, overwrite, ZOO_KIND)  # refuse before any training
    staging = staging_dir(out)
    marker = {"format": "weightgen-zoo-build", "fingerprint": fingerprint, "shard": [k, n], "preset": name}
    if staging.exists():
        try:
            found = json.loads((staging / BUILD_FILE).read_text())
        except (OSError, ValueError):
            raise ZooError(f"{staging} exists but holds no weightgen zoo build; move it away first") from None
        if found != marker:
            raise ZooError(f"{staging} holds another build (preset {found.get('preset')}, shard "
                           f"{found.get('shard')}); run that build again to finish it, or remove the folder")
    else:
        staging.mkdir(parents=True)
        _atomic_bytes(staging / BUILD_FILE, _json_bytes(marker))
    todo = [s for s in mine if not _complete(staging, s)]
    log.info("shard %d/%d: %d of %d specs to train (%d already done in %s)", k, n, len(todo), len(mine),
             len(mine) - len(todo), staging)
    t_start, c_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=len(todo), desc="zoo", disable=not progress)

    def done(spec, result) -> None:
        metas, secs, cpu = result
        log.info("%s: %d params, test acc %.4f, cos to init %s, %.1fs (%.1f cpu-s)", spec.model_id,
                 metas[0]["params"], metas[0]["test_accuracy"], metas[0].get("cos_init_median", "-"), secs, cpu)
        bar.update(1)

    jobs = max(1, min(jobs, len(todo)))
    if jobs == 1:
        for spec in todo:
            done(spec, _run_resumable(spec, staging, device))
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init)
        try:
            futures = {pool.submit(_run_resumable, s, staging, device): s
                       for s in sorted(todo, key=_cost_guess, reverse=True)}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    records = _records(mine, staging)
    build = {"preset": name, "jobs": jobs, "torch_threads": 1 if jobs > 1 else torch.get_num_threads(),
             "device": str(device), "seconds": round(time.perf_counter() - t_start, 2),
             "process_cpu_seconds": round(time.process_time() - c_start, 2),
             "load_average_1min": round(os.getloadavg()[0], 2), "resumed_specs": len(mine) - len(todo)}
    index = _index(records, fingerprint, build, (k, n), [i for s in specs for i in s.entry_ids()])
    files = [f"{eid}{ext}" for s in mine for eid in s.entry_ids() for ext in (".safetensors", ".json")]
    with atomic_directory(out, overwrite, kind=ZOO_KIND) as tmp:
        for f in files:
            shutil.copyfile(staging / f, tmp / f)
        _write_json(tmp / "zoo.json", index)
    _remove_staging(staging, mine)
    log.info("zoo shard %d/%d of %d models written to %s", k, n, len(mine), out)
    return index


def _remove_staging(staging: Path, specs: list[ZooSpec]) -> None:
    """Delete only what a build wrote there; a folder that still holds other files stays."""
    ours = {BUILD_FILE} | {f"{s.model_id}.cost.json" for s in specs}
    ours |= {f"{eid}{ext}" for s in specs for eid in s.entry_ids() for ext in (".safetensors", ".json")}
    for entry in os.scandir(staging):
        if entry.is_file(follow_symlinks=False) and (entry.name in ours or (
                entry.name.startswith(".") and entry.name.endswith(".tmp"))):
            os.remove(entry.path)
    try:
        staging.rmdir()
    except OSError:
        log.warning("left %s in place: it holds files this build did not write", staging)


def merge_zoo_shards(out_dir: str | os.PathLike, shard_dirs: list[str | os.PathLike],
                     overwrite: bool = False) -> dict:
    """Join the N shard outputs of one sharded build into one zoo at ``out_dir`` (files copied byte for
    byte, records in spec order); refuses shards of different builds, missing or repeated shards."""
    if not shard_dirs:
        raise ZooError("no shard folders given to merge")
    indexes = []
    for d in shard_dirs:
        try:
            idx = json.loads((Path(d) / "zoo.json").read_text())
        except (OSError, ValueError):
            raise ZooError(f"{d} is not a zoo (no readable zoo.json)") from None
        if "fingerprint" not in idx:
            raise ZooError(f"{d} was not built by a sharded build (no fingerprint in its zoo.json)")
        indexes.append(idx)
    fingerprints = {i["fingerprint"] for i in indexes}
    if len(fingerprints) != 1:
        raise ZooError(f"the shards come from different builds (fingerprints {sorted(fingerprints)})")
    shards = [i.get("shard", {"index": 0, "count": 1}) for i in indexes]
    count = shards[0]["count"]
    got = sorted(s["index"] for s in shards)
    if any(s["count"] != count for s in shards) or got != list(range(count)):
        raise ZooError(f"need each of the {count} shards exactly once, got shards {got}")
    all_models = indexes[0].get("all_models") or indexes[0]["models"]
    by_id = {r["model_id"]: (r, Path(d)) for i, d in zip(indexes, shard_dirs) for r in i["records"]}
    if sorted(by_id) != sorted(all_models):
        raise ZooError("the shards' models do not add up to the build's model list")
    records = [by_id[m][0] for m in all_models]
    build = {"merged_from": [dict(i["build"], shard=s["index"]) for i, s in zip(indexes, shards)],
             "seconds": max(i["build"]["seconds"] for i in indexes),  # wall time if shards ran side by side
             "preset": indexes[0]["build"].get("preset")}
    index = _index(records, fingerprints.pop(), build, None, None)
    with atomic_directory(Path(out_dir), overwrite, kind=ZOO_KIND) as tmp:
        for m in all_models:
            src = by_id[m][1]
            for ext in (".safetensors", ".json"):
                shutil.copyfile(src / f"{m}{ext}", tmp / f"{m}{ext}")
        _write_json(tmp / "zoo.json", index)
    log.info("merged %d shards (%d models) into %s", count, len(records), out_dir)
    return index
