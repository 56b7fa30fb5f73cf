"""The registry of adaptation methods: what each one injects and trains."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from ..bank import BANKS_ATTR
from ..config import RESIDUAL_CONV, SHORTCUTS, VIT_MLP_BLOCK, VIT_QKV
from ..io import WeightgenError
from ..layers import RecastConv2d, RecastLayer
from ..recasting import METHOD_ATTR, head_names
from .adaptformer import ParallelAdapter
from .base import Wrapper, swap
from .clr import CLRConv
from .lora import LoRAConv2d, LoRALinear
from .piggyback import PiggybackConv2d

log = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class AdaptMethod:
    """One way to learn a task on a backbone. ``apply`` is in place and keeps the function at init."""

    name: str
    description: str
    needs_recast: bool = False
    trains: str = "head"  # "head" | "coefficients" | "coefficients+norms" | "all"
    adapter: str | None = None  # None | "lora" | "adaptformer" | "clr" | "piggyback"
    rank: int = 1  # LoRA / adapter bottleneck
    alpha: float = 4.0  # LoRA alpha (scaling alpha / rank); AdaptFormer's output scale
    seed: int = 0  # init of injected tensors (LoRA A, adapter down-projection) when apply() gets no seed

    # --- checks -------------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise WeightgenError (one line) when this method cannot be applied to ``model``."""
        applied = model.__dict__.get(METHOD_ATTR)
        if applied is not None and applied != self.name:
            raise WeightgenError(f"model is already set up for method {applied!r}; start from a fresh backbone "
                                 f"for {self.name!r}")
        if self.needs_recast and BANKS_ATTR not in model.__dict__:
            raise WeightgenError(f"method {self.name!r} trains RECAST coefficients but the model is not recast "
                                 "(use a weightgen artifact or weightgen.recast(model, ...))")
        if applied is None and self.adapter is not None and not self._targets(model):
            raise WeightgenError(f"method {self.name!r} does not apply to {type(model).__name__}: "
                                 f"{self._target_hint()}")

    def _targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules this method wraps, by dotted name, in model order."""
        modules = dict(model.named_modules())
        heads = head_names(model)
        out = {}
        for name, module in modules.items():
            if not name or name in heads or isinstance(module, Wrapper) or name.endswith(".base_layer"):
                continue
            if self.adapter == "lora":
                if _is_linear(module) and re.fullmatch(VIT_QKV, name):
                    out[name] = module
                elif (_is_conv(module) and module.groups == 1 and re.fullmatch(RESIDUAL_CONV, name)
                      and not any(re.fullmatch(p, name) for p in SHORTCUTS)):
                    out[name] = module
            elif self.adapter == "adaptformer":
                if re.fullmatch(VIT_MLP_BLOCK, name) and hasattr(module, "fc1") and hasattr(module, "fc2"):
                    out[name] = module
            elif self.adapter in ("clr", "piggyback"):
                if isinstance(module, RecastConv2d):
                    out[name] = module
        return out

    def _target_hint(self) -> str:
        return {
            "lora": "it needs attention qkv layers (blocks.N.attn.qkv) or residual-stage convolutions",
            "adaptformer": "it needs transformer blocks with an MLP (blocks.N.mlp), e.g. a ViT",
            "clr": "it needs RECAST convolutions (a CNN recast with e.g. the recast-conv preset)",
            "piggyback": "it needs RECAST convolutions (a CNN recast with e.g. the recast-conv preset)",
        }[self.adapter]

    # --- application ---------------------------------------------------------------------------
    def apply(self, model: nn.Module, seed: int | None = None) -> nn.Module:
        """Inject this method's modules (once) and set ``requires_grad`` for it; returns ``model``.

        Injected tensors are initialised from CPU generators seeded by ``seed`` (default: the
        method's ``seed``), never from the global RNG. A second call with the same method only
        re-marks what trains; another method is refused.
        """
        self.check(model)
        if model.__dict__.get(METHOD_ATTR) is None and self.adapter is not None:
            self._inject(model, self.seed if seed is None else seed)
        self._mark_trainable(model)
        model.__dict__[METHOD_ATTR] = self.name  # read by save_task / load_task
        return model

    def _inject(self, model: nn.Module, seed: int) -> None:
        targets = self._targets(model)
        wrapped = {}
        for i, (name, module) in enumerate(targets.items()):
            wrapped[name] = self._wrap(module, seed=seed + 1000 * i)
        for name, module in wrapped.items():  # all built before the model is touched
            swap(model, name, module)
        log.info("%s: wrapped %d modules", self.name, len(wrapped))

    def _wrap(self, module: nn.Module, seed: int) -> nn.Module:
        if self.adapter == "lora":
            if _is_linear(module):
                dim = module.out_features // 3  # fused qkv: adapt q and v, leave k
                return LoRALinear(module, self.rank, self.alpha, slices=[(0, dim), (2 * dim, 3 * dim)], seed=seed)
            return LoRAConv2d(module, self.rank, self.alpha, seed=seed)
        if self.adapter == "adaptformer":
            like = module.fc1.weight
            return ParallelAdapter(module, module.fc1.in_features, self.rank, self.alpha, seed=seed,
                                   device=like.device, dtype=like.dtype, out_dim=module.fc2.out_features)
        if self.adapter == "clr":
            return CLRConv(module)
        if self.adapter == "piggyback":
            return PiggybackConv2d(module)
        raise AssertionError(self.adapter)

    def _mark_trainable(self, model: nn.Module) -> None:
        heads = head_names(model)
        for name, module in model.named_modules():
            own = module._parameters
            for pname, param in own.items():
                if param is None:
                    continue
                if self.trains == "all" or name in heads:
                    flag = True
                else:
                    flag = (self.trains.startswith("coefficients") and isinstance(module, RecastLayer)
                            and pname == "coefficients")
                    flag |= self.trains == "coefficients+norms" and isinstance(module, _NORMS)
                param.requires_grad = flag
        for module in model.modules():  # the injected tensors always train
            if isinstance(module, Wrapper):
                for child_name, child in module.named_children():
                    if child_name != "base_layer":
                        child.requires_grad_(True)
                for param in module._parameters.values():
                    if param is not None:
                        param.requires_grad = True


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (isinstance(module, RecastLayer) and hasattr(module, "in_features"))


def _is_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d or isinstance(module, RecastConv2d)


_R = dict(needs_recast=True)
METHODS: dict[str, AdaptMethod] = {m.name: m for m in [
    AdaptMethod("recast", "RECAST coefficients + head", trains="coefficients", **_R),
    AdaptMethod("recast-norm", "RECAST coefficients + norm affine parameters + head", trains="coefficients+norms", **_R),
    AdaptMethod("linear", "the classifier head only (linear probe)", trains="head"),
    AdaptMethod("full", "every parameter (full fine-tuning; its task file is the whole model)", trains="all"),
    AdaptMethod("lora", "LoRA r=1, alpha=4 on attention q,v (ViT) or residual-stage convs (CNN) + head",
                trains="head", adapter="lora", rank=1, alpha=4.0),
    AdaptMethod("recast+melo", "RECAST coefficients + LoRA r=1, alpha=4 on q,v of every block (convs on a CNN)",
                trains="coefficients", adapter="lora", rank=1, alpha=4.0, **_R),
    AdaptMethod("recast+adaptformer", "RECAST coefficients + parallel MLP adapter per block (r=2, scale 4, ReLU)",
                trains="coefficients", adapter="adaptformer", rank=2, alpha=4.0, **_R),
    AdaptMethod("recast+clr", "RECAST coefficients + depthwise 3x3 conv after each RECAST conv (dirac init)",
                trains="coefficients", adapter="clr", **_R),
    AdaptMethod("recast+piggyback", "RECAST coefficients + binary masks on RECAST conv weights (threshold 5e-3, STE)",
                trains="coefficients", adapter="piggyback", **_R),
]}


def get_method(name: str) -> AdaptMethod:
    if name not in METHODS:
        raise WeightgenError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Numbers a task trains, with and without the classifier head."""
    heads = head_names(model)
    head_params = {id(p) for name, m in model.named_modules() if name in heads for p in m.parameters(recurse=False)}
    seen, with_head, without_head = set(), 0, 0
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        with_head += param.numel()
        if id(param) not in head_params:
            without_head += param.numel()
    return {"with_head": with_head, "without_head": without_head}
