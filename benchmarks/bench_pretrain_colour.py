#!/usr/bin/env python
"""Does the RGB source backbone learn its source task? Glyphs in random colours, old and new colours.

Pretrains the same narrow ResNet-18 (weightgen.adapt.pretrain, 32 px, seed 0) on the glyph source
task: in grayscale (the control that always learned), in the current colours (ink brighter than the
paper by INK_GAP in luma) at two learning rates, and in the old colours (uniform random ink and paper,
either polarity; recreated here as the control that stayed at chance).

    python benchmarks/bench_pretrain_colour.py   # -> docs/bench_pretrain_colour.{md,json}
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

KWARGS = {"channels": [16, 32, 64, 128]}


def old_ink_and_paper(rng, n, gap=None):
    """The colours before the fix: uniform ink and paper, the paper moved when too close to the ink."""
    import numpy as np

    ink, paper = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    near = np.abs(ink - paper).sum(1, keepdims=True) < 0.6
    return ink, np.where(near, (ink + 0.5) % 1.0, paper)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-train", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "docs"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import weightgen.adapt.pretrain as pre

    info = machine_info()
    runs = [("glyphs-colour", "new", 1e-2), ("glyphs-colour", "old", 1e-2), ("glyphs", "grayscale", 2e-3),
            ("glyphs-colour", "new", 2e-3), ("glyphs-colour", "old", 2e-3)]
    rows, data = [], []
    current = pre.ink_and_paper
    with tempfile.TemporaryDirectory() as tmp:
        for i, (source, colours, lr) in enumerate(runs):
            pre.ink_and_paper = old_ink_and_paper if colours == "old" else current
            try:
                _, r, _ = pre.pretrain("resnet18", Path(tmp) / f"r{i}", epochs=args.epochs, img_size=32, seed=0,
                                       model_kwargs=KWARGS, max_train=args.max_train, max_eval=300,
                                       batch_size=args.batch_size, lr=lr, source=source)
            finally:
                pre.ink_and_paper = current
            chance = 1 / r["source_task"]["classes"]
            data.append({"source": source, "colours": colours, "lr": lr, "val_acc": r["val_acc"],
                         "test_acc": r["test_acc"], "steps": r["steps"], "seconds": r["seconds"], "chance": chance})
            rows.append([source, colours, f"{lr:g}", r["steps"], f"{r['val_acc']:.3f}", f"{r['test_acc']:.3f}",
                         f"{chance:.3f}", f"{r['seconds']:.0f}"])
            print(rows[-1], file=sys.stderr, flush=True)
            write(args, info, rows, data, pre.INK_GAP)  # after every run: a stopped run keeps its rows
    return 0


def write(args, info, rows, data, ink_gap) -> None:
    info = dict(info, loadavg_after=[round(x, 2) for x in os.getloadavg()])
    md = "\n".join([
        "# The RGB source backbone: does it learn its source task?", "",
        f"`{info['command']}` on {info['cpu']} ({info['cpus']} CPUs, shared; load average {info['loadavg']} before, "
        f"{info['loadavg_after']} after), {info['date_utc']}, commit {info['git_commit']}.", "",
        f"resnet18 {KWARGS}, 32 px, {args.epochs} epochs of {args.max_train} source images (52 glyph classes), "
        f"batch {args.batch_size}, AdamW with StepLR x0.1 at 1/3 and 2/3, seed 0. Colours: grayscale (white "
        "glyph on black); new (ink and paper uniform random RGB, the ink brighter than the paper by "
        f"{ink_gap} in luma); old (uniform random ink and paper of either polarity, the paper moved when "
        "too close to the ink: the colours before the fix).", "",
        markdown_table(["source", "colours", "lr", "steps", "val acc", "test acc", "chance", "seconds"], rows), "",
    ])
    write_outputs(args.out, "bench_pretrain_colour", md, {"machine": info, "settings": vars(args), "runs": data})


if __name__ == "__main__":
    raise SystemExit(main())
