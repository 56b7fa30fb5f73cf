"""TensorBoard views of a fit: loss curve, per-layer cosine (bar chart), histograms and images of templates."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .recasting import banks_of, recast_layers


def weight_image(weight: torch.Tensor, max_side: int = 128) -> torch.Tensor:
    """A (1, H, W) image in [0, 1] of a weight, rows = output units, crop to ``max_side``."""
    matrix = weight.detach().float().reshape(weight.shape[0], -1)[:max_side, :max_side]
    scale = matrix.abs().max().clamp(min=1e-12)
    return (matrix / scale * 0.5 + 0.5).unsqueeze(0)


def layer_cosine_figure(layers: list[dict]):
    """Bar chart of each layer's cosine to its target (``report["layers"]`` rows), in model order."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    cosines = [row["cosine"] for row in layers]
    fig = Figure(figsize=(max(6.0, 0.18 * len(layers) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(layers)), cosines, color="tab:blue")
    low = min(0.0, min(cosines, default=0.0))
    ax.set(ylim=(low, 1.02), ylabel="cosine to target", xlabel="layer (model order)",
           title=f"per-layer weight cosine: mean {sum(cosines) / max(len(cosines), 1):.4f}, "
                 f"min {min(cosines, default=float('nan')):.4f}")
    if len(layers) <= 60:  # names stay readable
        ax.set_xticks(range(len(layers)), [row["name"] for row in layers], rotation=90, fontsize=6)
    ax.grid(axis="y", alpha=0.3)
    return fig


def log_fit(logdir: str | Path, model: nn.Module, report: dict, tag: str = "mimicry") -> Path:
    """Write one TensorBoard run for a fitted recast model; returns the run directory."""
    from torch.utils.tensorboard import SummaryWriter

    logdir = Path(logdir)
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for step, loss in enumerate(report.get("loss_history", [])):
            writer.add_scalar(f"{tag}/loss", loss, step)
        # one bar per layer (a scalar chart would put the layer index on the step axis)
        writer.add_figure(f"{tag}/layer_cosine", layer_cosine_figure(report["layers"]), 0)
        writer.add_scalar(f"{tag}/mean_cosine", report["mean_cosine"], 0)
        writer.add_scalar(f"{tag}/min_cosine", report["min_cosine"], 0)
        for name, bank in banks_of(model).items():
            writer.add_histogram(f"templates/{name}", bank.templates.detach().float(), 0)
            for i in range(min(bank.num_templates, 4)):
                writer.add_image(f"templates/{name}/{i}", weight_image(bank.templates[i]), 0)
        for name, layer in recast_layers(model).items():
            writer.add_histogram(f"coefficients/{name}", layer.coefficients.detach().float(), 0)
    return logdir
