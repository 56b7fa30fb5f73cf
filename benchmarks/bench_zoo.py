#!/usr/bin/env python
"""Zoo build time: ``scripts/build_zoo.py --quick`` (and the default zoo with ``--full``), measured.

    python benchmarks/bench_zoo.py                 # quick zoo only, ~30 s
    python benchmarks/bench_zoo.py --full          # also the default 16-model zoo, ~10 min
    python benchmarks/bench_zoo.py --index DIR     # also record a zoo already built into DIR

Writes docs/bench_zoo.{md,json}. Each build runs as its own process with one torch thread; the
table gives the process wall time (imports included), the zoo's own record of its build time
(``zoo.json``: ``seconds`` wall, ``cpu_seconds``) and the machine's load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, run_measured  # noqa: E402


def build(kind: str, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "build_zoo.py"), "--out", str(out), "--threads", "1",
           "--no-progress"] + (["--quick"] if kind == "quick" else [])
    load_before = os.getloadavg()[0]
    run = run_measured(cmd, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run["rc"] != 0:
        raise SystemExit(f"{kind} zoo build failed (rc {run['rc']}):\n{run['stderr'][-2000:]}")
    return {"zoo": kind, "command": " ".join(cmd[1:]), "process_wall_s": round(run["wall_s"], 1),
            "peak_rss_mb": round(run["peak_rss_mb"]), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2), **record(out)}


def record(zoo: Path) -> dict:
    index = json.loads((zoo / "zoo.json").read_text())
    return {"models": len(index["models"]), "total_params": index["total_params"],
            "build_seconds": index["seconds"], "cpu_seconds": index["cpu_seconds"],
            "torch_threads": index.get("torch_threads"), "zoo_load_average_1min": index.get("load_average_1min"),
            "test_accuracy": [min(r["test_accuracy"] for r in index["records"]),
                              max(r["test_accuracy"] for r in index["records"])]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also build the default zoo (~10 min on 1 thread)")
    p.add_argument("--index", help="a zoo directory built before: its zoo.json is recorded as it is")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(build("quick", Path(tmp) / "quick", timeout=600))
        if args.full:
            rows.append(build("default", Path(tmp) / "default", timeout=3600))
    if args.index:
        rows.append({"zoo": f"recorded from {args.index}/zoo.json", "command": "(built before)",
                     "process_wall_s": None, "peak_rss_mb": None, "load_before": None, "load_after": None,
                     **record(Path(args.index))})
    info = machine_info()
    table = [[r["zoo"], r["models"], f"{r['total_params']:,}", r["process_wall_s"] or "-", r["build_seconds"],
              r["cpu_seconds"], r["torch_threads"] or "-", r["peak_rss_mb"] or "-",
              f"{r['test_accuracy'][0]:.2f}-{r['test_accuracy'][1]:.2f}",
              r["zoo_load_average_1min"] if r["zoo_load_average_1min"] is not None else r["load_after"] or "-"]
             for r in rows]
    md = (f"# Zoo build time\n\n`{info['command']}`, {info['date_utc']}, {info['cpus']} CPUs "
          f"({info['cpu']}), load average at the end {info['loadavg'][0]}.\n\n"
          "`build s` is the zoo's own record (`zoo.json` `seconds`, wall time of the build, imports "
          "excluded); `process s` includes interpreter start-up and imports. Wall time depends on the "
          "load from other jobs; CPU seconds much less.\n\n"
          + markdown_table(["zoo", "models", "params", "process s", "build s", "cpu s", "threads", "peak RSS MB",
                            "test acc", "load avg"], table) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_zoo.md").write_text(md)
    (out / "bench_zoo.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
