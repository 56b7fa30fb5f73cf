"""A source backbone trained here, offline: any timm arch on a many-class glyph task.

RECAST adapts a *pretrained* backbone; with no hub reachable, one is trained on ``source_task``
(Cyrillic letters and symbols), which shares no class with the downstream tasks. The output
directory holds ``model.safetensors`` and ``pretrain.json`` (arch, model kwargs, input size,
source accuracy); the same arguments reuse an existing output instead of training again.
"""
from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import torch

from ..config import PRESETS
from ..data import source_task, to_model_input
from ..models import small_input_kwargs
from ..io import WeightgenError, atomic_directory, check_output_dir, read_json, save_tensors, write_json
from ..models import create_model
from .trainer import TrainConfig, accuracy, predict, train_task

log = logging.getLogger(__name__)
CHECKPOINT, INFO = "model.safetensors", "pretrain.json"
KIND = "backbone"


def source_model_kwargs(arch: str, img_size: int, num_classes: int, model_kwargs: dict | None = None) -> dict:
    """One grey channel, the source task's classes; ViT-likes also get ``img_size``/``patch_size``."""
    kwargs = small_input_kwargs(arch, img_size, in_chans=1)
    kwargs["num_classes"] = num_classes
    kwargs.update(model_kwargs or {})  # the user's word wins (e.g. in_chans=3, patch_size=4)
    return kwargs


def generate_command(arch: str, out: Path, model_kwargs: dict, preset: str | None = None) -> str:
    """The follow-up ``generate_weights.py`` command that mimics this backbone into banks."""
    cmd = ["python", "scripts/generate_weights.py", "--arch", arch, "--checkpoint", str(out / CHECKPOINT),
           "--model-kwargs", *(f"{k}={v}" for k, v in model_kwargs.items())]
    if preset:
        cmd += ["--preset", preset]
    return shlex.join(cmd + ["--out", f"outputs/{out.name}"])


def default_preset_for(model) -> str | None:
    """The seed's ResNet preset for a timm ResNet when the toolkit has it; else generate's default."""
    return "recast-resnet" if type(model).__name__ == "ResNet" and "recast-resnet" in PRESETS else None


def pretrain(arch: str, out: str | Path, *, epochs: int = 10, img_size: int = 32, seed: int = 0,
             model_kwargs: dict | None = None, batch_size: int = 128, lr: float = 2e-3,
             weight_decay: float = 1e-4, max_train: int | None = 6000, max_eval: int | None = 1500, accelerator: str = "cpu",
             devices: int | str = 1, logdir: str | None = None, progress: bool = False,
             overwrite: bool = False) -> tuple[Path, dict, bool]:
    """Train ``arch`` on the source task; returns (out dir, info, reused).

    An existing output written with the same arguments is reused (``reused=True``), not retrained.
    """
    out = Path(out)
    if img_size < 8:
        raise WeightgenError("img_size must be >= 8", cli="--img-size must be >= 8")
    args = {"arch": arch, "epochs": epochs, "img_size": img_size, "seed": seed, "model_kwargs": dict(model_kwargs or {}),
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "max_train": max_train,
            "max_eval": max_eval}
    if (out / INFO).is_file() and (out / CHECKPOINT).is_file() and not overwrite:
        info = read_json(out / INFO)
        if info.get("args") == args:
            return out, info, True
    check_output_dir(out, overwrite, kind=KIND)
    task = source_task(seed, max_train=max_train, max_eval=max_eval)
    kwargs = source_model_kwargs(arch, img_size, task.num_classes, model_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the init is part of the run's seed
        model = create_model(arch, kwargs)
    channels = next((m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), 1)
    data = {s: (to_model_input(task.split(s)[0], channels, img_size), task.split(s)[1]) for s in ("train", "val", "test")}
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         accelerator=accelerator, devices=devices, progress=progress, logdir=logdir)
    start = time.perf_counter()
    summary = train_task(model, data["train"], data["val"], config, seed=seed, run_name="pretrain", version=out.name)
    model.cpu()
    test_acc = accuracy(predict(model, data["test"][0]), data["test"][1])
    info = {"arch": arch, "model_kwargs": kwargs, "img_size": img_size, "channels": channels,
            "source_task": {"name": task.name, "classes": task.num_classes, "sizes": task.sizes(),
                            "description": task.description},
            "val_acc": summary["val_acc"], "test_acc": test_acc, "best_epoch": summary["best_epoch"],
            "seconds": time.perf_counter() - start, "steps": summary["steps"], "args": args}
    info["generate_command"] = generate_command(arch, out, kwargs, default_preset_for(model))
    with atomic_directory(out, overwrite, kind=KIND) as tmp:
        save_tensors(tmp / CHECKPOINT, {k: v.detach().contiguous() for k, v in model.state_dict().items()},
                     metadata={"format": "weightgen-backbone/1", "arch": arch})
        write_json(tmp / INFO, info)
    log.info("pretrained %s on %s: test accuracy %.3f in %.0fs", arch, task.name, test_acc, info["seconds"])
    return out, info, False
