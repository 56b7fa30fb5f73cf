"""timm model creation with clear errors, strict loading, and an example input batch."""
from __future__ import annotations

import contextlib
import os
import difflib
import logging
import socket
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import timm
from timm.data import resolve_model_data_config
import torch
from torch import nn

from .io import WeightgenError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device that exists on this machine, or one clear error."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise WeightgenError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightgenError(f"CUDA is not available, so --device {name} cannot be used; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise WeightgenError(f"no CUDA device {device.index}: this machine has {torch.cuda.device_count()}")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            raise WeightgenError(f"device {name!r} is not available: {str(err).splitlines()[0]}") from None
    return device


def create_model(arch: str, model_kwargs: dict | None = None, pretrained: bool = False,
                 pretrained_file: str | os.PathLike | None = None) -> nn.Module:
    """``timm.create_model`` with one-line errors for unknown names and bad kwargs.

    ``pretrained_file``: a local weights file (.safetensors, or .pth/.bin read with
    ``weights_only``) loaded through timm's own mechanism (``pretrained_cfg_overlay=dict(file=...)``),
    so the model keeps its ``pretrained_cfg`` (mean, std, input size) and timm adapts ``in_chans``
    and a different ``num_classes`` as it does for hub weights. ``pretrained``: timm's hub weights;
    with ``HF_HUB_OFFLINE=1`` (or the hub unreachable) only the local cache is used.
    """
    model_kwargs = dict(model_kwargs or {})
    check_arch(arch)
    if pretrained_file is not None:
        return _from_pretrained_file(arch, model_kwargs, Path(pretrained_file))
    host = _weights_host(arch) if pretrained else None
    forced = host is not None and _env_offline()
    offline = host is not None and (forced or not reachable(host))
    try:
        # unreachable host: cached weights still load; anything else fails at once instead of
        # retrying for a minute
        with _hub_offline() if offline else contextlib.nullcontext():
            model = timm.create_model(arch, pretrained=pretrained, **model_kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        if forced:
            why = "HF_HUB_OFFLINE is set and they are not in the local cache"
        elif offline:
            why = f"{host} cannot be reached (no network?) and they are not in the local cache"
        else:
            why = textwrap.shorten(" ".join(str(err).split()), 200, placeholder=" ...").rstrip(".")
        what = f"could not fetch pretrained weights for {arch}: {why}. Use weights you have instead"
        raise WeightgenError(f"{what} (checkpoint=PATH).", cli=f"{what} (--checkpoint FILE).") from None
    except (TypeError, ValueError, KeyError, AssertionError) as err:  # unknown keyword, or a value timm rejects
        raise WeightgenError(f"bad --model-kwargs for {arch}: {type(err).__name__} {err}".rstrip()) from None
    return model.eval()


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_pretrained_file(arch: str, model_kwargs: dict, path: Path) -> nn.Module:
    if not path.is_file():
        raise WeightgenError(f"pretrained file {path} does not exist")
    try:
        overlay = dict(file=str(path))
        if "num_classes" in model_kwargs:  # the file's head is kept (timm drops a head whose cfg class count differs)
            overlay["num_classes"] = model_kwargs["num_classes"]
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise WeightgenError(f"bad --model-kwargs for {arch}: {type(err).__name__} {err}".rstrip()) from None
    except Exception as err:  # a foreign or pickled file, mismatched shapes: one line naming the file
        why = textwrap.shorten(" ".join(str(err).split()), 300, placeholder=" ...")
        raise WeightgenError(f"cannot load pretrained file {path} into {arch}: {type(err).__name__}: {why}") from None
    return model.eval()


@torch.no_grad()
def open_residual_gates(model: nn.Module, value: float) -> int:
    """Set to ``value`` every residual-branch gate timm starts at (near) zero; returns how many.

    timm zero-initialises the last norm scale of each ResNet block (``zero_init_last``) and starts
    ConvNeXt's layer scale ``gamma`` at 1e-6: good for training from scratch, but weights generated
    into such a model (or banks fitted to them) reach the output only through the shortcuts, and
    their coefficients get no gradient. Norm scales that are all zero and ``gamma`` parameters below
    1e-5 are set.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) \
                and getattr(module, "weight", None) is not None and not module.weight.any():
            module.weight.fill_(value)
            count += 1
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "gamma" and param.abs().max() < 1e-5:
            param.fill_(value)
            count += 1
    return count


def data_cfg(model: nn.Module) -> dict:
    """What a model's ``pretrained_cfg`` says its inputs are (for an artifact's record)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in keys if cfg.get(k) is not None}


