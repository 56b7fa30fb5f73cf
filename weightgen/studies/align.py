"""Weight matching: permute model B's hidden units to line up with model A's, without changing B's function.

Two networks trained from different seeds compute similar features in different unit orders, so a
straight line between their weights averages unrelated units. Weight matching (Ainsworth et al.,
"Git Re-Basin", 2023) picks, for each set of interchangeable hidden units, the permutation of B's
units that maximises the inner product of the weights that touch them; the permuted B computes
exactly the same function.

Permuted (``permutation_groups``):

* timm ``Mlp`` (ViT, Mixer, ConvNeXt MLPs): fc1 rows (+ bias, + a per-unit norm) and fc2 columns.
* timm ``Attention``: whole heads (q, k, v rows of ``qkv`` and the matching ``proj`` columns), and
  within each head the q/k dimensions (one permutation for q and k: q.k is unchanged) and the v
  dimensions (with ``proj`` columns) separately.
* timm ResNet ``BasicBlock`` (conv1 out, bn1, conv2 in) and ``Bottleneck`` (the same for conv1 ->
  conv2 and conv2 -> conv3).
* The residual stream of a plain timm ``VisionTransformer`` (one permutation of embed_dim: patch
  embedding, tokens, position embedding, every LayerNorm, qkv/fc1 inputs, proj/fc2 outputs, head
  input) and of a timm ``ResNet`` (one permutation per stretch between conv shortcuts: stem output,
  block inputs and outputs, shortcut convs, fc input) and of a timm ``ConvNeXt`` (one per stage:
  stem / downsampling conv output, depthwise convs, LayerNorms, fc1 inputs, fc2 outputs, layer
  scales, the head's norm and fc input).

Groups that share a tensor are solved by coordinate descent. Anything else (stems' inner
channels, depthwise or grouped convolutions, gated or normalised attention, other families) is left
in place; skipped variants of the blocks above are listed in the report with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..metrics import cosine

log = logging.getLogger(__name__)

__all__ = ["align_state", "function_change", "weight_cosine_states", "permutation_groups"]

# per-channel maps that commute with a channel permutation (the same op on every channel)
_CHANNELWISE = (nn.Identity, nn.AvgPool2d, nn.MaxPool2d, nn.Dropout, nn.Dropout2d)
_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)  # normalise over (or per) the permuted axis


@dataclass
class _Entry:
    key: str  # state-dict key
    dim: int  # the axis that carries the units
    offset: int = 0  # the units are t.narrow(dim, offset, n)
    score: bool = True  # counts in the matching objective (running BN statistics do not)


@dataclass
class _Group:
    """Interchangeable units of one block: ``sets`` of ``n`` units each, split into ``heads`` blocks.

    Every set gets its own permutation, except that all sets move head blocks together (heads == 1:
    the sets are independent free permutations).
    """
    module: str
    kind: str
    n: int
    sets: list[list[_Entry]]
    heads: int = 1
    perms: list[torch.Tensor] = field(default_factory=list)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _param_entries(prefix: str, module: nn.Module, dim: int, n: int) -> list[_Entry]:
    """The module's own tensors whose axis ``dim`` has the ``n`` units (weight, bias, BN statistics)."""
    entries = []
    for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if tensor is None or tensor.dim() <= dim or tensor.shape[dim] != n:
            continue
        entries.append(_Entry(f"{prefix}{pname}", dim, score=pname in ("weight", "bias")))
    return entries


def _conv_ok(conv) -> bool:
    return type(conv) is nn.Conv2d and conv.groups == 1


def _chain(name: str, block: nn.Module, first: str, norm: str, between: tuple[str, ...], second: str,
           kind: str) -> _Group | str:
    """conv ``first`` -> ``norm`` -> channel-wise ``between`` -> conv ``second``: the first's out channels."""
    conv1, bn, conv2 = getattr(block, first), getattr(block, norm), getattr(block, second)
    if not (_conv_ok(conv1) and _conv_ok(conv2)):
        return f"{first}/{second} are not plain ungrouped Conv2d"
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv1.out_channels:
        return f"{norm} is not a BatchNorm2d over {first}'s channels"
    for part in between:
        module = getattr(block, part, None)
        # activations are elementwise; drop-block masks are shared across channels
        if module is not None and not (isinstance(module, _CHANNELWISE) or _is_activation(module)
                                       or type(module).__name__ == "DropBlock2d"):
            return f"{part} ({type(module).__name__}) may mix channels"
    pre, n = _prefix(name), conv1.out_channels
    entries = (_param_entries(f"{pre}{first}.", conv1, 0, n) + _param_entries(f"{pre}{norm}.", bn, 0, n)
               + [_Entry(f"{pre}{second}.weight", 1)])
    return _Group(f"{pre}{first}->{second}", kind, n, [entries])


