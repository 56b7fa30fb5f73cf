"""Glyph tasks rendered from fonts that ship with matplotlib and hershey-fonts, split by font.

Each sample is one glyph drawn large, rotated, cropped to its ink, scaled and pasted into 28x28
with jitter. Train, validation and test use disjoint fonts (fonts whose glyphs are near copies of
each other go to the same split), so a test score measures generalisation to unseen fonts.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io import WeightgenError
from .base import ImageTask, as_split, subsample
from .sources import missing

SIDE = 28  # output side, as MNIST
CANVAS = 96
DRAW_SIZE = 40  # pixels per em when drawing

# Classes. Downstream tasks use Latin and Greek lowercase letters; the source task uses Cyrillic
# capitals with no Latin/Greek/digit look-alike and symbols that resemble none of those letters.
GLYPH_CLASSES = {
    "greek": list("αβγδεζθλξψ"),
    "latin": list("abdefghkmr"),
    "source": list("ДЖИЛЦШЩЫЭЮЯ") + list("∞∫√±÷≈≠≤≥∀∃⊕⊗→↔⇒↑§¶@&#%?★♠♣♥♦☺♪✓∴⊥∠△□◇‡†¥£$"),
}
CLASS_NAMES = {
    "greek": ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "lambda", "xi", "psi"],
}

DEJAVU = [f"DejaVu{family}{face}.ttf" for family in ("Sans", "SansMono", "Serif")
          for face in ("", "-Bold", "-Oblique" if family != "Serif" else "-Italic",
                       "-BoldOblique" if family != "Serif" else "-BoldItalic")]
STIX = ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"]
COMPUTER_MODERN = ["cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf"]  # Latin only
HERSHEY_LATIN = ["futural", "futuram", "rowmans", "rowmand", "rowmant", "timesr", "timesrb", "timesi", "timesib",
                 "scripts", "scriptc", "cursive", "gothiceng", "gothicger", "gothicita", "gothgbt", "gothgrt",
                 "gothitt"]
# Hershey Greek fonts map ASCII to Greek letters differently per font: explicit tables, checked by
# eye on a render of a-z ('c' is chi in greek/timesg, gamma in greekc/greeks). Their theta is the
# open form (U+03D1), a variant of the same letter.
_GREEK_SIMPLE = dict(zip("αβγδεζθλξψ", "abgdezqlxy"))
_GREEK_COMPLEX = dict(zip("αβγδεζθλξψ", "abcdefhknw"))
HERSHEY_GREEK: dict[str, dict[str, str]] = {"greek": _GREEK_SIMPLE, "timesg": _GREEK_SIMPLE,
                                            "greekc": _GREEK_COMPLEX, "greeks": _GREEK_COMPLEX}

FONTS = {
    "greek": DEJAVU + STIX,
    "latin": DEJAVU + STIX + COMPUTER_MODERN,
    "source": DEJAVU + STIX,
}
MIN_FONTS_PER_CLASS = 8  # a source class drawn by fewer fonts is left out


@dataclass(frozen=True)
class Font:
    name: str  # file name (TTF) or "hershey:<name>"
    kind: str  # "ttf" or "hershey"


def _ttf_dir() -> Path:
    import matplotlib
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _has_hershey() -> bool:
    return importlib.util.find_spec("HersheyFonts") is not None


def fonts_for(task: str) -> list[Font]:
    fonts = [Font(name, "ttf") for name in FONTS[task] if (_ttf_dir() / name).is_file()]
    hershey = HERSHEY_LATIN if task == "latin" else list(HERSHEY_GREEK) if task == "greek" else []
    if hershey:
        if not _has_hershey():
            raise missing("hershey-fonts", task)
        fonts += [Font(f"hershey:{name}", "hershey") for name in hershey]
    return fonts


def _to_image(canvas: Image.Image) -> np.ndarray | None:
    """Crop to the ink; None for an empty glyph."""
    box = canvas.getbbox()
    return None if box is None else np.asarray(canvas.crop(box))


@functools.lru_cache(maxsize=None)
def _ttf(name: str):
    from matplotlib.ft2font import FT2Font

    path = _ttf_dir() / name
    return ImageFont.truetype(str(path), DRAW_SIZE), FT2Font(str(path))


def _draw_ttf(name: str, char: str) -> np.ndarray | None:
    font, ft = _ttf(name)
    if ft.get_char_index(ord(char)) == 0:  # not in the font: Pillow would draw its "missing" box
        return None
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(canvas).text((CANVAS / 2, CANVAS / 2), char, fill=255, font=font, anchor="mm")
    return _to_image(canvas)


@functools.lru_cache(maxsize=None)
def _hershey(name: str):
    from HersheyFonts import HersheyFonts

    font = HersheyFonts()
    font.load_default_font(name)
    font.normalize_rendering(DRAW_SIZE)
    return font


def _draw_hershey(name: str, char: str) -> np.ndarray | None:
    ascii_char = HERSHEY_GREEK.get(name, {}).get(char, char)
    lines = list(_hershey(name).lines_for_text(ascii_char))
    if not lines:
        return None
    pts = np.array([p for line in lines for p in line], dtype=np.float64)
    lo, hi = pts.min(0), pts.max(0)
    offset = CANVAS / 2 - (lo + hi) / 2
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    for (x0, y0), (x1, y1) in lines:  # y points up in Hershey coordinates
        draw.line([(x0 + offset[0], CANVAS - (y0 + offset[1])), (x1 + offset[0], CANVAS - (y1 + offset[1]))],
                  fill=255, width=3)
    return _to_image(canvas)


@functools.lru_cache(maxsize=None)
def base_glyph(font: Font, char: str) -> np.ndarray | None:
    """The glyph drawn upright at DRAW_SIZE, cropped to its ink (uint8), or None if the font lacks it."""
    if font.kind == "ttf":
        return _draw_ttf(font.name, char)
    return _draw_hershey(font.name.partition(":")[2], char)


def _fit(ink: np.ndarray, longer: float) -> np.ndarray:
    """Scale a cropped glyph so its longer side is ``longer`` pixels, centred in SIDE x SIDE (float)."""
    h, w = ink.shape
    scale = longer / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(ink).resize(size, Image.BILINEAR, reducing_gap=None), dtype=np.float32)
    out = np.zeros((SIDE, SIDE), np.float32)
    y, x = (SIDE - size[1]) // 2, (SIDE - size[0]) // 2
    out[y:y + size[1], x:x + size[0]] = small
    return out / 255.0


def render(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One jittered sample (SIDE x SIDE, float32 in [0, 1]) of a cropped glyph."""
    angle, scale = rng.uniform(-12, 12), rng.uniform(0.8, 1.05)
    dx, dy = rng.integers(-2, 3, size=2)
    h, w = ink.shape
    side = math.ceil(math.hypot(h, w)) + 2  # room to rotate without clipping, and no more (speed)
    pad = np.zeros((side, side), np.uint8)
    y, x = (side - h) // 2, (side - w) // 2
    pad[y:y + h, x:x + w] = ink
    rotated = Image.fromarray(pad).rotate(angle, resample=Image.BILINEAR)
    box = rotated.getbbox()
    if box is None:
        return _fit(ink, 20 * scale)
    glyph = _fit(np.asarray(rotated.crop(box)), 20 * scale)
    return np.roll(glyph, (int(dy), int(dx)), axis=(0, 1))