def check_arch(arch: str) -> None:
    """One-line error for a name timm does not know, with close names suggested."""
    if not timm.is_model(arch.split(".")[0]):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise WeightgenError(f"unknown architecture {arch!r}{hint}")


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether an HTTPS connection to ``host`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _weights_host(arch: str) -> str | None:
    """The host timm downloads ``arch``'s pretrained weights from (the Hugging Face hub first)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except (RuntimeError, KeyError, ValueError):
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        return "huggingface.co"
    return urlparse(cfg.url).hostname if cfg.url else None


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub's offline mode for one call: cache only, no retries."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, check_only: bool = False) -> None:
    """Strict load that names the first missing / unexpected / mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shape_keys = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    mismatched = [f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in shape_keys]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        what = f"{source} does not fit the architecture; {'; '.join(parts)}"
        classes = _head_classes(model, state, missing, unexpected, shape_keys)
        if classes is None:
            raise WeightgenError(what)
        has = f"{classes} classes" if classes else "no classifier"
        hint = f" (only the classifier differs: the checkpoint has {has}; pass "
        raise WeightgenError(f"{what}{hint}model_kwargs={{'num_classes': {classes}}})",
                             cli=f"{what}{hint}--model-kwargs num_classes={classes})")
    if not check_only:
        model.load_state_dict(state, strict=True)


def _head_classes(model: nn.Module, state: dict, missing: list[str], unexpected: list[str],
                  shape_keys: list[str]) -> int | None:
    """When only the classifier differs: the ``num_classes`` that makes the checkpoint fit."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    heads = (heads,) if isinstance(heads, str) else tuple(heads or ())
    if not heads:
        return None
    in_head = lambda key: any(key.startswith(h + ".") for h in heads)  # noqa: E731
    if unexpected or not all(map(in_head, missing + shape_keys)):
        return None
    if shape_keys:
        weight = next((k for k in shape_keys if k.endswith(".weight")), shape_keys[0])
        return int(state[weight].shape[0])
    return 0 if missing else None  # missing: a checkpoint saved without its head


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


def _patch_embed(model: nn.Module) -> nn.Module | None:
    """The first timm PatchEmbed-like module (an ``img_size`` and a ``proj`` conv: ViT's ``patch_embed``,
    Mixer's ``stem``), if any."""
    return next((m for m in model.modules()
                 if getattr(m, "img_size", None) is not None and isinstance(getattr(m, "proj", None), nn.Conv2d)), None)


def _pretrained_cfg(model: nn.Module) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg if isinstance(cfg, dict) else cfg.to_dict()


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size[-2:])


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (height, width) that ``model`` only accepts, or None when it takes any size.

    The one rule weightgen uses, from timm: a model is fixed when its ``pretrained_cfg`` says
    ``fixed_input_size`` or when it has a patch embedding that checks its ``img_size``
    (``strict_img_size``), and never when built with ``dynamic_img_size``. The size is the model's own
    ``img_size`` where it has one (so ``img_size=64`` counts, not the cfg's 224), else the cfg's.
    """
    cfg = _pretrained_cfg(model)
    embed = _patch_embed(model)
    if getattr(model, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
        return None
    if embed is not None:
        return _pair(embed.img_size)
    if not cfg.get("fixed_input_size", False):
        return None
    own = getattr(model, "img_size", None)
    if own is not None:
        return _pair(own)
    return _pair(cfg["input_size"]) if cfg.get("input_size") else None


def first_conv(model: nn.Module) -> nn.Module | None:
    """The model's first convolution, dense or recast (a recast stem is a RecastConv2d, not an nn.Conv2d:
    skipping it would read the channels of a later conv, or none)."""
    from .layers import RecastConv2d  # layers imports nothing of models; deferred keeps models light

    return next((m for m in model.modules() if isinstance(m, (nn.Conv2d, RecastConv2d))), None)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width): the fixed size if the model has one, else timm's data config size."""
    cfg = getattr(model, "pretrained_cfg", None)
    # timm's own resolution of the model's data config; a non-timm model has none to resolve
    size = resolve_model_data_config(model).get("input_size") if cfg else None
    embed = _patch_embed(model)
    first = embed.proj if embed is not None else first_conv(model)
    # a patch embedding knows the size the model was built at, even one that accepts any size
    native = fixed_input_size(model) or (_pair(embed.img_size) if embed is not None else None)
    if native is None and size is None:
        raise WeightgenError("cannot tell the model's input size; it has no timm pretrained_cfg")
    channels = first.in_channels if first is not None else size[0]
    return (channels, *(native or size[1:]))


def input_side(model: nn.Module, preferred: int) -> int:
    """The square side to feed ``model``: its fixed size where it has one, else ``preferred``."""
    fixed = fixed_input_size(model)
    if fixed is None:
        return int(preferred)
    if fixed[0] != fixed[1]:
        raise WeightgenError(f"the model takes {fixed[0]}x{fixed[1]} inputs; only square inputs are supported")
    return fixed[0]


def example_batch(model: nn.Module, batch_size: int = 8, seed: int = 0, max_side: int = 224) -> torch.Tensor:
    """A seeded standard-normal batch at the model's input size (capped for speed unless fixed)."""
    channels, height, width = input_size(model)
    if fixed_input_size(model) is None:
        height, width = min(height, max_side), min(width, max_side)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, channels, height, width, generator=gen)


# Entry-point modules whose models take ``img_size``/``patch_size`` (ViT-like).
_VIT_MODULES = {
    "vision_transformer", "vision_transformer_relpos", "deit", "beit", "eva", "cait", "xcit",
    "vision_transformer_sam",
}


def _is_vit_like(arch: str) -> bool:
    name = arch.split(".")[0]
    try:
        module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    except Exception:  # unknown arch: fall back to the name
        return name.startswith(("vit", "deit"))
    # By module, not name: maxvit/mobilevit/levit contain "vit" but take no patch_size.
    return module in _VIT_MODULES


def small_input_kwargs(arch: str, image_size: int = 32, in_chans: int = 1, num_classes: int = 10,
                       patch_size: int | None = None) -> dict:
    """kwargs for ``timm.create_model(arch, **kw)`` on small images (the built-in tasks: 10 classes, 1 channel).

    ViT-like archs also get ``img_size`` and ``patch_size`` (default: a 4x4 token grid, i.e. 8 for
    32: each token sees 2x2 of an 8x8 digit; patch 4 costs ~4x more for lower accuracy).
    """
    kw: dict = {"num_classes": num_classes, "in_chans": in_chans}
    if _is_vit_like(arch):
        if patch_size is None:
            patch_size = next(p for p in (image_size // 4, 4, 2, 1) if p > 0 and image_size % p == 0)
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        kw.update(img_size=image_size, patch_size=patch_size)
    return kw