def _is_activation(module: nn.Module) -> bool:
    # torch and timm activations are elementwise; GLU halves the axis and is not
    return not isinstance(module, nn.GLU) and (
        type(module).__module__.startswith("torch.nn.modules.activation")
        or type(module).__module__.startswith("timm.layers.activations"))


def _mlp(name: str, mlp: nn.Module) -> _Group | str:
    fc1, fc2, norm = mlp.fc1, mlp.fc2, getattr(mlp, "norm", nn.Identity())
    linear = type(fc1) is nn.Linear and type(fc2) is nn.Linear
    if not (linear or (_conv_ok(fc1) and _conv_ok(fc2) and fc1.kernel_size == fc2.kernel_size == (1, 1))):
        return "fc1/fc2 are not both Linear or both 1x1 Conv2d"
    if not _is_activation(mlp.act):
        return f"act {type(mlp.act).__name__} is not elementwise"
    if not isinstance(norm, (nn.Identity, *_NORMS)):
        return f"norm {type(norm).__name__} is not per-unit"
    pre = _prefix(name)
    n = fc1.weight.shape[0]
    entries = _param_entries(f"{pre}fc1.", fc1, 0, n) + [_Entry(f"{pre}fc2.weight", 1)]
    if not isinstance(norm, nn.Identity):
        entries += _param_entries(f"{pre}norm.", norm, 0, n)
    return _Group(name, "mlp", n, [entries])


def _attention(name: str, attn: nn.Module) -> _Group | str:
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
            return f"{part} is not Identity"
    if type(attn.qkv) is not nn.Linear or type(attn.proj) is not nn.Linear:
        return "qkv/proj are not Linear"
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim
    if attn.qkv.out_features != 3 * width or attn.proj.in_features != width:
        return "qkv/proj widths do not match heads * head_dim"
    pre = _prefix(name)
    bias = attn.qkv.bias is not None
    qk, v = [], []
    for part, offset in (("q", 0), ("k", width), ("v", 2 * width)):
        target = v if part == "v" else qk
        target.append(_Entry(f"{pre}qkv.weight", 0, offset))
        if bias:
            target.append(_Entry(f"{pre}qkv.bias", 0, offset))
    v.append(_Entry(f"{pre}proj.weight", 1))
    return _Group(name, "attention", width, [qk, v], heads=heads)


def _side(prefix: str, module: nn.Module | None, dim: int, n: int) -> list[_Entry]:
    """Entries of ``module`` (its own tensors) on the stream: dim 0 for outputs, 1 for a weight's inputs."""
    if module is None or isinstance(module, nn.Identity):
        return []
    if dim == 1:
        return [_Entry(f"{prefix}weight", 1)]
    return _param_entries(prefix, module, 0, n)


