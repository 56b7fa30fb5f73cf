"""Fidelity of a reparameterized model: per-layer weight cosine, per-block feature cosine."""
from __future__ import annotations

import torch
from torch import nn

from ..bank import banks_of
from ..layers import recast_layers
from ..metrics import cosine  # noqa: F401  (re-exported: callers import it from here too)


@torch.no_grad()
def weight_fidelity(model: nn.Module, target: dict[str, torch.Tensor]) -> list[dict]:
    """One row per recast layer: name, shape, group, cosine and error relative to the target norm."""
    layers = recast_layers(model)
    return [row for group_name, bank in banks_of(model).items()
            for row in bank_fidelity(layers, group_name, bank, target)]


@torch.no_grad()
def bank_fidelity(layers: dict, group_name: str, bank, target: dict[str, torch.Tensor]) -> list[dict]:
    """``weight_fidelity``'s rows of one bank's layers (``layers``: ``recast_layers(model)``)."""
    rows = []
    for name in bank.members:
        fitted = layers[name].weight.reshape(-1).float()
        wanted = target[f"{name}.weight"].reshape(-1).float()
        wanted_norm = wanted.norm().item()
        rows.append({
            "name": name,
            "shape": list(bank.weight_shape),
            "group": group_name,
            "cosine": cosine(fitted, wanted),
            "rel_error": (fitted - wanted).norm().item() / max(wanted_norm, 1e-30),
        })
    return rows


def feature_blocks(model: nn.Module) -> list[str]:
    """Top-level children, with containers (ModuleList / Sequential) opened one level."""
    names = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 0:
            names += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            names.append(name)
    return names


@torch.no_grad()
def record_features(model: nn.Module, batch: torch.Tensor, blocks: list[str] | None = None) -> tuple[dict, torch.Tensor]:
    """Block outputs and logits of ``model`` on ``batch`` (record before recasting to compare after)."""
    model.eval()
    blocks = feature_blocks(model) if blocks is None else blocks
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out) if torch.is_tensor(out) else None
        )
        for name in blocks if name in modules
    ]
    try:
        logits = model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, logits


def compare_features(reference: tuple[dict, torch.Tensor], candidate: tuple[dict, torch.Tensor]) -> dict:
    """Per-block feature cosine and top-1 agreement between two ``record_features`` results."""
    (ref_feats, ref_logits), (cand_feats, cand_logits) = reference, candidate
    per_block = {
        name: cosine(ref, cand_feats[name])
        for name, ref in ref_feats.items() if name in cand_feats and cand_feats[name].shape == ref.shape
    }
    return {
        "top1_agreement": (ref_logits.argmax(-1) == cand_logits.argmax(-1)).float().mean().item(),
        "logits_max_abs_diff": (ref_logits - cand_logits).abs().max().item(),
        "block_cosine": per_block,
        "min_block_cosine": min(per_block.values()) if per_block else None,
        "batch_size": int(ref_logits.shape[0]),
    }


def function_fidelity(reference: nn.Module, candidate: nn.Module, batch: torch.Tensor) -> dict:
    """Per-block feature cosine and top-1 agreement of two models on one batch."""
    blocks = feature_blocks(reference)
    return compare_features(record_features(reference, batch, blocks), record_features(candidate, batch, blocks))
