#!/usr/bin/env python
"""Seconds per training step, side by side: every method on one backbone, measured round-robin.

`bench_adapt.py` times each method in its own process at another moment, so machine load leaks into
its `ms / step` column. Here all methods live in one process and take turns (one step of each,
repeated), so load hits them alike; the table gives medians and the ratio to full fine-tuning.

    python benchmarks/bench_adapt.py          # first: pretrains and caches the backbones
    python benchmarks/bench_adapt_step.py     # -> docs/bench_adapt_step.{md,json}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default=str(REPO / "docs" / "bench_adapt.json"), help="bench_adapt.py's run")
    p.add_argument("--rounds", type=int, default=30, help="steps per method, taken in turns")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--out", default=str(REPO / "docs"), help="where bench_adapt_step.{md,json} go")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from weightgen.adapt import get_method
    from weightgen.adapt.incremental import model_batch, open_backbone, prepare_model
    from weightgen.data import get_task

    torch.set_num_threads(1)
    reference = json.loads(Path(args.reference).read_text())
    rows, data = [], {"machine": machine_info(), "rounds": args.rounds, "batch": args.batch, "backbones": {}}
    for name, artifacts in reference["prepared"].items():
        methods = list(reference["settings"]["methods"][name])
        backbone = open_backbone(artifacts["source"], 32)
        task = get_task("digits", 0, max_train=args.batch, max_eval=8)
        x, y = model_batch("digits", backbone, 0, args.batch)
        x, y = x[:args.batch], y[:args.batch]
        steps = {}
        for method in methods:
            model = prepare_model(backbone, get_method(method), task.num_classes, 0).train()
            params = [q for q in model.parameters() if q.requires_grad]
            steps[method] = (model, torch.optim.AdamW(params, lr=1e-4))

        def one_step(model, opt) -> float:
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            return time.perf_counter() - start

        for model, opt in steps.values():  # warm-up
            one_step(model, opt)
        times = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method, (model, opt) in steps.items():
                times[method].append(one_step(model, opt))
        medians = {m: statistics.median(t) for m, t in times.items()}
        data["backbones"][name] = {"medians_s": medians, "times_s": times}
        for m in methods:
            rows.append([name, m, f"{medians[m] * 1000:.1f}", f"{medians[m] / medians['full']:.2f}"])
    table = markdown_table(["backbone", "method", "ms / step (median)", "x full"], rows)
    text = (f"# Seconds per training step, side by side\n\n`python benchmarks/bench_adapt_step.py`, "
            f"{data['machine']['date_utc']}, 1 torch thread, load average {data['machine'].get('loadavg')}: "
            f"one process, every method takes one step in turn ({args.rounds} rounds, batch {args.batch}, "
            f"32 px, forward + backward + AdamW), the backbones of `docs/bench_adapt.md`.\n\n{table}\n")
    write_outputs(args.out, "bench_adapt_step", text, data, indent=1, default=str, newline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