def _vit_stream(model: nn.Module) -> list[_Group] | str:
    """One permutation of a timm VisionTransformer's residual stream (embed_dim channels)."""
    from timm.layers import Attention, LayerScale, Mlp
    from timm.models.vision_transformer import Block

    if getattr(model, "attn_pool", None) is not None:
        return "attention pooling head"
    n = model.embed_dim
    norms = (nn.Identity, nn.LayerNorm)
    if not all(isinstance(getattr(model, part, nn.Identity()), norms)
               for part in ("norm_pre", "norm", "fc_norm")) or not isinstance(model.patch_embed.norm, norms):
        return "a norm on the stream is not LayerNorm"
    if type(model.patch_embed.proj) is not nn.Conv2d or not isinstance(model.head, (nn.Linear, nn.Identity)):
        return "patch embedding or head is not Conv2d / Linear"
    entries = (_side("patch_embed.proj.", model.patch_embed.proj, 0, n)
               + _side("patch_embed.norm.", model.patch_embed.norm, 0, n))
    for token in ("cls_token", "reg_token", "pos_embed"):
        if getattr(model, token, None) is not None:
            entries.append(_Entry(token, 2))
    entries += _side("norm_pre.", model.norm_pre, 0, n)
    for i, block in enumerate(model.blocks):
        ok = (type(block) is Block and type(block.attn) is Attention and type(block.mlp) is Mlp
              and all(isinstance(getattr(block, part), (nn.Identity, LayerScale)) for part in ("ls1", "ls2"))
              and all(isinstance(getattr(block, part), nn.LayerNorm) for part in ("norm1", "norm2")))
        if not ok:
            return f"block {i} is not a plain timm Block (Attention, Mlp, LayerNorm, LayerScale)"
        pre = f"blocks.{i}."
        for part, dim in (("norm1", 0), ("attn.qkv", 1), ("attn.proj", 0), ("ls1", 0), ("norm2", 0),
                          ("mlp.fc1", 1), ("mlp.fc2", 0), ("ls2", 0)):
            entries += _side(f"{pre}{part}.", block.get_submodule(part), dim, n)
    entries += _side("norm.", model.norm, 0, n) + _side("fc_norm.", model.fc_norm, 0, n)
    entries += _side("head.", model.head, 1, n)
    return [_Group("residual stream", "stream", n, [entries])]


def _conv_bn(prefix: str, module: nn.Module) -> tuple[list[_Entry], list[_Entry]] | str:
    """(input-side, output-side) entries of a conv [+ BN] path: a Conv2d or a Sequential of pool, conv, BN."""
    parts = list(module.named_children()) if isinstance(module, nn.Sequential) else [("", module)]
    convs = [(name, m) for name, m in parts if isinstance(m, nn.Conv2d)]
    if len(convs) != 1 or not _conv_ok(convs[0][1]):
        return "not one ungrouped Conv2d"
    name, conv = convs[0]
    n = conv.out_channels
    inputs = [_Entry(f"{prefix}{name}.weight" if name else f"{prefix}weight", 1)]
    outputs = []
    after = False
    for child_name, child in parts:
        sub = f"{prefix}{child_name}." if child_name else prefix
        if child is conv:
            outputs += _param_entries(sub, conv, 0, n)
            after = True
        elif isinstance(child, nn.BatchNorm2d) and after:
            outputs += _param_entries(sub, child, 0, n)
        elif not isinstance(child, (nn.AvgPool2d, nn.MaxPool2d, nn.Identity)):
            return f"{type(child).__name__} in a shortcut"
    return inputs, outputs


def _resnet_streams(model: nn.Module) -> list[_Group] | str:
    """One permutation per stretch of a timm ResNet's residual stream between downsampling shortcuts."""
    from timm.models.resnet import BasicBlock, Bottleneck

    if not isinstance(model.bn1, nn.BatchNorm2d) or not isinstance(model.maxpool, (nn.MaxPool2d, nn.Identity)):
        return "stem is not conv -> BatchNorm2d -> max pool"
    if type(model.fc) is not nn.Linear:
        return "fc is not Linear"
    stem = model.conv1[-1] if isinstance(model.conv1, nn.Sequential) else model.conv1
    stem_name = f"conv1.{len(model.conv1) - 1}." if isinstance(model.conv1, nn.Sequential) else "conv1."
    if not _conv_ok(stem):
        return "stem conv is not an ungrouped Conv2d"
    n = stem.out_channels
    groups, entries = [], _param_entries(stem_name, stem, 0, n) + _param_entries("bn1.", model.bn1, 0, n)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            pre = f"{stage}.{i}."
            if type(block) not in (BasicBlock, Bottleneck) or block.se is not None:
                return f"{pre[:-1]} is not a BasicBlock/Bottleneck without SE"
            last, norm = ("conv2", "bn2") if type(block) is BasicBlock else ("conv3", "bn3")
            conv, bn = getattr(block, last), getattr(block, norm)
            if not _conv_ok(block.conv1) or not _conv_ok(conv) or not isinstance(bn, nn.BatchNorm2d):
                return f"{pre[:-1]} has grouped convolutions or no BatchNorm2d"
            entries.append(_Entry(f"{pre}conv1.weight", 1))
            out = _param_entries(f"{pre}{last}.", conv, 0, conv.out_channels) + _param_entries(
                f"{pre}{norm}.", bn, 0, conv.out_channels)
            if block.downsample is not None:  # the shortcut re-maps channels: a new stretch starts
                shortcut = _conv_bn(f"{pre}downsample.", block.downsample)
                if isinstance(shortcut, str):
                    return f"{pre}downsample: {shortcut}"
                groups.append(_Group(f"stream before {pre[:-1]}", "stream", n, [entries + shortcut[0]]))
                n, entries = conv.out_channels, out + shortcut[1]
            else:
                entries += out
    entries.append(_Entry("fc.weight", 1))
    groups.append(_Group("stream to fc", "stream", n, [entries]))
    return groups


