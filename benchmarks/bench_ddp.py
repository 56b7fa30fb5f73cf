#!/usr/bin/env python
"""adapt.py on 1 device against 2 CPU devices (DDP, gloo): test accuracy over seeds, side by side.

Both runs learn the same tasks from the same backbone with the same seeds; on 2 devices the global
batch is split over the two processes (as many steps as on 1 device). The claim to check: the two
agree within the seed-to-seed spread. The backbone is test_resnet at random init, recast and fitted
(no pretraining: the run exercises the training loop, not transfer).

    python benchmarks/bench_ddp.py   # -> docs/bench_ddp.{md,json}
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, run_measured, write_outputs  # noqa: E402


def make_backbone(path: Path) -> None:
    import timm
    import torch

    import weightgen as wg

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wg.recast(model)
    wg.save(model, path, wg.fit(model, state), arch="test_resnet", model_kwargs={"in_chans": 1})


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    from scipy import stats

    mean = statistics.mean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, half


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--task", default="digits")
    p.add_argument("--method", default="full")
    p.add_argument("--extra", default="--lr 1e-2 --epochs 5 --max-train 512 --max-eval 256 --batch-size 32",
                   help="further adapt.py arguments")
    p.add_argument("--out", default=str(REPO / "docs"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone = Path(tmp) / "backbone"
        make_backbone(backbone)
        for devices in (1, 2):
            out = Path(tmp) / f"d{devices}"
            cmd = [sys.executable, str(REPO / "scripts" / "adapt.py"), "--backbone", str(backbone), "--tasks",
                   args.task, "--seeds", args.seeds, "--method", args.method, *args.extra.split(),
                   "--accelerator", "cpu", "--devices", str(devices), "--out", str(out)]
            run = run_measured(cmd, env=env, cwd=REPO, timeout=3600)
            if run["rc"] != 0:
                print(run["stderr"][-3000:], file=sys.stderr)
                return 1
            with open(out / "results.csv") as f:
                rows = list(csv.DictReader(f))
            results[devices] = {"wall_s": run["wall_s"], "test_acc": {int(r["seed"]): float(r["test_acc"]) for r in rows},
                                "val_acc": {int(r["seed"]): float(r["val_acc"]) for r in rows},
                                "steps": {int(r["seed"]): int(r["steps"]) for r in rows},
                                "task_files": sorted(p.name for p in (out / "tasks").iterdir())}
    table = []
    for devices in (1, 2):
        acc = [results[devices]["test_acc"][s] for s in seeds]
        mean, half = interval(acc)
        results[devices]["mean"], results[devices]["ci95"] = mean, half
        table.append([devices, " ".join(f"{a:.3f}" for a in acc), f"{mean:.3f} +- {half:.3f}",
                      f"{statistics.stdev(acc):.3f}", results[devices]["steps"][seeds[0]],
                      f"{results[devices]['wall_s']:.0f}"])
    diffs = [results[2]["test_acc"][s] - results[1]["test_acc"][s] for s in seeds]
    dmean, dhalf = interval(diffs)
    info = machine_info()
    md = "\n".join([
        f"# adapt.py on 1 and 2 CPU devices ({args.method} on {args.task}, test_resnet)", "",
        f"CPU: {info['cpu']} ({info['cpus']} CPUs, load average {info['loadavg']}). Command: `{info['command']}`; "
        f"adapt.py arguments: `{args.extra}`.", "",
        markdown_table(["devices", "test acc per seed", "mean +- 95% CI", "seed sd", "steps", "wall s"], table), "",
        f"Paired difference (2 devices - 1 device), same seeds: {dmean:+.3f} +- {dhalf:.3f} (95% CI). "
        f"Each run wrote one results directory with one task file per seed ({len(results[2]['task_files'])} files).",
        ""])
    write_outputs(args.out, "bench_ddp", md, {"machine": info, "args": vars(args), "results": results,
                                              "paired_difference": {"mean": dmean, "ci95": dhalf, "values": diffs}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
