"""RecastConfig and the presets named after the paper's variants."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from torch import nn

# Regexes on full dotted module names. Kept here, and only here, so no other file hard-codes names
# (weightgen.adapt picks its adapter targets with the same patterns).
VIT_QKV = r"(^|.*\.)blocks\.\d+\.attn\.qkv"
VIT_MLP = r"(^|.*\.)blocks\.\d+\.mlp\.fc[12]"
VIT_MLP_BLOCK = r"(^|.*\.)blocks\.\d+\.mlp"  # the MLP module itself (AdaptFormer's parallel adapter)
# Convolutions inside residual stages (timm ResNet `layerN.M.convK`, and `stages.N...` families);
# the stem and the downsample shortcuts stay dense, as RECAST-resnet does.
RESIDUAL_CONV = r"(^|.*\.)(layer\d+|stages\.\d+)\.\d+\.(.*\.)?conv[^.]*"
SHORTCUTS = (r".*downsample.*", r".*shortcut.*")
# conv1/conv2 of every block but the first of each stage (timm ResNet `layerN.M.convK`, M >= 1)
LATER_BLOCK_CONV12 = r"(^|.*\.)layer\d+\.[1-9]\d*\.conv[12]"

PRESETS: dict[str, dict] = {
    "recast-mlp": {"target_modules": VIT_MLP, "layer_types": ("linear",)},
    "recast-attn": {"target_modules": VIT_QKV, "layer_types": ("linear",)},
    "recast-attn-mlp": {"target_modules": f"({VIT_QKV})|({VIT_MLP})", "layer_types": ("linear",)},
    "recast-conv": {
        "target_modules": RESIDUAL_CONV,
        "exclude_modules": list(SHORTCUTS),
        "layer_types": ("conv",),
    },
    # RECAST-resnet (the seed's): the first block of each stage stays dense; conv1/conv2 of the other
    # blocks of a stage share one bank (same shape in a BasicBlock stage) of half as many templates as
    # layers, at least 2: 2*(blocks-1) layers -> max(2, blocks-1) templates. One template would let a
    # coefficient only rescale its conv, which the BatchNorm after it undoes. ResNet-34, K=2:
    # 4*(2*2)+6*(2*3)+10*(2*5)+4*(2*2) = 168 coefficients per task (stages of 3, 4, 6, 3 blocks);
    # ResNet-18 (stages of 2 blocks: banks of 2 layers, 2 templates): 4*(2*2*2) = 32.
    "recast-resnet": {"target_modules": LATER_BLOCK_CONV12, "layer_types": ("conv",), "template_ratio": 0.5,
                      "min_templates": 2},
    # every Linear/Conv2d except the classifier head (excluded at match time)
    "all": {"target_modules": None, "layer_types": ("linear", "conv")},
}


@dataclass
class RecastConfig:
    """How a model is rewritten into template banks.

    A layer's weight is ``W_l = (1/K) * sum_k sum_i coef[l, k, i] * T[g, i]``.
    """

    # regex on full dotted names, or a list of exact names / dotted suffixes; None = every layer
    target_modules: str | list[str] | None = None
    # regexes or names / suffixes never wrapped (applied after target_modules)
    exclude_modules: list[str] = field(default_factory=list)
    layer_types: tuple[str, ...] = ("linear", "conv")  # which of nn.Linear / nn.Conv2d may match
    exclude_head: bool = True  # keep the classifier head dense (it changes per task)
    layers_per_group: int | None = None  # cap on consecutive same-shape layers per bank; None = all
    templates: int | None = None  # templates per bank; None = layers in the group (exact fit)
    # templates per bank as a share of its layers: n = max(ceil(ratio * layers), min(min_templates, layers));
    # exclusive with templates
    template_ratio: float | None = None
    # floor of the template_ratio rule, capped at the bank's layer count. Default 1 (what artifacts written
    # before this field was recorded were fitted with); recast-resnet uses 2 (see PRESETS)
    min_templates: int = 1
    # templates appended after fitting (weightgen.adapt.extend_banks; their coefficients start at zero);
    # recorded so that loading rebuilds banks of the right size
    extra_templates: int = 0
    coef_sets: int = 2  # K coefficient sets per layer, averaged
    seed: int = 0
    preset: str | None = None  # name the config came from, for the record

    def __post_init__(self) -> None:
        if self.coef_sets < 1:
            raise ValueError(f"coef_sets must be >= 1, got {self.coef_sets}")
        if self.templates is not None and self.templates < 1:
            raise ValueError(f"templates must be >= 1, got {self.templates}")
        if self.template_ratio is not None and not self.template_ratio > 0:
            raise ValueError(f"template_ratio must be > 0, got {self.template_ratio}")
        if self.template_ratio is not None and self.templates is not None:
            raise ValueError("pass either templates or template_ratio, not both")
        if self.min_templates < 1:
            raise ValueError(f"min_templates must be >= 1, got {self.min_templates}")
        if self.min_templates > 1 and self.template_ratio is None:
            raise ValueError("min_templates is the floor of template_ratio; pass template_ratio with it")
        if self.extra_templates < 0:
            raise ValueError(f"extra_templates must be >= 0, got {self.extra_templates}")
        if self.layers_per_group is not None and self.layers_per_group < 1:
            raise ValueError(f"layers_per_group must be >= 1, got {self.layers_per_group}")
        bad = set(self.layer_types) - {"linear", "conv"}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; use 'linear' and/or 'conv'")
        if isinstance(self.target_modules, str):
            _compile(self.target_modules)
        for pattern in self.exclude_modules:
            _compile(pattern)
        self.layer_types = tuple(self.layer_types)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RecastConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown recast config keys: {sorted(unknown)}")
        return cls(**data)

    def templates_for(self, layers: int) -> int:
        """Templates of a bank of ``layers`` layers under this config (extra templates included)."""
        if self.templates is not None:
            fitted = self.templates
        elif self.template_ratio is not None:
            fitted = max(math.ceil(self.template_ratio * layers - 1e-9), min(self.min_templates, layers), 1)
        else:
            fitted = layers
        return fitted + self.extra_templates

    def matches(self, name: str) -> bool:
        """Whether a module name is targeted (type and head checks happen in recasting.py)."""
        if self.target_modules is not None and not _name_matches(name, self.target_modules):
            return False
        return not any(_name_matches(name, pattern) for pattern in self.exclude_modules)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid module pattern {pattern!r}: {err}") from None


def _name_matches(name: str, spec: str | list[str]) -> bool:
    if isinstance(spec, str):
        # a plain name is also accepted as a suffix, like peft does
        return bool(_compile(spec).fullmatch(name)) or name == spec or name.endswith("." + spec)
    return any(name == key or name.endswith("." + key) for key in spec)


def preset_config(name: str, **overrides) -> RecastConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    settings = {**PRESETS[name], **overrides, "preset": name}
    if overrides.get("templates") is not None and "template_ratio" not in overrides:
        # an explicit template count wins over the preset's ratio (and its floor)
        settings.pop("template_ratio", None)
        settings.pop("min_templates", None)
    return RecastConfig(**settings)


def default_preset(model: nn.Module) -> str:
    """The paper's variant for a model family: attention+MLP for ViTs, residual convs for CNNs.

    A family preset is chosen only if it selects at least one plain nn.Linear / nn.Conv2d of the
    model (e.g. CoAtNet's qkv are convolutions, NFNet's convs are a Conv2d subclass); else ``all``.
    """
    layers = {name: type(m) for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    for name in ("recast-attn-mlp", "recast-conv"):
        config = preset_config(name)
        wanted = tuple({"linear": nn.Linear, "conv": nn.Conv2d}[t] for t in config.layer_types)
        if any(kind in wanted and config.matches(layer) for layer, kind in layers.items()):
            return name
    return "all"
