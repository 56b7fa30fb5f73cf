#!/usr/bin/env python
"""Adaptation on the colour tasks (hue: classes differ only in hue; photo-patches: RGB photo patches
split by region) from an RGB source backbone pretrained offline on glyphs in random colours
(weightgen.adapt.pretrain, source 'glyphs-colour'), mimicked into banks (closed form) with
``--templates`` templates per bank (2: an exact fit of the two convs of a later ResNet block, so a
coefficient can mix directions instead of only rescaling a conv, which the BatchNorm after it undoes).

Reports per method: test accuracy (mean and 95% t-interval over seeds), bytes per task file,
training seconds; every method at its adapt.py default lr and step budget
(weightgen.adapt.incremental.METHOD_DEFAULTS, DEFAULT_STEPS); and recast minus linear per seed
(paired) with its 95% interval, on ``--claim-seeds`` (the claim methods get those extra seeds).

A method may name another bank layout after ``@``: ``recast@all+16`` trains the coefficients of a
backbone fitted with the ``all`` preset (every conv: stem, residual and shortcut convs, exact fit)
plus 16 random templates per bank (generate_weights.py --preset all --extra-templates 16). A plain
method uses the default layout (``recast-resnet``, ``--templates`` per bank).

    python benchmarks/bench_adapt_colour.py            # docs/bench_adapt_colour.{md,json}
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402
from bench_ddp import interval  # noqa: E402

ARCH, KWARGS, PRESET = "resnet18", {"channels": [16, 32, 64, 128]}, "recast-resnet"
METHODS = ["linear", "recast", "recast@all+16", "recast-norm", "full", "lora", "recast+melo", "recast+clr",
           "recast+piggyback"]
CLAIM = ["linear", "recast"]  # recast vs linear rests on a difference: these (any layout) get --claim-seeds too


def split_method(name: str) -> tuple[str, str | None, int]:
    """``method@preset+extra`` -> (method, preset or None for the default layout, extra templates)."""
    method, _, layout = name.partition("@")
    if not layout:
        return method, None, 0
    preset, _, extra = layout.partition("+")
    return method, preset, int(extra or 0)


def is_claim(name: str) -> bool:
    return split_method(name)[0] in CLAIM
TASKS = ["hue", "photo-patches"]


def colour_source(cache: str | Path, epochs: int = 10, max_train: int = 4000, lr: float = 1e-2):
    """The RGB source backbone, pretrained on glyphs in random colours (cached): (cache root, its
    checkpoint directory, pretrain's record)."""
    from weightgen.adapt.pretrain import pretrain

    key = hashlib.sha256(json.dumps([ARCH, KWARGS, epochs, max_train, lr, "rgb"]).encode()).hexdigest()[:8]
    root = Path(cache) / f"{ARCH}-w16-rgb-{key}"
    src, info, _ = pretrain(ARCH, root / "src", epochs=epochs, img_size=32, seed=0, model_kwargs=KWARGS,
                            max_train=max_train, max_eval=1000, source="glyphs-colour", lr=lr)
    return root, src, info


def layout_artifact(root: Path, src: Path, info: dict, preset: str | None = None, extra: int = 0,
                    templates: int | None = 2) -> Path:
    """The source fitted into banks (cached): the default layout (PRESET, ``templates`` per bank) when
    ``preset`` is None, else ``preset``'s own rule; plus ``extra`` random templates per bank (seed 0)."""
    from weightgen.generate import GenerateOptions, generate

    art = (root / f"art-t{templates}" if preset is None and not extra
           else root / (f"art-{preset or PRESET}-x{extra}" + ("" if preset else f"-t{templates}")))
    if not (art / "report.json").is_file():
        generate(GenerateOptions(arch=ARCH, checkpoint=str(src / "model.safetensors"), model_kwargs=info["model_kwargs"],
                                 preset=preset or PRESET, templates=None if preset else templates,
                                 extra_templates=extra, out=str(art), overwrite=True))
    return art


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(REPO / "outputs" / "bench_adapt_colour_cache"))
    p.add_argument("--out", default=str(REPO / "docs"))
    p.add_argument("--stem", default="bench_adapt_colour")
    p.add_argument("--seeds", default="42,1998,3142592", help="seeds of every method")
    p.add_argument("--claim-seeds", default="7,11", help="extra seeds for the claim methods (linear, recast)")
    p.add_argument("--templates", type=int, default=2, help="templates per bank (generate_weights.py --templates)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-eval", type=int, default=500)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--pretrain-max-train", type=int, default=4000)
    p.add_argument("--pretrain-lr", type=float, default=1e-2)
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="no training: join the rows of these outputs (runs of different --methods) into one table")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    import torch

    torch.set_num_threads(1)
    from weightgen.adapt.incremental import (DEFAULT_STEPS, DataOptions, method_defaults, open_backbone,
                                             run_sequence)
    from weightgen.adapt.trainer import TrainConfig

    start = time.perf_counter()
    root, src, info = colour_source(args.cache, args.pretrain_epochs, args.pretrain_max_train, args.pretrain_lr)
    print(f"[{time.perf_counter() - start:.0f}s] source backbone: test accuracy {info['test_acc']:.3f}", flush=True)
    backbones: dict[tuple, object] = {}

    def backbone(preset: str | None, extra: int):
        """The source fitted into banks of one layout (cached on disk); extra random templates at seed 0."""
        if (preset, extra) not in backbones:
            backbones[preset, extra] = open_backbone(layout_artifact(root, src, info, preset, extra, args.templates))
        return backbones[preset, extra]

    seeds = [int(s) for s in args.seeds.split(",")]
    claim_seeds = [int(s) for s in args.claim_seeds.split(",") if s]
    data = {"settings": vars(args), "pretrain": {k: info[k] for k in ("test_acc", "val_acc", "seconds", "channels",
                                                                      "mean", "std", "img_size")},
            "machine": machine_info(), "steps": DEFAULT_STEPS,
            "templates_per_bank": backbone(None, 0).report.get("templates_per_bank"), "layouts": {}, "rows": []}
    for name in args.methods.split(","):
        method, preset, extra = split_method(name)
        bb = backbone(preset, extra)
        if preset is not None:
            data["layouts"][name.partition("@")[2]] = {"preset": preset, "extra_templates": extra,
                                                       "templates_per_bank": bb.report.get("templates_per_bank")}
        lr = method_defaults(method)["lr"]
        with tempfile.TemporaryDirectory() as tmp:
            result = run_sequence(bb, method, TASKS, seeds + (claim_seeds if is_claim(name) else []),
                                  TrainConfig(epochs=1, batch_size=64, lr=lr), tmp,
                                  options=DataOptions(max_train=args.max_train, max_eval=args.max_eval),
                                  steps=DEFAULT_STEPS)
        data["rows"] += [{k: r[k] for k in ("task", "seed", "val_acc", "test_acc", "task_file_bytes",
                                            "train_seconds", "steps", "exact_switch")}
                         | {"method": name, "lr": lr, "trainable": r.get("trainable")} for r in result["rows"]]
        print(f"[{time.perf_counter() - start:.0f}s] {name}", flush=True)
        data["seconds"] = time.perf_counter() - start  # written after every method: a stopped run keeps its rows
        data["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        data["paired"] = all_paired(data)
        write_outputs(args.out, args.stem, markdown(data), data)
    return 0


def merge(args) -> int:
    """One table from several runs of this benchmark (e.g. methods run in parallel processes)."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    data = dict(parts[0], rows=[r for d in parts for r in d["rows"]])
    data["settings"] = dict(parts[0]["settings"], methods=",".join(dict.fromkeys(r["method"] for r in data["rows"])))
    data["seconds"] = max(d["seconds"] for d in parts)
    data["merged_from"] = [{"command": d["machine"]["command"], "seconds": d["seconds"],
                            "loadavg": d["machine"]["loadavg"], "loadavg_after": d.get("loadavg_after")} for d in parts]
    data["layouts"] = {k: v for d in parts for k, v in d.get("layouts", {}).items()}
    data["paired"] = all_paired(data)
    write_outputs(args.out, args.stem, markdown(data), data)
    return 0


def _mean_ci(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    m, h = interval(values)
    return f"{m:.3f} +- {h:.3f}"


def paired(data: dict, task: str, a: str, b: str) -> dict | None:
    """``a`` minus ``b`` on ``task``, per seed both ran (test accuracy, points), with its 95% t-interval."""
    acc = {(r["method"], r["seed"]): r["test_acc"] for r in data["rows"] if r["task"] == task}
    seeds = sorted({s for m, s in acc if m == a} & {s for m, s in acc if m == b})
    if len(seeds) < 2:
        return None
    diffs = [100 * (acc[a, s] - acc[b, s]) for s in seeds]
    m, h = interval(diffs)
    return {"task": task, "a": a, "b": b, "seeds": seeds, "diffs": diffs, "mean": m, "half": h,
            "wins": sum(d > 0 for d in diffs)}


def all_paired(data: dict) -> list[dict]:
    """Every recast row (any bank layout) minus linear, per task."""
    recasts = [m for m in dict.fromkeys(r["method"] for r in data["rows"]) if split_method(m)[0] == "recast"]
    return [d for m in recasts for t in TASKS for d in [paired(data, t, m, "linear")] if d]


def markdown(data: dict) -> str:
    s, pre = data["settings"], data["pretrain"]
    lines = ["# Adaptation on colour tasks", "",
             f"Source backbone: {ARCH} {KWARGS}, pretrained here on the glyph source task in random colours "
             f"({s['pretrain_epochs']} epochs, {s['pretrain_max_train']} images, lr {s['pretrain_lr']:g}, 32 px RGB; "
             f"source test accuracy {pre['test_acc']:.3f}, chance 0.019), banks by closed form ({PRESET}, "
             f"{s['templates']} templates per bank: {data['templates_per_bank']}). Tasks: {', '.join(TASKS)} "
             f"({s['max_train']} training / {s['max_eval']} evaluation images at most), seeds {s['seeds']} "
             f"(and {s['claim_seeds']} for {', '.join(CLAIM)}), each method at adapt.py's default lr and a "
             f"{data['steps']}-step budget. "
             + "".join(f"`recast@{k}` (and any method@{k}): banks fitted with the `{v['preset']}` preset "
                       f"(every conv: stem, residual and shortcut convs; exact fit) plus {v['extra_templates']} random "
                       f"templates per bank (coefficients start at zero), templates per bank "
                       f"{v['templates_per_bank']} before the extra ones. "
                       for k, v in data.get("layouts", {}).items())
             + ("Processes run in parallel, rows merged (`--merge`): "
                + "; ".join(f"`{m['command']}` ({m['seconds'] / 60:.0f} min; load average {m['loadavg']} at the "
                            f"start, {m['loadavg_after']} at the end)" for m in data["merged_from"]) + "."
                if data.get("merged_from") else
                f"Command: `{data['machine']['command']}` ({data['seconds'] / 60:.0f} min; load average "
                f"{data['machine']['loadavg']} at the start, {data.get('loadavg_after')} at the end).")
             + f" 1 thread each, {data['machine']['cpu']}, shared with other jobs.", ""]
    rows = []
    for m in dict.fromkeys(r["method"] for r in data["rows"]):
        sel = [r for r in data["rows"] if r["method"] == m]
        acc = {t: _mean_ci([r["test_acc"] for r in sel if r["task"] == t]) for t in TASKS}
        rows.append([m, f"{sel[0]['lr']:g}", len({r["seed"] for r in sel}), *(acc[t] for t in TASKS),
                     f"{statistics.fmean(r['task_file_bytes'] for r in sel):,.0f}",
                     f"{statistics.fmean(r['train_seconds'] for r in sel):.1f}",
                     "yes" if all(r["exact_switch"] for r in sel) else "NO"])
    lines += [markdown_table(["method", "lr", "seeds", *(f"{t} test acc" for t in TASKS), "bytes / task",
                              "train s / task", "exact switch"], rows), "",
              "Accuracy: mean +- half-width of the 95% t-interval over seeds; chance is 0.200 on hue (5 classes) and "
              "0.100 on photo-patches (10). Train seconds on a shared CPU: compare within this table only.", ""]
    diffs = all_paired(data)
    if diffs:
        lines += ["recast minus linear, paired by seed (test accuracy, points):", ""]
        lines += [f"- {d['a']}, {d['task']}: {d['mean']:+.1f} [{d['mean'] - d['half']:+.1f}, {d['mean'] + d['half']:+.1f}] "
                  f"over seeds {', '.join(map(str, d['seeds']))} ({d['a']} ahead on {d['wins']}); per seed "
                  + ", ".join(f"{x:+.1f}" for x in d["diffs"]) for d in diffs]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
