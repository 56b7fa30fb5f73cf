#!/usr/bin/env python
"""Neural Mimicry benchmark: closed_form vs the gradient recipe vs closed_form+gradient, side by side.

Models: ResNet-18/50/101/152 and ViT tiny/small/base/large at timm's random init, plus ResNet-18 and
ViT-tiny trained on scikit-learn digits (real trained structure; cached under --cache). Settings:
``exact`` (templates = layers per group) and ``compressed`` (2 templates per bank), each with the
family's default preset. Every cell runs in a fresh process, so its peak RSS is its own. Also runs
``scripts/generate_weights.py`` end to end on saved random-init checkpoints and checks the dense
export (strict load into a fresh timm model, top-1 agreement on a seeded batch of 4).

    python benchmarks/bench_mimicry.py                 # full run -> docs/bench_mimicry.{md,json,png}
    python benchmarks/bench_mimicry.py --quick         # smoke check (< 1 min) -> /tmp/weightgen_bench_quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, run_measured  # noqa: E402
from _mimicry_report import SETTINGS, model_label, write_json, write_markdown, write_plot  # noqa: E402

RANDOM_ARCHS = ["resnet18", "resnet50", "resnet101", "resnet152", "vit_tiny_patch16_224",
                "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
TRAINED_ARCHS = ["resnet18", "vit_tiny_patch16_224"]  # trained on digits with weightgen.classifier
QUICK_ARCHS = ["test_resnet", "test_vit"]
# The gradient recipe runs with its fixed step count only up to these sizes (and on trained models).
GRADIENT_ARCHS = {"resnet18", "resnet50", "vit_tiny_patch16_224", "vit_small_patch16_224", *QUICK_ARCHS}
E2E_ARCHS = ["resnet50", "vit_large_patch16_224"]
METHODS = ["closed_form", "gradient", "closed_form+gradient"]


# ----------------------------------------------------------------------------- child jobs
# Each runs in its own process (``--_job JSON``) and writes one JSON result to spec["result"].

def _setup_torch(threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch


def _vmrss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _digits_kwargs(arch: str) -> dict:
    from weightgen.models import small_input_kwargs

    return small_input_kwargs(arch)


def job_train(spec: dict) -> dict:
    """Train ``arch`` on digits, save its state dict (safetensors) and a small meta JSON."""
    torch = _setup_torch(spec["threads"])
    import timm
    from safetensors.torch import save_file
    from weightgen.classifier import evaluate, reestimate_batchnorm, train_classifier
    from weightgen.data import model_splits

    data = model_splits("digits")
    torch.manual_seed(0)
    model = timm.create_model(spec["arch"], **spec["kwargs"])
    start = time.perf_counter()
    losses = train_classifier(model, data, spec["steps"], seed=0)
    seconds = time.perf_counter() - start
    reestimate_batchnorm(model, data.train)
    meta = {"arch": spec["arch"], "kwargs": spec["kwargs"], "steps": spec["steps"], "train_s": seconds,
            "final_loss": losses[-1], "test_acc": evaluate(model, data.test)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, spec["path"])
    Path(spec["path"]).with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta


def job_drift(spec: dict) -> dict:
    """How far training moved the weights: cosine of each trained weight (ndim >= 2, outside the
    stem and head) to the same seeded init it started from."""
    torch = _setup_torch(spec["threads"])
    import timm
    from safetensors.torch import load_file

    trained = load_file(spec["path"])
    torch.manual_seed(0)
    init = timm.create_model(spec["arch"], **spec["kwargs"]).state_dict()
    cos = [torch.nn.functional.cosine_similarity(trained[k].flatten().double(), v.flatten().double(), dim=0).item()
           for k, v in init.items() if v.ndim >= 2 and ("blocks." in k or ".layer" in k or k.startswith("layer"))]
    meta_path = Path(spec["path"]).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.update(cos_to_init_mean=sum(cos) / len(cos), cos_to_init_min=min(cos))
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def job_checkpoint(spec: dict) -> dict:
    """Save a random-init (seed 0) timm state dict for the end-to-end rows."""
    torch = _setup_torch(spec["threads"])
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(spec["arch"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, spec["path"])
    return {"path": spec["path"]}


def job_cell(spec: dict) -> dict:
    """Build the target model, recast it (empty), fit with one method; report times and fidelity."""
    torch = _setup_torch(spec["threads"])
    import timm
    from weightgen import fit, preset_config, recast
    from weightgen.config import default_preset
    from weightgen.mimicry import DEFAULT_LR

    load_before = os.getloadavg()
    torch.manual_seed(0)
    if spec["source"] == "digits":
        from safetensors.torch import load_file

        model = timm.create_model(spec["arch"], **spec["kwargs"])
        model.load_state_dict(load_file(spec["checkpoint"]), strict=True)
    else:
        model = timm.create_model(spec["arch"])
    model.eval()
    target = dict(model.state_dict())  # references to the dense weights, not copies
    preset = default_preset(model)
    config = preset_config(preset, **SETTINGS[spec["setting"]], seed=0)
    recast(model, config, init="empty")
    rss_before_fit = _vmrss_mb()

    stamps: list[float] = []
    report = fit(model, target, spec["method"], steps=spec["steps"],
                 on_step=lambda step, loss: stamps.append(time.perf_counter()))
    steps_run = max(0, len(stamps) - 1)
    step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) if steps_run > 0 else None
    loop_s = stamps[-1] - stamps[0] if steps_run > 0 else 0.0
    counts = report["params"]
    cosines = [row["cosine"] for row in report["layers"]]
    out = {
        "run_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "preset": preset, "lr": DEFAULT_LR.get(spec["method"]) if spec["method"] != "closed_form" else None,
        "templates_arg": config.templates, "layers": len(cosines),
        "banks": len(model.recast_groups), "max_layers_per_bank": max(len(g.members) for g in model.recast_groups),
        "fit_s": report["seconds"], "steps_run": steps_run, "step_s": step_s,
        "setup_s": report["seconds"] - loop_s,  # closed form / problem setup / write-back, outside the loop
        "mean_cos": report["mean_cosine"], "min_cos": report["min_cosine"],
        "layer_cos": cosines, "recast_elems": sum(math.prod(row["shape"]) for row in report["layers"]),
        "loss_first": report["loss_history"][0] if report["loss_history"] else None,
        "loss_last": report["loss_history"][-1] if report["loss_history"] else None,
        "params_model": counts["model"], "params_templates": counts["templates"],
        "params_per_task": counts["per_task_trainable"],
        "rss_before_fit_mb": rss_before_fit, "threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    if spec["source"] == "digits":
        from weightgen.classifier import evaluate
        from weightgen.data import model_splits

        out["test_acc"] = evaluate(model, model_splits("digits").test)
    return out


def job_verify(spec: dict) -> dict:
    """Dense export of an end-to-end run vs the original: strict load, logits on a seeded batch of 4."""
    torch = _setup_torch(spec["threads"])
    import timm
    from weightgen.io import load_checkpoint, load_tensors
    from weightgen.models import example_batch

    out_dir = Path(spec["out_dir"])
    report = json.loads((out_dir / "report.json").read_text())
    original = timm.create_model(spec["arch"]).eval()
    original.load_state_dict(load_checkpoint(spec["checkpoint"]), strict=True)
    dense = timm.create_model(spec["arch"]).eval()
    dense.load_state_dict(load_tensors(out_dir / "weights.safetensors"), strict=True)
    batch = example_batch(original, 4, seed=0)
    with torch.no_grad():
        ref, got = original(batch), dense(batch)
    return {
        "mean_cos": report["mean_cosine"], "min_cos": report["min_cosine"], "fit_s": report["seconds"],
        "seconds_total_in_process": report.get("seconds_total"),
        "recast_top1_agreement": report.get("function", {}).get("top1_agreement"),
        "dense_top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "dense_logits_max_abs_diff": (ref - got).abs().max().item(),
        "dense_logits_max_abs": ref.abs().max().item(),
        "params_model": report["params"]["model"], "params_templates": report["params"]["templates"],
        "params_per_task": report["params"]["per_task_trainable"],
    }


CACHE_DIR = Path("/tmp/weightgen_bench_cache")  # set from --cache in main()
JOBS = {"train": job_train, "drift": job_drift, "checkpoint": job_checkpoint, "cell": job_cell, "verify": job_verify}


ISOLATION = "exec"  # set from --isolation in main()
_PRELOAD = ["torch", "timm", "weightgen", "weightgen.mimicry", "weightgen.classifier", "weightgen.data",
            "safetensors.torch"]


def _job_entry(spec: dict) -> None:
    """Body of a forkserver child: run the job, write its result and this process's peak RSS."""
    import resource
    import traceback

    try:
        result = _digits_kwargs(spec["arch"]) if spec["job"] == "kwargs" else JOBS[spec["job"]](spec)
    except Exception as err:  # reported as the row's status
        traceback.print_exc()
        result = {"status": f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
    result["_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps(result))


def run_job(spec: dict, timeout: float | None = None) -> tuple[dict, dict]:
    """Run one job in a fresh process; returns (its result, {wall_s, peak_rss_mb}).

    ``exec``: a new interpreter per job, peak RSS via ``os.wait4`` (as ``/usr/bin/time -v``).
    ``forkserver``: a new process forked from a server that imported torch/timm/weightgen
    once (saves ~3-8 s of imports per cell); its peak RSS is its own ``ru_maxrss``, which counts the
    imported pages it touches (~0.3-0.4 GB less than a fresh interpreter here).
    """
    spec = {**spec, "result": str(CACHE_DIR / f"{spec['job']}.{os.getpid()}.result.json")}
    result_path = Path(spec["result"])
    result_path.unlink(missing_ok=True)
    if ISOLATION == "exec":
        proc = run_measured([sys.executable, str(Path(__file__).resolve()), "--_job", json.dumps(spec)],
                            timeout=timeout, cwd=REPO)
        if proc["rc"] == 0 and result_path.exists():
            result = json.loads(result_path.read_text())
            result.pop("_peak_rss_mb", None)
            return result, proc
        why = "timeout" if proc["timed_out"] else "error: " + (proc["stderr"].strip().splitlines() or ["?"])[-1][:200]
        return {"status": why}, proc

    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    start = time.perf_counter()
    child = ctx.Process(target=_job_entry, args=(spec,))
    child.start()
    child.join(timeout)
    timed_out = child.is_alive()
    if timed_out:
        child.kill()
        child.join()
    wall = time.perf_counter() - start
    if timed_out or not result_path.exists():
        why = "timeout" if timed_out else f"error: process exited with {child.exitcode}"
        return {"status": why}, {"wall_s": wall, "peak_rss_mb": None}
    result = json.loads(result_path.read_text())
    return result, {"wall_s": wall, "peak_rss_mb": result.pop("_peak_rss_mb")}


# ----------------------------------------------------------------------------- parent


def plan_cells(args) -> list[dict]:
    if args.quick:
        models = [(a, "random") for a in QUICK_ARCHS]
    else:
        models = [(a, "random") for a in RANDOM_ARCHS] + [(a, "digits") for a in TRAINED_ARCHS]
    if args.archs:
        def names(arch, source):
            short = arch.replace("_patch16_224", "")
            return {f"digits:{arch}", f"digits:{short}"} if source == "digits" else {arch, short}
        models = [(a, s) for a, s in models if names(a, s) & set(args.archs)]
    cells = []
    for arch, source in models:
        for setting in SETTINGS:
            for method in METHODS:
                gradient_based = method != "closed_form"
                skip = gradient_based and source == "random" and arch not in GRADIENT_ARCHS
                steps = args.gradient_steps if method == "gradient" else None
                cells.append({"arch": arch, "source": source, "setting": setting, "method": method,
                              "steps": steps, "skip": "skipped (time)" if skip else None})
    return cells


def prepare_trained(args, archs: list[str]) -> dict[str, dict]:
    """Train (or reuse from the cache) the digits models; returns arch -> {checkpoint, kwargs, meta}."""
    out = {}
    for arch in archs:
        # kwargs come from weightgen.models in a child (the parent never imports torch)
        kwargs, _ = run_job({"job": "kwargs", "arch": arch, "threads": args.threads})
        if "status" in kwargs:
            raise SystemExit(f"digits kwargs for {arch}: {kwargs['status']}")
        tag = "_".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
        path = args.cache / f"digits_{arch}_{tag}_{args.trained_steps}steps_s0.safetensors"
        if not path.exists():
            print(f"training {arch} on digits for {args.trained_steps} steps (cached at {path}) ...", flush=True)
            result, _ = run_job({"job": "train", "arch": arch, "kwargs": kwargs, "steps": args.trained_steps,
                                 "path": str(path), "threads": args.threads})
            if "status" in result:
                raise SystemExit(f"training {arch} failed: {result['status']}")
        meta = json.loads(path.with_suffix(".json").read_text())
        if "cos_to_init_mean" not in meta:
            meta, _ = run_job({"job": "drift", "arch": arch, "kwargs": kwargs, "path": str(path), "threads": args.threads})
            if "status" in meta:
                raise SystemExit(f"drift of {arch}: {meta['status']}")
        out[arch] = {"checkpoint": str(path), "kwargs": kwargs, "meta": meta}
    return out


def run_cells(args, cells: list[dict], trained: dict, json_path: Path, header: dict) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(cells, desc="cells", unit="cell", dynamic_ncols=True)
    for cell in bar:
        row = {"kind": "cell", "model": model_label(cell["arch"], cell["source"]), **cell}
        bar.set_postfix_str(f"{row['model']} {cell['setting']} {cell['method']}")
        if cell["skip"]:
            row["status"] = cell["skip"]
        else:
            spec = {"job": "cell", **cell, "threads": args.threads}
            if cell["source"] == "digits":
                spec.update(checkpoint=trained[cell["arch"]]["checkpoint"], kwargs=trained[cell["arch"]]["kwargs"])
            result, proc = run_job(spec, timeout=args.cell_timeout)
            row.update(result)
            row.setdefault("status", "ok")
            row.update(peak_rss_mb=proc["peak_rss_mb"], process_wall_s=proc["wall_s"])
        rows.append(row)
        write_json(json_path, header, rows)  # partial results survive an interrupted run
    return rows


def run_e2e(args, archs: list[str]) -> list[dict]:
    """generate_weights.py as a user runs it; with --threads N, once with N threads and once with torch's default."""
    rows = []
    variants = [args.threads, None] if args.threads else [None]
    for arch in archs:
        checkpoint = args.cache / f"{arch}_random_s0.safetensors"
        if not checkpoint.exists():
            print(f"saving a random-init {arch} checkpoint to {checkpoint} ...", flush=True)
            result, _ = run_job({"job": "checkpoint", "arch": arch, "path": str(checkpoint), "threads": args.threads})
            if "status" in result:
                raise SystemExit(f"checkpoint for {arch} failed: {result['status']}")
        out_dir = args.cache / "e2e" / arch
        cmd = [sys.executable, "scripts/generate_weights.py", "--arch", arch, "--checkpoint", str(checkpoint),
               "--out", str(out_dir), "--overwrite"]
        for threads in variants:
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
            print(f"end to end: {prefix}{' '.join(cmd[1:])}", flush=True)
            load_before = os.getloadavg()
            proc = run_measured(cmd, timeout=args.cell_timeout, env=env, cwd=REPO)
            row = {"kind": "e2e", "model": model_label(arch, "random"), "arch": arch, "source": "random",
                   "setting": "exact", "method": "closed_form", "threads": threads,
                   "command": f"{prefix}python " + " ".join(cmd[1:]),
                   "wall_s": proc["wall_s"], "peak_rss_mb": proc["peak_rss_mb"],
                   "loadavg_before": [round(x, 2) for x in load_before],
                   "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
            if proc["rc"] != 0:
                row["status"] = "error: " + (proc["stderr"].strip().splitlines() or ["?"])[-1][:200]
            else:
                result, _ = run_job({"job": "verify", "arch": arch, "checkpoint": str(checkpoint),
                                     "out_dir": str(out_dir), "threads": args.threads})
                row.update(result)
                row.setdefault("status", "ok")
            rows.append(row)
            if not args.keep_artifacts:
                import shutil

                shutil.rmtree(out_dir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- reporting


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", help="only these models (arch names; digits:ARCH for a trained one)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: test_resnet/test_vit, 20 gradient steps")
    p.add_argument("--gradient-steps", type=int, default=None, help="steps of the gradient recipe (default 300, quick 20)")
    p.add_argument("--out", type=Path, help="output folder (default docs/, or /tmp/weightgen_bench_quick with --quick)")
    p.add_argument("--e2e", nargs="*", help="archs for the generate_weights.py end-to-end rows "
                   "(default resnet50 vit_large_patch16_224; quick: test_resnet; empty: none)")
    p.add_argument("--trained-steps", type=int, default=300, help="digits training steps for the trained models")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's; 1 with --quick). "
                   "On a loaded machine 1 avoids OpenMP oversubscription stalls")
    p.add_argument("--cell-timeout", type=float, default=3600, help="seconds before a cell is killed")
    p.add_argument("--cache", type=Path, default=Path("/tmp/weightgen_bench_cache"),
                   help="trained / random checkpoints and scratch files")
    p.add_argument("--keep-artifacts", action="store_true", help="keep the end-to-end artifact folders")
    p.add_argument("--isolation", choices=["exec", "forkserver"],
                   help="fresh process per job: a new interpreter (default; peak RSS as a user would see it) "
                   "or forked from a server that preloaded torch/timm (default with --quick: no import cost "
                   "per cell, but peak RSS reads ~0.3-0.4 GB lower, the import pages a child never touches)")
    p.add_argument("--report-only", action="store_true", help="re-render the .md/.png from OUT/bench_mimicry.json")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.isolation is None:
        args.isolation = "forkserver" if args.quick else "exec"
    if args.threads is None and args.quick:
        args.threads = 1
    if args.gradient_steps is None:
        args.gradient_steps = 20 if args.quick else 300
    if args.out is None:
        args.out = Path("/tmp/weightgen_bench_quick") if args.quick else REPO / "docs"
    if args.e2e is None:
        args.e2e = ["test_resnet"] if args.quick else E2E_ARCHS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._job:  # a child of --isolation exec
        _job_entry(json.loads(args._job))
        return 0

    json_path, md_path, png_path = (args.out / f"bench_mimicry.{ext}" for ext in ("json", "md", "png"))
    if args.report_only:
        data = json.loads(json_path.read_text())
        print(write_markdown(md_path, data["header"], data["rows"]))
        write_plot(png_path, data["rows"])
        return 0
    start = time.perf_counter()
    global CACHE_DIR, ISOLATION
    CACHE_DIR, ISOLATION = args.cache, args.isolation
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    header = {**machine_info(), "threads": args.threads, "isolation": args.isolation,
              "gradient_steps": args.gradient_steps,
              "quick": args.quick}
    cells = plan_cells(args)
    trained_archs = sorted({c["arch"] for c in cells if c["source"] == "digits"})
    trained = prepare_trained(args, trained_archs)
    header["trained"] = trained
    rows = run_cells(args, cells, trained, json_path, header)
    header["gradient_lr"] = next((r["lr"] for r in rows if r["method"] == "gradient" and r.get("lr")), None)
    rows += run_e2e(args, args.e2e)
    header.update(loadavg_end=[round(x, 2) for x in os.getloadavg()], total_wall_s=time.perf_counter() - start)
    write_json(json_path, header, rows)
    text = write_markdown(md_path, header, rows)
    write_plot(png_path, rows)
    print(text)
    print(f"wrote {md_path}, {json_path}, {png_path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
