"""Per-task files: everything one task changed in a model, as a small safetensors file.

A task file holds, like peft's ``modules_to_save``: every RECAST layer's coefficients, every
parameter that trains for the task (``requires_grad`` at save time: the method's adapters, norms,
or the whole model for full fine-tuning), the classifier head, and every BatchNorm buffer of the
model (body included: training in train mode moves them). Loading the file back therefore gives
the task's logits bit for bit, whatever another task trained in between.
"""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .io import WeightgenError, atomic_file, load_tensors, save_tensors
from .recasting import METHOD_ATTR, head_names, recast_layers

TASK_FORMAT = "weightgen-task/1"


def _parts(model: nn.Module, include_head: bool = True) -> dict[str, list[str]]:
    """State-dict keys of a task, by part: coefficients, trainable, head, buffers (disjoint, sorted)."""
    state = model.state_dict(keep_vars=True)
    heads = head_names(model)
    stats = {name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats}
    parts: dict[str, list[str]] = {"coefficients": [], "trainable": [], "head": [], "buffers": []}
    recast = set(recast_layers(model))
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in heads:
            if include_head:
                parts["head"].append(key)
        elif owner in recast and leaf == "coefficients":
            parts["coefficients"].append(key)
        elif isinstance(value, nn.Parameter) and value.requires_grad:
            parts["trainable"].append(key)
        elif owner in stats and not isinstance(value, nn.Parameter):
            parts["buffers"].append(key)
    return {part: sorted(keys) for part, keys in parts.items()}


def _task_tensors(model: nn.Module, parts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    if not recast_layers(model) and model.__dict__.get(METHOD_ATTR) is None:
        raise WeightgenError("model has no RECAST layers; recast it first (or apply a weightgen.adapt method)")
    state = model.state_dict()
    return {key: state[key].detach().clone() for keys in parts.values() for key in keys}


def save_task(model: nn.Module, path: str | Path, name: str = "task", include_head: bool = True,
              overwrite: bool = False) -> int:
    """Write the task file atomically; returns its size in bytes.

    Its metadata records the task name, the adaptation method (``"recast"`` unless a
    ``weightgen.adapt`` method was applied) and which keys it holds, by part.
    """
    path = Path(path)
    parts = _parts(model, include_head)
    tensors = _task_tensors(model, parts)
    metadata = {"format": TASK_FORMAT, "task": name, "method": model.__dict__.get(METHOD_ATTR) or "recast",
                "parts": json.dumps(parts, separators=(",", ":"))}
    # overwrite replaces only a weightgen task file (recognised by its metadata format)
    with atomic_file(path, overwrite, owned_format=TASK_FORMAT) as tmp:
        save_tensors(tmp, tensors, metadata=metadata)
    return path.stat().st_size


def task_metadata(path: str | Path) -> dict:
    """The metadata of a task file (``parts`` decoded); {} for a file without any."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # load_tensors reports unreadable files with a proper message
        return {}
    if "parts" in meta:
        try:
            meta["parts"] = json.loads(meta["parts"])
        except ValueError:
            raise WeightgenError(f"task file {path} has corrupt metadata") from None
    return meta


def load_task(model: nn.Module, path: str | Path) -> None:
    """Switch ``model`` to the stored task in place, exactly.

    Every check runs before the model is touched: keys the model lacks, shapes, and tensors the
    model's method trains (or BatchNorm statistics) that the file does not hold. A head of another
    class count is rebuilt with timm's ``reset_classifier`` (on the old head's device and dtype).
    """
    state = load_tensors(Path(path))
    meta = task_metadata(path)
    current = model.state_dict(keep_vars=True)
    heads = head_names(model)
    file_method, model_method = meta.get("method"), model.__dict__.get(METHOD_ATTR) or "recast"
    hint = ""
    if file_method and file_method != model_method:
        hint = (f" (the file was trained with method {file_method!r}, the model is set up for {model_method!r}; "
                f"apply it first: weightgen.adapt.get_method({file_method!r}).apply(model))")
    unknown = [k for k in state if k not in current]
    if unknown:
        raise WeightgenError(f"task file {path} does not fit this model: unexpected {', '.join(unknown[:3])}{hint}")
    expected = _parts(model, include_head=False)
    missing = [k for k in expected["coefficients"] if k not in state]
    if missing:
        raise WeightgenError(f"task file {path} lacks coefficients for {', '.join(missing[:3])}{hint}")
    missing = [k for k in expected["trainable"] + expected["buffers"] if k not in state]
    if missing:
        raise WeightgenError(f"task file {path} lacks {', '.join(missing[:3])}, which this model's method changes "
                             f"per task{hint}")
    head_keys = [k for k in state if k.rpartition(".")[0] in heads]
    bad = [k for k in state if k not in head_keys and state[k].shape != current[k].shape]
    if bad:  # checked before any head is rebuilt, so a refused file leaves the model as it was
        raise WeightgenError(f"task file {path} has shapes that do not fit: {_shapes(bad, state, current)}")
    resized = [k for k in head_keys if state[k].shape != current[k].shape]
    if resized:
        classes = {state[k].shape[0] for k in resized}
        if (not hasattr(model, "reset_classifier") or len(classes) != 1
                or any(state[k].shape[1:] != current[k].shape[1:] for k in resized)):
            raise WeightgenError(f"task file {path} has a head that does not fit: {_shapes(resized, state, current)}")
        classes = classes.pop()
        after = _shapes_after_reset(model, classes)  # on a tensorless copy: the model is not touched yet
        bad = [k for k in state if state[k].shape != after.get(k)]
        if bad:
            raise WeightgenError(f"task file {path} has shapes that do not fit: {_shapes(bad, state, after)}")
        like = current[resized[0]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the new head is overwritten below; its init must not draw from the caller's RNG
            model.reset_classifier(classes)
        model.get_classifier().to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
        current = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in state.items():
            current[key].copy_(value)


def _shapes_after_reset(model: nn.Module, classes: int) -> dict[str, torch.Size]:
    """State-dict shapes of ``model`` after ``reset_classifier(classes)``, found on a copy whose tensors
    live on the meta device (no memory, no data copied; ``model`` and the caller's RNG untouched)."""
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    probe = copy.deepcopy(model, memo)
    with torch.random.fork_rng(devices=[]):
        probe.reset_classifier(classes)
    return {key: value.shape for key, value in probe.state_dict().items()}


def _shapes(keys: list[str], state: dict, current: dict) -> str:
    def shape(value) -> tuple | None:  # a tensor, a torch.Size, or None for a key the model lacks
        return None if value is None else tuple(getattr(value, "shape", value))

    return ", ".join(f"{k} (file {shape(state[k])}, model {shape(current.get(k))})" for k in keys[:3])
