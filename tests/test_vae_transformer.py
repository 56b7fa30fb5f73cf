"""The transformer body of WeightVAE: windows, masking augmentation, export; the windowed zoo dataset."""
from __future__ import annotations

import json

import pytest
import torch

from test_vae_data import make_fake_zoo
from weightgen.vae.data import ZooDataModule, ZooTokenDataset, split_by_model
from weightgen.vae.model import VAEConfig, WeightVAE
from weightgen.vae.store import load_vae, save_vae
from weightgen.vae.tokenize import COND_DIM, TOKEN_SIZE, tokenize


def _config(**kw):
    return VAEConfig(**{"arch": "transformer", "window": 8, "hidden": 32, "layers": 1, "heads": 2,
                        "latent_dim": 4, **kw})


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TOKEN_SIZE, generator=g), torch.rand(n, COND_DIM, generator=g)


def test_tokens_see_their_window_and_nothing_else():
    torch.manual_seed(0)
    vae = WeightVAE(_config()).eval()
    x, cond = _inputs(20)  # windows [0, 8), [8, 16), [16, 20) + 4 padding rows
    mu = vae.encode(x, cond)[0]
    assert mu.shape == (20, 4)
    x2 = x.clone()
    x2[3] += 1.0  # a token of the first window
    mu2 = vae.encode(x2, cond)[0]
    assert not torch.allclose(mu2[:8], mu[:8])  # its window mates change (attention)
    assert torch.equal(mu2[8:], mu[8:])  # other windows do not
    # a layer encoded in chunks that are multiples of the window gives the same latents
    chunked = torch.cat([vae.encode(x[:8], cond[:8])[0], vae.encode(x[8:], cond[8:])[0]])
    assert torch.allclose(chunked, mu, atol=1e-6)
    assert vae.decode(mu, cond).shape == (20, TOKEN_SIZE)


def test_masking_augmentation_only_in_training():
    torch.manual_seed(0)
    vae = WeightVAE(_config(mask_ratio=0.5))
    x, cond = _inputs(16)
    mask = torch.ones_like(x, dtype=torch.bool)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    vae.eval()
    a, b = vae.loss(x, mask, cond, 0.0, generator=g()), vae.loss(x, mask, cond, 0.0, generator=g())
    assert torch.equal(a["mu"], b["mu"]) and torch.equal(a["mu"], vae.encode(x, cond)[0])
    vae.train()
    masked = vae.loss(x, mask, cond, 0.0, generator=g())
    assert not torch.equal(masked["mu"], a["mu"])  # half the tokens reached the encoder as zeros


def test_config_checks():
    with pytest.raises(ValueError, match="arch"):
        VAEConfig(arch="lstm")
    with pytest.raises(ValueError, match="window must be 1"):
        VAEConfig(window=4)
    with pytest.raises(ValueError, match="multiple of heads"):
        _config(hidden=30, heads=4)
    with pytest.raises(ValueError, match="power of two"):
        _config(window=12)


def test_transformer_save_load_round_trip_and_old_configs_load_as_mlp(tmp_path):
    torch.manual_seed(0)
    vae = WeightVAE(_config()).eval()
    save_vae(vae, tmp_path / "t")
    loaded, meta = load_vae(tmp_path / "t")
    assert meta["config"]["arch"] == "transformer" and loaded.config.window == 8
    x, cond = _inputs(12)
    assert torch.equal(vae.encode(x, cond)[0], loaded.encode(x, cond)[0])
    # a VAE exported before the transformer existed (no arch in its config) is the MLP
    save_vae(WeightVAE(VAEConfig(hidden=16, layers=1, latent_dim=4)), tmp_path / "old")
    meta_path = tmp_path / "old" / "vae.json"
    old = json.loads(meta_path.read_text())
    for key in ("arch", "window", "heads", "mask_ratio"):
        old["config"].pop(key)
    meta_path.write_text(json.dumps(old))
    assert load_vae(tmp_path / "old")[0].config.arch == "mlp"