def _fingerprint(font: Font, chars: list[str]) -> np.ndarray | None:
    """The font's upright glyphs at 16x16 side by side (NaN where missing), to find near-copies."""
    out = []
    for char in chars:
        ink = base_glyph(font, char)
        out.append(np.full((SIDE, SIDE), np.nan, np.float32) if ink is None else _fit(ink, 20))
    return np.stack(out)


NEAR_COPY = 0.04  # mean |pixel difference| below which two fonts count as one for splitting


def font_groups(fonts: list[Font], chars: list[str]) -> list[list[Font]]:
    """Fonts in groups of near-copies (e.g. two Hershey fonts drawn from the same strokes)."""
    prints = [_fingerprint(f, chars) for f in fonts]
    parent = list(range(len(fonts)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(fonts)):
        for j in range(i):
            diff = np.abs(prints[i] - prints[j])
            if np.isfinite(diff).any() and np.nanmean(diff) < NEAR_COPY:
                parent[root(i)] = root(j)
    groups: dict[int, list[Font]] = {}
    for i, font in enumerate(fonts):
        groups.setdefault(root(i), []).append(font)
    return list(groups.values())


def split_fonts(groups: list[list[Font]], seed: int, test_fraction: float = 0.2,
                val_fraction: float = 0.15) -> dict[str, list[Font]]:
    """Font groups shuffled by ``seed`` and dealt to test, val, then train (each gets >= 1 group)."""
    if len(groups) < 3:
        raise WeightgenError(f"need at least 3 distinct fonts to split by font, found {len(groups)}")
    order = np.random.default_rng(seed).permutation(len(groups))
    total = sum(len(g) for g in groups)
    out: dict[str, list[Font]] = {"test": [], "val": [], "train": []}
    for stage, fraction in (("test", test_fraction), ("val", val_fraction)):
        while len(order) > 1 and (not out[stage] or len(out[stage]) < fraction * total):
            out[stage] += groups[order[0]]
            order = order[1:]
    for i in order:
        out["train"] += groups[i]
    return out


@functools.lru_cache(maxsize=None)
def _usable(task: str) -> tuple[list[Font], list[str]]:
    """Fonts and classes of a task: every class drawn by enough fonts (source) or by all (others)."""
    fonts, chars = fonts_for(task), GLYPH_CLASSES[task]
    have = {c: [f for f in fonts if base_glyph(f, c) is not None] for c in chars}
    if task == "source":
        chars = [c for c in chars if len(have[c]) >= MIN_FONTS_PER_CLASS]
    else:
        fonts = [f for f in fonts if all(f in have[c] for c in chars)]
    return fonts, chars


def glyph_task(task: str, seed: int, max_train: int | None, max_eval: int | None, description: str,
               per_font: int = 24) -> ImageTask:
    """Render a glyph task; ``per_font`` samples per (font, class) when a split has no cap."""
    fonts, chars = _usable(task)
    by_stage = split_fonts(font_groups(fonts, chars), seed)
    names = CLASS_NAMES.get(task, chars)
    splits, groups = {}, {}
    for s_i, (stage, cap) in enumerate((("train", max_train), ("val", max_eval), ("test", max_eval))):
        pairs = [(f, c) for f in by_stage[stage] for c in range(len(chars)) if base_glyph(f, chars[c]) is not None]
        k = per_font if cap is None else max(1, math.ceil(cap / len(pairs)))
        rng = np.random.default_rng([seed, s_i, zlib.crc32(task.encode())])  # own stream per task and split
        images = np.stack([render(base_glyph(f, chars[c]), rng) for f, c in pairs for _ in range(k)])
        labels = np.repeat(np.array([c for _, c in pairs], dtype=np.int64), k)
        font_of = np.repeat(np.array([f.name for f, _ in pairs]), k)
        keep = subsample(np.arange(len(labels)), labels, cap, seed)
        splits[stage] = as_split(images, labels, keep)
        groups[stage] = font_of[keep].tolist()
    return ImageTask(task if task != "source" else "source", list(names), splits["train"], splits["val"],
                     splits["test"], SIDE, description, groups)
