"""Target matching, grouping into banks, injection, merge/unload and parameter accounting."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .bank import TemplateBank
from .config import RecastConfig, default_preset, preset_config
from .layers import RecastLayer, wrap

log = logging.getLogger(__name__)
BANKS_ATTR = "recast_banks"  # the ModuleDict on the root model that holds every bank once


class Banks(nn.ModuleDict):
    """Every bank of a model, registered once on its root as ``recast_banks``.

    Its forward passes the input through: a recast ``nn.Sequential`` calls every child in turn,
    this one included, and must still compute the same function.
    """

    def forward(self, x):
        return x


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
    if hasattr(model, BANKS_ATTR):
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


def recast(model: nn.Module, config: RecastConfig | None = None, *, preset: str | None = None,
           init: str = "fit") -> nn.Module:
    """Rewrite matched layers of ``model`` in place as RECAST layers over shared template banks.

    ``init="fit"`` fits the banks to the layers' current weights in closed form (exact when
    templates >= layers per group); ``init="empty"`` leaves zeros, for loading or fitting later.
    All checks run before the model is touched.
    """
    config = resolve_config(model, config, preset)
    if init not in ("fit", "empty"):
        raise ValueError(f"init must be 'fit' or 'empty', got {init!r}")
    groups = plan_groups(model, find_targets(model, config), config)
    modules = dict(model.named_modules())
    current = {f"{n}.weight": modules[n].weight.detach() for g in groups for n in g.members} if init == "fit" else {}

    banks = Banks()
    for group in groups:
        n = config.templates or len(group.members)
        like = modules[group.members[0]].weight  # banks live on the layers' device, in their dtype
        kind = {"device": like.device, "dtype": like.dtype}
        banks[group.name] = TemplateBank(torch.zeros((n, *group.shape), **kind), group.members)
        for name in group.members:
            base = modules[name]
            layer = wrap(base, banks[group.name], torch.zeros(config.coef_sets, n, **kind))
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, layer)
    model.add_module(BANKS_ATTR, banks)
    model.recast_config = config
    model.recast_groups = groups
    if init == "fit":
        from .mimicry.closed_form import fit_closed_form
        fit_closed_form(model, current)
    mark_only_coefficients_trainable(model, train_head=False)
    log.info("recast %d layers into %d banks", sum(len(g.members) for g in groups), len(groups))
    return model


def recast_layers(model: nn.Module) -> dict[str, RecastLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RecastLayer)}


def banks_of(model: nn.Module) -> nn.ModuleDict:
    if not hasattr(model, BANKS_ATTR):
        raise ValueError("model is not recast; call weightgen.recast(model, ...) first")
    return getattr(model, BANKS_ATTR)


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
    templates = sum(bank.templates.numel() for bank in banks_of(model).values())
    coefficients = sum(layer.coefficients.numel() for layer in layers.values())
    dense_weights = sum(layer.bank.templates[0].numel() for layer in layers.values())
    other = sum(p.numel() for n, p in model.named_parameters()
                if not n.startswith(BANKS_ATTR + ".") and not n.endswith("coefficients"))
    return {
        "model": other + dense_weights,
        "templates": templates,
        "coefficients": coefficients,
        "per_task_trainable": coefficients,
        "stored": other + templates + coefficients,
    }


def dense_entries(model: nn.Module) -> list:
    """The dense state dict as (key, dtype, shape, producer) entries, each weight computed on demand.

    Lets a writer stream a dense export of a large model without holding all of it in memory.
    """
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
    """A plain state dict that loads with ``strict=True`` into the original architecture."""
    return {key: produce() for key, _, _, produce in dense_entries(model)}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every RECAST layer by a plain layer with its combined weight and drop the banks."""
    modules = dict(model.named_modules())
    for name, layer in recast_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.merge())
    delattr(model, BANKS_ATTR)
    for attr in ("recast_config", "recast_groups"):
        model.__dict__.pop(attr, None)
    return model
