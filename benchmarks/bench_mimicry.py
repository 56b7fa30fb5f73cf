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
from _common import REPO, machine_info, markdown_table, run_measured  # noqa: E402

RANDOM_ARCHS = ["resnet18", "resnet50", "resnet101", "resnet152", "vit_tiny_patch16_224",
                "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
TRAINED_ARCHS = ["resnet18", "vit_tiny_patch16_224"]  # trained on digits with weightgen.digits
QUICK_ARCHS = ["test_resnet", "test_vit"]
# The gradient recipe runs with its fixed step count only up to these sizes (and on trained models).
GRADIENT_ARCHS = {"resnet18", "resnet50", "vit_tiny_patch16_224", "vit_small_patch16_224", *QUICK_ARCHS}
E2E_ARCHS = ["resnet50", "vit_large_patch16_224"]
METHODS = ["closed_form", "gradient", "closed_form+gradient"]
SETTINGS = {"exact": {}, "compressed": {"layers_per_group": None, "templates": 2}}
PAPER_STEPS = (1000, 3000)
# A layer whose fitted cosine is below this is lost ("collapsed"): what a plain SVD does to some
# layers under compression. Not a quality bar: with n templates for L near-orthogonal layers the
# best a balanced fit can give every layer is about sqrt(n / L) (0.41 for 2 of 12, 0.29 for 2 of 24).
COLLAPSED_COS = 0.1
TARGETS = {"resnet50": {"wall_s": 15, "peak_rss_mb": 1.5 * 1024},
           "vit_large_patch16_224": {"wall_s": 60, "peak_rss_mb": 4 * 1024}}


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
    from weightgen.digits import digits_model_kwargs

    return digits_model_kwargs(arch)


def job_train(spec: dict) -> dict:
    """Train ``arch`` on digits, save its state dict (safetensors) and a small meta JSON."""
    torch = _setup_torch(spec["threads"])
    import timm
    from safetensors.torch import save_file
    from weightgen.digits import evaluate, load_digits_data, reestimate_batchnorm, train_classifier

    data = load_digits_data()
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
        from weightgen.digits import evaluate, load_digits_data

        out["test_acc"] = evaluate(model, load_digits_data().test)
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
_PRELOAD = ["torch", "timm", "weightgen", "weightgen.mimicry", "weightgen.digits", "safetensors.torch"]


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


def model_label(arch: str, source: str) -> str:
    short = arch.replace("_patch16_224", "")
    return f"{short} (digits)" if source == "digits" else short


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
        # kwargs come from weightgen.digits in a child (the parent never imports torch)
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


def write_json(path: Path, header: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")


def _f(x, spec: str, empty: str = "–") -> str:
    return empty if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _cos(x) -> str:
    if x is None:
        return "–"
    return f"{x:.6f}" if x < 0.999999 else f"1 − {1 - x:.0e}" if x < 1 else "1"


def _s(x) -> str:
    return "–" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:,.0f}"


def extrapolate(row: dict, steps: int) -> float | None:
    if row.get("step_s") is None:
        return None
    return row["setup_s"] + steps * row["step_s"]


def _family(r: dict) -> str:
    return "digits" if r["source"] == "digits" else ("vit" if "vit" in r["arch"] else "resnet")


def estimate_skipped(rows: list[dict]) -> None:
    """For gradient cells skipped for time: scale the largest measured same-family cell's step time by
    the recast weight count (each step reads and writes every template and target entry)."""
    cells = [r for r in rows if r["kind"] == "cell"]
    measured = [r for r in cells if r.get("status") == "ok" and r.get("recast_elems")]
    for r in cells:
        if not str(r.get("status", "")).startswith("skipped"):
            continue
        size = next((c.get("recast_elems") for c in measured if c["model"] == r["model"]
                     and c["setting"] == r["setting"]), None)
        refs = [c for c in measured if c["method"] == r["method"] and c["setting"] == r["setting"]
                and _family(c) == _family(r) and c.get("step_s")]
        if not size or not refs:
            continue
        ref = max(refs, key=lambda c: c["recast_elems"])
        scale = size / ref["recast_elems"]
        r.update(est_step_s=ref["step_s"] * scale, est_setup_s=ref["setup_s"] * scale, est_fit_s=ref["fit_s"] * scale,
                 est_from=ref["model"])


def cell_table(rows: list[dict]) -> str:
    headers = ["model", "setting", "method", "steps", "fit s", "s/step", "est. 1k / 3k steps s",
               "peak RSS MB", "mean cos", "min cos", "params (model)", "templates", "per-task", "status"]
    body = []
    for r in rows:
        if r["kind"] != "cell":
            continue
        ok = r.get("status") == "ok"
        est = (f"{extrapolate(r, PAPER_STEPS[0]):,.0f} / {extrapolate(r, PAPER_STEPS[1]):,.0f}"
               if ok and r["method"] == "gradient" and r.get("step_s") is not None else "–")
        step = _f(r.get("step_s"), ".3f")
        fit_s = _s(r.get("fit_s"))
        if "est_step_s" in r:  # skipped for time: scaled from a measured cell, marked ~
            step = f"~{r['est_step_s']:.2f}"
            if r["method"] == "gradient":
                est = " / ".join(f"~{r['est_setup_s'] + n * r['est_step_s']:,.0f}" for n in PAPER_STEPS)
            else:
                fit_s = f"~{r['est_fit_s']:,.0f}"
        body.append([
            r["model"], r["setting"], r["method"], r.get("steps_run", r.get("steps")) if ok else (r.get("steps") or "–"),
            fit_s, step, est, _f(r.get("peak_rss_mb"), ".0f"),
            _cos(r.get("mean_cos")), _cos(r.get("min_cos")), _f(r.get("params_model"), ","),
            _f(r.get("params_templates"), ","), _f(r.get("params_per_task"), ","),
            r.get("status", "") + (f", acc {r['test_acc']:.1%}" if "test_acc" in r else "")
            + (f"; ~ scaled from {r['est_from']} by weight count" if "est_from" in r else ""),
        ])
    return markdown_table(headers, body, "lllrrrrrrrrrrl")


def e2e_table(rows: list[dict]) -> str:
    headers = ["model", "threads", "wall s (process)", "fit s", "peak RSS MB", "mean cos", "min cos",
               "dense top-1 agreement", "dense max |Δlogit| (max |logit|)", "load avg (1 min)", "status"]
    body = []
    for r in rows:
        if r["kind"] != "e2e":
            continue
        logits = (f"{r['dense_logits_max_abs_diff']:.1e} ({r['dense_logits_max_abs']:.2g})"
                  if "dense_logits_max_abs_diff" in r else "–")
        body.append([r["model"], r.get("threads") or "default", _f(r.get("wall_s"), ".1f"), _f(r.get("fit_s"), ".2f"),
                     _f(r.get("peak_rss_mb"), ".0f"), _cos(r.get("mean_cos")), _cos(r.get("min_cos")),
                     _f(r.get("dense_top1_agreement"), ".0%"), logits, r["loadavg_before"][0], r.get("status", "")])
    return markdown_table(headers, body, "lrrrrrrrrrl")


def _check(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def targets_section(rows: list[dict]) -> list[str]:
    """The benchmark's targets, each with its measured numbers."""
    lines = []
    for r in rows:
        if r["kind"] != "e2e" or r.get("status") != "ok" or r["arch"] not in TARGETS:
            continue
        t = TARGETS[r["arch"]]
        parts = [f"wall {r['wall_s']:.1f} s ≤ {t['wall_s']} s: {_check(r['wall_s'] <= t['wall_s'])}",
                 f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB ≤ {t['peak_rss_mb'] / 1024:.1f} GB: "
                 f"{_check(r['peak_rss_mb'] <= t['peak_rss_mb'])}"]
        if r["arch"] == "resnet50":
            parts += [f"mean cos {_cos(r['mean_cos'])} ≥ 0.9999: {_check(r['mean_cos'] >= 0.9999)}",
                      f"dense top-1 agreement {r['dense_top1_agreement']:.0%} = 100%: "
                      f"{_check(r['dense_top1_agreement'] == 1.0)}"]
        lines.append(f"- {r['model']} end to end (threads {r.get('threads') or 'default'}): " + "; ".join(parts))
    cells = {(r["model"], r["setting"], r["method"]): r for r in rows if r["kind"] == "cell" and r.get("status") == "ok"}
    for (model, setting, method), cf in cells.items():
        grad = cells.get((model, setting, "gradient"))
        if method != "closed_form" or grad is None or grad.get("step_s") is None:
            continue
        at_n, at_1k = grad["fit_s"] / cf["fit_s"], extrapolate(grad, PAPER_STEPS[0]) / cf["fit_s"]
        fidelity = cf["mean_cos"] >= grad["mean_cos"]
        lines.append(f"- {model} {setting}: closed_form {_s(cf['fit_s'])} s vs gradient {_s(grad['fit_s'])} s at "
                     f"{grad['steps_run']} steps ({at_n:,.0f}×) / ~{extrapolate(grad, PAPER_STEPS[0]):.0f} s at 1,000 "
                     f"steps ({at_1k:,.0f}×), mean cos {_cos(cf['mean_cos'])} vs {_cos(grad['mean_cos'])}: "
                     f"≥100× at equal or better fidelity {_check(at_1k >= 100 and fidelity)}")
        if setting == "compressed" and cf["source"] == "digits":
            lost_cf, lost_grad = (sum(c < COLLAPSED_COS for c in r["layer_cos"]) for r in (cf, grad))
            lines.append(f"  - compressed, trained: closed_form mean cos {_cos(cf['mean_cos'])} ≥ gradient "
                         f"{_cos(grad['mean_cos'])}: {_check(fidelity)}; min cos {_cos(cf['min_cos'])} "
                         f"(min/mean {cf['min_cos'] / cf['mean_cos']:.2f}; {lost_cf} of {cf['layers']} layers below "
                         f"{COLLAPSED_COS}) vs gradient {_cos(grad['min_cos'])} (min/mean "
                         f"{grad['min_cos'] / grad['mean_cos']:.2f}; {lost_grad} below): not collapsed "
                         f"{_check(lost_cf == 0)}")
    return lines


def speedup_table(rows: list[dict]) -> str:
    """closed_form vs the gradient recipe per (model, setting): time at the run's and the paper's steps."""
    cells = {(r["model"], r["setting"], r["method"]): r for r in rows if r["kind"] == "cell" and r.get("status") == "ok"}
    headers = ["model", "setting", "closed_form s", "gradient s (N steps)", "× at N",
               "× at 1k steps", "× at 3k steps", "cos cf / grad (mean)", "cos cf / grad (min)"]
    body = []
    for (model, setting, method), cf in cells.items():
        grad = cells.get((model, setting, "gradient"))
        if method != "closed_form" or grad is None or grad.get("step_s") is None:
            continue
        body.append([
            model, setting, _s(cf["fit_s"]), f"{_s(grad['fit_s'])} ({grad['steps_run']})",
            f"{grad['fit_s'] / cf['fit_s']:,.0f}", f"{extrapolate(grad, PAPER_STEPS[0]) / cf['fit_s']:,.0f}",
            f"{extrapolate(grad, PAPER_STEPS[1]) / cf['fit_s']:,.0f}",
            f"{_cos(cf['mean_cos'])} / {_cos(grad['mean_cos'])}", f"{_cos(cf['min_cos'])} / {_cos(grad['min_cos'])}",
        ])
    return markdown_table(headers, body, "llrrrrrll")


def write_markdown(path: Path, header: dict, rows: list[dict]) -> str:
    h = header
    trained = "; ".join(f"{model_label(a, 'digits')}: {m['meta']['steps']} steps, test acc {m['meta']['test_acc']:.1%}, "
                        f"kwargs {m['kwargs']}, weight cosine to its own init mean "
                        f"{m['meta'].get('cos_to_init_mean', float('nan')):.3f} / min "
                        f"{m['meta'].get('cos_to_init_min', float('nan')):.3f}" for a, m in h.get("trained", {}).items())
    lines = [
        "# Neural Mimicry benchmark",
        "",
        f"- date: {h['date_utc']}; commit {h['git_commit']}"
        + (f" with uncommitted changes in {', '.join(h['git_dirty'])}" if h.get("git_dirty") else ""),
        f"- machine: {h['cpu']}, {h['cpus']} CPUs, {h['mem_total_gib']} GiB RAM, {h['platform']}",
        f"- load average (1/5/15 min) at start {h['loadavg']}, at end {h.get('loadavg_end')} "
        "(shared machine: other jobs were running; every row also records its own)",
        f"- python {h['python']}, torch {h['torch']}, timm {h['timm']}, weightgen {h['weightgen']}; "
        f"torch threads per process: {h['threads'] or 'default'}; process per cell: {h['isolation']}",
        f"- command: `{h['command']}`",
        f"- total wall time: {h.get('total_wall_s', 0) / 60:.1f} min",
        "",
        "Each cell is a fresh process: `fit s` is the fit alone (`report['seconds']`), `peak RSS` is that "
        "process's `ru_maxrss` (imports, model, target and fit; "
        + ("a fresh interpreter importing torch+timm alone holds ~0.85 GB here). " if h["isolation"] == "exec" else
           "forked from a preloaded server, so ~0.3-0.4 GB of import pages a fresh interpreter holds are not counted). ")
        + "Targets are the model's own random-init (timm default) weights, or the weights after training on "
        "scikit-learn digits. `exact`: templates = layers per bank (default); `compressed`: "
        "`layers_per_group=None, templates=2`. Presets: recast-conv (ResNets), recast-attn-mlp (ViTs). "
        f"`gradient` is the paper recipe (random start, RMSprop, SmoothL1, lr {h['gradient_lr']}) at a fixed "
        f"{h['gradient_steps']} steps; `s/step` is the median loop step, and `est. 1k / 3k steps` = setup + steps × s/step, "
        "the cost at the paper's 1,000-3,000 steps. `closed_form+gradient` is the closed form refined with the "
        "default steps. Gradient-based methods run only up to resnet50 / vit_small (and on the trained models); "
        "the rest are `skipped (time)`.",
        "",
    ]
    if trained:
        lines += [f"Trained models: {trained}. The `acc` in the status column is the digits test accuracy of the "
                  "fitted (recast) model. A few hundred steps move the weights only a little away from their "
                  "random init (cosine to init above), so their geometry, and hence compressed fidelity, stays "
                  "close to the random-init rows.", ""]
    estimate_skipped(rows)
    lines += ["## Cells", "", cell_table(rows), ""]
    lines += ["## closed_form vs the gradient recipe", "", speedup_table(rows), ""]
    targets = targets_section(rows)
    if targets:
        lines += ["## Targets", "", *targets, ""]
    if any(r["kind"] == "e2e" for r in rows):
        lines += ["## End to end: `scripts/generate_weights.py --checkpoint`", "",
                  "Wall seconds of the whole process (python start-up, imports, model creation, checkpoint load, "
                  "recast, fit, function check, writing the artifact); peak RSS of that process. The dense export "
                  "`weights.safetensors` is loaded strictly into a fresh timm model and compared with the original "
                  "on a seeded batch of 4.", "", e2e_table(rows), ""]
        lines += [f"- `{r['command']}`" for r in rows if r["kind"] == "e2e"] + [""]
    lines += ["Raw rows (per-layer cosines, load averages, RSS before the fit, loss ends): `bench_mimicry.json`. "
              "Plot: `bench_mimicry.png`.", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def write_plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = {"closed_form": "tab:blue", "gradient": "tab:red", "closed_form+gradient": "tab:green"}
    styles = {"exact": "-", "compressed": "--"}

    def family(r):
        return "trained (digits)" if r["source"] == "digits" else ("ViT" if "vit" in r["arch"] else "ResNet")

    markers = {"ResNet": "o", "ViT": "^", "trained (digits)": "*"}
    ok = [r for r in rows if r["kind"] == "cell" and r.get("status") == "ok"]
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(13, 5.2))
    size = {"closed_form": 6, "gradient": 7, "closed_form+gradient": 10}  # cf drawn last and smaller: both show
    for method in ["closed_form+gradient", "gradient", "closed_form"]:
        for setting in SETTINGS:
            for fam in markers:
                pts = sorted((r["params_model"], r["fit_s"], r["mean_cos"]) for r in ok
                             if r["method"] == method and r["setting"] == setting and family(r) == fam)
                if not pts:
                    continue
                x, t, c = zip(*pts)
                kw = dict(color=colors[method], linestyle=styles[setting], marker=markers[fam],
                          markersize=size[method] + (3 if fam.startswith("trained") else 0), alpha=0.85,
                          markerfacecolor="white" if setting == "compressed" else colors[method])
                ax_t.plot(x, t, **kw)
                ax_c.plot(x, c, **kw)
                if method == "gradient":  # the same fits at the paper's 1,000 steps, extrapolated
                    est = sorted((r["params_model"], extrapolate(r, PAPER_STEPS[0])) for r in ok
                                 if r["method"] == method and r["setting"] == setting and family(r) == fam)
                    ax_t.plot(*zip(*est), color=colors[method], linestyle=":", marker="x", alpha=0.45,
                              markersize=size[method])
    steps = next((r["steps_run"] for r in ok if r["method"] == "gradient"), "N")
    ax_t.set(xscale="log", yscale="log", xlabel="parameters (dense model)", ylabel="fit seconds",
             title=f"Fit time (gradient: {steps} steps measured, x = 1,000 steps est.)")
    ax_c.set(xscale="log", xlabel="parameters (dense model)", ylabel="mean per-layer weight cosine",
             title="Fidelity", ylim=(-0.05, 1.05))
    for ax in (ax_t, ax_c):
        ax.grid(True, which="both", alpha=0.3)
    handles = ([Line2D([], [], color=c, label=m) for m, c in colors.items()]
               + [Line2D([], [], color=colors["gradient"], linestyle=":", marker="x", alpha=0.45,
                         label="gradient at 1,000 steps (est.)")]
               + [Line2D([], [], color="gray", linestyle=s, marker="o", label=k,
                         markerfacecolor="white" if k == "compressed" else "gray") for k, s in styles.items()]
               + [Line2D([], [], color="gray", marker=m, linestyle="none", label=f) for f, m in markers.items()])
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


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