def _convnext_streams(model: nn.Module) -> list[_Group] | str:
    """One permutation per stage of a timm ConvNeXt's residual stream (depthwise convs move with it)."""
    from timm.models.convnext import ConvNeXtBlock, ConvNeXtStage

    stem = list(model.stem)
    if len(stem) != 2 or not _conv_ok(stem[0]) or not isinstance(stem[1], nn.LayerNorm):
        return "stem is not Conv2d -> LayerNorm2d"
    head = model.head
    if not all(isinstance(getattr(head, part, None), kind) for part, kind in
               (("norm", nn.LayerNorm), ("pre_logits", nn.Identity), ("fc", nn.Linear))):
        return "head is not norm -> fc"
    n = stem[0].out_channels
    groups, entries = [], _param_entries("stem.0.", stem[0], 0, n) + _param_entries("stem.1.", stem[1], 0, n)
    for s, stage in enumerate(model.stages):
        pre = f"stages.{s}."
        if type(stage) is not ConvNeXtStage:
            return f"{pre[:-1]} is not a ConvNeXtStage"
        if not isinstance(stage.downsample, nn.Identity):  # LayerNorm2d -> strided conv: a new stream
            parts = list(stage.downsample)
            if len(parts) != 2 or not isinstance(parts[0], nn.LayerNorm) or not _conv_ok(parts[1]):
                return f"{pre}downsample is not LayerNorm2d -> Conv2d"
            entries += _param_entries(f"{pre}downsample.0.", parts[0], 0, n) + [_Entry(f"{pre}downsample.1.weight", 1)]
            groups.append(_Group(f"stream before {pre}downsample", "stream", n, [entries]))
            n = parts[1].out_channels
            entries = _param_entries(f"{pre}downsample.1.", parts[1], 0, n)
        for i, block in enumerate(stage.blocks):
            b = f"{pre}blocks.{i}."
            dw, mlp = block.conv_dw, block.mlp
            ok = (type(block) is ConvNeXtBlock and isinstance(block.shortcut, nn.Identity)
                  and type(dw) is nn.Conv2d and dw.groups == dw.in_channels == dw.out_channels == n
                  and isinstance(block.norm, nn.LayerNorm) and isinstance(mlp.fc1, (nn.Linear, nn.Conv2d))
                  and isinstance(mlp.fc2, (nn.Linear, nn.Conv2d)))
            if not ok:
                return f"{b[:-1]} is not a plain ConvNeXtBlock (depthwise conv, LayerNorm, Mlp)"
            entries += (_param_entries(f"{b}conv_dw.", dw, 0, n) + _param_entries(f"{b}norm.", block.norm, 0, n)
                        + [_Entry(f"{b}mlp.fc1.weight", 1)] + _param_entries(f"{b}mlp.fc2.", mlp.fc2, 0, n))
            if block.gamma is not None:
                entries.append(_Entry(f"{b}gamma", 0))
    entries += _side("norm_pre.", model.norm_pre, 0, n) + _param_entries("head.norm.", head.norm, 0, n)
    entries.append(_Entry("head.fc.weight", 1))
    groups.append(_Group("stream to head", "stream", n, [entries]))
    return groups


