"""Export / load a WeightVAE as safetensors + JSON (no Lightning, never unpickle), and the
per-layer scale model that predicts a layer's weight RMS from its shape and depth."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..io import atomic_directory, check_output_dir
from .model import VAEConfig, WeightVAE
from .tokenize import COND_DIM, KINDS

__all__ = ["VAE_FORMAT_VERSION", "save_vae", "load_vae", "fit_scale_model", "predict_scale"]

log = logging.getLogger(__name__)

VAE_FORMAT_VERSION = 1
VAE_KIND = "vae"  # the kind in the output directory's manifest
_WEIGHTS, _META = "vae.safetensors", "vae.json"
_RESERVED = ("format_version", "config", "torch_version", "weightgen_version")


def _weightgen_version() -> str:
    return __version__


def save_vae(vae: WeightVAE, out_dir, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``out_dir/vae.safetensors`` + ``out_dir/vae.json`` atomically (temp dir + rename).

    ``overwrite`` replaces only a VAE directory weightgen wrote (see ``io.atomic_directory``).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite, kind=VAE_KIND)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra may not set reserved keys {clash}")
    meta = {"format_version": VAE_FORMAT_VERSION, "config": dataclasses.asdict(vae.config),
            "torch_version": torch.__version__, **extra}
    wg = _weightgen_version()
    if wg is not None:
        meta["weightgen_version"] = wg
    text = json.dumps(meta, sort_keys=True, indent=2) + "\n"  # fails here, before touching disk
    state = {k: v.detach().cpu().contiguous().clone() for k, v in vae.state_dict().items()}

    with atomic_directory(out_dir, overwrite, kind=VAE_KIND) as tmp:
        save_file(state, str(tmp / _WEIGHTS), metadata={"format_version": str(VAE_FORMAT_VERSION)})
        (tmp / _META).write_text(text)
    log.info("saved WeightVAE to %s", out_dir)
    return out_dir


def load_vae(path) -> tuple[WeightVAE, dict]:
    """Load a directory written by :func:`save_vae`; returns (model in eval mode, json dict)."""
    d = Path(path)
    if d.is_file() and d.name in (_WEIGHTS, _META):
        d = d.parent
    if not d.is_dir():
        raise ValueError(f"VAE directory not found: {d}")
    for name in (_META, _WEIGHTS):
        if not (d / name).is_file():
            raise ValueError(f"VAE directory {d} is missing {name}")
    try:
        meta = json.loads((d / _META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt {d / _META}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != VAE_FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"unknown VAE format version {got!r} in {d / _META} (expected {VAE_FORMAT_VERSION})")
    try:
        config = VAEConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad VAE config in {d / _META}: {e}") from e
    if config.cond_dim != COND_DIM:
        raise ValueError(f"VAE in {d} expects cond_dim={config.cond_dim}, this tokenizer makes COND_DIM={COND_DIM}")
    try:
        state = load_file(str(d / _WEIGHTS))
    except Exception as e:  # SafetensorError and friends on truncated / corrupt files
        raise ValueError(f"corrupt or truncated {d / _WEIGHTS}: {str(e).splitlines()[0] if str(e) else e!r}") from e

    vae = WeightVAE(config)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(expected) != set(got):
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ValueError(f"{d / _WEIGHTS} does not match config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    bad = [k for k in expected if expected[k] != got[k]]
    if bad:
        k = bad[0]
        raise ValueError(f"shape mismatch in {d / _WEIGHTS}: {k} is {got[k]}, config needs {expected[k]}")
    vae.load_state_dict(state)
    return vae.eval(), meta


# ---- scale model ------------------------------------------------------------------------------
_FEATURES = [f"kind={k}" for k in KINDS] + ["log_fan_in", "log_fan_out", "depth"]


def _scale_features(kind: str, shape, depth: float) -> list[float]:
    if kind not in KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"weight shape {shape} has no fan-in")
    onehot = [1.0 if k == kind else 0.0 for k in KINDS]
    return onehot + [math.log(math.prod(shape[1:])), math.log(shape[0]), float(depth)]


def fit_scale_model(records: list[tuple[str, tuple[int, ...], float, float]], alpha: float = 1e-3) -> dict:
    """Ridge fit of ``log(rms)`` on [one-hot kind, log fan_in, log fan_out, depth]."""
    from sklearn.linear_model import Ridge  # heavy import, only needed here

    rows, targets = [], []
    for kind, shape, depth, rms in records:
        if not (math.isfinite(rms) and rms > 0):
            log.warning("fit_scale_model: skipping %s %s with rms=%s", kind, tuple(shape), rms)
            continue
        rows.append(_scale_features(kind, shape, depth))
        targets.append(math.log(rms))
    if not rows:
        raise ValueError("fit_scale_model needs at least one record with a positive, finite rms")
    X, y = np.asarray(rows, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    reg = Ridge(alpha=alpha).fit(X, y)
    resid = y - reg.predict(X)
    return {
        "features": list(_FEATURES),
        "coef": [float(c) for c in reg.coef_],
        "intercept": float(reg.intercept_),
        "residual_std": float(math.sqrt(float((resid**2).mean()))),
    }


def predict_scale(scale_model: dict, kind, shape, depth) -> float:
    """Predicted weight RMS (a positive float) for a layer."""
    if scale_model.get("features") != _FEATURES:
        raise ValueError(f"scale model features {scale_model.get('features')} != {_FEATURES}")
    x = _scale_features(kind, shape, depth)
    return math.exp(scale_model["intercept"] + sum(c * v for c, v in zip(scale_model["coef"], x)))
