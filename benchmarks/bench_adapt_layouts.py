#!/usr/bin/env python
"""Which bank layout lets coefficient-only ``recast`` adapt? Chosen on VALIDATION splits only.

A layout is ``PRESET`` or ``PRESET+N``: the source fitted with ``generate_weights.py --preset PRESET``
(closed form) plus N random templates per bank (``--extra-templates N``: coefficients start at zero,
so the model's function is unchanged). ``recast-resnet`` fits conv1/conv2 of the later blocks of each
stage (2 templates per bank); ``recast-conv`` every residual conv (exact); ``all`` every conv: the
stem, residual and shortcut convs (exact).

- ``--part hue``: the RGB source of bench_adapt_colour.py (glyphs in random colours), task ``hue``,
  seed 0, validation accuracy of every layout at ``--hue-lrs``, and ``linear`` at the same lrs.
- ``--part gray``: the grayscale source of bench_adapt_defaults.py, tasks latin and mnist (300
  training / 300 validation images), seed 0, validation accuracy at adapt.py's default lr for
  ``recast`` and ``linear`` (the lr a user gets).
- Rule: among the layouts whose grayscale validation mean is at least ``linear``'s, the one with the
  best hue validation accuracy at adapt.py's default ``recast`` lr (ties: fewer coefficients).

    python benchmarks/bench_adapt_layouts.py --part hue --out /tmp/l --stem hue &
    python benchmarks/bench_adapt_layouts.py --part gray --out /tmp/l --stem gray
    python benchmarks/bench_adapt_layouts.py --render /tmp/l/hue.json /tmp/l/gray.json   # docs/adapt_layouts.{md,json}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

HUE_LAYOUTS = ["recast-resnet", "recast-resnet+16", "recast-conv", "recast-conv+16", "all", "all+4", "all+8", "all+16"]
GRAY_LAYOUTS = ["recast-resnet", "all+4", "all+8", "all+16"]
HUE_LRS = [0.03, 0.1, 0.3]


def split_layout(layout: str) -> tuple[str, int]:
    preset, _, extra = layout.partition("+")
    return preset, int(extra or 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("hue", "gray"))
    p.add_argument("--colour-cache", default=str(REPO / "outputs" / "bench_adapt_colour_cache"),
                   help="bench_adapt_colour.py's --cache (its RGB source is pretrained there once)")
    p.add_argument("--gray-cache", default=str(REPO / "outputs" / "bench_adapt_defaults_cache"),
                   help="bench_adapt_defaults.py's --cache (its grayscale source)")
    p.add_argument("--layouts", help="comma-separated; default: the part's own list")
    p.add_argument("--hue-lrs", default=",".join(map(str, HUE_LRS)))
    p.add_argument("--out", default=str(REPO / "docs"))
    p.add_argument("--stem", default="adapt_layouts")
    p.add_argument("--render", nargs="+", metavar="JSON", help="no training: merge the parts' outputs into one record")
    args = p.parse_args(argv)
    if args.render:
        parts = [json.loads(Path(f).read_text()) for f in args.render]
        data = {"parts": [{k: d[k] for k in ("settings", "machine", "seconds")} for d in parts],
                "rows": [r for d in parts for r in d["rows"]]}
        data["chosen"] = choose(data["rows"])
        write_outputs(args.out, args.stem, markdown(data), data)
        return 0
    if not args.part:
        p.error("pass --part hue|gray, or --render")
    import torch

    torch.set_num_threads(1)
    import bench_adapt_colour as colour
    import bench_adapt_defaults as gray
    from weightgen.adapt.incremental import DEFAULT_STEPS, DataOptions, method_defaults, open_backbone, run_sequence
    from weightgen.adapt.trainer import TrainConfig

    start = time.perf_counter()
    rows: list[dict] = []
    data = {"settings": vars(args), "machine": machine_info(), "steps": DEFAULT_STEPS, "rows": rows}

    def run(bb, layout: str, method: str, lr: float, tasks: list[str], options) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_sequence(bb, method, tasks, [0], TrainConfig(epochs=1, batch_size=64, lr=lr), tmp,
                                  options=options, steps=DEFAULT_STEPS)
        rows.extend({"part": args.part, "layout": layout if method != "linear" else "-", "method": method, "lr": lr,
                     **{k: r[k] for k in ("task", "seed", "val_acc", "trainable", "task_file_bytes", "train_seconds")},
                     "templates_per_bank": bb.report.get("templates_per_bank")} for r in result["rows"])
        data["seconds"] = time.perf_counter() - start
        write_outputs(args.out, args.stem, markdown(data), data)  # after every run: a stopped run keeps its rows
        print(f"[{data['seconds']:.0f}s] {method} {layout} lr {lr:g}", flush=True)

    if args.part == "hue":
        root, src, info = colour.colour_source(args.colour_cache)
        options = DataOptions(max_train=1000, max_eval=500)  # bench_adapt_colour.py's caps
        lrs = [float(x) for x in args.hue_lrs.split(",")]
        for lr in lrs:
            run(open_backbone(colour.layout_artifact(root, src, info)), "-", "linear", lr, ["hue"], options)
        for layout in (args.layouts.split(",") if args.layouts else HUE_LAYOUTS):
            preset, extra = split_layout(layout)
            art = colour.layout_artifact(root, src, info, None if preset == colour.PRESET else preset, extra)
            for lr in lrs:
                run(open_backbone(art), layout, "recast", lr, ["hue"], options)
    else:
        options = DataOptions(max_train=300, max_eval=300)  # bench_adapt_defaults.py's caps
        cache = Path(args.gray_cache)
        run(open_backbone(gray.backbone(cache, 4)), "-", "linear", method_defaults("linear")["lr"], gray.TASKS, options)
        for layout in (args.layouts.split(",") if args.layouts else GRAY_LAYOUTS):
            preset, extra = split_layout(layout)
            bb = open_backbone(gray.backbone(cache, 4, preset=preset, extra=extra))
            run(bb, layout, "recast", method_defaults("recast")["lr"], gray.TASKS, options)
    return 0


def _val(rows: list[dict], **match) -> float | None:
    sel = [r["val_acc"] for r in rows if all(r[k] == v for k, v in match.items())]
    return statistics.fmean(sel) if sel else None


def choose(rows: list[dict]) -> dict | None:
    """The rule in the module docstring; None until both parts are in."""
    from weightgen.adapt.incremental import method_defaults

    lr_r, lr_l = method_defaults("recast")["lr"], method_defaults("linear")["lr"]
    gray_linear = _val(rows, part="gray", method="linear")
    if gray_linear is None:
        return None
    coefs = {r["layout"]: r["trainable"] for r in rows if r["method"] == "recast" and r["part"] == "hue"}
    ok = [lay for lay in dict.fromkeys(r["layout"] for r in rows if r["part"] == "gray" and r["method"] == "recast")
          if _val(rows, part="gray", method="recast", layout=lay) >= gray_linear
          and _val(rows, part="hue", method="recast", layout=lay, lr=lr_r) is not None]
    if not ok:
        return {"layout": None, "gray_linear": gray_linear}
    best = max(ok, key=lambda lay: (_val(rows, part="hue", method="recast", layout=lay, lr=lr_r), -coefs.get(lay, 0)))
    return {"layout": best, "lr": lr_r, "hue_val": _val(rows, part="hue", method="recast", layout=best, lr=lr_r),
            "hue_val_linear": _val(rows, part="hue", method="linear", lr=lr_l),
            "gray_val": _val(rows, part="gray", method="recast", layout=best), "gray_val_linear": gray_linear,
            "eligible": ok}


def markdown(data: dict) -> str:
    rows = data["rows"]
    parts = data.get("parts") or [data]
    lines = ["# Which bank layout lets coefficient-only `recast` adapt (validation only)", "",
             "A layout `P+N`: the source fitted with `generate_weights.py --preset P` (closed form) plus N random "
             "templates per bank (`--extra-templates N`, coefficients at zero: the function is unchanged). "
             "`recast-resnet`: conv1/conv2 of the later blocks of each stage, 2 templates per bank; `recast-conv`: "
             "every residual conv, exact; `all`: every conv (stem, residual and shortcut convs), exact. "
             f"Seed 0, validation accuracy, a {data.get('steps', 150)}-step budget, batch 64, 1 thread.", ""]
    for part in parts:
        s, m = part["settings"], part["machine"]
        secs = part.get("seconds")
        lines.append(f"- `python benchmarks/bench_adapt_layouts.py --part {s['part']}"
                     + (f" --layouts {s['layouts']}" if s.get("layouts") else "")
                     + (f" --colour-cache {s['colour_cache']}" if s["part"] == "hue" else f" --gray-cache {s['gray_cache']}")
                     + f"` ({secs / 60:.0f} min; {m['cpu']}, load average {m['loadavg']} at the start; commit "
                     f"{m.get('git_commit')})" if secs else "")
    lines.append("")
    hue = [r for r in rows if r["part"] == "hue"]
    if hue:
        lrs = sorted({r["lr"] for r in hue})
        lines += ["## 1. hue (RGB source of bench_adapt_colour.py; 1,000 training / 500 evaluation images at most)", "",
                  "Validation accuracy (chance 0.200); coefficients: trainable numbers without the head.", ""]
        table = []
        for lay, method in dict.fromkeys((r["layout"], r["method"]) for r in hue):
            sel = [r for r in hue if r["layout"] == lay and r["method"] == method]
            name = "linear" if method == "linear" else f"recast, {lay}"
            table.append([name, sel[0]["trainable"]] + [next((f"{r['val_acc']:.3f}" for r in sel if r["lr"] == lr), "-")
                                                        for lr in lrs])
        lines += [markdown_table(["method, layout", "coefficients", *(f"lr {lr:g}" for lr in lrs)], table), ""]
    gray = [r for r in rows if r["part"] == "gray"]
    if gray:
        lines += ["## 2. latin and mnist (grayscale source of bench_adapt_defaults.py; 300 training / 300 validation "
                  "images), adapt.py's default lr", "", "Validation accuracy, mean over the two tasks.", ""]
        table = []
        for lay, method in dict.fromkeys((r["layout"], r["method"]) for r in gray):
            sel = [r for r in gray if r["layout"] == lay and r["method"] == method]
            table.append(["linear" if method == "linear" else f"recast, {lay}", f"{sel[0]['lr']:g}", sel[0]["trainable"],
                          *(f"{r['val_acc']:.3f}" for r in sel), f"{statistics.fmean(r['val_acc'] for r in sel):.3f}"])
        tasks = [r["task"] for r in gray if (r["layout"], r["method"]) == (gray[0]["layout"], gray[0]["method"])]
        lines += [markdown_table(["method, layout", "lr", "coefficients", *tasks, "mean"], table), ""]
    chosen = data.get("chosen")
    if chosen and chosen.get("layout"):
        lines += ["## Chosen", "",
                  f"`{chosen['layout']}`: hue validation {chosen['hue_val']:.3f} at lr {chosen['lr']:g} (`linear` "
                  f"{chosen['hue_val_linear']:.3f}); latin/mnist validation {chosen['gray_val']:.3f} (`linear` "
                  f"{chosen['gray_val_linear']:.3f}). Layouts eligible (grayscale validation >= `linear`'s): "
                  f"{', '.join(chosen['eligible'])}. Test accuracy: docs/bench_adapt_colour.md (hue, photo-patches) "
                  "and the grayscale test stage in docs/adapt_defaults_all16.md.", ""]
    elif chosen:
        lines += ["## Chosen", "", "No layout reached `linear`'s grayscale validation accuracy.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
