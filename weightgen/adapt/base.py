"""What every injected adapter shares: it wraps one module as ``base_layer`` (peft's convention)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..io import WeightgenError
from ..layers import RecastLayer


class Wrapper(nn.Module):
    """A module around ``base_layer``; its own tensors are the method's per-task parameters.

    Wrapping (rather than hooks) means a later ``weightgen.merge_and_unload`` of the banks still
    sees the adapter: it merges ``...base_layer`` and the adapter keeps working on top of it.
    """

    foldable = False  # whether fold() can return a plain layer with the same function

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def fold(self) -> nn.Module:
        raise WeightgenError(f"{type(self).__name__} adds computation that no plain layer of the original "
                             "architecture can hold; keep the model as it is and save task files instead")


def plain_copy(layer: nn.Module) -> nn.Module:
    """A plain nn.Linear / nn.Conv2d with ``layer``'s current weight and bias (``layer`` untouched)."""
    if isinstance(layer, RecastLayer):
        return layer.merge()
    if type(layer) in (nn.Linear, nn.Conv2d):
        return copy.deepcopy(layer)
    raise WeightgenError(f"cannot fold an adapter over a {type(layer).__name__}")


def swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
