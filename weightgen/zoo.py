"""Zoos of small timm models trained offline on CPU (minutes), at 32x32 with one input channel.

Presets (``PRESETS``): ``default`` (16 models on scikit-learn's digits), ``quick`` (4 tiny models, for
tests) and ``field`` (77 final models of 9 families on 4 tasks from ``weightgen.data``, each with two
checkpoints, some seeds held out; see ``field_zoo_specs``).

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
``zoo.json`` indexes the models. Field models also record ``family``, ``task``, ``split`` (``train`` or
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
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weightgen.classifier import evaluate, reestimate_batchnorm, train_classifier
from weightgen.data import TensorSplits as DigitsData, model_splits
from weightgen.io import WeightgenError, atomic_directory
from weightgen.models import small_input_kwargs as digits_model_kwargs

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

    def checkpoint_id(self, i: int) -> str:
        return f"{self.model_id}-t{i + 1}"

    def entry_ids(self) -> list[str]:
        """The zoo entries this spec writes: the final model, then its checkpoints."""
        return [self.model_id] + [self.checkpoint_id(i) for i in range(len(self.checkpoints))]


def _spec(model_id: str, arch: str, seed: int, steps: int, lr: float = 1e-3, **kw) -> ZooSpec:
    kwargs = {**digits_model_kwargs(arch, ZOO_IMAGE_SIZE, 1), **kw}
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
            kwargs = {**digits_model_kwargs(arch, ZOO_IMAGE_SIZE, 1), **kw}
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
def zoo_data(task: str | None, in_chans: int = 1) -> DigitsData:
    """The data a spec trains on: the ``weightgen.data`` task (None: ``digits``) split by
    ``ZOO_DATA_SEED``, as ``ZOO_IMAGE_SIZE`` model inputs. Cached: callers must not modify the tensors."""
    return model_splits(task or "digits", ZOO_DATA_SEED, ZOO_IMAGE_SIZE, in_chans)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2) + "\n")


def _save_entry(model: nn.Module, data: DigitsData, spec: ZooSpec, losses: list[float], out_dir: Path,
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


def _train_entries(spec: ZooSpec, data: DigitsData, out_dir: Path, progress: bool = False,
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


def train_zoo_model(spec: ZooSpec, data: DigitsData, out_dir: Path, progress: bool = False,
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
