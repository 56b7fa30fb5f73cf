"""Weight tensor <-> fixed-size tokens, with an exact (bitwise) inverse.

A layer weight of shape ``(out, ...)`` is viewed as ``out`` rows of length ``fan_in``
(``weight.reshape(out, -1)``); each row is cut into ``ceil(fan_in / token_size)`` chunks and
the last chunk of every row is zero padded. Values are divided by the power of two nearest the
layer's RMS (token RMS in [0.71, 1.41]): dividing and multiplying by a power of two is exact, so
``detokenize(tokenize(W))`` gives ``W`` back bit for bit, in its dtype and on its device. Every token carries a conditioning vector that
tells the VAE what kind of layer it comes from and where in the layer it sits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

TOKEN_SIZE = 64
KINDS = ("linear", "conv", "dwconv")  # index = kind id

# Column names of the conditioning vector, in order. Kept as data so other code can find a
# field (e.g. COND_FIELDS.index("depth")) instead of hard-coding column numbers.
COND_FIELDS = (
    "kind=linear",
    "kind=conv",
    "kind=dwconv",
    "log2_fan_in/12",
    "log2_fan_out/12",
    "kernel_h/7",
    "kernel_w/7",
    "depth",
    "chunk/chunks_per_row",
    "row/out_features",
    "1/chunks_per_row",
)
COND_DIM = len(COND_FIELDS)  # 11

__all__ = [
    "TOKEN_SIZE",
    "KINDS",
    "COND_FIELDS",
    "COND_DIM",
    "Tokens",
    "layer_kind",
    "tokenize",
    "detokenize",
    "token_count",
    "condition",
    "weight_scale",
    "token_scale",
]


def layer_kind(shape: tuple[int, ...], groups: int = 1) -> str:
    """``"linear"`` for 2-D weights, ``"dwconv"`` for depthwise 4-D, ``"conv"`` for other 4-D."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return "linear"
    if len(shape) == 4:
        return "dwconv" if groups > 1 and shape[1] == 1 else "conv"
    raise ValueError(f"unsupported weight shape {shape}: expected a 2-D Linear or 4-D Conv2d weight")


@dataclass
class Tokens:
    values: torch.Tensor  # (N, token_size) in the weight's dtype, weight / scale, zero padded
    mask: torch.Tensor  # (N, token_size) bool, True where a real weight sits
    cond: torch.Tensor  # (N, COND_DIM) float32
    scale: float  # power of two nearest the weight RMS (1.0 for an all-zero weight): exact to divide by
    shape: tuple[int, ...]
    kind: str


def _geometry(shape, token_size: int) -> tuple[int, int, int]:
    """(out_features, row_length, chunks_per_row) of a weight shape."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ValueError(f"cannot tokenize weight of shape {shape}")
    if token_size <= 0:
        raise ValueError(f"token_size must be positive, got {token_size}")
    out = shape[0]
    row = math.prod(shape[1:])
    return out, row, -(-row // token_size)


def token_count(shape, token_size: int = TOKEN_SIZE) -> int:
    out, _, cpr = _geometry(shape, token_size)
    return out * cpr


def weight_scale(weight: torch.Tensor) -> float:
    """RMS of a weight (float64 accumulation); 1.0 for an all-zero or non-finite one."""
    rms = float(weight.detach().double().pow(2).mean().sqrt())
    if not math.isfinite(rms) or rms <= 0.0:
        return 1.0  # all-zero (or underflowing) weight: nothing to normalise
    return rms


def token_scale(weight: torch.Tensor) -> float:
    """The power of two nearest the weight's RMS (in log scale): ``(w / s) * s == w`` bit for bit."""
    return 2.0 ** round(math.log2(weight_scale(weight)))


def _check_kind(shape, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")
    want = 2 if kind == "linear" else 4
    if len(shape) != want:
        raise ValueError(f"kind {kind!r} expects a {want}-D weight, got shape {tuple(shape)}")


def condition(shape, kind: str, depth: float, token_size: int = TOKEN_SIZE) -> torch.Tensor:
    """Conditioning vectors for every token of a layer, (token_count, COND_DIM) float32."""
    shape = tuple(int(s) for s in shape)
    _check_kind(shape, kind)
    depth = float(depth)
    if not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be a relative depth in [0, 1], got {depth}")
    out, row, cpr = _geometry(shape, token_size)
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)

    # Per-layer constants, broadcast to every token.
    const = torch.zeros(COND_DIM - 3, dtype=torch.float32)  # kind one-hot + 7 scalars, minus the 3 per-token ones
    layer = torch.tensor(
        [math.log2(row) / 12.0, math.log2(out) / 12.0, kh / 7.0, kw / 7.0, depth], dtype=torch.float32
    )
    const[3:] = layer
    const[KINDS.index(kind)] = 1.0

    # Token n sits at row n // cpr, chunk n % cpr (row-major, same order as tokenize).
    chunk = torch.arange(cpr, dtype=torch.float32).repeat(out) / cpr  # (N,)
    rows = torch.arange(out, dtype=torch.float32).repeat_interleave(cpr) / out  # (N,)
    inv = torch.full_like(chunk, 1.0 / cpr)  # (N,)
    per_token = torch.stack([chunk, rows, inv], dim=1)  # (N, 3)
    return torch.cat([const.expand(out * cpr, -1), per_token], dim=1).contiguous()  # (N, COND_DIM)


def tokenize(weight, kind: str, depth: float, token_size: int = TOKEN_SIZE) -> Tokens:
    """Cut a Linear/Conv2d weight into normalised, zero-padded tokens (its dtype and device)."""
    w = torch.as_tensor(weight).detach()
    if not w.is_floating_point():
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    shape = tuple(w.shape)
    _check_kind(shape, kind)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight of shape {shape} contains NaN or Inf")
    out, row, cpr = _geometry(shape, token_size)

    scale = token_scale(w)
    padded = w.new_zeros(out, cpr * token_size)  # (out, cpr * token_size)
    padded[:, :row] = w.reshape(out, row) / scale  # exact: scale is a power of two
    mask = torch.zeros(out, cpr * token_size, dtype=torch.bool, device=w.device)
    mask[:, :row] = True
    return Tokens(
        values=rearrange(padded, "o (c t) -> (o c) t", t=token_size),  # (N = out * cpr, token_size)
        mask=rearrange(mask, "o (c t) -> (o c) t", t=token_size),
        cond=condition(shape, kind, depth, token_size).to(w.device),  # (N, COND_DIM)
        scale=scale,
        shape=shape,
        kind=kind,
    )


def detokenize(values, shape, scale, token_size: int = TOKEN_SIZE) -> torch.Tensor:
    """Inverse of :func:`tokenize`: padded positions are dropped, the scale is re-applied.

    Bitwise exact for ``tokenize``'s own values and scale (a power of two; only values pushed below
    the dtype's normal range by the division could lose bits); keeps the values' dtype.
    """
    shape = tuple(int(s) for s in shape)
    out, row, cpr = _geometry(shape, token_size)
    v = torch.as_tensor(values)
    if tuple(v.shape) != (out * cpr, token_size):
        raise ValueError(
            f"expected values of shape {(out * cpr, token_size)} for weight {shape}, got {tuple(v.shape)}"
        )
    rows = rearrange(v, "(o c) t -> o (c t)", o=out)[:, :row]  # (out, fan_in)
    return (rows * float(scale)).reshape(shape).contiguous()
