"""Check that a PNG a script wrote is a real plot: it decodes, has the figure's size, and shows the colours
of what it should draw (a blank or truncated image fails)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colors as mcolors
from PIL import Image


def plot_pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(height, width, 3) RGB of the PNG at ``path``, checked to decode fully at ``size`` (width, height)."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size, (image.format, image.size, size)
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)  # decodes every row: a truncated file raises
    assert (rgb < 128).all(-1).sum() > 500, "no dark pixels: no axes, ticks or text"
    return rgb


def count_colour(rgb: np.ndarray, colour, tolerance: int = 6) -> int:
    """How many pixels are within ``tolerance`` per channel of ``colour`` (any matplotlib colour spec)."""
    want = np.round(np.array(mcolors.to_rgb(colour)) * 255).astype(np.int16)
    return int((np.abs(rgb - want) <= tolerance).all(-1).sum())
