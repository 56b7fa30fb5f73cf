"""Conditional VAE over layer-weight tokens: tokenizer, model, training wrapper, zoo data, export."""
from __future__ import annotations

import importlib

from .model import VAEConfig, WeightVAE, kl_weight
from .store import VAE_FORMAT_VERSION, fit_scale_model, load_vae, predict_scale, save_vae
from .tokenize import (
    COND_DIM,
    COND_FIELDS,
    KINDS,
    TOKEN_SIZE,
    Tokens,
    condition,
    detokenize,
    layer_kind,
    token_count,
    tokenize,
    weight_scale,
)

__all__ = [
    "COND_DIM",
    "COND_FIELDS",
    "KINDS",
    "TOKEN_SIZE",
    "Tokens",
    "condition",
    "detokenize",
    "layer_kind",
    "token_count",
    "tokenize",
    "weight_scale",
    "VAEConfig",
    "WeightVAE",
    "kl_weight",
    "LitWeightVAE",
    "ZooDataModule",
    "ZooTokenDataset",
    "list_zoo",
    "split_by_model",
    "VAE_FORMAT_VERSION",
    "save_vae",
    "load_vae",
    "fit_scale_model",
    "predict_scale",
]

# Lightning-dependent names load on first use, so inference code (tokenize/model/store) does not
# pay the multi-second pytorch_lightning import.
_LAZY = {
    "LitWeightVAE": ".lit",
    "ZooDataModule": ".data",
    "ZooTokenDataset": ".data",
    "list_zoo": ".data",
    "split_by_model": ".data",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
