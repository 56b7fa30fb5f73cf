"""timm model creation with clear errors, strict loading, and an example input batch."""
from __future__ import annotations

import difflib
import logging

import timm
import torch
from torch import nn

from .io import WeightgenError

log = logging.getLogger(__name__)


def create_model(arch: str, model_kwargs: dict | None = None, pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with one-line errors for unknown names and bad kwargs."""
    model_kwargs = dict(model_kwargs or {})
    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise WeightgenError(f"unknown architecture {arch!r}{hint}")
    try:
        model = timm.create_model(arch, pretrained=pretrained, **model_kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as err:  # unknown keyword, or a value timm rejects
        raise WeightgenError(f"bad --model-kwargs for {arch}: {type(err).__name__} {err}".rstrip()) from None
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise WeightgenError(f"could not fetch pretrained weights for {arch} (no network?): "
                                 f"{str(err).splitlines()[0][:160]}; pass --checkpoint FILE instead") from None
        raise
    return model.eval()


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, check_only: bool = False) -> None:
    """Strict load that names the first missing / unexpected / mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise WeightgenError(f"{source} does not fit the architecture; {'; '.join(parts)}")
    if not check_only:
        model.load_state_dict(state, strict=True)


def model_from_state(arch: str, model_kwargs: dict | None, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """A timm model whose tensors *are* the checkpoint's (no random init, no second copy).

    The model is built on the meta device and the checkpoint assigned into it. Models that cannot
    be built on meta, or hold tensors outside the state dict (non-persistent buffers), are built
    normally and loaded by copy instead.
    """
    try:
        with torch.device("meta"):
            model = create_model(arch, model_kwargs)
    except Exception:  # some models compute values at init; the real build below reports real errors
        model = None
    if model is not None:
        expected = model.state_dict()
        load_into(model, state, source, check_only=True)
        cast = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in state.items()}
        model.load_state_dict(cast, strict=True, assign=True)
        if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            return model.eval()
    model = create_model(arch, model_kwargs)
    load_into(model, state, source)
    return model


def input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else getattr(cfg, "input_size", None)
    # models built with img_size=... report their real size on the patch embedding
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        in_chans = getattr(patch_embed.proj, "in_channels", size[0] if size else 3)
        return (in_chans, *patch_embed.img_size)
    if size is None:
        raise WeightgenError("cannot tell the model's input size; it has no timm pretrained_cfg")
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else size[0]
    return (channels, *size[1:])


def example_batch(model: nn.Module, batch_size: int = 8, seed: int = 0, max_side: int = 224) -> torch.Tensor:
    """A seeded standard-normal batch at the model's input size (capped for speed)."""
    channels, height, width = input_size(model)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None) is not None
    if not fixed:
        height, width = min(height, max_side), min(width, max_side)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, channels, height, width, generator=gen)
