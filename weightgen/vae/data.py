"""Model-zoo token dataset: memory-mapped, lazily tokenised, split by model (never by token)."""
from __future__ import annotations

import json
import logging
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from .tokenize import KINDS, TOKEN_SIZE, layer_kind, token_count, tokenize

__all__ = ["list_zoo", "split_by_model", "ZooTokenDataset", "ZooDataModule"]

log = logging.getLogger(__name__)

_REQUIRED = ("arch", "layers")
_LAYER_KEYS = ("name", "shape", "depth")


def _valid_meta(meta) -> bool:
    if not isinstance(meta, dict) or any(k not in meta for k in _REQUIRED):
        return False
    layers = meta["layers"]
    return isinstance(layers, list) and bool(layers) and all(
        isinstance(lay, dict) and all(k in lay for k in _LAYER_KEYS) for lay in layers
    )


def list_zoo(root) -> list[dict]:
    """Metadata of every ``<id>.json`` in ``root`` that has a matching ``<id>.safetensors``.

    Each dict is the JSON content plus ``model_id`` (the file stem) and ``weights`` (the path).
    """
    root = Path(root)
    models = []
    for meta_path in sorted(root.glob("*.json")) if root.is_dir() else []:
        weights = meta_path.with_suffix(".safetensors")
        if not weights.is_file():
            continue  # e.g. a zoo-level summary json
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: unreadable json (%s)", meta_path, e)
            continue
        if not _valid_meta(meta):
            log.warning("skipping %s: needs %s and a non-empty layers list of {name, shape, depth}",
                        meta_path, "/".join(_REQUIRED))
            continue
        meta["model_id"] = meta_path.stem  # the file name is what locates the weights
        meta["weights"] = str(weights)
        models.append(meta)
    if not models:
        raise ValueError(f"no usable models in {root}")
    return models


def split_by_model(models: list[dict], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (train_ids, val_ids); both non-empty when there are >= 2 models.

    A zoo whose models say ``"split": "train" | "heldout"`` (the field zoo: held-out seeds and their
    checkpoints) is split that way; otherwise a seeded random ``val_fraction`` of the models.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    marked = {m["model_id"]: m.get("split") for m in models}
    if any(v == "heldout" for v in marked.values()) and any(v != "heldout" for v in marked.values()):
        return (sorted(i for i, v in marked.items() if v != "heldout"),
                sorted(i for i, v in marked.items() if v == "heldout"))
    ids = sorted({m["model_id"] for m in models})  # input order must not change the split
    if len(ids) < 2:
        return ids, []
    n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    perm = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in perm[:n_val])
    train = sorted(ids[i] for i in perm[n_val:])
    return train, val


