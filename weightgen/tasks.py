"""Per-task files: one task's coefficients (and its head) as a tiny safetensors file."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .io import WeightgenError, atomic_file, load_tensors, save_tensors
from .recast import head_names, recast_layers

TASK_FORMAT = "weightgen-task/1"


def task_state(model: nn.Module, include_head: bool = True) -> dict[str, torch.Tensor]:
    """The tensors that make one task: every layer's coefficients, plus the classifier head."""
    state = {f"{name}.coefficients": layer.coefficients.detach().clone()
             for name, layer in recast_layers(model).items()}
    if not state:
        raise WeightgenError("model has no RECAST layers; recast it first")
    if include_head:
        heads = head_names(model)
        for key, value in model.state_dict().items():
            if key.rpartition(".")[0] in heads:
                state[key] = value.detach().clone()
    return state


def save_task(model: nn.Module, path: str | Path, name: str = "task", include_head: bool = True,
              overwrite: bool = False) -> int:
    """Write the task file atomically; returns its size in bytes."""
    path = Path(path)
    # overwrite replaces only a weightgen task file (recognised by its metadata format)
    with atomic_file(path, overwrite, owned_format=TASK_FORMAT) as tmp:
        save_tensors(tmp, task_state(model, include_head), metadata={"format": TASK_FORMAT, "task": name})
    return path.stat().st_size


def load_task(model: nn.Module, path: str | Path) -> None:
    """Switch ``model`` to the stored task in place (templates untouched).

    A head of another class count is rebuilt with timm's ``reset_classifier`` first.
    """
    state = load_tensors(Path(path))
    current = model.state_dict()
    unknown = [k for k in state if k not in current]
    if unknown:
        raise WeightgenError(f"task file {path} does not fit this model: unexpected {', '.join(unknown[:3])}")
    missing = [k for k in current if k.endswith(".coefficients") and k not in state]
    if missing:
        raise WeightgenError(f"task file {path} lacks coefficients for {', '.join(missing[:3])}")
    head_keys = [k for k in state if k.rpartition(".")[0] in head_names(model)]
    head_weight = next((k for k in head_keys if k.endswith("weight")), None)
    bad = [k for k in state if k not in head_keys and state[k].shape != current[k].shape]
    if bad:  # checked before any head is rebuilt, so a refused file leaves the model as it was
        raise WeightgenError(f"task file {path} has shapes that do not fit: {', '.join(bad[:3])}")
    if head_weight and state[head_weight].shape != current[head_weight].shape and hasattr(model, "reset_classifier"):
        model.reset_classifier(state[head_weight].shape[0])
        current = model.state_dict()
    bad = [k for k in state if state[k].shape != current[k].shape]
    if bad:
        raise WeightgenError(f"task file {path} has shapes that do not fit: {', '.join(bad[:3])}")
    with torch.no_grad():
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # heads may hold BN buffers
        for key, value in state.items():
            tensors[key].copy_(value)
