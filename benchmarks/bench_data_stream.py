#!/usr/bin/env python
"""Peak memory and images/s of streaming an image folder from disk, at two folder sizes.

Generates class folders of small JPEGs and PNGs (varied sizes, 64-256 px), then, each in a fresh
process, opens the folder with ``weightgen.data.images.open_task`` (bad-image scan included) and
streams one epoch of its training split at 224 px (flip + random-resized-crop, batch 64) through
``make_loader``. The parent samples the process tree (main process + DataLoader workers) every
0.1 s: peak summed RSS (counts pages shared by forked workers once per process) and peak summed
PSS (shares them out: the tree's real footprint). The target: peak memory that does not grow with
the folder's size.

    python benchmarks/bench_data_stream.py   # -> docs/bench_data_stream.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

CLASSES = 10


def generate(root: Path, n: int, seed: int = 0) -> float:
    """``n`` images in ``CLASSES`` folders (half JPEG, half PNG), reused if already complete."""
    import numpy as np
    from PIL import Image

    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(n):
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % CLASSES:02d}"
        if i < CLASSES:
            folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(64, 257, size=2))
        # a smooth colour field: a tiny random image upsampled (cheap, and compresses like a photo)
        small = rng.integers(0, 256, size=(4 + i % 5, 4 + i % 7, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        im.save(folder / f"{i:06d}.{'jpg' if i % 2 else 'png'}", **({"quality": 90} if i % 2 else {}))
    marker.write_text(str(n))
    return time.perf_counter() - start


# ---- the measured child ------------------------------------------------------------------------

def child(args) -> int:
    import resource

    import torch

    from weightgen.data.images import image_config, make_loader, open_task

    torch.set_num_threads(1)
    phase = Path(args.phase_file)
    _write(phase, "scan")
    t0 = time.perf_counter()
    data = open_task(f"imagefolder:{args.root}", seed=0, decode=args.decode)
    scan_s = time.perf_counter() - t0
    _write(phase, "stream")
    cfg = image_config(img_size=args.img_size)  # no backbone: timm's ImageNet mean/std
    loader = make_loader(data.dataset("train", cfg, augment="flip-crop", seed=0), args.batch_size, train=True,
                         workers=args.workers[0], seed=0)
    n, checksum = 0, 0.0
    t1 = time.perf_counter()
    for x, y in loader:
        n += len(y)
        checksum += float(x[:, :, ::32, ::32].sum())  # touch the batch, as a model would
        if args.limit and n >= args.limit:
            break
    stream_s = time.perf_counter() - t1
    del loader  # workers exit and are reaped: RUSAGE_CHILDREN then holds their peak
    print(json.dumps({
        "images": n, "sizes": data.sizes(), "scan_s": scan_s, "stream_s": stream_s,
        "images_per_s": n / stream_s, "shape": list(x.shape[1:]), "checksum": checksum,
        "main_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))
    return 0


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # the sampler never reads a half-written file


# ---- the parent: sample the child's process tree -----------------------------------------------

def _tree(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def _footprint(pids: list[int]) -> dict[str, float]:
    """Summed RSS, PSS and USS (private pages) in MiB of ``pids``, from /proc/PID/smaps_rollup."""
    kib = {"rss": 0, "pss": 0, "uss": 0}
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in ("Rss", "Pss"):
                        kib[key.lower()] += int(line.split()[1])
                    elif key in ("Private_Clean", "Private_Dirty"):
                        kib["uss"] += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return {k: v / 1024 for k, v in kib.items()}


def run_sampled(cmd: list[str], env: dict, phase_file: Path) -> tuple[str, str, int, dict[str, float]]:
    """Run ``cmd``, sampling its process tree's memory every 0.1 s: the peak of each footprint per phase
    (the phase is what the child last wrote to ``phase_file``) and overall (``_all``), and the most
    processes at once (``procs``)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak: dict[str, float] = {"procs": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _tree(proc.pid)
            stage = phase_file.read_text().strip()
            for k, v in _footprint(pids).items():
                peak[f"{k}_{stage}"] = max(peak.get(f"{k}_{stage}", 0.0), v)
                peak[f"{k}_all"] = max(peak.get(f"{k}_all", 0.0), v)
            peak["procs"] = max(peak["procs"], len(pids))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return out, err, proc.returncode, peak


def measure(root: Path, workers: int, args, limit: int = 0) -> dict:
    phase_file = Path(args.data_dir) / ".phase"
    _write(phase_file, "start")
    cmd = [sys.executable, __file__, "--child", "--root", str(root), "--workers", str(workers),
           "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--phase-file", str(phase_file),
           "--limit", str(limit)]
    if args.decode is not None:
        cmd += ["--decode", str(args.decode)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out, err, code, peak = run_sampled(cmd, env, phase_file)
    if code != 0:
        raise SystemExit(f"error: child failed ({code}): {err.strip().splitlines()[-1:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(workers=workers, max_processes=peak.pop("procs"), limit=limit,
                  **{f"peak_{k}_mb": v for k, v in peak.items()})
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="images per generated folder")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to compare")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", default="/tmp/weightgen_bench_stream", help="where the folders are generated")
    p.add_argument("--out", default=str(REPO / "docs"), help="where bench_data_stream.{md,json} go")
    p.add_argument("--compare-at", type=int, default=3000,
                   help="also run each folder for only this many images: the same work whatever the folder's size")
    p.add_argument("--decode", type=int, choices=[0, 1], default=None,
                   help="bad-image scan: 1 full decode, 0 header check (default: full decode up to 5,000 images)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase-file", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    info = machine_info()
    runs, generated = [], {}
    for n in args.sizes:
        root = Path(args.data_dir) / f"n{n}"
        generated[n] = {"seconds": generate(root, n), "bytes": sum(f.stat().st_size for f in root.rglob("*.*"))}
        for w in args.workers:
            for limit in (args.compare_at, 0):
                r = measure(root, w, args, limit)
                r["folder_images"] = n
                runs.append(r)
                print(f"{n} images, workers {w}, {r['images']} streamed: {r['images_per_s']:.0f} img/s, "
                      f"peak tree RSS {r.get('peak_rss_stream_mb', 0):.0f} MiB", file=sys.stderr)
    scan_text = {None: "full decode up to 5,000 images, header check above", 0: "header check",
                 1: "full decode"}[args.decode]
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    def mb(r, key):
        return f"{r.get(key, 0.0):.0f}"

    rows = [[f"{r['folder_images']:,}", r["workers"], f"{r['images']:,}", f"{r['scan_s']:.1f}",
             f"{r['images_per_s']:.0f}", mb(r, "peak_rss_scan_mb"), mb(r, "peak_rss_stream_mb"),
             mb(r, "peak_pss_stream_mb"), f"{r['main_maxrss_mb']:.0f}",
             f"{r['worker_maxrss_mb']:.0f}" if r["workers"] else "-"] for r in runs]
    growth = []
    for w in args.workers:
        for limit, what in ((args.compare_at, f"the first {args.compare_at:,} images of an epoch"),
                            (0, "a whole epoch")):
            by_n = {r["folder_images"]: r for r in runs if r["workers"] == w and r["limit"] == limit}
            if len(by_n) < 2:
                continue
            lo, hi = min(by_n), max(by_n)
            keys = [("peak_rss_stream_mb", "tree RSS"), ("main_maxrss_mb", "main maxrss")]
            keys += [("worker_maxrss_mb", "largest worker maxrss")] if w else []
            parts = [f"{name} {by_n[lo][k]:.0f} -> {by_n[hi][k]:.0f} MiB ({by_n[hi][k] - by_n[lo][k]:+.0f})"
                     for k, name in keys]
            growth.append(f"- workers={w}, {what}, {lo:,} -> {hi:,} images: " + "; ".join(parts))
    md = "\n".join([
        "# Streaming an image folder from disk: peak memory and images/s",
        "",
        f"`{info['command']}` on {info['cpu']} ({info['cpus']} CPUs, shared; load average "
        f"{info['loadavg']} before, {info['loadavg_after']} after), torch {info['torch']}, timm {info['timm']}, "
        f"{info['date_utc']}, commit {info['git_commit']}.",
        "",
        f"Generated folders: {CLASSES} classes, half JPEG half PNG, sides 64-256 px. Each row is a fresh process: "
        "`open_task('imagefolder:DIR')` (split 70/10/20 by seed, bad-image scan: "
        f"{scan_text}, on a few threads), then one epoch of the training split at {args.img_size} px with flip + "
        f"random-resized-crop, batch {args.batch_size}, `make_loader(..., workers=W)`.",
        "",
        markdown_table(["folder", "workers", "images streamed", "scan s", "images/s", "tree RSS, scan",
                        "tree RSS, streaming", "tree PSS, streaming", "main maxrss", "largest worker maxrss"], rows),
        "",
        "Memory in MiB. Tree RSS/PSS: peaks of the process tree (main process + DataLoader workers), sampled "
        "every 0.1 s from /proc/PID/smaps_rollup. RSS is summed over the tree, so a library a worker shares with "
        "its parent counts once per process; PSS divides shared pages among every process on the machine that "
        "maps them, so it also moves with whatever else runs (other Python processes on this shared machine map "
        "the same torch libraries). maxrss: getrusage of the main process, and the largest of its reaped "
        "workers. A batch of 64 images at 224 px is 38.5 MB of float32 and a few are alive at once (the one in "
        f"use, up to 2 prefetched per worker), so peaks move by about a batch from run to run; each folder is "
        f"therefore also run for only its first {args.compare_at:,} images (the same work at either size).",
        "",
        "Growth with the folder's size:",
        "",
        *growth,
        "",
    ])
    write_outputs(args.out, "bench_data_stream", md, {"machine": info, "generated": generated, "runs": runs,
                                                       "settings": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