def test_window_dataset_reassembles_layers_and_permutes_rows(tmp_path):
    make_fake_zoo(tmp_path / "zoo", n_models=1, widths=(6,))
    from safetensors.torch import load_file

    plain = ZooTokenDataset(tmp_path / "zoo", window=4)
    weights = load_file(str(tmp_path / "zoo" / "tiny_00.safetensors"))
    path, key, kind, depth, shape, _ = plain.layers[0]
    tokens = tokenize(weights[key], kind, depth)
    n = tokens.values.shape[0]
    items = [plain[i] for i in range(plain.offsets[0], plain.offsets[1])]
    assert all(it["values"].shape == (4, TOKEN_SIZE) for it in items) and len(items) == -(-n // 4)
    values = torch.cat([it["values"] for it in items])
    assert torch.equal(values[:n], tokens.values) and not values[n:].any()  # zero padding at the end
    assert torch.equal(torch.cat([it["cond"] for it in items])[:n], tokens.cond)
    assert not torch.cat([it["mask"] for it in items])[n:].any()

    perm = ZooTokenDataset(tmp_path / "zoo", window=4, permute_rows=True, seed=3)

    def rows(ds):
        v = torch.cat([ds[i]["values"] for i in range(ds.offsets[0], ds.offsets[1])])[:n]
        return v.reshape(shape[0], -1)

    original, first = rows(plain), rows(perm)
    assert not torch.equal(first, original)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, original.tolist()))  # the same rows
    assert torch.equal(rows(perm), first)  # fixed within an epoch
    perm.set_epoch(1)
    assert not torch.equal(rows(perm), first)  # fresh every epoch


def test_split_field_decides_the_split():
    models = [{"model_id": f"m{i}", "split": "heldout" if i in (2, 5) else "train"} for i in range(8)]
    assert split_by_model(models) == ([f"m{i}" for i in (0, 1, 3, 4, 6, 7)], ["m2", "m5"])
    unmarked = [{"model_id": f"m{i}"} for i in range(8)]
    assert len(split_by_model(unmarked)[1]) == 2  # the seeded random fraction, as before



@pytest.mark.parametrize("workers", [0, 2])
def test_row_permutations_follow_the_epoch_in_persistent_workers(tmp_path, workers):
    """Each epoch's batches equal a worker-free reference read at that epoch, workers or not."""
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import RandomSampler

    make_fake_zoo(tmp_path / "zoo", n_models=4)
    dm = ZooDataModule(tmp_path / "zoo", batch_size=8, num_workers=workers, window=4, permute_rows=True, seed=3)
    dm.setup()
    reference = ZooTokenDataset(tmp_path / "zoo", dm.train_ids, window=4, permute_rows=True, seed=3)
    order = RandomSampler(reference, generator=torch.Generator().manual_seed(3))  # the loader's shuffle
    loader = dm.train_dataloader()
    assert loader.persistent_workers == (workers > 0)
    seen = []
    for epoch in range(2):
        _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop does before each epoch's iterator
        values = torch.cat([b["values"] for b in loader])
        reference.set_epoch(epoch)
        want = torch.stack([reference[i]["values"] for i in order])
        assert torch.equal(values, want), f"epoch {epoch}"
        seen.append(values)
    assert not torch.equal(seen[0], seen[1])


def test_row_permutations_follow_the_epoch_under_ddp_sampler_wrapping(tmp_path):
    """Under DDP Lightning wraps the sampler (whose set_epoch stops at the wrapper before Lightning 2.6):
    the module's own set_epoch, called by the LightningModule each epoch, reaches it on any version."""
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import DataLoader

    make_fake_zoo(tmp_path / "zoo", n_models=4)
    dm = ZooDataModule(tmp_path / "zoo", batch_size=8, window=4, permute_rows=True, seed=3)
    dm.setup()
    plain = dm.train_dataloader()
    wrapped = DataLoader(plain.dataset, batch_size=8,
                         sampler=DistributedSamplerWrapper(plain.sampler, num_replicas=1, rank=0, shuffle=False))
    first = torch.cat([b["values"] for b in wrapped])
    dm.set_epoch(1)
    assert {int(e) for e, _ in wrapped.sampler} == {1}
    assert not torch.equal(torch.cat([b["values"] for b in wrapped]), first)
