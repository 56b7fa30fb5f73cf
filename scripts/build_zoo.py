#!/usr/bin/env python
"""Train a zoo of small timm models (offline, CPU) and write it to --out.

    python scripts/build_zoo.py --out zoo/ [--quick | --preset default|quick|field|structured] [--jobs 2] [--overwrite]
    python scripts/build_zoo.py --preset structured --shard K/N --out shards/K     # one piece of N (K = 0..N-1)
    python scripts/build_zoo.py --merge shards/0 shards/1 ... --out zoo/           # join the N pieces

Presets: default (16 models on sklearn digits, ~5 CPU-min), quick (4 tiny models, ~15 CPU-s), field
(77 models of 9 families on 4 tasks, each with 2 checkpoints, 9 held out; ~20 CPU-min: use --jobs 2),
structured (models trained to convergence with strong weight decay, varied hyperparameters and tasks,
little of their init left; each records its cosine to init), tiny_structured (4 tiny models, for tests).

The structured presets, and any build given --shard, are resumable: finished models wait in a staging
folder next to --out (.<name>.building); run the same command again after a stop and only the missing
models train. The merged zoo equals one unsharded build (same model files byte for byte, same records
but for timings) when every piece runs the same torch build with one thread per model (--threads 1, or
--jobs N, whose workers run one thread each).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from weightgen.cli import HelpFormatter, run_cli  # noqa: E402
from weightgen.models import resolve_device  # noqa: E402
from weightgen.zoo import (  # noqa: E402
    PRESETS, RESUMABLE_PRESETS, ZooError, build_zoo, build_zoo_resumable, merge_zoo_shards, preset_specs,
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output directory (new or empty, or a zoo with --overwrite)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="which zoo (default: default)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick: 4 tiny models (15 CPU-s, 58 s wall on a loaded 2-core AMD EPYC)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many models at once, in worker processes of one torch thread each")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a zoo weightgen wrote, once the new one is complete (never other folders)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the models' init and training")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--device", default="cpu", help="where the models train: cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s: these models are too small to gain from more, "
                        "and many threads on a many-core machine cost ~10x the CPU time; 0: torch's own)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="build only piece K of N (0 <= K < N) of the preset; join the pieces with --merge")
    p.add_argument("--merge", nargs="+", default=None, metavar="SHARD_DIR",
                   help="join the outputs of all N shards of one build into --out (trains nothing)")
    return p.parse_args(argv)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ZooError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ZooError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("weightgen").setLevel(logging.INFO)  # one line per trained model
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.quick and args.preset not in (None, "quick"):
        raise ZooError(f"--quick contradicts --preset {args.preset}")
    if args.merge is not None:
        if args.shard or args.quick or args.preset:
            raise ZooError("--merge joins finished shards: it takes no --shard, --quick or --preset")
        index = merge_zoo_shards(args.out, args.merge, overwrite=args.overwrite)
        print(f"merged {len(args.merge)} shards: {len(index['models'])} models, {index['total_params']:,} params, "
              f"{index['cpu_seconds']:.1f} cpu-s -> {args.out}")
        return 0
    if args.jobs < 1:
        raise ZooError(f"--jobs must be at least 1, got {args.jobs}")
    name = "quick" if args.quick else args.preset or "default"
    specs = preset_specs(name, args.seed)
    device = resolve_device(args.device)
    if args.shard is not None or name in RESUMABLE_PRESETS:
        shard = _parse_shard(args.shard) if args.shard is not None else (0, 1)
        index = build_zoo_resumable(args.out, specs, shard, progress=not args.no_progress,
                                    overwrite=args.overwrite, device=device, jobs=args.jobs, name=name)
        index["seconds"] = index["build"]["seconds"]
    else:
        index = build_zoo(args.out, specs, progress=not args.no_progress, overwrite=args.overwrite,
                          device=device, jobs=args.jobs)
    finals = [r for r in index["records"] if "checkpoint_of" not in r]  # checkpoints: see zoo.json
    width = max(len(r["model_id"]) for r in finals)
    print(f"\n{'model_id':<{width}}  {'params':>9}  {'test_acc':>8}  {'cos_init':>8}  {'seconds':>7}  split")
    for r in finals:
        cos = f"{r['cos_init_median']:>8.3f}" if "cos_init_median" in r else f"{'-':>8}"
        print(f"{r['model_id']:<{width}}  {r['params']:>9,}  {r['test_accuracy']:>8.4f}  {cos}  "
              f"{r['seconds']:>7.1f}  {r.get('split', 'train')}")
    print(f"{len(finals)} models ({len(index['records'])} with checkpoints), {index['total_params']:,} params, "
          f"{index['seconds']:.1f}s total ({index['cpu_seconds']:.1f} cpu-s) -> {args.out}")
    return 0


if __name__ == "__main__":
    # SIGTERM -> SystemExit, so build_zoo removes its temp dir instead of leaving it behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