def permutation_groups(model: nn.Module, streams: bool = True) -> tuple[list[_Group], list[dict]]:
    """The blocks of ``model`` whose hidden units can be permuted, and the skipped ones with reasons.

    ``streams``: also the residual stream of timm VisionTransformer / ResNet / ConvNeXt models (all
    blocks see the same order, so those tensors are permuted on both axes).
    """
    from timm.layers import Attention, Mlp
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    from timm.models.vision_transformer import VisionTransformer

    groups, skipped = [], []
    stream_finders = {VisionTransformer: _vit_stream, ResNet: _resnet_streams, ConvNeXt: _convnext_streams}
    if streams and type(model) in stream_finders:
        found = stream_finders[type(model)](model)
        if isinstance(found, str):
            skipped.append({"module": "", "kind": "residual stream", "reason": found})
        else:
            groups += found
    for name, module in model.named_modules():
        found: list[_Group | str] = []
        if type(module) is Mlp:  # exact types: subclasses may change forward()
            found.append(_mlp(name, module))
        elif type(module) is Attention:
            found.append(_attention(name, module))
        elif type(module) is BasicBlock:
            found.append(_chain(name, module, "conv1", "bn1", ("drop_block", "act1", "aa"), "conv2", "conv"))
        elif type(module) is Bottleneck:
            found.append(_chain(name, module, "conv1", "bn1", ("act1",), "conv2", "conv"))
            found.append(_chain(name, module, "conv2", "bn2", ("drop_block", "act2", "aa"), "conv3", "conv"))
        for item in found:
            if isinstance(item, str):
                skipped.append({"module": name, "kind": type(module).__name__, "reason": item})
            else:
                groups.append(item)
    return groups, skipped


def _unit_rows(tensor: torch.Tensor, entry: _Entry, n: int) -> torch.Tensor:
    """(n, -1) float64: one row per unit."""
    return tensor.narrow(entry.dim, entry.offset, n).movedim(entry.dim, 0).reshape(n, -1).double()


def _apply(tensor: torch.Tensor, moves: list[tuple[_Entry, torch.Tensor]]) -> torch.Tensor:
    out = tensor.clone()
    for entry, perm in moves:
        part = out.narrow(entry.dim, entry.offset, perm.numel())
        part.copy_(part.index_select(entry.dim, perm.to(part.device)))
    return out


def _moves_by_key(groups: list[_Group], skip: _Group | None = None) -> dict[str, list]:
    moves: dict[str, list] = {}
    for group in groups:
        if group is skip:
            continue
        for entries, perm in zip(group.sets, group.perms):
            for entry in entries:
                moves.setdefault(entry.key, []).append((entry, perm))
    return moves


def _scores(group: _Group, state_a: dict, state_b: dict, others: dict[str, list]) -> list[torch.Tensor]:
    """Per set: (n, n) inner products of A's unit i with B's unit j (B with the other groups' permutations)."""
    out = []
    for entries in group.sets:
        total = torch.zeros(group.n, group.n, dtype=torch.float64)
        for entry in entries:
            if not entry.score:
                continue
            b = _apply(state_b[entry.key], others[entry.key]) if entry.key in others else state_b[entry.key]
            total += (_unit_rows(state_a[entry.key], entry, group.n)
                      @ _unit_rows(b, entry, group.n).T).cpu()
        out.append(total)
    return out


def _solve(scores: list[torch.Tensor], heads: int) -> tuple[list[torch.Tensor], float]:
    """Best permutation per set (head blocks moving together), and its objective."""
    n = scores[0].shape[0]
    d = n // heads
    mats = [s.numpy() for s in scores]
    inner = {}  # (i, j, set) -> (value, within-head permutation)
    head_score = np.zeros((heads, heads))
    for i in range(heads):
        for j in range(heads):
            for s, mat in enumerate(mats):
                block = mat[i * d:(i + 1) * d, j * d:(j + 1) * d]
                rows, cols = linear_sum_assignment(block, maximize=True)
                inner[i, j, s] = cols
                head_score[i, j] += block[rows, cols].sum()
    rows, cols = linear_sum_assignment(head_score, maximize=True)
    perms = [torch.from_numpy(np.concatenate([cols[i] * d + inner[i, cols[i], s] for i in range(heads)]))
             for s in range(len(mats))]
    return perms, float(head_score[rows, cols].sum())


def _descend(groups: list[_Group], state_a: dict, state_b: dict, max_rounds: int) -> int:
    """Coordinate descent from the identity: each group in turn takes its best permutation given the
    others', until a round changes nothing (one round when no two groups share a tensor). Rounds run."""
    for group in groups:
        group.perms = [torch.arange(group.n) for _ in group.sets]
    shared = len({e.key for g in groups for s in g.sets for e in s}) < sum(
        len({e.key for s in g.sets for e in s}) for g in groups)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for group in groups:
            perms, _ = _solve(_scores(group, state_a, state_b, _moves_by_key(groups, skip=group)), group.heads)
            if any(not torch.equal(p, q) for p, q in zip(perms, group.perms)):
                changed = True
                group.perms = perms
        if not (changed and shared):
            break
    return rounds


