"""Public entry points that join the layers: ``recast`` = inject template banks, then fit them."""
from __future__ import annotations

from torch import nn

from .config import RecastConfig
from .mimicry import fit_closed_form
from .recasting import inject, restore


def recast(model: nn.Module, config: RecastConfig | None = None, *, preset: str | None = None,
           init: str = "fit") -> nn.Module:
    """Rewrite matched layers of ``model`` in place as RECAST layers over shared template banks.

    ``init="fit"`` fits the banks to the layers' current weights in closed form (exact when
    templates >= layers per group); ``init="empty"`` leaves zeros, for loading or fitting later.
    All checks run before the model is touched, and if the fit fails the model is put back as it
    was (same modules, same state dict) before the error propagates.
    """
    if init not in ("fit", "empty"):
        raise ValueError(f"init must be 'fit' or 'empty', got {init!r}")
    undo = inject(model, config, preset=preset)
    if init == "fit":
        try:
            fit_closed_form(model, {f"{name}.weight": layer.weight.detach() for name, layer in undo.originals.items()})
        except BaseException:
            restore(model, undo)
            raise
    return model
