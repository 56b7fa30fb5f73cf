import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from weightgen.vae.data import ZooDataModule, ZooTokenDataset, list_zoo, split_by_model
from weightgen.vae.tokenize import COND_DIM, KINDS, TOKEN_SIZE, layer_kind, token_count, tokenize



def _tiny_net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width),  # depthwise
        nn.Conv2d(width, 2 * width, 1),
        nn.Flatten(),
        nn.Linear(2 * width * 4, 10),
    )


def make_fake_zoo(root, n_models=3, widths=(4, 6, 8)):
    """Writes <id>.safetensors + <id>.json the way the zoo builder does; returns the ids."""
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_models):
        torch.manual_seed(i)
        net = _tiny_net(widths[i % len(widths)])
        layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        mid = f"tiny_{i:02d}"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / f"{mid}.safetensors"))
        meta = {
            "arch": "tiny", "model_kwargs": {"width": widths[i % len(widths)]}, "seed": i,
            "test_accuracy": 0.5 + 0.1 * i,
            "layers": [
                {"name": n, "shape": list(m.weight.shape), "groups": getattr(m, "groups", 1),
                 "depth": j / (len(layers) - 1)}
                for j, (n, m) in enumerate(layers)
            ],
        }
        (root / f"{mid}.json").write_text(json.dumps(meta))
        ids.append(mid)
    (root / "zoo_summary.json").write_text("{}")  # no weights: must be ignored
    return ids


def _tokens_in(meta):
    return sum(token_count(tuple(lay["shape"])) for lay in meta["layers"])


def test_list_zoo_and_empty(tmp_path):
    ids = make_fake_zoo(tmp_path / "zoo")
    models = list_zoo(tmp_path / "zoo")
    assert [m["model_id"] for m in models] == ids
    assert all(len(m["layers"]) == 4 for m in models)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable models"):
        list_zoo(tmp_path / "empty")
    with pytest.raises(ValueError, match="no usable models"):
        list_zoo(tmp_path / "missing")


def test_split_by_model():
    models = [{"model_id": f"m{i}"} for i in range(10)]
    train, val = split_by_model(models, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert set(train) | set(val) == {m["model_id"] for m in models}
    assert (train, val) == split_by_model(list(reversed(models)), 0.2, seed=0)  # order-independent
    assert split_by_model(models, 0.2, seed=1) != (train, val)
    tr, va = split_by_model(models[:2], 0.01)
    assert len(tr) == 1 and len(va) == 1
    tr, va = split_by_model(models[:2], 0.99)
    assert len(tr) == 1 and len(va) == 1


def test_dataset(tmp_path):
    ids = make_fake_zoo(tmp_path)
    models = list_zoo(tmp_path)
    ds = ZooTokenDataset(tmp_path)
    assert len(ds) == sum(_tokens_in(m) for m in models)
    sub = ZooTokenDataset(tmp_path, model_ids=ids[:1])
    assert len(sub) == _tokens_in(models[0])
    item = ds[0]
    assert item["values"].shape == (TOKEN_SIZE,) and item["values"].dtype == torch.float32
    assert item["mask"].shape == (TOKEN_SIZE,) and item["mask"].dtype == torch.bool
    assert item["cond"].shape == (COND_DIM,)
    assert item["kind"].dtype == torch.long and KINDS[int(item["kind"])] == "conv"
    # items reproduce the tokenizer exactly, in model/layer/token order
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / f"{ids[0]}.safetensors"))
    lay = models[0]["layers"][-1]
    t = tokenize(sd[lay["name"] + ".weight"], layer_kind(tuple(lay["shape"]), lay["groups"]), lay["depth"])
    last = torch.stack([sub[i]["values"] for i in range(len(sub) - len(t.values), len(sub))])
    assert torch.equal(last, t.values)
    assert torch.equal(sub[-1]["cond"], t.cond[-1])
    kinds = {KINDS[int(sub[i]["kind"])] for i in range(len(sub))}
    assert kinds == {"conv", "dwconv", "linear"}
    with pytest.raises(IndexError, match=rf"index {len(ds)} out of range"):
        ds[len(ds)]
    with pytest.raises(ValueError, match=r"model ids not in zoo .*\['nope'\]"):
        ZooTokenDataset(tmp_path, model_ids=["nope"])


def test_max_tokens_per_layer(tmp_path):
    make_fake_zoo(tmp_path)
    full = ZooTokenDataset(tmp_path)
    capped = ZooTokenDataset(tmp_path, max_tokens_per_layer=5, seed=3)
    same = ZooTokenDataset(tmp_path, max_tokens_per_layer=5, seed=3)
    expected = sum(min(5, token_count(tuple(lay["shape"]))) for m in list_zoo(tmp_path) for lay in m["layers"])
    assert len(capped) == expected < len(full)
    assert all(torch.equal(capped[i]["values"], same[i]["values"]) for i in range(len(capped)))


def test_batched_loader_matches_items(tmp_path):
    make_fake_zoo(tmp_path)
    ds = ZooTokenDataset(tmp_path, cache_mb=0.001)  # tiny cache: forces evictions
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:64].tolist()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=64, sampler=order)))
    assert batch["values"].shape == (64, TOKEN_SIZE) and batch["cond"].shape == (64, COND_DIM)
    assert batch["kind"].shape == (64,)
    ref = ZooTokenDataset(tmp_path)
    for key in ("values", "mask", "cond", "kind"):
        assert torch.equal(batch[key], torch.stack([ref[i][key] for i in order])), key


def test_bad_metadata_is_skipped(tmp_path):
    ids = make_fake_zoo(tmp_path, n_models=2)
    (tmp_path / f"{ids[1]}.json").write_text(json.dumps({"arch": "tiny", "layers": [{"name": "0"}]}))
    assert [m["model_id"] for m in list_zoo(tmp_path)] == ids[:1]


def test_lightning_fit_writes_tensorboard(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from weightgen.vae.lit import LitWeightVAE
    from weightgen.vae.model import VAEConfig

    make_fake_zoo(tmp_path / "zoo", n_models=3)
    dm = ZooDataModule(tmp_path / "zoo", batch_size=64, val_fraction=0.34, seed=0)
    lit = LitWeightVAE(VAEConfig(hidden=32, layers=1, latent_dim=4, warmup_steps=5), lr=3e-3)
    logger = TensorBoardLogger(tmp_path / "tb", name="vae")
    trainer = pl.Trainer(
        max_epochs=2, logger=logger, enable_checkpointing=False, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(lit, datamodule=dm)
    assert set(dm.train_ids).isdisjoint(dm.val_ids) and dm.val_ids
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/beta", "val/loss", "val/recon", "val/kl", "val/cosine_conv", "val/cosine_linear"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("val/loss", "val/cosine_conv", "val/cosine_linear"):  # one point per epoch, as logged
        logged = [e.value for e in events.Scalars(key)]
        assert len(logged) == 2 and logged[-1] == pytest.approx(metrics[key].item(), rel=1e-6), key
    assert list((tmp_path / "tb").rglob("projector_config.pbtxt"))  # add_embedding ran
    # no TensorBoard logger: the diagnostics are skipped, nothing breaks
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, accelerator="cpu",
               enable_progress_bar=False, enable_model_summary=False).fit(lit, datamodule=dm)
