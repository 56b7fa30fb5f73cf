"""LitWeightVAE: a thin Lightning wrapper that trains a WeightVAE and logs diagnostics."""
from __future__ import annotations

import dataclasses
import logging
import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from .model import VAEConfig, WeightVAE, kl_weight
from .tokenize import COND_FIELDS, KINDS

__all__ = ["LitWeightVAE"]

log = logging.getLogger(__name__)

_DEPTH_COL = COND_FIELDS.index("depth")
_N_VIS_TOKENS = 8  # tokens drawn as images
_N_EMBED = 300  # latent means sent to the projector
_N_CACHE = 512  # validation tokens kept for the epoch-end visuals


def _token_images(x: torch.Tensor) -> torch.Tensor:
    """(n, token_size) -> (n, s, s) with s = ceil(sqrt(token_size)); 8x8 for 64-wide tokens."""
    n, d = x.shape
    s = math.ceil(math.sqrt(d))
    return F.pad(x, (0, s * s - d)).view(n, s, s)


def _flat(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Windowed batches (B, window, ...) as token batches (B * window, ...); token batches as they are.

    Windows stay contiguous, so the transformer VAE cuts the flat list back into the same windows.
    """
    if batch["values"].dim() == 2:
        return batch
    w = batch["values"].shape[1]
    flat = {k: batch[k].flatten(0, 1) for k in ("values", "mask", "cond")}
    flat.update({k: batch[k].repeat_interleave(w) for k in batch if k not in flat})
    return flat


_EMBED_COLUMNS = ("kind", "depth", "depth_bucket", "model", "layer")  # projector metadata columns


def _real_vs_decoded_figure(real: torch.Tensor, decoded: torch.Tensor):
    """Figure of (k, s, s) real tokens (top row, labelled) above their decodings (bottom row)."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    k = real.shape[0]
    lim = float(torch.cat([real, decoded]).abs().max().clamp_min(1e-8))
    fig = Figure(figsize=(1.2 * k + 1, 3), layout="constrained")
    axes = fig.subplots(2, k, squeeze=False)
    for row, (label, images) in enumerate((("real", real), ("decoded", decoded))):
        for i in range(k):
            axes[row][i].imshow(images[i].numpy(), cmap="coolwarm", vmin=-lim, vmax=lim)
            axes[row][i].set_xticks([])
            axes[row][i].set_yticks([])
        axes[row][0].set_ylabel(label)
    fig.suptitle("validation tokens: real (top) vs decode(mu) (bottom)", fontsize=9)
    return fig


class LitWeightVAE(pl.LightningModule):
    def __init__(self, config: VAEConfig | dict, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        if isinstance(config, dict):  # as restored from hparams
            config = VAEConfig(**config)
        # store the config as a plain dict so checkpoints/hparams.yaml never need a custom class
        self.save_hyperparameters({"config": dataclasses.asdict(config), "lr": lr, "weight_decay": weight_decay})
        self.config = config
        self.vae = WeightVAE(config)
        self._vis_batch: dict[str, torch.Tensor] | None = None

    def current_beta(self) -> float:
        return kl_weight(self.config, self.global_step)

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        batch = _flat(batch)
        x, mask, cond, kind = batch["values"], batch["mask"], batch["cond"], batch["kind"]
        beta = self.current_beta()
        out = self.vae.loss(x, mask, cond, beta)
        bs = x.shape[0]
        # train: per step; val: epoch means. Never both, so tags stay exactly "<stage>/<name>".
        kw = {"on_step": stage == "train", "on_epoch": stage != "train"}
        for name in ("loss", "recon", "kl"):
            self.log(f"{stage}/{name}", out[name], batch_size=bs, prog_bar=name == "loss", **kw)
        self.log(f"{stage}/beta", beta, batch_size=bs, **kw)

        # Reconstruction cosine per layer kind, on the deterministic decode(mu).
        with torch.no_grad():
            m = mask.to(x.dtype)
            x_mu = self.vae.decode(out["mu"].detach(), cond)  # (B, token_size)
            cos = F.cosine_similarity(x * m, x_mu * m, dim=-1, eps=1e-8)  # (B,)
            for kid, name in enumerate(KINDS):
                sel = (kind == kid) & mask.any(-1)  # not the zero tokens padding a window
                n = int(sel.sum())
                if n:
                    self.log(f"{stage}/cosine_{name}", cos[sel].mean(), batch_size=n, **kw)
        return out["loss"]

    def on_train_epoch_start(self) -> None:
        # fresh row permutations (augmentation) for the windowed zoo dataset, DDP's wrapped sampler too
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0 and self._vis_batch is None:
            self._vis_batch = {k: v[:_N_CACHE].detach().cpu() for k, v in _flat(batch).items()}
        return self._common_step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if not math.isfinite(total) or total <= 0:
            return opt  # unknown run length (max_epochs=-1): constant LR
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(total), eta_min=self.hparams.lr * 0.05)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- TensorBoard diagnostics --------------------------------------------------------------
    def _tensorboards(self) -> list:
        writers = []
        for logger in self.loggers:
            exp = getattr(logger, "experiment", None)
            if all(hasattr(exp, a) for a in ("add_image", "add_histogram", "add_embedding")):
                writers.append(exp)
        return writers

    def on_validation_epoch_end(self) -> None:
        batch, self._vis_batch = self._vis_batch, None
        if batch is None or self.trainer.sanity_checking:
            return
        writers = self._tensorboards()
        if not writers:
            log.debug("no TensorBoard logger attached: skipping VAE diagnostics")
            return
        with torch.no_grad():
            x, mask, cond = (batch[k].to(self.device) for k in ("values", "mask", "cond"))
            mu, _ = self.vae.encode(x, cond)  # (n, latent_dim)
            x_hat = self.vae.decode(mu, cond)  # (n, token_size)
        x, mask, mu, x_hat = x.cpu(), mask.cpu(), mu.cpu(), x_hat.cpu()
        step = self.global_step

        # real vs decoded tokens: a labelled figure, one shared colour scale
        k = min(_N_VIS_TOKENS, x.shape[0])
        real, dec = _token_images(x[:k] * mask[:k]), _token_images(x_hat[:k] * mask[:k])  # (k, s, s)
        figure = _real_vs_decoded_figure(real, dec)

        n = min(_N_EMBED, mu.shape[0])
        depth = cond[:n, _DEPTH_COL].cpu()
        dataset = getattr(getattr(self.trainer, "datamodule", None), "val_set", None)
        names = [dataset.layer_label(int(j)) if dataset is not None and "layer" in batch else ("?", "?")
                 for j in batch.get("layer", torch.zeros(n, dtype=torch.long))[:n]]
        metadata = [[KINDS[int(kd)], f"{float(dp):.2f}", f"d{min(int(dp * 4), 3)}", model, layer]
                    for kd, dp, (model, layer) in zip(batch["kind"][:n], depth, names)]
        for w in writers:
            w.add_histogram("val/tokens_real", x[mask], step)
            w.add_histogram("val/tokens_decoded", x_hat[mask], step)
            w.add_figure("val/tokens_real_vs_decoded", figure, step, close=False)
            if n >= 2:
                w.add_embedding(mu[:n], metadata=metadata, metadata_header=list(_EMBED_COLUMNS),
                                tag="val/latent_mu", global_step=step)
