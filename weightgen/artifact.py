"""Artifact directories: recast_config.json, recast.safetensors, weights.safetensors, report.json."""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from . import __version__
from .config import RecastConfig
from .io import WeightgenError, atomic_directory, load_tensors, read_json, save_tensors, write_json, write_safetensors
from .models import create_model
from .recasting import dense_entries, inject

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
ARTIFACT_KIND = "artifact"  # the kind recorded in the directory's manifest
CONFIG_FILE, RECAST_FILE, WEIGHTS_FILE, REPORT_FILE = (
    "recast_config.json", "recast.safetensors", "weights.safetensors", "report.json")


def artifact_config(model: nn.Module, arch: str | None, model_kwargs: dict | None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "model_kwargs": dict(model_kwargs or {}),
        "recast": model.recast_config.to_dict(),
        "groups": {g.name: {"shape": list(g.shape), "members": list(g.members)} for g in model.recast_groups},
        "versions": {"weightgen": __version__, "timm": timm.__version__, "torch": torch.__version__},
    }


def save(model: nn.Module, out_dir: str | Path, report: dict, *, arch: str | None = None,
         model_kwargs: dict | None = None, overwrite: bool = False) -> Path:
    """Write one artifact directory atomically; returns its path.

    The dense weights are computed one layer at a time as they are written (no full dense copy).
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite, kind=ARTIFACT_KIND) as tmp:
        write_json(tmp / CONFIG_FILE, artifact_config(model, arch, model_kwargs))
        save_tensors(tmp / RECAST_FILE, model.state_dict())
        write_safetensors(tmp / WEIGHTS_FILE, dense_entries(model))
        write_json(tmp / REPORT_FILE, report)
    log.info("wrote %s", out_dir)
    return out_dir


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the reparameterized model from an artifact directory, offline, without unpickling.

    ``model`` is needed only for non-timm architectures (``arch`` is null in the config).
    """
    path = Path(path)
    if not path.is_dir():
        raise WeightgenError(f"artifact directory not found: {path}")
    config = read_json(path / CONFIG_FILE)
    if config.get("format_version") != FORMAT_VERSION:
        raise WeightgenError(f"{path} has artifact format {config.get('format_version')!r}; "
                             f"this weightgen reads format {FORMAT_VERSION}")
    if model is None:
        if not config.get("arch"):
            raise WeightgenError(f"{path} was made from a non-timm model; pass model=... to load it")
        model = create_model(config["arch"], config.get("model_kwargs"))
    try:
        inject(model, RecastConfig.from_dict(config["recast"]))
    except (ValueError, TypeError, KeyError) as err:
        raise WeightgenError(f"{path}: cannot rebuild the recast model: {err}") from None
    saved_groups = {k: v["members"] for k, v in config.get("groups", {}).items()}
    if saved_groups != {g.name: list(g.members) for g in model.recast_groups}:
        raise WeightgenError(f"{path}: the model's layers do not group as the artifact's do")
    state = load_tensors(path / RECAST_FILE)
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    extra = [k for k in state if k not in expected]
    if bad or extra:
        raise WeightgenError(f"{path / RECAST_FILE} does not match the model: "
                             f"{', '.join((bad + extra)[:3])}")
    model.load_state_dict(state, strict=True)
    return model.eval()
