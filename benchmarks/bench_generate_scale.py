#!/usr/bin/env python
"""Generation from the VAE prior at scale: peak memory as a multiple of the model's float32 bytes.

    python benchmarks/bench_generate_scale.py   # writes docs/bench_generate_scale.{md,json}
    python benchmarks/bench_generate_scale.py --before /tmp/wg-before   # adds rows for an older checkout
    python benchmarks/bench_generate_scale.py --archs resnet50 vit_huge_patch14_224 vit_giant_patch14_224 \
        --before /tmp/wg-v1 --after-only vit_giant_patch14_224   # no before row for the giant (memory, time)
    python benchmarks/bench_generate_scale.py --archs resnet50 --before /tmp/wg-main --repeats 5 --threads 1 2 \
        --stem bench_generate_speed   # time: medians of 5 alternating before/after processes per thread count

Each row runs `python scripts/generate_weights.py --arch ARCH` (no checkpoint, offline) as a fresh
process and reads its wall time and peak RSS (``ru_maxrss`` of that process). The ratio is peak RSS
over the model's float32 bytes (params x 4); issues 8 and 14 ask for <= 2.5x and no slower. With
``--before DIR`` (a checkout of an older commit, e.g. ``git worktree add DIR <commit>``) the same
command runs from that checkout first, and the two ``weights.safetensors`` / ``recast.safetensors``
are compared byte for byte (same seed, same bytes). With ``--repeats N`` each row is N fresh processes,
before and after alternating so that both meet the same load, and the table shows medians; ``--threads``
gives each thread count (``OMP_NUM_THREADS`` of the process) its own rows.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, run_measured, write_outputs  # noqa: E402

TARGET_RATIO = 2.5


def measure(checkout: Path, arch: str, out: Path, threads: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}  # that checkout's weightgen, not the installed one
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load, (user, system) = os.getloadavg()[0], _children_cpu_split()
    run = run_measured([sys.executable, str(checkout / "scripts" / "generate_weights.py"), "--arch", arch,
                        "--out", str(out)], cwd=checkout, env=env)
    if run["rc"] != 0:
        raise SystemExit(f"{arch} ({checkout}) failed: {run['stderr'][-400:]}")
    params = json.loads((out / "report.json").read_text())["params"]["model"]
    f32 = params * 4
    peak = run["peak_rss_mb"] * 2**20
    user_end, system_end = _children_cpu_split()
    return {"arch": arch, "checkout": str(checkout), "params": params, "float32_bytes": f32,
            "wall_s": run["wall_s"], "cpu_s": user_end - user + system_end - system, "sys_s": system_end - system,
            "load_at_start": load, "threads": threads, "peak_rss_bytes": peak, "ratio": peak / f32}


def _children_cpu_split() -> tuple[float, float]:
    """(user, system) seconds of every waited-for child so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def _median(runs: dict | list[dict]) -> dict:
    """One measurement, or the per-field medians of repeated ones (``runs``: how many; ``range_*``: min, max)."""
    if isinstance(runs, dict):  # a row of an older log: one process
        return {**runs, "runs": 1}
    merged = {**runs[0], "runs": len(runs)}
    for key in ("wall_s", "cpu_s", "sys_s", "load_at_start", "peak_rss_bytes", "ratio"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            merged[key] = statistics.median(values)
            merged[f"range_{key}"] = [min(values), max(values)]
    return merged


def _children_cpu() -> float:
    """User + system seconds of every waited-for child so far (run_measured waits for its child)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _json_rows(log: Path) -> list[dict]:
    rows = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"after"' in line:
            rows.append(json.loads(line))
    return rows


def _commit_file(checkout: Path) -> str:
    marker = checkout / ".commit"
    return marker.read_text().strip() if marker.is_file() else "unknown"


def same_files(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in ("weights.safetensors", "recast.safetensors"))


def _ratios(raw: list[dict]) -> list[str]:
    """after / before of the median wall and CPU seconds, per row measured on both sides."""
    lines = []
    for row in raw:
        if "before" in row:
            b, a = _median(row["before"]), _median(row["after"])
            lines.append(f"{row['arch']}, threads {row.get('threads') or 'env'}: after {a['wall_s']:.1f} s wall, "
                         f"{a['cpu_s']:.1f} CPU-s; before {b['wall_s']:.1f} s, {b['cpu_s']:.1f} CPU-s "
                         f"(after / before: {a['wall_s'] / b['wall_s']:.2f}x wall, {a['cpu_s'] / b['cpu_s']:.2f}x CPU)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="*", default=["vit_huge_patch14_224", "vit_large_patch16_224", "resnet50"])
    p.add_argument("--before", help="checkout of an older commit, measured first for a before/after row")
    p.add_argument("--after-only", nargs="*", default=[], metavar="ARCH",
                   help="archs measured on this checkout only, even with --before")
    p.add_argument("--rows-from", nargs="*", default=[], metavar="LOG",
                   help="logs of earlier calls of this benchmark (their printed JSON rows): archs found there are "
                        "taken from them, not measured again (a long run finished in pieces)")
    p.add_argument("--note-file", help="a text file whose paragraph goes under the table (e.g. which commit measured "
                                       "which row)")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per row, before and after alternating; the table shows medians")
    p.add_argument("--threads", nargs="*", type=int, default=[],
                   help="OMP_NUM_THREADS of the measured processes, one set of rows per value "
                        "(default: this process's environment)")
    p.add_argument("--stem", default="bench_generate_scale", help="docs/STEM.{md,json}")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    if args.repeats < 1 or any(t < 1 for t in args.threads):
        p.error("--repeats and --threads must be >= 1")
    note = Path(args.note_file).read_text().strip() if args.note_file else ""
    before = Path(args.before).resolve() if args.before else None
    earlier: dict[str, list[dict]] = {}  # arch -> its rows (one per thread count)
    for log in args.rows_from:
        for row in _json_rows(Path(log)):
            earlier.setdefault(row["arch"], []).append(row)
    raw = []
    for arch in args.archs:  # one arch at a time, outputs deleted after: a vit_huge artifact is ~5 GB
        if arch in earlier:
            raw.extend(earlier[arch])
            continue
        for threads in args.threads or [None]:
            tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
            try:
                row = {"arch": arch, "threads": threads, "after": []}
                compare = before and arch not in args.after_only
                if compare:
                    row["before"] = []
                for i in range(args.repeats):  # alternating, so that both sides meet the same load
                    if compare:
                        row["before"].append(measure(before, arch, tmp / f"before{i}", threads))
                    row["after"].append(measure(REPO, arch, tmp / f"after{i}", threads))
                    if compare:
                        row.setdefault("identical_bytes", []).append(same_files(tmp / f"before{i}", tmp / f"after{i}"))
                    for side in ("before", "after"):  # only the first pair's files are kept
                        if i:
                            shutil.rmtree(tmp / f"{side}{i}", ignore_errors=True)
                if compare:
                    row["identical_bytes"] = all(row["identical_bytes"])
                if args.repeats == 1:  # the format of earlier logs
                    row.update({side: row[side][0] for side in ("before", "after") if side in row})
                raw.append(row)
                print(json.dumps(row), flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def cells(label: str, m: dict) -> list:  # the load column: the 1-minute load average when the row started
        m = _median(m)
        spread = (f" ({m['range_wall_s'][0]:.1f}-{m['range_wall_s'][1]:.1f})" if m["runs"] > 1 else "")
        cpu_spread = (f" ({m['range_cpu_s'][0]:.1f}-{m['range_cpu_s'][1]:.1f})" if m["runs"] > 1 else "")
        return [m["arch"], m.get("threads") or "env", label, m["runs"], f"{m['params'] / 1e6:.1f}M",
                f"{m['float32_bytes'] / 1e9:.2f}", f"{m['wall_s']:.1f}{spread}", f"{m['cpu_s']:.1f}{cpu_spread}",
                f"{m['sys_s']:.1f}" if m.get("sys_s") is not None else "-", f"{m['load_at_start']:.1f}",
                f"{m['peak_rss_bytes'] / 1e9:.2f}", f"{m['ratio']:.2f}x", "yes" if m["ratio"] <= TARGET_RATIO else "no"]

    rows = []
    for row in raw:
        if "before" in row:
            rows.append(cells("before", row["before"]) + [""])
        rows.append(cells("after" if before else "now", row["after"])
                    + [("yes" if row["identical_bytes"] else "NO") if "identical_bytes" in row else ""])
    info = machine_info()
    info["omp_threads"] = os.environ.get("OMP_NUM_THREADS", "unset (torch's default: every core)")
    info["load_end"] = [round(x, 2) for x in os.getloadavg()]
    if before:
        info["before_commit"] = (subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=before,
                                                capture_output=True, text=True).stdout.strip()
                                 or _commit_file(before))  # a `git archive` export has no git; a .commit file says which
    before_note = (f" `before` runs commit {info['before_commit']} (a checkout in `{before}`); `identical` says "
                   "whether its weights.safetensors and recast.safetensors equal the new ones byte for byte."
                   if before else "")
    md = (f"# Generation from the VAE prior at scale\n\n`{info['command']}` on {info['cpu']} ({info['cpus']} cores, "
          f"{info['mem_total_gib']} GiB, load average {info['loadavg']}), {info['date_utc']}, commit "
          f"{info['git_commit']}. One fresh process per run (`scripts/generate_weights.py --arch ARCH`, seed 0; "
          f"runs: how many, before and after alternating; times are medians, with the range); "
          f"wall time includes start-up and imports (~0.7 GB of the RSS is torch + timm before any model); cpu s is the "
          f"process's user + system time, load the 1-minute load average when it started (other jobs share the 2 cores, "
          f"so compare wall times at similar load; threads: OMP_NUM_THREADS of the process, `env` = "
          f"{info['omp_threads']}); sys: the system part of cpu s (page faults, mostly). "
          f"GB are 10^9 bytes; ratio = peak RSS / (params x 4 bytes); target <= {TARGET_RATIO}x (issues 8, 14)."
          f"{before_note}\n\n"
          + markdown_table(["arch", "threads", "code", "runs", "params", "float32 GB", "wall s", "cpu s", "sys s",
                            "load", "peak RSS GB", "ratio", f"<= {TARGET_RATIO}x", "identical"], rows) + "\n"
          + "".join(f"\n- {line}" for line in _ratios(raw)) + ("\n" if _ratios(raw) else "")
          + (f"\n{note}\n" if note else ""))
    write_outputs(args.out, args.stem, md, {"machine": info, "rows": raw, "note": note,
                                                          "rows_from": args.rows_from})
    return 0


if __name__ == "__main__":
    sys.exit(main())
