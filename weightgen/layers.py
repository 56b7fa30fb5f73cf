"""RecastLinear / RecastConv2d: per-layer coefficients over a shared TemplateBank."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bank import TemplateBank


class RecastLayer(nn.Module):
    """Common part: K coefficient sets (K, n), the original bias, a reference to the bank."""

    def __init__(self, bank: TemplateBank, coefficients: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # object.__setattr__ keeps the bank out of this module's state_dict (it is stored once)
        object.__setattr__(self, "bank", bank)
        self.coefficients = nn.Parameter(coefficients)  # (K, n)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @property
    def weight(self) -> torch.Tensor:
        return self.bank.combine(self.coefficients)

    def merge(self) -> nn.Module:
        """A plain nn.Linear / nn.Conv2d with the current combined weight."""
        raise NotImplementedError


class RecastLinear(RecastLayer):
    def __init__(self, base: nn.Linear, bank: TemplateBank, coefficients: torch.Tensor):
        super().__init__(bank, coefficients, base.bias)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def merge(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(self.weight.detach().clone())
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, coefficients={tuple(self.coefficients.shape)}"


class RecastConv2d(RecastLayer):
    _CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")

    def __init__(self, base: nn.Conv2d, bank: TemplateBank, coefficients: torch.Tensor):
        super().__init__(bank, coefficients, base.bias)
        for arg in self._CONV_ARGS:
            setattr(self, arg, getattr(base, arg))
        self._reversed_padding_repeated_twice = base._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reuse Conv2d's own forward so padding modes and padding="same" behave identically
        return nn.Conv2d._conv_forward(self, x, self.weight, self.bias)

    def merge(self) -> nn.Conv2d:
        kwargs = {arg: getattr(self, arg) for arg in self._CONV_ARGS}
        layer = nn.Conv2d(**kwargs, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(self.weight.detach().clone())
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, coefficients={tuple(self.coefficients.shape)}")


def recast_layers(model: nn.Module) -> dict[str, RecastLayer]:
    """Every RECAST layer of ``model`` by dotted name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RecastLayer)}


def wrap(base: nn.Module, bank: TemplateBank, coefficients: torch.Tensor) -> RecastLayer:
    if isinstance(base, nn.Linear):
        return RecastLinear(base, bank, coefficients)
    if isinstance(base, nn.Conv2d):
        return RecastConv2d(base, bank, coefficients)
    raise TypeError(f"cannot reparameterize {type(base).__name__}")
