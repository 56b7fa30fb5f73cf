#!/usr/bin/env python
"""Closed form and gradient mimicry on one device: fit seconds, gradient step time, fidelity.

    python benchmarks/bench_device.py --device cuda           # writes docs/bench_device_cuda.{md,json}
    python benchmarks/bench_device.py --device cpu --quick    # resnet18 / vit_small: docs/bench_device_cpu_quick.*

Each model is a timm random init (seeded), moved to the device, recast with its default preset
(`init="empty"`) and fitted to its own weights: `fit(method="closed_form")` (exact: templates =
layers per group) and a compressed closed form (4 templates per bank), then the gradient recipe's
step time (`fit(method="gradient")`, median of `--steps` steps after a warm-up). Times are
wall-clock around the call, synchronised on CUDA; a tiny warm-up fit runs first so CUDA start-up
is not counted. Run it once per device and compare the tables.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table  # noqa: E402

FULL = {"closed_form": ["resnet50", "vit_large_patch16_224"], "gradient": "resnet50"}
QUICK = {"closed_form": ["resnet18", "vit_small_patch16_224"], "gradient": "resnet18"}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(arch: str, device):
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(arch).eval()
    return model.to(device)


def _recast(model, templates: int | None):
    import weightgen as wg
    from weightgen.config import default_preset

    target = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wg.recast(model, wg.preset_config(default_preset(model), templates=templates), init="empty")
    return target


def time_closed_form(arch: str, device, templates: int | None) -> dict:
    import torch
    from weightgen.mimicry import fit

    model = _model(arch, device)
    target = _recast(model, templates)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    report = fit(model, target, "closed_form")
    _sync(device)
    row = {"arch": arch, "setting": "exact" if templates is None else f"{templates} templates/bank",
           "fit_s": report["seconds"], "fit_and_report_s": time.perf_counter() - start,
           "mean_cosine": report["mean_cosine"], "min_cosine": report["min_cosine"],
           "layers": len(report["layers"]), "banks": len({r["group"] for r in report["layers"]})}
    if device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def time_gradient(arch: str, device, steps: int) -> dict:
    from weightgen.mimicry import fit

    base = _model(arch, device)
    model = copy.deepcopy(base)
    fit(model, _recast(model, None), "gradient", steps=2)  # warm-up: optimiser state, kernels
    model = copy.deepcopy(base)
    target = _recast(model, None)
    stamps: list[float] = []

    def on_step(_step: int, _loss: float) -> None:  # loss.item() has synchronised already
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    report = fit(model, target, "gradient", steps=steps, on_step=on_step)
    _sync(device)
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"arch": arch, "steps": steps, "step_s_median": statistics.median(per_step),
            "total_s": time.perf_counter() - start, "loss_first": report["loss_history"][0],
            "loss_best": min(report["loss_history"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="resnet18 / vit_small instead of resnet50 / vit_large")
    p.add_argument("--steps", type=int, default=20, help="gradient steps timed (default: %(default)s)")
    p.add_argument("--out", default="docs", help="output folder (default: %(default)s)")
    args = p.parse_args(argv)

    import torch
    from weightgen.generate import resolve_device
    from weightgen.io import WeightgenError

    try:
        device = resolve_device(args.device)
    except WeightgenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    time_closed_form("test_vit", device, None)  # warm-up: CUDA context, cuBLAS / cuSOLVER handles

    closed = []
    for arch in plan["closed_form"]:
        for templates in (None, 4):
            closed.append(time_closed_form(arch, device, templates))
            print(f"closed form {arch} {closed[-1]['setting']}: {closed[-1]['fit_s']:.2f} s", file=sys.stderr)
    gradient = time_gradient(plan["gradient"], device, args.steps)
    print(f"gradient {gradient['arch']}: {gradient['step_s_median'] * 1e3:.1f} ms/step", file=sys.stderr)

    info = machine_info()
    info["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    where = info.get("gpu") or f"{info['cpu']} ({info['torch_threads']} torch threads)"
    gpu_col = device.type == "cuda"
    rows = [[r["arch"], r["setting"], r["layers"], r["banks"], f"{r['fit_s']:.2f}", f"{r['fit_and_report_s']:.2f}",
             f"{r['mean_cosine']:.6f}", f"{r['min_cosine']:.6f}"] + ([f"{r['peak_gpu_mb']:.0f}"] if gpu_col else [])
            for r in closed]
    md = (f"# Mimicry on `{device}`\n\n`{info['command']}` on {where}, torch {info['torch']}, "
          f"{info['date_utc']}, commit {info['git_commit']}.\n\n"
          "## Closed form (random init, default preset, fit to its own weights)\n\n"
          + markdown_table(["arch", "templates", "layers", "banks", "fit s", "fit + report s", "mean cosine",
                            "min cosine"] + (["peak GPU MB"] if gpu_col else []), rows)
          + f"\n\n## Gradient recipe (`method=\"gradient\"`, {gradient['steps']} steps)\n\n"
          + markdown_table(["arch", "ms / step (median)", "total s", "loss first", "loss best"],
                           [[gradient["arch"], f"{gradient['step_s_median'] * 1e3:.1f}", f"{gradient['total_s']:.2f}",
                             f"{gradient['loss_first']:.4g}", f"{gradient['loss_best']:.4g}"]]) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_device_{device.type}{'_quick' if args.quick else ''}"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "device": str(device), "closed_form": closed,
                                                   "gradient": gradient}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
