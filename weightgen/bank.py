"""TemplateBank: the n shared templates of one group of same-shape layers; where a model keeps them."""
from __future__ import annotations

import torch
from torch import nn

BANKS_ATTR = "recast_banks"  # state_dict prefix of the banks, and the root attribute that lists them


class TemplateBank(nn.Module):
    """n templates of one weight shape, registered once on the model (see :class:`Banks`).

    Layers keep a plain reference to their bank, so ``state_dict()`` holds each bank once.
    """

    def __init__(self, templates: torch.Tensor, members: list[str]):
        super().__init__()
        # frozen by default: downstream tasks train only coefficients
        self.templates = nn.Parameter(templates, requires_grad=False)  # (n, *shape)
        self.members = list(members)

    @property
    def num_templates(self) -> int:
        return self.templates.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.templates.shape[1:])

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``(1/K) sum_k sum_i c[k, i] T[i]`` for coefficients (K, n) -> one weight (*shape)."""
        mixed = coefficients.mean(dim=0)  # (n,)
        flat = self.templates.reshape(self.num_templates, -1)  # (n, D)
        return (mixed @ flat).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return f"templates={self.num_templates}, shape={self.weight_shape}, layers={len(self.members)}"


class Banks(nn.ModuleDict):
    """Every bank of a model ("g0", "g1", ...), held once.

    The module tree keeps it as a child of the model's first RECAST layer, never of the root: a
    child of the root would change the root's structure (an ``nn.Sequential`` root would grow by
    one and run it as a step). There it is in ``parameters()`` once and follows ``.to()``. The
    root lists it as the plain attribute ``recast_banks``, and its state-dict hooks keep the
    saved keys ``recast_banks.<group>.templates`` wherever the container sits.
    """


def attach_banks(model: nn.Module, owner: nn.Module, banks: Banks) -> None:
    """Hold ``banks`` under ``owner`` (a RECAST layer of ``model``) and list them on ``model``."""
    owner.add_module(BANKS_ATTR, banks)
    object.__setattr__(model, BANKS_ATTR, banks)  # an attribute, not a child: the root's children stay as they were
    if not model.__dict__.get("_recast_hooks"):  # registered once per model; inert while it holds no banks
        model.register_state_dict_post_hook(_save_hook)
        model.register_load_state_dict_pre_hook(_load_hook)
        object.__setattr__(model, "_recast_hooks", True)


def detach_banks(model: nn.Module) -> None:
    """Forget the banks (after their layers were replaced); the hooks fall silent."""
    banks = model.__dict__.pop(BANKS_ATTR, None)
    if banks is None:
        return
    for module in model.modules():
        if module._modules.get(BANKS_ATTR) is banks:
            del module._modules[BANKS_ATTR]


def banks_of(model: nn.Module) -> Banks:
    banks = model.__dict__.get(BANKS_ATTR)
    if banks is None:
        raise ValueError("model is not recast; call weightgen.recast(model, ...) first")
    return banks


def _owner_path(model: nn.Module) -> str | None:
    """Dotted name of the module that holds the banks, or None when ``model`` is not recast."""
    banks = model.__dict__.get(BANKS_ATTR)
    if banks is None:
        return None
    return next(name for name, module in model.named_modules() if module._modules.get(BANKS_ATTR) is banks)


def _save_hook(model: nn.Module, state: dict, prefix: str, _meta) -> None:
    owner = _owner_path(model)
    if owner is None:
        return
    held, saved = f"{prefix}{owner}.{BANKS_ATTR}." if owner else f"{prefix}{BANKS_ATTR}.", f"{prefix}{BANKS_ATTR}."
    for key in [k for k in state if k.startswith(held)]:
        state[saved + key[len(held):]] = state.pop(key)  # re-inserted last, where the root's child used to be


def _load_hook(model: nn.Module, state: dict, prefix: str, *_args) -> None:
    owner = _owner_path(model)
    if not owner:
        return
    saved, held = f"{prefix}{BANKS_ATTR}.", f"{prefix}{owner}.{BANKS_ATTR}."
    for key in [k for k in state if k.startswith(saved)]:
        state[held + key[len(saved):]] = state.pop(key)
