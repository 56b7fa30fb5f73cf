"""A zoo of small timm models trained on scikit-learn's ``digits`` (offline, CPU, minutes).

Architectures in the default zoo (timm entry point -> what it contributes); keep this list
current, because benchmarks elsewhere must pick an architecture that is NOT in the zoo:

* ``resnet18``   narrow (``channels``/``layers``): BasicBlock 3x3, 7x7 stem, 1x1 downsample
* ``resnet14t``  narrow (``channels``/``stem_width``/``layers``): Bottleneck 1x1/3x3, 3x3 stem
* ``test_resnet``  timm's tiny test ResNet (mixed Basic/Bottleneck blocks)
* ``vit_tiny_patch16_224``  (``img_size=32, patch_size=8, embed_dim, depth, num_heads``): linears
* ``test_vit``   timm's tiny test ViT
* ``test_efficientnet``  with ``channel_multiplier``/``depth_multiplier``: depthwise 3x3, SE 1x1 convs
* ``test_convnext``  depthwise 7x7 convs + linear MLPs
* ``mobilenetv3_small_050``  depthwise 3x3/5x5 convs, SE, hard-swish

Not in the zoo (on purpose): ``resnet26``, ``resnet50``, ``resnet34``, any full-width ResNet,
``efficientnet_*``, ``deit_*``, ``convnext_*``.

On-disk format (version 1), per model: ``<model_id>.safetensors`` (the ``state_dict``) and
``<model_id>.json`` (spec, accuracies, params and every Linear/Conv2d layer in model order);
``zoo.json`` indexes the models.

Deterministic: a seed gives byte-identical model files for the same torch build and thread count
(float reductions reorder with the thread count). CPU cost of the default zoo is ~300 single-thread
CPU-seconds; on a busy shared machine ``torch.set_num_threads(1)`` is many times faster than 2.
"""
from __future__ import annotations

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

from weightgen.digits import (
    DigitsData, digits_model_kwargs, evaluate, load_digits_data, reestimate_batchnorm,
    train_classifier,
)
from weightgen.io import WeightgenError, atomic_directory

log = logging.getLogger(__name__)

ZOO_FORMAT_VERSION = 1
ZOO_KIND = "zoo"  # the kind in the output directory's manifest
ZOO_IMAGE_SIZE = 32
ZOO_DATA_SEED = 0  # one split for the whole zoo, so accuracies are comparable
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


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2) + "\n")


def train_zoo_model(spec: ZooSpec, data: DigitsData, out_dir: Path, progress: bool = False,
                    device: str | torch.device = "cpu") -> dict:
    """Train one spec on ``device``, write its safetensors + JSON into out_dir, return its metadata.

    The init is drawn on the CPU, then moved, so a seed gives the same model on any device.
    """
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's global RNG is untouched
        torch.manual_seed(spec.seed)
        model = create_zoo_model(spec.arch, spec.model_kwargs).to(device)
    losses = train_classifier(model, data, spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                              seed=spec.seed, progress=progress)
    # Exact BN stats for the final weights: momentum-0.1 running stats lag badly on short runs.
    reestimate_batchnorm(model, data.train)
    meta = {
        "model_id": spec.model_id, "arch": spec.arch, "model_kwargs": spec.model_kwargs,
        "seed": spec.seed, "steps": spec.steps, "lr": spec.lr, "batch_size": spec.batch_size,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "val_accuracy": evaluate(model, data.val), "test_accuracy": evaluate(model, data.test),
        "params": sum(p.numel() for p in model.parameters()), "layers": layer_records(model),
    }
    # clone: safetensors refuses tensors that share storage.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = out_dir / f"{spec.model_id}.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    _write_json(out_dir / f"{spec.model_id}.json", meta)
    return meta


def _check_specs(specs: list[ZooSpec]) -> None:
    if not specs:
        raise ZooError("no zoo specs given")
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        dups = sorted({i for i in ids if ids.count(i) > 1})
        raise ZooError(f"duplicate model ids in zoo specs: {dups}")
    for s in specs:
        if not _ID_RE.match(s.model_id) or s.model_id == "zoo":
            raise ZooError(f"bad model id {s.model_id!r} (want lowercase [a-z0-9_.-], not 'zoo')")
        if s.steps <= 0:
            raise ZooError(f"{s.model_id}: steps must be positive")


def build_zoo(out_dir: str | os.PathLike, specs: list[ZooSpec], progress: bool = True,
              overwrite: bool = False, device: str | torch.device = "cpu") -> dict:
    """Train every spec and write the zoo to out_dir atomically; return the index (zoo.json)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    _check_specs(specs)
    t_start = time.perf_counter()
    data_cache: dict[int, DigitsData] = {}
    records = []
    # overwrite replaces only a zoo weightgen wrote that holds nothing else
    with atomic_directory(out, overwrite, kind=ZOO_KIND) as tmp:
        for spec in tqdm(specs, desc="zoo", disable=not progress):
            chans = int(spec.model_kwargs.get("in_chans", 1))
            if chans not in data_cache:
                data_cache[chans] = load_digits_data(ZOO_IMAGE_SIZE, chans, seed=ZOO_DATA_SEED)
            t0, c0 = time.perf_counter(), time.process_time()
            meta = train_zoo_model(spec, data_cache[chans], tmp, progress=progress, device=device)
            # CPU seconds too: wall time swings a lot when other jobs share the cores.
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            log.info("%s: %d params, test acc %.4f, %.1fs (%.1f cpu-s)", spec.model_id,
                     meta["params"], meta["test_accuracy"], secs, cpu)
            records.append({"model_id": spec.model_id, "arch": spec.arch, "params": meta["params"],
                            "test_accuracy": meta["test_accuracy"], "seconds": round(secs, 2),
                            "cpu_seconds": round(cpu, 2)})
        index = {
            "format": "weightgen-zoo", "version": ZOO_FORMAT_VERSION,
            "models": [s.model_id for s in specs],
            "total_params": sum(r["params"] for r in records),
            "seconds": round(time.perf_counter() - t_start, 2),  # wall time of the whole build
            "torch_threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2),
            "cpu_seconds": round(sum(r["cpu_seconds"] for r in records), 2), "records": records,
        }
        _write_json(tmp / "zoo.json", index)
    log.info("zoo of %d models written to %s in %.1fs", len(specs), out, index["seconds"])
    return index
