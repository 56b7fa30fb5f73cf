#!/usr/bin/env python
"""Zoo build time: ``scripts/build_zoo.py --quick`` (and the default zoo with ``--full``), measured.

    python benchmarks/bench_zoo.py                 # quick zoo only, ~30 s
    python benchmarks/bench_zoo.py --full          # also the default 16-model zoo, ~10 min
    python benchmarks/bench_zoo.py --index DIR     # also record a zoo already built into DIR
    python benchmarks/bench_zoo.py --field DIR     # only summarise a field zoo built into DIR (no build)

The --field summary goes to docs/bench_zoo_field.{md,json}: the build's own record (wall and CPU
seconds, jobs, load average) and, per family and per task, models, checkpoints and test accuracies.

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
from _common import REPO, machine_info, markdown_table, run_measured, write_outputs  # noqa: E402


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


def _acc(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({min(values):.2f}-{max(values):.2f})" if values else "-"


def field_summary(zoo: Path, out: Path) -> int:
    """Per-family and per-task tables of a field zoo, from its zoo.json and model JSONs."""
    index = json.loads((zoo / "zoo.json").read_text())
    metas = {m: json.loads((zoo / f"{m}.json").read_text()) for m in index["models"]}
    finals = [m for m in metas.values() if "checkpoint_of" not in m]
    ckpts = [m for m in metas.values() if "checkpoint_of" in m]
    cost = {r["model_id"]: r for r in index["records"] if "cpu_seconds" in r}

    def rows_by(key: str) -> list[list]:
        rows = []
        for value in sorted({m[key] for m in finals}):
            group = [m for m in finals if m[key] == value]
            ids = {m["model_id"] for m in group}
            t1 = [m["test_accuracy"] for m in ckpts if m["checkpoint_of"] in ids and m["model_id"].endswith("-t1")]
            t2 = [m["test_accuracy"] for m in ckpts if m["checkpoint_of"] in ids and m["model_id"].endswith("-t2")]
            other = "task" if key == "family" else "family"
            rows.append([value, ", ".join(sorted({m[other] for m in group})),
                         ", ".join(sorted({m["arch"] for m in group})), len(group),
                         sum(m["split"] == "heldout" for m in group), len(t1) + len(t2),
                         f"{min(m['params'] for m in group):,}-{max(m['params'] for m in group):,}",
                         _acc([m["test_accuracy"] for m in group if m["split"] == "train"]),
                         _acc([m["test_accuracy"] for m in group if m["split"] == "heldout"]), _acc(t1), _acc(t2),
                         round(sum(cost[i]["cpu_seconds"] for i in ids), 1)])
        return rows

    headers = ["{}", "{}", "archs", "final models", "held out", "checkpoints", "params",
               "test acc, train split: mean (min-max)", "test acc, held out", "test acc at 1/3 steps",
               "test acc at 2/3 steps", "cpu s"]
    fam_rows, task_rows = rows_by("family"), rows_by("task")
    info = machine_info()
    held = [m for m in finals if m["split"] == "heldout"]
    md = (f"# Field zoo ({zoo})\n\n`{info['command']}`, {info['date_utc']}, {info['cpus']} CPUs ({info['cpu']}).\n\n"
          f"Built by `scripts/build_zoo.py --preset field --jobs {index.get('jobs', 1)}` (one torch thread per "
          f"worker): {len(finals)} final models of {len({m['family'] for m in finals})} families on "
          f"{len({m['task'] for m in finals})} tasks, {len(ckpts)} checkpoints (at 1/3 and 2/3 of each run's "
          f"steps), {len(held)} final models held out (`split: heldout`, new seeds of zoo configs, in "
          f"{len({m['family'] for m in held})} families), {index['total_params']:,} parameters in all entries.\n\n"
          f"Build wall time {index['seconds']:.0f} s, {index['cpu_seconds']:.0f} CPU-seconds of training "
          f"(checkpoint evaluation included), load average {index['load_average_1min']} at the end of the build "
          f"on a CPU shared with other jobs: wall time depends on that load, CPU seconds much less.\n\n"
          "Test accuracy after exact BN re-estimation, on each task's test split (split seed 0).\n\n"
          "## Per family\n\n" + markdown_table([headers[0].format("family"), "tasks"] + headers[2:], fam_rows, align="lll" + "r" * 9) + "\n\n"
          "## Per task\n\n" + markdown_table([headers[0].format("task"), "families"] + headers[2:], task_rows, align="lll" + "r" * 9) + "\n")
    write_outputs(out, "bench_zoo_field", md, {"machine": info, "zoo": str(zoo), "index": {
        k: v for k, v in index.items() if k != "records"}, "families": fam_rows, "tasks": task_rows}, newline=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also build the default zoo (~10 min on 1 thread)")
    p.add_argument("--index", help="a zoo directory built before: its zoo.json is recorded as it is")
    p.add_argument("--field", help="a field zoo (build_zoo.py --preset field) to summarise into bench_zoo_field.*")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    if args.field:
        return field_summary(Path(args.field), Path(args.out))

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