class ZooTokenDataset(Dataset):
    """One item per token: ``dict(values, mask, cond, kind)``; with ``window > 1``, one per window.

    A window is ``window`` consecutive tokens of one layer in row-major order, starting at a
    multiple of ``window`` (what the transformer VAE sees at inference); the layer's last window is
    padded with zero tokens (mask False, cond zero). ``max_tokens_per_layer`` then keeps a seeded
    subset of whole windows. ``permute_rows`` (training augmentation) permutes each layer's output
    units afresh every epoch (``set_epoch``): a permuted layer is as real as the original, and the
    VAE learns not to rely on an order of hidden units.

    The index (model, layer, token ids) comes from JSON metadata and safetensors headers; weights
    are read lazily through ``safe_open`` (memory-mapped) and tokenised layers are kept in a small
    LRU cache bounded in bytes. Each DataLoader worker holds its own copy of the cache.
    """

    def __init__(
        self,
        root,
        model_ids: list[str] | None = None,
        token_size: int = TOKEN_SIZE,
        max_tokens_per_layer: int | None = None,
        seed: int = 0,
        cache_mb: float = 256.0,
        window: int = 1,
        permute_rows: bool = False,
    ):
        self.root = Path(root)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.permute_rows, self.seed, self.epoch = int(window), bool(permute_rows), int(seed), 0
        self._perms: dict[int, torch.Tensor] = {}  # layer -> this epoch's row permutation
        self.token_size = int(token_size)
        self.cache_bytes = int(cache_mb * 2**20)
        models = {m["model_id"]: m for m in list_zoo(root)}
        if model_ids is not None:
            missing = sorted(set(model_ids) - set(models))
            if missing:
                raise ValueError(f"model ids not in zoo {root}: {missing}")
            models = {i: models[i] for i in sorted(set(model_ids))}
        if not models:
            raise ValueError(f"no models selected from {root}")
        if max_tokens_per_layer is not None and max_tokens_per_layer <= 0:
            raise ValueError(f"max_tokens_per_layer must be positive, got {max_tokens_per_layer}")

        # layers[j] = (weights path, tensor key, kind, depth, shape, token ids or None = all)
        self.layers: list[tuple[str, str, str, float, tuple[int, ...], np.ndarray | None]] = []
        lengths = []
        for mid, meta in models.items():
            header = self._header_shapes(meta["weights"])
            for li, layer in enumerate(meta["layers"]):
                shape = tuple(int(s) for s in layer["shape"])
                key = layer["name"] + ".weight"
                if header.get(key) != shape:
                    raise ValueError(f"{mid}: tensor {key!r} is {header.get(key)} in safetensors, json says {shape}")
                kind = layer_kind(shape, int(layer.get("groups", 1)))
                if not 0.0 <= float(layer["depth"]) <= 1.0:  # fail at index time, not mid-epoch
                    raise ValueError(f"{mid}: layer {layer['name']!r} has depth {layer['depth']} outside [0, 1]")
                n = -(-token_count(shape, self.token_size) // self.window)  # windows (tokens when window == 1)
                cap = None if max_tokens_per_layer is None else max(1, max_tokens_per_layer // self.window)
                ids = None
                if cap is not None and n > cap:  # a seeded subset of tokens (or whole windows)
                    # seeded by model id, not position, so a model's subset never depends on the split
                    rng = np.random.default_rng([seed, zlib.crc32(mid.encode()), li])
                    ids, n = np.sort(rng.choice(n, size=cap, replace=False)), cap
                self.layers.append((meta["weights"], key, kind, float(layer["depth"]), shape, ids))
                lengths.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (L + 1,)
        self.model_ids = list(models)
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self._cached_bytes = 0

    @staticmethod
    def _header_shapes(path: str) -> dict[str, tuple[int, ...]]:
        try:
            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise ValueError(f"cannot read safetensors header of {path}: {e}") from e

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _layer(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Tokenised layer ``j`` as (values, mask, cond, kind_id), through the LRU cache."""
        hit = self._cache.get(j)
        if hit is not None:
            self._cache.move_to_end(j)
            return hit
        path, key, kind, depth, _, ids = self.layers[j]
        with safe_open(path, framework="pt") as f:
            weight = f.get_tensor(key)
        t = tokenize(weight, kind, depth, self.token_size)
        values, mask, cond = t.values, t.mask, t.cond
        if ids is not None and self.window == 1:
            idx = torch.from_numpy(ids)
            values, mask, cond = values[idx], mask[idx], cond[idx]
        entry = (values, mask, cond, KINDS.index(kind))
        size = sum(x.numel() * x.element_size() for x in entry[:3])
        self._cache[j] = entry
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= sum(x.numel() * x.element_size() for x in old[:3])
        return entry

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tokens")
        index %= len(self)
        j = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return j, index - int(self.offsets[j])

    def set_epoch(self, epoch: int) -> None:
        """New row permutations for ``permute_rows``. In a DataLoader use ``EpochSampler``: a worker
        holds its own copy of the dataset, so a call here never reaches a (persistent) worker."""
        if int(epoch) != self.epoch:
            self.epoch, self._perms = int(epoch), {}

    def _index(self, index) -> int:
        """An int index, or ``EpochSampler``'s (epoch, index): the epoch travels with each index."""
        if isinstance(index, (tuple, list)):
            epoch, index = index
            self.set_epoch(epoch)
        return int(index)

    def _window(self, j: int, k: int) -> dict[str, torch.Tensor]:
        values, mask, cond, kind_id = self._layer(j)
        ids = self.layers[j][5]
        w = int(ids[k]) if ids is not None else k
        n = values.shape[0]
        pos = torch.arange(w * self.window, min((w + 1) * self.window, n))  # layout positions in the window
        src = pos
        if self.permute_rows:
            out = self.layers[j][4][0]
            cpr = n // out
            perm = self._perms.get(j)
            if perm is None:
                perm = self._perms[j] = torch.from_numpy(np.random.default_rng([self.seed, self.epoch, j]).permutation(out))
            src = perm[pos // cpr] * cpr + pos % cpr  # the token that sits there after permuting rows
        pad = self.window - len(pos)
        padded = [torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t
                  for t in (values[src], mask[src], cond[pos])]
        return {"values": padded[0], "mask": padded[1], "cond": padded[2], "kind": torch.tensor(kind_id),
                "layer": torch.tensor(j)}

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        j, k = self._locate(self._index(index))
        if self.window > 1:
            return self._window(j, k)
        values, mask, cond, kind_id = self._layer(j)
        return {"values": values[k], "mask": mask[k], "cond": cond[k], "kind": torch.tensor(kind_id),
                "layer": torch.tensor(j)}

    def layer_label(self, j: int) -> tuple[str, str]:
        """(model id, layer name) of layer index ``j`` (a batch's ``"layer"`` entry)."""
        path, key = self.layers[j][0], self.layers[j][1]
        return Path(path).stem, key.removesuffix(".weight")

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # DataLoader's batched fetch: visit each layer once per batch so a shuffled batch does not
        # thrash the cache more than necessary.
        flat = [self._index(i) for i in indices]
        located = [self._locate(i) for i in flat]
        order = sorted(range(len(located)), key=lambda n: located[n][0])
        out: list[dict | None] = [None] * len(located)
        for n in order:
            out[n] = self.__getitem__(flat[n])
        return out  # type: ignore[return-value]


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` pairs from ``base``: the dataset's row permutations follow the epoch
    in every DataLoader worker, persistent ones included (Lightning calls ``set_epoch`` on the sampler
    before each epoch's iterator is made)."""

    def __init__(self, base: Sampler):
        self.base, self.epoch = base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


class ZooDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root,
        batch_size: int = 1024,
        val_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
        max_tokens_per_layer: int | None = None,
        token_size: int = TOKEN_SIZE,
        cache_mb: float = 256.0,
        window: int = 1,
        permute_rows: bool = False,
    ):
        super().__init__()
        self.window, self.permute_rows = window, permute_rows
        self.root = Path(root)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.max_tokens_per_layer = max_tokens_per_layer
        self.token_size = token_size
        self.cache_mb = cache_mb  # per dataset and worker; a zoo bigger than this re-reads layers
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []
        self.train_set: ZooTokenDataset | None = None
        self.val_set: ZooTokenDataset | None = None
        self._epoch_sampler: EpochSampler | None = None  # the train loader's, for set_epoch

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        models = list_zoo(self.root)
        if len(models) < 2:
            raise ValueError(f"need at least 2 models in {self.root} to split train/val, found {len(models)}")
        self.train_ids, self.val_ids = split_by_model(models, self.val_fraction, self.seed)
        kw = dict(token_size=self.token_size, max_tokens_per_layer=self.max_tokens_per_layer, seed=self.seed,
                  cache_mb=self.cache_mb, window=self.window)
        self.train_set = ZooTokenDataset(self.root, self.train_ids, permute_rows=self.permute_rows, **kw)
        self.val_set = ZooTokenDataset(self.root, self.val_ids, **kw)
        log.info(
            "zoo %s: %d train models (%d tokens), %d val models (%d tokens)",
            self.root, len(self.train_ids), len(self.train_set), len(self.val_ids), len(self.val_set),
        )

    def _loader(self, ds: ZooTokenDataset, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        order = RandomSampler(ds, generator=gen) if shuffle else SequentialSampler(ds)
        if ds.permute_rows:
            order = self._epoch_sampler = EpochSampler(order)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the row permutations, set on this module's own sampler: under DDP Lightning
        wraps it in a DistributedSamplerWrapper, whose ``set_epoch`` reaches it only from Lightning 2.6."""
        if self._epoch_sampler is not None:
            self._epoch_sampler.set_epoch(epoch)
        if self.train_set is not None:
            self.train_set.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
