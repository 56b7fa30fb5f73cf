#!/usr/bin/env python
"""End-to-end generation from the VAE prior: wall time and peak RSS of the real command.

    python benchmarks/bench_generate.py   # writes docs/bench_generate.{md,json}

Each row runs `python scripts/generate_weights.py --arch ARCH` (no checkpoint, offline) as a fresh
process, `--repeats` times; the median wall time and the largest peak RSS are reported, with the
finiteness and activation-range checks from report.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, run_measured, write_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="*", default=["resnet50", "vit_base_patch16_224", "efficientnet_b0"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            runs = []
            for i in range(args.repeats):
                out = Path(tmp) / f"{arch}-{i}"
                runs.append(run_measured([sys.executable, str(REPO / "scripts" / "generate_weights.py"),
                                          "--arch", arch, "--out", str(out)], cwd=REPO))
                if runs[-1]["rc"] != 0:
                    raise SystemExit(f"{arch} failed: {runs[-1].get('stderr', '')[-400:]}")
            report = json.loads((out / "report.json").read_text())
            acts = report["activations"]
            walls = [r["wall_s"] for r in runs]
            row = {"arch": arch, "wall_s_median": statistics.median(walls), "wall_s": walls,
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "params": report["params"]["model"],
                   "all_finite": acts["all_finite"], "max_block_std_ratio": acts["max_ratio"],
                   "min_block_std_ratio": acts["min_ratio"], "fallback_layers": len(report["prior"]["fallback_layers"])}
            raw.append(row)
            rows.append([arch, f"{row['params'] / 1e6:.1f}M", f"{row['wall_s_median']:.1f}",
                         f"{row['peak_rss_mb']:.0f}", "yes" if row["all_finite"] else "NO",
                         f"{row['min_block_std_ratio']:.3g} .. {row['max_block_std_ratio']:.3g}",
                         row["fallback_layers"]])
    info = machine_info()
    md = (f"# Generation from the VAE prior\n\n`{info['command']}` on {info['cpu']} ({info['cpus']} cores, "
          f"load average {info['loadavg']}), {info['date_utc']}. Wall time includes interpreter start-up "
          f"and imports; median of {args.repeats}.\n\n"
          + markdown_table(["arch", "params", "wall s", "peak RSS MB", "all finite",
                            "block std / input std", "fallback layers"], rows) + "\n")
    write_outputs(args.out, "bench_generate", md, {"machine": info, "rows": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
