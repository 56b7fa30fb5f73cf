"""WeightVAE: a small conditional VAE over weight tokens (plain ``nn.Module``).

Two bodies behind one interface (``encode(values, cond)`` / ``decode(z, cond)`` on flat token
lists of one layer, in row-major order; latents stay per token):

* ``arch="mlp"``: each 64-value token on its own (the first shipped VAE).
* ``arch="transformer"``: consecutive tokens are cut into windows of ``window`` tokens and a
  transformer encoder/decoder lets every token see the others of its window (rows and column
  pieces of the same layer). Windows start at multiples of ``window`` from the layer's first
  token, so a caller that passes whole layers (or chunks that are multiples of ``window``) gets
  the same windows the model was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .tokenize import COND_DIM, TOKEN_SIZE

__all__ = ["VAEConfig", "WeightVAE", "kl_weight", "ARCHS"]

ARCHS = ("mlp", "transformer")

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
    arch: str = "mlp"  # "mlp" (per token) or "transformer" (windows of tokens)
    window: int = 1  # tokens per attention window (transformer); 1 for the MLP
    heads: int = 4  # attention heads (transformer)
    mask_ratio: float = 0.0  # training only: fraction of encoder input tokens zeroed (masking augmentation)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"VAEConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "mlp" and self.window != 1:
            raise ValueError("VAEConfig.window must be 1 for the per-token MLP")
        if self.arch == "transformer" and self.hidden % max(self.heads, 1):
            raise ValueError(f"VAEConfig.hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"VAEConfig.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.window & (self.window - 1):
            raise ValueError(f"VAEConfig.window must be a power of two (layers are decoded in chunks of 2^16 tokens), got {self.window}")
        for name in ("token_size", "cond_dim", "latent_dim", "hidden", "layers", "window", "heads"):
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


class _WindowTransformer(nn.Module):
    """(N, d_in) -> (N, d_out): tokens attend to the others of their window of ``window`` tokens.

    The last window is padded with zero rows (as the training windows are); padding is dropped.
    """

    def __init__(self, d_in: int, d_model: int, layers: int, heads: int, window: int, d_out: int):
        super().__init__()
        self.window = window
        self.inp = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.zeros(window, d_model))  # place inside the window
        nn.init.normal_(self.pos, std=0.02)
        block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, w = x.shape[0], self.window
        pad = -n % w
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        h = self.inp(rearrange(x, "(b w) d -> b w d", w=w)) + self.pos  # (N / w, w, d_model)
        h = self.out(self.norm(self.body(h)))  # (N / w, w, d_out)
        return rearrange(h, "b w d -> (b w) d")[:n]


class WeightVAE(nn.Module):
    """Encoder ``q(z | x, c)`` and decoder ``p(x | z, c)``, both MLPs that see the condition ``c``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config
        if c.arch == "transformer":
            self.encoder = _WindowTransformer(c.token_size + c.cond_dim, c.hidden, c.layers, c.heads, c.window,
                                              2 * c.latent_dim)
            self.decoder = _WindowTransformer(c.latent_dim + c.cond_dim, c.hidden, c.layers, c.heads, c.window,
                                              c.token_size)
        else:
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
        """``recon + beta * kl``; recon is the MSE over real (unpadded) entries only.

        In training mode with ``mask_ratio > 0`` a random fraction of tokens reaches the encoder
        as zeros (their latents must come from the window around them); the loss still asks for
        every token back.
        """
        x_in = x
        if self.training and self.config.mask_ratio > 0:
            device = generator.device if generator is not None else x.device
            drop = torch.rand(x.shape[0], generator=generator, device=device).to(x.device) < self.config.mask_ratio
            x_in = x.masked_fill(drop[:, None], 0.0)
        x_hat, mu, logvar = self(x_in, cond, generator=generator)
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
