"""The only code that touches files: safetensors + JSON, atomic directory writes, safe loading."""
from __future__ import annotations

import contextlib
import json
import os
import math
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


class WeightgenError(ValueError):
    """A user-facing error: scripts print its message as one line and exit non-zero."""


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WeightgenError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightgenError(f"corrupt JSON in {path}: {err}") from None


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TensorEntry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_safetensors(path: Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> None:
    """Write the safetensors format one tensor at a time.

    ``safetensors.torch.save_file`` first copies every tensor into a bytes object, which doubles the
    peak memory of a large model; here each tensor is produced (e.g. a dense weight computed from
    its bank) only when its bytes are written. Files read back with safetensors' own loader.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    entries = sorted(entries, key=lambda e: e[0])
    for name, dtype, shape, _ in entries:
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot store {name}: unsupported dtype {dtype}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in entries:
            tensor = produce().detach().to("cpu").contiguous()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    write_safetensors(path, [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()], metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightgenError(f"missing file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightgenError(f"corrupt or truncated safetensors file {path}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from .safetensors / .pt / .pth / .bin, never executing pickled code.

    Nested ``state_dict`` / ``model`` entries are unwrapped and ``module.`` / ``_orig_mod.``
    prefixes stripped. Raises WeightgenError on anything unusable, including NaN / Inf.
    """
    path = Path(path)
    if not path.exists():
        raise WeightgenError(f"checkpoint not found: {path}")
    if path.is_dir() or path.suffix not in CHECKPOINT_SUFFIXES:
        raise WeightgenError(f"unsupported checkpoint {path}: expected a file ending in {', '.join(CHECKPOINT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt or unsafe pickles
            raise WeightgenError(f"cannot read checkpoint {path} (corrupt, truncated, or not a plain "
                                 f"tensor dict): {_first_line(err)}") from None
    state = _unwrap(state, path)
    check_finite(state, str(path))
    return state


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, dict):
        nested = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not state:
        raise WeightgenError(f"checkpoint {path} holds no state dict")
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue  # optimizer steps, epochs and other bookkeeping
        while key.startswith(_PREFIXES):  # in any order: DDP of a compiled model, or the reverse
            key = key[len(next(p for p in _PREFIXES if key.startswith(p))):]
        out[key] = value
    if not out:
        raise WeightgenError(f"checkpoint {path} holds no tensors")
    return out


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    for key, value in state.items():
        # a sum is non-finite whenever any element is; only then pay for the exact check
        if value.is_floating_point() and not torch.isfinite(value.sum()) and not torch.isfinite(value).all():
            raise WeightgenError(f"non-finite values (NaN/Inf) in {key!r} of {where}")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is never touched unless ``overwrite``; then it is replaced only after
    the new one is complete.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            out_dir.rename(trash / "old")
            tmp.rename(out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WeightgenError(f"output path {out_dir} exists and is not a directory")
    if out_dir.exists() and not overwrite:
        raise WeightgenError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    blocking = next((p for p in out_dir.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise WeightgenError(f"cannot create {out_dir}: {blocking} is a file")
