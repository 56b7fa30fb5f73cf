"""A source backbone trained here, offline: any timm arch on a many-class glyph task.

RECAST adapts a *pretrained* backbone; with no hub reachable, one is trained on ``source_task``
(Cyrillic letters and symbols), which shares no class with the downstream tasks: in grayscale
(``source='glyphs'``), or in colour (``'glyphs-colour'``: each glyph in a random ink colour on a
random background, an RGB backbone whose first layers have seen colour). Training goes through the
same image pipeline as adaptation (:mod:`weightgen.data.images`). The output directory holds
``model.safetensors`` and ``pretrain.json`` (arch, model kwargs, channels, input size, mean/std,
source accuracy); the same arguments reuse an existing output instead of training again.
"""
from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from ..config import PRESETS
from ..data import ImageTask, source_task
from ..data.images import AUGMENTS, MemoryImages, image_config, make_loaders
from ..data.photos import LUMA  # the brightness of a colour (PIL's convert("L") weights)
from ..io import WeightgenError, atomic_directory, check_output_dir, read_json, save_tensors, write_json
from ..models import create_model, small_input_kwargs
from .trainer import TrainConfig, train_task

log = logging.getLogger(__name__)
CHECKPOINT, INFO = "model.safetensors", "pretrain.json"
KIND = "backbone"


SOURCES = {"glyphs": 1, "glyphs-colour": 3}  # source -> input channels
# default AdamW lr per source: in colour, 2e-3 is still on the plateau when StepLR first cuts it
# (docs/bench_pretrain_colour.md, resnet18-w16, 160 steps: source test accuracy 0.040 at 2e-3, 0.240 at 1e-2)
SOURCE_LR = {"glyphs": 2e-3, "glyphs-colour": 1e-2}


# how much brighter the ink is than the paper. Uniform random ink and paper (either polarity, any
# contrast) left a ResNet at chance on the source task: the paper, 88% of the pixels, puts a random
# colour offset on every image that dwarfs the glyph, and training sat on a plateau the lr schedule
# never left.
# A bright glyph on darker paper, as in the grayscale source, learns (docs/bench_pretrain_colour.md).
INK_GAP = 0.5


def ink_and_paper(rng: np.random.Generator, n: int, gap: float = INK_GAP) -> tuple[np.ndarray, np.ndarray]:
    """(ink, paper), each (n, 3) in [0, 1]: uniform random RGB colours, kept only where the ink's luma
    exceeds the paper's by ``gap`` (the brighter of a pair is the ink); hue and saturation stay free."""
    ink, paper = np.empty((n, 3)), np.empty((n, 3))
    todo = np.arange(n)
    while len(todo):
        a, b = rng.uniform(0, 1, (len(todo), 3)), rng.uniform(0, 1, (len(todo), 3))
        swap = (a @ LUMA) < (b @ LUMA)
        a[swap], b[swap] = b[swap], a[swap].copy()
        ok = (a @ LUMA) - (b @ LUMA) >= gap
        ink[todo[ok]], paper[todo[ok]] = a[ok], b[ok]
        todo = todo[~ok]
    return ink, paper


def colour_task(task: ImageTask, seed: int) -> ImageTask:
    """``task``'s grayscale glyphs as RGB: ink and paper colours drawn per image (seeded), the ink
    brighter than the paper (``INK_GAP``), so colour varies within every class and the shapes carry
    the labels."""
    def tint(split, stage: int):
        x, y = split
        ink, paper = ink_and_paper(np.random.default_rng([seed, stage, 0xC010]), len(y))
        ink = torch.from_numpy(ink.astype(np.float32))[:, :, None, None]
        paper = torch.from_numpy(paper.astype(np.float32))[:, :, None, None]
        return x * ink + (1 - x) * paper, y.clone()

    return ImageTask(task.name + "-colour", list(task.classes), tint(task.train, 0), tint(task.val, 1),
                     tint(task.test, 2), task.image_size, task.description + ", in random colours", task.groups)


def source_model_kwargs(arch: str, img_size: int, num_classes: int, model_kwargs: dict | None = None,
                        in_chans: int = 1) -> dict:
    """The source's channels, its classes; ViT-likes also get ``img_size``/``patch_size``."""
    kwargs = small_input_kwargs(arch, img_size, in_chans=in_chans)
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
             model_kwargs: dict | None = None, batch_size: int = 128, lr: float | None = None,
             weight_decay: float = 1e-4, max_train: int | None = 6000, max_eval: int | None = 1500, accelerator: str = "cpu",
             devices: int | str = 1, logdir: str | None = None, progress: bool = False,
             overwrite: bool = False, source: str = "glyphs", mean=None, std=None, augment: str = "none",
             workers: int = 0) -> tuple[Path, dict, bool]:
    """Train ``arch`` on the source task; returns (out dir, info, reused).

    Inputs are normalised with ``mean``/``std`` (default: the model's ``pretrained_cfg``'s), resized
    to ``img_size`` with no crop; all of it is recorded, so adaptation feeds the backbone the same way.
    An existing output written with the same arguments is reused (``reused=True``), not retrained.
    ``lr``: AdamW's learning rate; None: the source's default (``SOURCE_LR``).
    """
    out = Path(out)
    if img_size < 8:
        raise WeightgenError("img_size must be >= 8", cli="--img-size must be >= 8")
    if source not in SOURCES:
        raise WeightgenError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if augment not in AUGMENTS:
        raise WeightgenError(f"unknown augmentation {augment!r}; choose from {', '.join(AUGMENTS)}")
    lr = SOURCE_LR[source] if lr is None else lr
    args = {"arch": arch, "epochs": epochs, "img_size": img_size, "seed": seed, "model_kwargs": dict(model_kwargs or {}),
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "max_train": max_train,
            "max_eval": max_eval, "source": source, "mean": mean, "std": std, "augment": augment,
            "pipeline": "images/1"}
    if source == "glyphs-colour":
        args["colours"] = f"ink-gap/{INK_GAP}"  # a backbone cached before the colour fix is not reused
    if (out / INFO).is_file() and (out / CHECKPOINT).is_file() and not overwrite:
        info = read_json(out / INFO)
        if info.get("args") == args:
            return out, info, True
    check_output_dir(out, overwrite, kind=KIND)
    task = source_task(seed, max_train=max_train, max_eval=max_eval)
    if source == "glyphs-colour":
        task = colour_task(task, seed)
    kwargs = source_model_kwargs(arch, img_size, task.num_classes, model_kwargs, in_chans=SOURCES[source])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the init is part of the run's seed
        model = create_model(arch, kwargs)
    cfg = image_config(model, img_size=img_size, mean=mean, std=std, crop_pct=1.0)
    loaders = make_loaders(MemoryImages(task), cfg, batch_size, augment=augment, workers=workers, seed=seed,
                           eval_batch_size=max(batch_size, 256))
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         accelerator=accelerator, devices=devices, progress=progress, logdir=logdir)
    start = time.perf_counter()
    summary = train_task(model, loaders["train"], loaders["val"], config, seed=seed, run_name="pretrain",
                         version=out.name)
    model.cpu()
    test_acc = _accuracy(model, loaders["test"])
    info = {"arch": arch, "model_kwargs": kwargs, "img_size": img_size, "channels": cfg.channels,
            "mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation,
            "crop_pct": cfg.crop_pct,
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


@torch.no_grad()
def _accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        seen += len(y)
    return correct / max(1, seen)
