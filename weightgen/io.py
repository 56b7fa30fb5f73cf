"""The only code that touches files: safetensors + JSON, atomic directory writes, safe loading."""
from __future__ import annotations

import argparse
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.models import clean_state_dict

from . import __version__  # the package sets it before importing any of its modules

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")


class WeightgenError(ValueError):
    """A user-facing error: scripts print its message as one line and exit non-zero.

    ``cli``: the same message in command-line terms (``--overwrite`` where the message says
    ``overwrite=True``); :func:`weightgen.cli.run_cli` prints it instead.
    """

    def __init__(self, message: str = "", *, cli: str | None = None):
        super().__init__(message)
        self.cli = cli


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


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """The checks on a checkpoint path that need no reading: it exists and has a known suffix."""
    path = Path(path)
    if not path.exists():
        raise WeightgenError(f"checkpoint not found: {path}")
    if path.is_dir() or path.suffix not in CHECKPOINT_SUFFIXES:
        raise WeightgenError(f"unsupported checkpoint {path}: expected a file ending in {', '.join(CHECKPOINT_SUFFIXES)}")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from .safetensors / .pt / .pth / .bin, never executing pickled code.

    Nested ``state_dict`` / ``model`` entries are unwrapped and ``module.`` / ``_orig_mod.``
    prefixes stripped (timm's ``clean_state_dict``). timm's ``load_state_dict`` does not fit here:
    it fails on a pickle that is not a dict and unwraps one level only. Raises WeightgenError on
    anything unusable, including NaN / Inf.
    """
    path = check_checkpoint_path(path)
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        try:
            # timm training checkpoints hold their argparse.Namespace; allow it as timm does (torch >= 2.5)
            safe = getattr(torch.serialization, "safe_globals", None)
            with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
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
    # optimizer steps, epochs and other bookkeeping dropped; DDP / torch.compile prefixes stripped
    out = clean_state_dict({k: v for k, v in state.items() if torch.is_tensor(v)})
    if not out:
        raise WeightgenError(f"checkpoint {path} holds no tensors")
    return out


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    for key, value in state.items():
        # a sum is non-finite whenever any element is; only then pay for the exact check
        if value.is_floating_point() and not torch.isfinite(value.sum()) and not torch.isfinite(value).all():
            raise WeightgenError(f"non-finite values (NaN/Inf) in {key!r} of {where}")


# ---------------------------------------------------------------- writing outputs safely
#
# Every output directory weightgen writes carries a manifest (MANIFEST_FILE) listing its files.
# ``overwrite`` replaces only such a directory, and only while it holds nothing but those files:
# a folder weightgen did not write (or a user's file added to one) is never deleted.

MANIFEST_FILE = ".weightgen.json"
MANIFEST_FORMAT = "weightgen-output/1"


def _refuse(message: str, cli: str | None = None) -> None:
    raise WeightgenError(message, cli=cli)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a directory weightgen wrote, or None (absent, unreadable, or not ours)."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
          and isinstance(manifest.get("files"), list) and all(isinstance(f, str) for f in manifest["files"]))
    return manifest if ok else None


def _listing(root: Path) -> list[str]:
    """Every file under ``root`` (relative POSIX paths, sorted); symlinks count as files."""
    out = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            out += [f"{entry.name}/{sub}" for sub in _listing(Path(entry.path))]
        else:
            out.append(entry.name)
    return out


def _foreign(root: Path, files: set[str], prefix: str = "") -> list[str]:
    """Entries under ``root`` that the manifest does not list (a foreign folder is named once)."""
    dirs = {f.rsplit("/", 1)[0] for f in files if "/" in f}
    dirs |= {d.rsplit("/", i)[0] for d in list(dirs) for i in range(1, d.count("/") + 1)}
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        rel = prefix + entry.name
        if entry.is_dir(follow_symlinks=False) and rel in dirs:
            found += _foreign(Path(entry.path), files, rel + "/")
        elif rel not in files and rel != MANIFEST_FILE:
            found.append(rel + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return found


def _names(paths: list[str], n: int = 3) -> str:
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, kind: str | None = None) -> None:
    """Raise WeightgenError unless ``out_dir`` may be written; never touches the disk.

    Allowed: a path that does not exist yet, an empty directory, or (with ``overwrite``) a
    directory weightgen wrote (it has a manifest; of ``kind``, when given) that holds nothing
    beyond the files its manifest lists. The current directory and its parents are never targets.
    """
    out = Path(out_dir)
    if out.is_symlink():
        _refuse(f"output path {out} is a symbolic link; pass the directory it points to")
    if out.exists() and not out.is_dir():
        _refuse(f"output path {out} exists and is not a directory")
    if out.exists():
        resolved, cwd = out.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
            _refuse(f"refusing to write to {out}: it is the current directory, one above it, or your home "
                    f"directory; name a new directory instead")
        if not any(out.iterdir()):
            return  # an empty directory is used as is
        manifest = read_manifest(out)
        if manifest is None:
            _refuse(f"output directory {out} already exists and was not written by weightgen (it has no "
                    f"{MANIFEST_FILE}); choose another output directory")
        if not overwrite:
            what = f"output directory {out} already exists"
            _refuse(f"{what}; pass overwrite=True to replace it", cli=f"{what}; pass --overwrite to replace it")
        if kind is not None and manifest.get("kind") != kind:
            _refuse(f"refusing to replace {out}: it holds a weightgen {manifest.get('kind')}, not a {kind}")
        foreign = _foreign(out, set(manifest["files"]))
        if foreign:
            _refuse(f"refusing to replace {out}: it holds {_names(foreign)}, which weightgen did not write; "
                    f"move them away first")
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        _refuse(f"cannot create {out}: {blocking} is a file")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightgenError(f"cannot create {path.parent}: {err.strerror or err}") from None


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False, kind: str = "output") -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``out_dir`` only if the block succeeds.

    ``out_dir`` is checked first (:func:`check_output_dir`), so a refused target is left
    untouched. On success a manifest listing every file written is added, permissions are made
    normal (``0o777 & ~umask``; ``mkdtemp`` makes 0700), and an old directory is replaced only
    after the new one is complete.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite, kind)
    _make_parent(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        files = _listing(tmp)
        write_json(tmp / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "kind": kind, "files": files,
                                         "weightgen_version": __version__})
        mask = _umask()
        for name in files + [MANIFEST_FILE]:  # safetensors writes 0600
            if not (tmp / name).is_symlink():
                os.chmod(tmp / name, 0o666 & ~mask)
        for folder in {str(Path(f).parent) for f in files} - {"."}:
            os.chmod(tmp / folder, 0o777 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        check_output_dir(out, overwrite, kind)  # again: the target may have changed meanwhile
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(trash / "old")
            try:
                tmp.rename(out)
            except BaseException:
                (trash / "old").rename(out)  # put the old one back
                trash.rmdir()
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def add_output_file(out_dir: str | os.PathLike, name: str, data: str | bytes, kind: str | None = None) -> Path:
    """Write (or replace) the file ``name`` inside a directory weightgen wrote, atomically, and
    list it in the directory's manifest (so a later ``overwrite`` may replace it).

    Refused: a directory without a manifest (or of another ``kind``), and a file of that name
    that the manifest does not list (a user's file).
    """
    out = Path(out_dir)
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None:
        _refuse(f"{out} was not written by weightgen (no {MANIFEST_FILE}); not writing into it")
    if kind is not None and manifest.get("kind") != kind:
        _refuse(f"{out} holds a weightgen {manifest.get('kind')}, not a {kind}; not writing into it")
    if not name or "/" in name or name in (".", "..", MANIFEST_FILE):
        raise ValueError(f"not a plain file name: {name!r}")
    target = out / name
    if (target.exists() or target.is_symlink()) and name not in manifest["files"]:
        _refuse(f"{target} exists and weightgen did not write it; move it away first")
    manifest["files"] = sorted(set(manifest["files"]) | {name})
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
    for file, content in ((name, data), (MANIFEST_FILE, text)):  # the file first: listed only once written
        fd, tmp = tempfile.mkstemp(prefix=f".{file}.", suffix=".tmp", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, out / file)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def safetensors_format(path: str | os.PathLike) -> str | None:
    """The ``format`` entry of a safetensors file's metadata, or None (no such entry, not safetensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # any unreadable file is simply not one of ours
        return None


def check_output_file(path: str | os.PathLike, overwrite: bool, owned_format: str) -> None:
    """Raise WeightgenError unless ``path`` may be written: absent, or (with ``overwrite``) a
    safetensors file whose metadata ``format`` is ``owned_format`` (one weightgen wrote)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        _refuse(f"output path {path} exists and is not a regular file")
    if path.exists():
        if not overwrite:
            what = f"file {path} already exists"
            _refuse(f"{what}; pass overwrite=True to replace it", cli=f"{what}; pass --overwrite to replace it")
        if safetensors_format(path) != owned_format:
            _refuse(f"refusing to replace {path}: it is not a {owned_format} file weightgen wrote")
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        _refuse(f"cannot create {path}: {blocking} is a file")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False, *, owned_format: str) -> Iterator[Path]:
    """Yield a temporary sibling file path; move it to ``path`` only if the block succeeds.

    For single safetensors files such as task files: the writer must store
    ``metadata={"format": owned_format}``, which is how a later ``overwrite`` recognises the file.
    """
    path = Path(path)
    check_output_file(path, overwrite, owned_format)
    _make_parent(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if safetensors_format(tmp) != owned_format:
            raise ValueError(f"the file written for {path} does not carry format {owned_format!r} in its metadata")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        check_output_file(path, overwrite, owned_format)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
