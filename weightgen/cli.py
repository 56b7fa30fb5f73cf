"""Shared CLI plumbing: one-line errors, key=value parsing, report tables."""
from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

from .io import WeightgenError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default to its help, unless the
    default is None/False or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and not action.required
        if shown and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parse_kwargs(items: list[str] | None) -> dict:
    """``["depth=6", "num_classes=0", "act_layer=gelu"]`` -> typed dict (literals, else strings)."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise WeightgenError(f"bad --model-kwargs entry {item!r}: expected key=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


@contextlib.contextmanager
def user_errors(cli: str | None = None) -> Iterator[None]:
    """The one way a script turns a core ``ValueError`` (bad config, bad pattern) into a user error:
    the same message as a :class:`WeightgenError` (``cli``: its command-line wording, if different)."""
    try:
        yield
    except WeightgenError:
        raise
    except ValueError as err:
        raise WeightgenError(str(err), cli=cli) from None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(mmap_mib: int = 16, trim_mib: int = 256) -> bool:
    """Let glibc keep freed memory for the next allocation instead of handing it back to the OS at once.

    A script's process calls this once (process-wide: never library code). glibc's default unmaps or
    trims a freed block of a few MiB, so the next chunk's activations fault fresh, zero-filled pages
    in again: generating resnet50 from the prior spent 0.9 s more system time on 400k more such faults
    (docs/bench_generate_speed.md). Blocks up to ``mmap_mib`` now come from the heap, and up to
    ``trim_mib`` of free heap stays mapped. Bigger blocks are still mapped alone and returned when
    freed: at 32 MiB vit_huge's 20-26 MB weights went to the heap, where the targets the closed-form
    fit frees bank by bank stay mapped, and its peak rose from 1.8x to 2.4x its float32 bytes; at
    16 MiB (the decoder's 8 MiB chunk buffers on the heap, big weights not) the peak is unchanged.
    Returns whether it applied (glibc only; elsewhere nothing changes).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries tune (or lack) mallopt differently
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_mib << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_mib << 20))


def run_cli(main: Callable[[], int]) -> int:
    """Run ``main``; user mistakes become one line on stderr and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main()
    except WeightgenError as err:
        print("error: " + " ".join(str(err.cli or err).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def group_table(report: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in report["layers"]:
        groups[row["group"]].append(row)
    lines = [f"{'group':<6} {'shape':<22} {'layers':>6} {'mean cos':>10} {'min cos':>10}"]
    for name, rows in groups.items():
        cos = [r["cosine"] for r in rows]
        lines.append(f"{name:<6} {str(tuple(rows[0]['shape'])):<22} {len(rows):>6} "
                     f"{sum(cos) / len(cos):>10.6f} {min(cos):>10.6f}")
    return "\n".join(lines)


def total_line(report: dict) -> str:
    p = report["params"]
    fn = report.get("function") or {}
    agree = f", top-1 agreement {fn['top1_agreement']:.0%}" if "top1_agreement" in fn else ""
    return (f"total: {len(report['layers'])} layers, mean cos {report['mean_cosine']:.6f}, "
            f"min cos {report['min_cosine']:.6f}{agree}; params model {p['model']:,}, templates "
            f"{p['templates']:,}, per-task {p['per_task_trainable']:,}; fit {report['seconds']:.2f}s")


_FILE_ROLES = {
    "recast_config.json": "arch, model kwargs, recast config, bank membership, versions",
    "recast.safetensors": "templates + coefficients: weightgen.load(DIR) rebuilds the model",
    "weights.safetensors": "the dense state dict; loads strict=True into timm.create_model(arch)",
    "report.json": "per-layer cosines, parameter counts, timings (what is printed above)",
}


def fit_kind(report: dict, templates: int | None = None) -> str:
    """One sentence on what the cosines mean: an exact fit by construction, or a compressed one.

    Template counts come from ``report["templates_per_bank"]`` (a preset's ``template_ratio``
    included); ``templates`` is the fallback for reports written before it was recorded.
    """
    sizes: dict[str, int] = defaultdict(int)
    for row in report["layers"]:
        sizes[row["group"]] += 1
    if report.get("method") != "closed_form":
        return f"{report.get('method')} fit: the cosines measure how closely the fitted templates reproduce the weights."
    per_bank = report.get("templates_per_bank") or {g: templates if templates is not None else n
                                                    for g, n in sizes.items()}
    short = sorted((g for g, n in sizes.items() if per_bank.get(g, n) < n), key=lambda g: (len(g), g))
    if not short:
        return ("exact fit: every bank has at least as many templates as layers, so mean cos 1.000000 holds "
                "by construction (the templates span the layers' weights).")
    counts = sorted({per_bank[g] for g in short})
    shown = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (f"compressed fit: {len(short)} of {len(sizes)} banks have fewer templates ({shown}) than "
            f"layers, so their cosines show how much of the weights the templates keep.")


def artifact_listing(out: Path) -> str:
    """The files of an artifact directory, one per line with size and role."""
    lines = [f"files in {out}/:"]
    for name, role in _FILE_ROLES.items():
        path = Path(out) / name
        if path.is_file():
            lines.append(f"  {name:<20} {path.stat().st_size / 1e6:>8.2f} MB  {role}")
    return "\n".join(lines)


def accelerator_for(device: str, accelerator: str | None) -> str:
    """The Lightning accelerator for ``--device`` unless ``--accelerator`` names one."""
    if accelerator:
        return accelerator
    if device.startswith("cuda"):
        return "gpu"
    if device == "cpu":
        return "cpu"
    raise WeightgenError(f"unknown --device {device!r}: use cpu or cuda")
