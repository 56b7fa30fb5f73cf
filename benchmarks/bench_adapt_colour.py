#!/usr/bin/env python
"""Adaptation on the colour tasks (hue: classes differ only in hue; photo-patches: RGB photo patches
split by region) from an RGB source backbone pretrained offline on glyphs in random colours
(weightgen.adapt.pretrain, source 'glyphs-colour'), mimicked into banks (closed form).

Reports per method: test accuracy, bytes per task file, training seconds; every method at its
adapt.py default lr and step budget (weightgen.adapt.incremental.METHOD_DEFAULTS, DEFAULT_STEPS).

    python benchmarks/bench_adapt_colour.py            # docs/bench_adapt_colour.{md,json}
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

ARCH, KWARGS, PRESET = "resnet18", {"channels": [16, 32, 64, 128]}, "recast-resnet"
METHODS = ["linear", "recast", "recast-norm", "full", "lora", "recast+melo", "recast+clr"]
TASKS = ["hue", "photo-patches"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(REPO / "outputs" / "bench_adapt_colour_cache"))
    p.add_argument("--out", default=str(REPO / "docs"))
    p.add_argument("--stem", default="bench_adapt_colour")
    p.add_argument("--seeds", default="42")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-eval", type=int, default=500)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--pretrain-max-train", type=int, default=4000)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from weightgen.adapt.incremental import (DEFAULT_STEPS, DataOptions, method_defaults, open_backbone,
                                             run_sequence)
    from weightgen.adapt.pretrain import pretrain
    from weightgen.adapt.trainer import TrainConfig
    from weightgen.generate import GenerateOptions, generate

    start = time.perf_counter()
    key = hashlib.sha256(json.dumps([ARCH, KWARGS, args.pretrain_epochs, args.pretrain_max_train, "rgb"]).encode()).hexdigest()[:8]
    root = Path(args.cache) / f"{ARCH}-w16-rgb-{key}"
    src, info, _ = pretrain(ARCH, root / "src", epochs=args.pretrain_epochs, img_size=32, seed=0, model_kwargs=KWARGS,
                            max_train=args.pretrain_max_train, max_eval=1000, source="glyphs-colour")
    art = root / "art"
    if not (art / "report.json").is_file():
        generate(GenerateOptions(arch=ARCH, checkpoint=str(src / "model.safetensors"), model_kwargs=info["model_kwargs"],
                                 preset=PRESET, out=str(art), overwrite=True))
    bb = open_backbone(art)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = {"settings": vars(args), "pretrain": {k: info[k] for k in ("test_acc", "val_acc", "seconds", "channels",
                                                                      "mean", "std", "img_size")},
            "machine": machine_info(), "steps": DEFAULT_STEPS, "rows": []}
    for method in args.methods.split(","):
        lr = method_defaults(method)["lr"]
        with tempfile.TemporaryDirectory() as tmp:
            result = run_sequence(bb, method, TASKS, seeds, TrainConfig(epochs=1, batch_size=64, lr=lr), tmp,
                                  options=DataOptions(max_train=args.max_train, max_eval=args.max_eval),
                                  steps=DEFAULT_STEPS)
        data["rows"] += [{k: r[k] for k in ("task", "method", "seed", "val_acc", "test_acc", "task_file_bytes",
                                            "train_seconds", "steps", "exact_switch")} | {"lr": lr}
                         for r in result["rows"]]
        print(f"[{time.perf_counter() - start:.0f}s] {method}", flush=True)
    data["seconds"] = time.perf_counter() - start
    write_outputs(args.out, args.stem, markdown(data), data)
    return 0


def markdown(data: dict) -> str:
    s, pre = data["settings"], data["pretrain"]
    lines = ["# Adaptation on colour tasks", "",
             f"Source backbone: {ARCH} {KWARGS}, pretrained here on the glyph source task in random colours "
             f"({s['pretrain_epochs']} epochs, {s['pretrain_max_train']} images, 32 px RGB; source test accuracy "
             f"{pre['test_acc']:.3f}), banks by closed form ({PRESET}). Tasks: {', '.join(TASKS)} "
             f"({s['max_train']} training / {s['max_eval']} evaluation images at most), seeds {s['seeds']}, each "
             f"method at adapt.py's default lr and a {data['steps']}-step budget. "
             f"Command: `python benchmarks/bench_adapt_colour.py` ({data['seconds'] / 60:.0f} min, 1 thread, a "
             "shared 2-core CPU).", ""]
    rows = []
    for m in dict.fromkeys(r["method"] for r in data["rows"]):
        sel = [r for r in data["rows"] if r["method"] == m]
        acc = {t: statistics.fmean(r["test_acc"] for r in sel if r["task"] == t) for t in TASKS}
        rows.append([m, f"{sel[0]['lr']:g}", *(f"{acc[t]:.3f}" for t in TASKS),
                     f"{statistics.fmean(r['task_file_bytes'] for r in sel):,.0f}",
                     f"{statistics.fmean(r['train_seconds'] for r in sel):.1f}",
                     "yes" if all(r["exact_switch"] for r in sel) else "NO"])
    lines += [markdown_table(["method", "lr", *(f"{t} test acc" for t in TASKS), "bytes / task", "train s / task",
                              "exact switch"], rows), ""]
    if len(s["seeds"].split(",")) < 5:
        lines += ["One seed per cell: a reduced run (time); no claim that one method beats another rests on it.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
