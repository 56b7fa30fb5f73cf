"""Train a WeightVAE on a zoo with Lightning, then export safetensors + JSON (no Lightning needed to load).

After training: a per-layer scale model and a latent density are fitted on the *training* models,
and reconstruction of the *held-out* models is compared with scikit-learn PCA of the same latent
size per token.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..io import WeightgenError, check_output_dir
from .codec import decode_layer, encode_layer, fit_latent_density
from .model import VAEConfig, WeightVAE
from .store import fit_scale_model, save_vae
from .tokenize import KINDS, layer_kind, tokenize, weight_scale

log = logging.getLogger(__name__)
_DENSITY_TOKENS_PER_LAYER = 512  # latents per layer used to fit the density (cheap, representative)


def iter_layers(models: list[dict]):
    """(model_meta, layer_meta, kind, weight) for every layer of the given zoo models, lazily."""
    for meta in models:
        with safe_open(meta["weights"], framework="pt") as f:
            for layer in meta["layers"]:
                weight = f.get_tensor(layer["name"] + ".weight")
                kind = layer_kind(tuple(weight.shape), layer.get("groups", 1))
                yield meta, layer, kind, weight


def fit_priors(vae: WeightVAE, models: list[dict], seed: int = 0, density: str = "mixture") -> tuple[dict, dict]:
    """Scale model (log RMS ~ kind, fan-in, fan-out, depth) and latent density from train models.

    ``density``: "mixture" (Gaussian mixture per kind and depth bucket: higher held-out likelihood
    and better coverage than one Gaussian, docs/bench_prior.md) or "gaussian" (the older prior).
    """
    gen = torch.Generator().manual_seed(seed)
    scale_records, latent_records = [], []
    for model, layer, kind, weight in iter_layers(models):
        mu, _ = encode_layer(vae, weight, kind, layer["depth"])
        # the RMS itself, not the token scale (a power of two near it)
        scale_records.append((kind, tuple(weight.shape), layer["depth"], weight_scale(weight)))
        if mu.shape[0] > _DENSITY_TOKENS_PER_LAYER:
            mu = mu[torch.randperm(mu.shape[0], generator=gen)[:_DENSITY_TOKENS_PER_LAYER]]
        latent_records.append((kind, layer["depth"], mu, model["model_id"]))  # model ids: the mixture's backstop
    return fit_scale_model(scale_records), fit_latent_density(latent_records, vae.config.latent_dim, density, seed)


@torch.no_grad()
def reconstruction_vs_pca(vae: WeightVAE, train: list[dict], held_out: list[dict], seed: int = 0,
                          pca_tokens: int = 200_000) -> dict:
    """Mean per-layer cosine of held-out layers: VAE (decode(mu)) vs PCA with latent_dim components."""
    from sklearn.decomposition import PCA

    size = vae.config.token_size
    rng = np.random.default_rng(seed)
    sample = []
    for _, layer, kind, weight in iter_layers(train):
        values = tokenize(weight, kind, layer["depth"], size).values.numpy()
        sample.append(values[rng.permutation(len(values))[:2048]])
    pool = np.concatenate(sample)
    pool = pool[rng.permutation(len(pool))[:pca_tokens]]
    pca = PCA(n_components=vae.config.latent_dim, random_state=seed).fit(pool)
    rows = []
    for meta, layer, kind, weight in iter_layers(held_out):
        tokens = tokenize(weight, kind, layer["depth"], size)
        mu, _ = vae.encode(tokens.values, tokens.cond)
        vae_values = vae.decode(mu, tokens.cond) * tokens.mask
        pca_values = torch.from_numpy(pca.inverse_transform(pca.transform(tokens.values.numpy()))) * tokens.mask
        real = tokens.values.reshape(-1)
        rows.append({"model": meta["model_id"], "layer": layer["name"], "kind": kind,
                     "vae": torch.nn.functional.cosine_similarity(vae_values.reshape(-1), real, dim=0).item(),
                     "pca": torch.nn.functional.cosine_similarity(pca_values.reshape(-1).float(), real, dim=0).item()})
    summary = {"layers": len(rows), "latent_dim": vae.config.latent_dim,
               "vae_mean_cosine": float(np.mean([r["vae"] for r in rows])),
               "pca_mean_cosine": float(np.mean([r["pca"] for r in rows]))}
    for kind in KINDS:
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            summary[f"vae_cosine_{kind}"] = float(np.mean([r["vae"] for r in sel]))
            summary[f"pca_cosine_{kind}"] = float(np.mean([r["pca"] for r in sel]))
    return {"summary": summary, "layers": rows}


def _real_vs_decoded_layer(weight: torch.Tensor, decoded: torch.Tensor, title: str, max_side: int = 128):
    """Figure: the real layer (rows = output units, cropped to ``max_side``) beside its decoding."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    pair = [w.detach().float().reshape(w.shape[0], -1)[:max_side, :max_side] for w in (weight, decoded)]
    lim = float(max(p.abs().max() for p in pair).clamp_min(1e-12))
    fig = Figure(figsize=(8, 4), layout="constrained")
    for ax, label, matrix in zip(fig.subplots(1, 2), ("real", "decoded (VAE)"), pair):
        ax.imshow(matrix.numpy(), cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set(title=label, xlabel="input (fan-in)", ylabel="output unit")
    cos = torch.nn.functional.cosine_similarity(weight.reshape(-1).float(), decoded.reshape(-1).float(), dim=0)
    fig.suptitle(f"{title}: cosine {float(cos):.3f}", fontsize=9)
    return fig


@torch.no_grad()
def log_layer_reconstructions(writer, vae: WeightVAE, models: list[dict], step: int, per_kind: int = 2) -> None:
    """TensorBoard figures of whole held-out layers, real beside decoded (titled), and 3x3 kernels."""

    shown: dict[str, int] = {}
    for meta, layer, kind, weight in iter_layers(models):
        if shown.get(kind, 0) >= per_kind:
            continue
        shown[kind] = shown.get(kind, 0) + 1
        mu, scale = encode_layer(vae, weight, kind, layer["depth"])
        decoded = decode_layer(vae, mu, tuple(weight.shape), kind, layer["depth"], scale)
        title = f"{meta['model_id']} {layer['name']} {tuple(weight.shape)}"
        writer.add_figure(f"reconstruction/{kind}/{meta['model_id']}/{layer['name']}",
                          _real_vs_decoded_layer(weight, decoded, title), step)
        if weight.ndim == 4 and weight.shape[-1] > 1:  # kernels as a grid: first 16 filters, channel 0
            kernels = torch.stack([weight[:16, 0], decoded[:16, 0]]).flatten(0, 1)[:, None]  # (32, 1, kh, kw)
            kernels = (kernels / kernels.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12) + 1) / 2
            writer.add_images(f"kernels/{kind}/{meta['model_id']}/{layer['name']}", kernels, step)


