"""TensorBoard views of a fit: loss curve, per-layer cosine, histograms and images of templates."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def weight_image(weight: torch.Tensor, max_side: int = 128) -> torch.Tensor:
    """A (1, H, W) image in [0, 1] of a weight, rows = output units, crop to ``max_side``."""
    matrix = weight.detach().float().reshape(weight.shape[0], -1)[:max_side, :max_side]
    scale = matrix.abs().max().clamp(min=1e-12)
    return (matrix / scale * 0.5 + 0.5).unsqueeze(0)


def log_fit(logdir: str | Path, model: nn.Module, report: dict, tag: str = "mimicry") -> Path:
    """Write one TensorBoard run for a fitted recast model; returns the run directory."""
    from torch.utils.tensorboard import SummaryWriter

    from .recast import banks_of, recast_layers

    logdir = Path(logdir)
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for step, loss in enumerate(report.get("loss_history", [])):
            writer.add_scalar(f"{tag}/loss", loss, step)
        for index, row in enumerate(report["layers"]):
            writer.add_scalar(f"{tag}/layer_cosine", row["cosine"], index)
            writer.add_scalar(f"{tag}/cosine/{row['name']}", row["cosine"], 0)
        writer.add_scalar(f"{tag}/mean_cosine", report["mean_cosine"], 0)
        writer.add_scalar(f"{tag}/min_cosine", report["min_cosine"], 0)
        for name, bank in banks_of(model).items():
            writer.add_histogram(f"templates/{name}", bank.templates.detach().float(), 0)
            for i in range(min(bank.num_templates, 4)):
                writer.add_image(f"templates/{name}/{i}", weight_image(bank.templates[i]), 0)
        for name, layer in recast_layers(model).items():
            writer.add_histogram(f"coefficients/{name}", layer.coefficients.detach().float(), 0)
    return logdir
