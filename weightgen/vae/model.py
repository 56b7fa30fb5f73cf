"""WeightVAE: a small conditional VAE over weight tokens (plain ``nn.Module``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .tokenize import COND_DIM, TOKEN_SIZE

__all__ = ["VAEConfig", "WeightVAE", "kl_weight"]

# Keeps exp(logvar) finite early in training, when the encoder output can be large.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


@dataclass
class VAEConfig:
    token_size: int = TOKEN_SIZE
    cond_dim: int = COND_DIM
    latent_dim: int = 16
    hidden: int = 256
    layers: int = 3  # hidden blocks (Linear -> LayerNorm -> GELU) in encoder and decoder
    beta: float = 1e-3  # final KL weight (after warm-up)
    warmup_steps: int = 500  # linear KL warm-up from 0 to beta

    def __post_init__(self) -> None:
        for name in ("token_size", "cond_dim", "latent_dim", "hidden", "layers"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VAEConfig.{name} must be positive, got {getattr(self, name)}")
        if self.beta < 0 or self.warmup_steps < 0:
            raise ValueError("VAEConfig.beta and warmup_steps must be non-negative")


def kl_weight(config: VAEConfig, step: int) -> float:
    """Linear warm-up of the KL weight from 0 to ``config.beta`` over ``warmup_steps`` steps."""
    if config.warmup_steps <= 0:
        return float(config.beta)
    return float(config.beta) * min(1.0, max(0, step) / config.warmup_steps)


def _mlp(d_in: int, hidden: int, layers: int, d_out: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        blocks += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU()]
        d = hidden
    blocks.append(nn.Linear(d, d_out))
    return nn.Sequential(*blocks)


class WeightVAE(nn.Module):
    """Encoder ``q(z | x, c)`` and decoder ``p(x | z, c)``, both MLPs that see the condition ``c``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = _mlp(c.token_size + c.cond_dim, c.hidden, c.layers, 2 * c.latent_dim)
        self.decoder = _mlp(c.latent_dim + c.cond_dim, c.hidden, c.layers, c.token_size)

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat([x, cond], dim=-1))  # (B, 2 * latent_dim)
        mu, logvar = h.chunk(2, dim=-1)  # (B, latent_dim) each
        return mu, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, cond], dim=-1))  # (B, token_size)

    @staticmethod
    def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # draw on the generator's device, so a CPU generator gives the same numbers for a GPU model
        device = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x, cond)
        z = mu + self._randn(mu.shape, mu, generator) * torch.exp(0.5 * logvar)  # (B, latent_dim)
        return self.decode(z, cond), mu, logvar

    def loss(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cond: torch.Tensor,
        beta: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """``recon + beta * kl``; recon is the MSE over real (unpadded) entries only."""
        x_hat, mu, logvar = self(x, cond, generator=generator)
        m = mask.to(x.dtype)  # (B, token_size)
        recon = ((x_hat - x).pow(2) * m).sum() / m.sum().clamp_min(1.0)
        kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1).mean()
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl, "x_hat": x_hat, "mu": mu}

    @torch.no_grad()
    def sample(
        self, cond: torch.Tensor, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """Decode ``z ~ N(0, temperature^2 I)``; returns (B, token_size)."""
        z = self._randn((cond.shape[0], self.config.latent_dim), cond, generator)  # (B, latent_dim)
        return self.decode(z * temperature, cond)
