"""Paired differences, with 95% t-intervals, of the prior init vs timm's init from the two runs
that measured it: docs/bench_vae_init.json (4 architectures absent from the zoo, per seed) and
docs/bench_memorisation.json (11 zoo configurations, per seed, 50 steps).

    python benchmarks/summarise_init_gain.py  ->  docs/init_gain_intervals.md / .json

It reads recorded results only (no training), so it runs in a second.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

EXCLUDES = {True: "yes", False: "no", None: "n/a: identical differences"}
DOCS = Path(__file__).resolve().parent.parent / "docs"


def interval(diffs: list[float]) -> dict:
    """Mean and two-sided 95% t-interval of paired differences (points)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("nan")
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    # Identical differences (sd 0) give a zero-width interval that says nothing about spread.
    excludes = None if not sd > 1e-9 else bool(mean - half > 0 or mean + half < 0)
    return {"n": n, "mean": 100 * mean, "low": 100 * (mean - half), "high": 100 * (mean + half),
            "excludes_zero": excludes}


def init_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    acc: dict = defaultdict(dict)
    for r in data["results"]:
        acc[(r["arch"], r["seed"])][r["init"]] = r["accuracy"]
    rows = []
    for steps in ("50", "150"):
        pairs = [(a, v["vae_prior"][steps] - v["timm"][steps]) for (a, _), v in sorted(acc.items())]
        rows.append({"source": path.name, "steps": int(steps), "unit": "architecture x seed",
                     **interval([d for _, d in pairs])})
        for arch in sorted({a for a, _ in pairs}):
            rows.append({"source": path.name, "steps": int(steps), "unit": arch,
                         **interval([d for a, d in pairs if a == arch])})
    return rows


def memorisation_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    diffs = []
    for g in data["groups"]:
        by = defaultdict(dict)
        for r in g["rows"]:
            if r["generator"] in ("VAE prior + train", "timm init + train"):
                by[r["id"]][r["generator"]] = r["accuracy"]
        diffs += [v["VAE prior + train"] - v["timm init + train"] for v in by.values() if len(v) == 2]
    return [{"source": path.name, "steps": data["train_steps"],
             "unit": f"zoo configuration x seed ({len(data['groups'])} configurations)", **interval(diffs)}]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=Path, default=DOCS)
    args = ap.parse_args(argv)
    rows = init_rows(args.docs / "bench_vae_init.json") + memorisation_rows(args.docs / "bench_memorisation.json")
    lines = ["# Prior init minus timm init: paired differences with 95% t-intervals", "",
             "`python benchmarks/summarise_init_gain.py`: recomputed from the recorded per-seed results of",
             "`docs/bench_vae_init.json` (2 seeds, 359 digits test images) and `docs/bench_memorisation.json`",
             "(3 seeds per configuration, the configuration's own task). Points of test accuracy; an interval",
             "computed from 2 seeds (1 degree of freedom) is very wide.", "",
             "| source | steps | paired over | n | mean | 95% interval | excludes 0 |",
             "| :--- | ---: | :--- | ---: | ---: | :--- | :--- |"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['steps']} | {r['unit']} | {r['n']} | {r['mean']:+.1f} | "
                     f"[{r['low']:+.1f}, {r['high']:+.1f}] | {EXCLUDES[r['excludes_zero']]} |")
    (args.docs / "init_gain_intervals.md").write_text("\n".join(lines) + "\n")
    (args.docs / "init_gain_intervals.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
