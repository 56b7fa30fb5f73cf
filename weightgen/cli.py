"""Shared CLI plumbing: one-line errors, key=value parsing, report tables."""
from __future__ import annotations

import ast
import logging
import sys
from collections import defaultdict
from typing import Callable

from .io import WeightgenError


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


def run_cli(main: Callable[[], int]) -> int:
    """Run ``main``; user mistakes become one line on stderr and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main()
    except WeightgenError as err:
        print(f"error: {err.cli or err}", file=sys.stderr)
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
