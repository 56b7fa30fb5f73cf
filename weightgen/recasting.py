"""Target matching, grouping into banks, injection, merge/unload and parameter accounting.

Injection alone lives here (``inject``); the function ``weightgen.recast`` adds the closed-form fit
on top (``weightgen/api.py``), so this module never imports the fitting code above it. Adapters
(``weightgen.adapt``, a layer above) are unloaded through the :class:`Foldable` protocol they
implement, so this module never imports them either.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .bank import BANKS_ATTR, Banks, TemplateBank, attach_banks, banks_of, detach_banks
from .config import RecastConfig, default_preset, preset_config
from .io import WeightgenError
from .layers import RecastLayer, recast_layers, wrap

log = logging.getLogger(__name__)
METHOD_ATTR = "adapt_method"  # set on a model by weightgen.adapt methods; recorded in task files
__all__ = ["BANKS_ATTR", "METHOD_ATTR", "Banks", "Foldable", "Group", "Injection", "banks_of", "dense_entries", "export_dense", "find_targets",
           "head_names", "inject", "mark_only_coefficients_trainable", "merge_and_unload", "parameter_counts",
           "plan_groups", "recast_layers", "resolve_config", "restore"]


@dataclass(frozen=True)
class Group:
    name: str  # bank key, "g0", "g1", ... in model order
    shape: tuple[int, ...]
    members: tuple[str, ...]  # dotted module names, model order


def head_names(model: nn.Module) -> set[str]:
    """Module names of the classifier head (timm's get_classifier, else the last Linear)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    if head is not None:
        # heads may be containers (e.g. Sequential); every layer inside belongs to the head
        names |= {f"{prefix}.{sub}" for prefix in list(names) for sub, _ in head.named_modules() if sub}
        return names
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {linears[-1]} if linears else set()


def _type_ok(module: nn.Module, layer_types: tuple[str, ...]) -> bool:
    return ("linear" in layer_types and type(module) is nn.Linear) or (
        "conv" in layer_types and type(module) is nn.Conv2d
    )


def find_targets(model: nn.Module, config: RecastConfig) -> list[str]:
    """Names of the layers ``config`` selects, in model order. Raises if nothing matches."""
    if BANKS_ATTR in model.__dict__:
        raise ValueError("model is already recast; merge_and_unload() it first")
    heads = head_names(model) if config.exclude_head else set()
    names = [
        name for name, module in model.named_modules()
        if name and _type_ok(module, config.layer_types) and name not in heads and config.matches(name)
    ]
    if not names:
        subclassed = sorted({type(m).__name__ for m in model.modules()
                             if isinstance(m, (nn.Linear, nn.Conv2d)) and type(m) not in (nn.Linear, nn.Conv2d)})
        note = (f"; layers of types {', '.join(subclassed)} have their own forward and are never wrapped"
                if subclassed else "")
        raise ValueError(
            f"target pattern {config.target_modules!r} (types {list(config.layer_types)}) matched no layer; "
            f"e.g. this model has {', '.join(_example_names(model))}{note}"
        )
    return names


def _example_names(model: nn.Module, count: int = 4) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:count]


def plan_groups(model: nn.Module, names: list[str], config: RecastConfig) -> list[Group]:
    """Bank layers of equal weight shape in model order, at most ``layers_per_group`` per bank."""
    modules = dict(model.named_modules())
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        by_shape.setdefault(tuple(modules[name].weight.shape), []).append(name)
    chunks = []
    cap = config.layers_per_group
    for shape, members in by_shape.items():
        step = cap or len(members)
        chunks += [(shape, tuple(members[i:i + step])) for i in range(0, len(members), step)]
    order = {name: i for i, name in enumerate(names)}
    chunks.sort(key=lambda chunk: order[chunk[1][0]])
    return [Group(f"g{i}", shape, members) for i, (shape, members) in enumerate(chunks)]


def resolve_config(model: nn.Module, config: RecastConfig | None = None, preset: str | None = None) -> RecastConfig:
    if config is not None and preset is not None:
        raise ValueError("pass either a RecastConfig or a preset name, not both")
    if config is not None:
        return config
    return preset_config(preset or default_preset(model))


@dataclass
class Injection:
    """What ``inject`` replaced, so that ``restore`` can put the model back exactly as it was."""
    originals: dict[str, nn.Module]  # dotted name -> the plain layer it replaced, model order
    trainable: list[tuple[nn.Parameter, bool]] = field(default_factory=list)  # requires_grad before


def inject(model: nn.Module, config: RecastConfig | None = None, *, preset: str | None = None) -> Injection:
    """Rewrite matched layers of ``model`` in place as RECAST layers over zero template banks.

    All checks run before the model is touched, and a failure while swapping puts it back.
    Only coefficients stay trainable. Returns what was replaced (see ``restore``).
    """
    config = resolve_config(model, config, preset)
    groups = plan_groups(model, find_targets(model, config), config)
    modules = dict(model.named_modules())
    undo = Injection({n: modules[n] for g in groups for n in g.members},
                     [(p, p.requires_grad) for p in model.parameters()])
    try:
        banks = Banks()
        for group in groups:
            n = config.templates_for(len(group.members))
            like = modules[group.members[0]].weight  # banks live on the layers' device, in their dtype
            kind = {"device": like.device, "dtype": like.dtype}
            banks[group.name] = TemplateBank(torch.zeros((n, *group.shape), **kind), group.members)
            for name in group.members:
                _swap(model, modules, name, wrap(modules[name], banks[group.name],
                                                 torch.zeros(config.coef_sets, n, **kind)))
        attach_banks(model, model.get_submodule(groups[0].members[0]), banks)
        model.recast_config = config
        model.recast_groups = groups
        mark_only_coefficients_trainable(model, train_head=False)
    except BaseException:
        restore(model, undo)
        raise
    log.info("recast %d layers into %d banks", len(undo.originals), len(groups))
    return undo