def below_pca_warning(recon: dict) -> str | None:
    """A warning when the VAE reconstructs held-out layers worse than PCA of the same size, else None."""
    vae, pca = recon["vae_mean_cosine"], recon["pca_mean_cosine"]
    if vae >= pca:
        return None
    return (f"this VAE reconstructs held-out layers worse than PCA of the same latent size (cosine {vae:.4f} "
            f"vs {pca:.4f}): it is undertrained; train longer (--max-epochs) or on a bigger zoo before using it")


def train_vae(zoo: str | Path, out: str | Path, *, logdir: str | Path | None = None, max_epochs: int = 20,
              batch_size: int = 1024, lr: float = 2e-3, config: VAEConfig | None = None,
              max_tokens_per_layer: int | None = 4096, seed: int = 0, overwrite: bool = False,
              resume: str | None = None, trainer_kwargs: dict | None = None, progress: bool = True,
              permute_rows: bool = False) -> tuple[Path, dict]:
    """Train, fit priors, evaluate against PCA and export; returns (out dir, summary).

    Under DDP only rank 0 exports; the other ranks return ``{"rank": r}`` (r > 0) as their summary.
    """
    # deferred: pytorch_lightning takes seconds to import, and this module's other helpers need none of it
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from .data import ZooDataModule, list_zoo
    from .lit import LitWeightVAE

    check_output_dir(Path(out), overwrite, kind="vae")
    try:
        models = {m["model_id"]: m for m in list_zoo(zoo)}
    except ValueError as err:
        raise WeightgenError(str(err)) from None
    start = time.perf_counter()
    # seeded init and training under a forked torch RNG: the caller's RNG (and environment) stay as
    # they were; the data order and augmentations draw from their own seeded generators
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        config = config or VAEConfig()
        # batch_size counts tokens for both bodies: the transformer's batches hold batch_size / window windows
        data = ZooDataModule(zoo, batch_size=max(1, batch_size // config.window), seed=seed,
                             max_tokens_per_layer=max_tokens_per_layer, token_size=config.token_size,
                             window=config.window, permute_rows=permute_rows)
        try:
            data.setup()
        except ValueError as err:
            raise WeightgenError(str(err)) from None
        module = LitWeightVAE(config, lr=lr)
        # no placeholder hp_metric (-1): the real metrics are logged with the hyperparameters at the end
        logger = TensorBoardLogger(str(logdir), name="vae", default_hp_metric=False) if logdir else False
        steps_per_epoch = -(-len(data.train_set) // data.batch_size)
        trainer = pl.Trainer(max_epochs=max_epochs, logger=logger, deterministic=True,
                             log_every_n_steps=max(1, min(50, steps_per_epoch)),
                             enable_checkpointing=bool(logdir), enable_progress_bar=progress,
                             enable_model_summary=False, **(trainer_kwargs or {}))
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.global_rank != 0:
        # another DDP process (Lightning re-runs the script once per extra device): it trained beside
        # rank 0, which alone fits the priors, evaluates, exports and reports
        return Path(out), {"rank": trainer.global_rank}
    vae = module.vae.cpu().eval()
    train_models = [models[i] for i in data.train_ids]
    held_out = [models[i] for i in data.val_ids]
    scale_model, density = fit_priors(vae, train_models, seed)
    recon = reconstruction_vs_pca(vae, train_models, held_out, seed)
    if logger:
        log_layer_reconstructions(logger.experiment, vae, held_out, trainer.global_step)
        logger.log_hyperparams(module.hparams, {"hp/heldout_vae_cosine": recon["summary"]["vae_mean_cosine"],
                                                "hp/heldout_pca_cosine": recon["summary"]["pca_mean_cosine"]})
        logger.finalize("success")
    summary = {
        "seconds": time.perf_counter() - start,
        "epochs": trainer.current_epoch,  # epochs run: max_time can stop before max_epochs
        "max_epochs": max_epochs,
        "steps": trainer.global_step,
        "arch": config.arch,
        "train_models": data.train_ids,
        "val_models": data.val_ids,
        "archs": sorted({m["arch"] for m in models.values()}),
        "reconstruction": recon["summary"],
        "warning": below_pca_warning(recon["summary"]),
    }
    extra = {"scale_model": scale_model, "latent_density": density, "training": summary,
             "trainer": {"lr": lr, "batch_size": batch_size, "max_tokens_per_layer": max_tokens_per_layer,
                         "seed": seed, "permute_rows": permute_rows}}
    save_vae(vae, out, extra=extra, overwrite=overwrite)
    log.info("VAE trained in %.0fs: held-out cosine VAE %.4f vs PCA %.4f", summary["seconds"],
             recon["summary"]["vae_mean_cosine"], recon["summary"]["pca_mean_cosine"])
    if summary["warning"]:
        log.warning(summary["warning"])
    return Path(out), summary


__all__ = ["train_vae", "fit_priors", "reconstruction_vs_pca", "iter_layers", "below_pca_warning"]
