#!/usr/bin/env python
"""What closes the gap between coefficient-only adaptation and full fine-tuning?

The protocol's learning rate (2e-3) is the seed's for every method, but coefficients are O(1)
numbers (the templates carry the layers' norms), so 3 epochs at 2e-3 move them little. This study
reruns `recast` on bench_adapt's backbones and tasks with larger learning rates and more epochs,
everything else as in `bench_adapt.py`, and compares with its `full` and `recast` rows.

    python benchmarks/bench_adapt_gap.py     # after bench_adapt.py: docs/bench_adapt_gap.{md,json}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapt as ba  # noqa: E402
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

# (label, learning rate, epochs); the protocol's own (2e-3, 3 epochs) comes from bench_adapt.json
VARIANTS = [("lr 2e-2", 2e-2, 3), ("lr 1e-1", 1e-1, 3), ("lr 2e-2, 10 epochs", 2e-2, 10)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default=str(REPO / "docs" / "bench_adapt.json"), help="bench_adapt.py's full run")
    p.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one torch thread each)")
    p.add_argument("--out", default=str(REPO / "docs"), help="where bench_adapt_gap.{md,json} go")
    args = p.parse_args(argv)
    reference = json.loads(Path(args.reference).read_text())
    settings, prepared = reference["settings"], reference["prepared"]
    start = time.perf_counter()
    jobs = [{"backbone": b, "method": "recast", "bank": "source", "artifacts": prepared[b], "label": label,
             "lr": lr, "epochs": epochs}
            for b in prepared for label, lr, epochs in VARIANTS]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda j: ba.call_worker({"kind": "run", "jobs": [j], "settings": settings}, 7200)[0][0],
                             jobs))
    rows = []
    for b, s in reference["summary"].items():
        methods = s["methods"]
        full = methods["full"]["mean_acc"]
        entries = [("full (protocol: lr 2e-3, 3 epochs)", methods["full"]["mean_acc"], methods["full"]["std_acc"],
                    methods["full"]["task_file_bytes"]),
                   ("recast (protocol: lr 2e-3, 3 epochs)", methods["recast"]["mean_acc"], methods["recast"]["std_acc"],
                    methods["recast"]["task_file_bytes"])]
        for r in (r for r in runs if r["backbone"] == b):
            acc, std = ba.mean_over_tasks(r["rows"], settings["seeds"])
            size = sum(x["task_file_bytes"] for x in r["rows"]) / len(r["rows"])
            entries.append((f"recast, {r['label']}", acc, std, size))
        for name, acc, std, size in entries:
            rows.append([b, name, f"{acc:.3f} ± {std:.3f}", f"{acc / full:.0%}", f"{size:,.0f}"])
    table = markdown_table(["backbone", "run", "test acc (mean over tasks)", "of full", "bytes per task file"], rows)
    data = {"machine": machine_info(), "variants": VARIANTS, "wall_s": time.perf_counter() - start, "runs": runs}
    text = (f"# What closes the gap: coefficient-only learning rate and epochs\n\n"
            f"`python benchmarks/bench_adapt_gap.py`, {data['machine'].get('date_utc', '')}; tasks "
            f"{', '.join(settings['tasks'])}, seeds {', '.join(map(str, settings['seeds']))}, the backbones, data caps "
            f"and protocol of `docs/bench_adapt.md` except the learning rate and epochs named. "
            f"Wall time {data['wall_s'] / 60:.1f} min with {args.jobs} parallel jobs.\n\n{table}\n")
    write_outputs(args.out, "bench_adapt_gap", text, data, indent=1, default=str, newline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