def restore(model: nn.Module, undo: Injection) -> nn.Module:
    """Undo ``inject``: the original layers back, no banks, parameters trainable as before."""
    modules = dict(model.named_modules())
    for name, original in undo.originals.items():
        _swap(model, modules, name, original)
    detach_banks(model)
    for attr in ("recast_config", "recast_groups"):
        model.__dict__.pop(attr, None)
    for param, flag in undo.trainable:
        param.requires_grad = flag
    return model


def _swap(model: nn.Module, modules: dict[str, nn.Module], name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(modules[parent_name] if parent_name else model, child, layer)


def mark_only_coefficients_trainable(model: nn.Module, train_head: bool = True) -> None:
    """Freeze everything but the coefficients (and the classifier head, for a new task)."""
    heads = head_names(model) if train_head else set()
    for name, module in model.named_modules():
        own = isinstance(module, RecastLayer)
        for pname, param in module.named_parameters(recurse=False):
            param.requires_grad = (own and pname == "coefficients") or name in heads


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Model = parameters of the equivalent dense model; per_task_trainable = coefficients only."""
    layers = recast_layers(model)
    banks = banks_of(model)
    templates = sum(bank.templates.numel() for bank in banks.values())
    coefficients = sum(layer.coefficients.numel() for layer in layers.values())
    dense_weights = sum(layer.bank.templates[0].numel() for layer in layers.values())
    own = {id(p) for p in banks.parameters()} | {id(layer.coefficients) for layer in layers.values()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in own)
    return {
        "model": other + dense_weights,
        "templates": templates,
        "coefficients": coefficients,
        "per_task_trainable": coefficients,
        "stored": other + templates + coefficients,
    }


@runtime_checkable
class Foldable(Protocol):
    """What a module that wraps a layer (``base_layer``) implements so that unloading can remove it:
    ``foldable`` says whether ``fold()`` returns one plain layer with the same function (LoRA, masks)
    or the wrapper adds computation that no plain layer holds (``fold()`` then raises)."""

    foldable: bool

    def fold(self) -> nn.Module: ...


def _wrappers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and isinstance(m, Foldable)}


def _check_foldable(model: nn.Module) -> dict[str, nn.Module]:
    wrappers = _wrappers(model)
    unfoldable = sorted({type(m).__name__ for m in wrappers.values() if not m.foldable})
    if unfoldable:
        raise WeightgenError(f"cannot merge {', '.join(unfoldable)} into the original architecture; keep the "
                             "adapted model and its task files, or pass keep_adapters=True to merge the banks only")
    return wrappers


def dense_entries(model: nn.Module) -> list:
    """The dense state dict as (key, dtype, shape, producer) entries, each weight computed on demand.

    Lets a writer stream a dense export of a large model without holding all of it in memory. A
    model with adapters (LoRA, masks) is folded into a copy first, which costs one model of memory.
    Raises WeightgenError (before any work) for adapters no plain layer can hold.
    """
    if _check_foldable(model):
        model = merge_and_unload(copy.deepcopy(model))
    layers = recast_layers(model)
    entries = []
    for key, value in model.state_dict().items():
        if key.startswith(BANKS_ATTR + "."):
            continue
        module_name, _, leaf = key.rpartition(".")
        if module_name in layers and leaf == "coefficients":
            layer = layers[module_name]
            entries.append((f"{module_name}.weight", layer.bank.templates.dtype, layer.bank.weight_shape,
                            lambda layer=layer: _combined(layer)))
        else:
            entries.append((key, value.dtype, tuple(value.shape), lambda value=value: value))
    return entries


@torch.no_grad()
def _combined(layer: RecastLayer) -> torch.Tensor:
    return layer.weight.detach()


def export_dense(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state dict that loads with ``strict=True`` into the original architecture.

    ``model`` is untouched: RECAST layers give their combined weights, LoRA and Piggyback masks are
    folded in (on a copy); AdaptFormer / CLR adapters are refused (WeightgenError).
    """
    return {key: produce() for key, _, _, produce in dense_entries(model)}


def merge_and_unload(model: nn.Module, keep_adapters: bool = False) -> nn.Module:
    """In place: every RECAST layer becomes a plain layer with its combined weight, the banks go, and
    every adapter (anything :class:`Foldable`: LoRA, Piggyback masks) is folded into a plain layer.

    Adapters that no plain layer can hold (AdaptFormer, CLR) are refused before the model is
    touched; ``keep_adapters=True`` merges the banks only and leaves every adapter working on top of
    the merged layers.
    """
    wrappers = {} if keep_adapters else _check_foldable(model)
    modules = dict(model.named_modules())
    for name, layer in recast_layers(model).items():  # inside wrappers too: they are folded next
        _swap(model, modules, name, layer.merge())
    detach_banks(model)
    for attr in ("recast_config", "recast_groups"):
        model.__dict__.pop(attr, None)
    for name in sorted(wrappers, key=lambda n: -n.count(".")):  # innermost first
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, model.get_submodule(name).fold())
    if not keep_adapters:
        model.__dict__.pop(METHOD_ATTR, None)  # a plain model: no method's parameters left to train
    return model