def _objective(groups: list[_Group], state_a: dict, state_b: dict) -> float:
    """Sum of <a, permuted b> over every scored tensor: what weight matching maximises."""
    moves = _moves_by_key(groups)
    keys = {e.key for g in groups for s in g.sets for e in s if e.score}
    return float(sum((state_a[k].double() * _apply(state_b[k], moves[k]).double()).sum() for k in keys))


def align_state(model: nn.Module, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                streams: bool = True, max_rounds: int = 50) -> tuple[dict[str, torch.Tensor], dict]:
    """(copy of ``state_b`` with its hidden units permuted to match ``state_a``, report).

    ``model`` gives the architecture only (it is not modified); both states are full state dicts
    of it. Blocks are solved one at a time by ``linear_sum_assignment``; blocks that share a tensor
    (a Bottleneck's two chains, a residual stream and its blocks) are revisited until no permutation
    changes (at most ``max_rounds`` rounds), in two orders (streams first / last), keeping the better.
    Every step only raises the inner product with A (weights, biases and norm affines: the objective).
    Report: per group the units and how many moved, the skipped blocks, the objective and the
    Linear/Conv2d weight cosine to A before and after.
    """
    groups, skipped = permutation_groups(model, streams)
    # Coordinate descent finds a local optimum that depends on the order: streams first suits
    # trained ViTs, blocks first never ends below blocks-only matching. Both run; the better one wins.
    orders = [groups]
    if any(g.kind == "stream" for g in groups):
        orders.append([g for g in groups if g.kind != "stream"] + [g for g in groups if g.kind == "stream"])
    best = None
    for order in orders:
        rounds = _descend(order, state_a, state_b, max_rounds)
        objective = _objective(groups, state_a, state_b)
        if best is None or objective > best[0]:
            best = (objective, rounds, [list(g.perms) for g in groups])
    objective, rounds, perms = best
    for group, group_perms in zip(groups, perms):
        group.perms = group_perms
    moves = _moves_by_key(groups)
    aligned = {k: _apply(v, moves[k]) if k in moves else v.clone() for k, v in state_b.items()}
    report = {
        "method": "weight matching (Git Re-Basin), linear_sum_assignment per block",
        "groups": [{"module": g.module, "kind": g.kind, "units": g.n, "heads": g.heads,
                    "moved": int(sum((p != torch.arange(g.n)).sum() for p in g.perms)),
                    "units_total": g.n * len(g.sets)} for g in groups],
        "skipped": skipped,
        "rounds": rounds,
        "objective": objective,
        "cosine_before": weight_cosine_states(model, state_a, state_b),
        "cosine_after": weight_cosine_states(model, state_a, aligned),
    }
    report["units_moved"] = sum(g["moved"] for g in report["groups"])
    report["units_permutable"] = sum(g["units_total"] for g in report["groups"])
    log.info("aligned %d block(s), %d/%d units moved, weight cosine to a %.4f -> %.4f", len(groups),
             report["units_moved"], report["units_permutable"], report["cosine_before"], report["cosine_after"])
    return aligned, report


def weight_cosine_states(model: nn.Module, state_a: dict, state_b: dict) -> float:
    """Cosine of the concatenated Linear/Conv2d weights of two state dicts of ``model``."""
    keys = [f"{_prefix(name)}weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    a = torch.cat([state_a[k].reshape(-1).double().cpu() for k in keys])
    b = torch.cat([state_b[k].reshape(-1).double().cpu() for k in keys])
    return cosine(a, b)


@torch.no_grad()
def function_change(model: nn.Module, state: dict, other: dict, batch: torch.Tensor) -> float:
    """max |logits(other) - logits(state)| / max |logits(state)| on ``batch`` (eval mode).

    Loads both into ``model`` in turn; the model keeps ``other`` and its train/eval mode.
    """
    training = model.training
    model.eval()
    try:
        model.load_state_dict(state, strict=True)
        ref = model(batch).double()
        model.load_state_dict(other, strict=True)
        diff = (model(batch).double() - ref).abs().max()
    finally:
        model.train(training)
    return float(diff / ref.abs().max().clamp_min(1e-12))
