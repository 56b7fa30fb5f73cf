#!/usr/bin/env python
"""Downstream adaptation side by side: methods x tasks x seeds on a small ResNet and a small ViT.

Each backbone is pretrained here on the source glyph task (scripts/pretrain.py's library call,
cached), mimicked into banks (exact closed form), then every method learns the task sequence
from it (weightgen.adapt.incremental.run_sequence: best-val checkpoint, task files, accuracy
matrix, exact-switch check). Also the issue's question (d): coefficient-only adaptation with banks
from (a) the source backbone, (b) the VAE prior, (c) timm's random init, (d) (a) + extra templates.

    python benchmarks/bench_adapt.py            # full: writes docs/bench_adapt.{md,json,png} (<= 60 min, 2 cores)
    python benchmarks/bench_adapt.py --quick    # smoke run (<= 2 min): outputs/bench_adapt_quick.*

Every job runs as its own process (peak RSS per job), two at a time (``--jobs``), one torch thread each.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, run_measured  # noqa: E402

BACKBONES = {
    # ResNet-34 geometry (3,4,6,3 blocks) at 1/4 width: recast-resnet gives the paper's 168 coefficients
    "resnet34-w16": {"arch": "resnet34", "kwargs": {"channels": [16, 32, 64, 128]}, "preset": "recast-resnet",
                     "pretrain": {"epochs": 8, "lr": 2e-3}},
    # a 6-block ViT, 96 wide, 8x8 patches of 32x32 inputs (16 tokens), mean-pooled tokens; ViTs learn slower
    # from scratch on 6k images: 16 epochs at lr 1e-3 reach 0.75 source accuracy (8 epochs: 0.39; lr 2e-3: 0.19)
    "vit-d6-e96": {"arch": "vit_tiny_patch16_224",
                   "kwargs": {"embed_dim": 96, "depth": 6, "num_heads": 3, "global_pool": "avg"}, "preset": None,
                   "pretrain": {"epochs": 16, "lr": 1e-3}},
}
METHODS = {
    "resnet34-w16": ["linear", "full", "recast", "recast-norm", "lora", "recast+melo", "recast+clr", "recast+piggyback"],
    "vit-d6-e96": ["linear", "full", "recast", "recast-norm", "lora", "recast+melo", "recast+adaptformer"],
}
# (d): bank sources for coefficient-only adaptation ("source" is the main run's recast row)
BANKS = ["source", "prior", "timm_init", "source+pca2", "source+random2"]
COEFFICIENT_ONLY = ("recast",)

FULL = {"tasks": ["digits", "mnist", "animals", "greek"], "seeds": [42, 1998, 3142592], "epochs": 3,
        "max_train": 2000, "max_eval": 1000, "batch_size": 64, "pretrain_scale": 1.0, "pretrain_max_train": 6000,
        "step_steps": 20, "banks": BANKS, "methods": METHODS}
QUICK = {"tasks": ["digits", "mnist"], "seeds": [42], "epochs": 2, "max_train": 512, "max_eval": 256,
         "batch_size": 64, "pretrain_scale": 0.25, "pretrain_max_train": 2000, "step_steps": 10,
         "banks": ["source", "prior", "source+pca2"],
         "methods": {"resnet34-w16": ["linear", "full", "recast", "lora", "recast+melo"],
                     "vit-d6-e96": ["linear", "full", "recast", "lora", "recast+melo"]}}
IMG_SIZE = 32


# ------------------------------------------------------------------ worker side (imports torch)

def vae_key(vae: str | None) -> str:
    """Short hash of a VAE's files (default: the shipped one), so a prior artifact is never reused
    for another VAE (the cache would otherwise key only on the backbone)."""
    from weightgen.vae.prior import default_vae_dir

    root = Path(vae) if vae else default_vae_dir()
    digest = hashlib.sha256()
    for name in ("vae.json", "vae.safetensors"):
        digest.update((root / name).read_bytes() if (root / name).is_file() else b"")
    return digest.hexdigest()[:10]


def prepare(name: str, settings: dict, cache: Path, vae: str | None = None, bank_seed: int = 0) -> dict:
    """Pretrain (cached) and build the three artifacts: source, prior (from ``vae``, default the
    shipped one), timm init. ``bank_seed``: which draw of the prior and of timm's init (0: the protocol's)."""
    import torch

    from weightgen.adapt.pretrain import pretrain
    from weightgen.generate import GenerateOptions, generate
    from weightgen.io import save_tensors
    from weightgen.models import create_model

    spec = BACKBONES[name]
    epochs = max(1, round(spec["pretrain"]["epochs"] * settings["pretrain_scale"]))
    key = hashlib.sha256(json.dumps([spec, epochs, settings["pretrain_max_train"]], sort_keys=True).encode()).hexdigest()[:10]
    root = cache / f"{name}-{key}"
    src, info, reused = pretrain(spec["arch"], root / "src", epochs=epochs, img_size=IMG_SIZE, seed=0,
                                 model_kwargs=spec["kwargs"], lr=spec["pretrain"]["lr"],
                                 max_train=settings["pretrain_max_train"])
    kwargs = info["model_kwargs"]
    out = {"pretrain": {k: info[k] for k in ("test_acc", "val_acc", "seconds", "steps")}, "reused": reused}
    tag = f"-s{bank_seed}" if bank_seed else ""  # seed 0 keeps the names the cache already has
    init = root / f"init{tag}" / "model.safetensors"
    if not init.is_file():
        init.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(bank_seed)
            model = create_model(spec["arch"], kwargs)
        save_tensors(init, model.state_dict())
    for bank, checkpoint in (("source", src / "model.safetensors"), ("prior", None), ("timm_init", init)):
        art = root / (f"art-prior-{vae_key(vae)}{tag}" if bank == "prior" else f"art-{bank}"
                      + ("" if bank == "source" else tag))
        if not (art / "report.json").is_file():
            generate(GenerateOptions(arch=spec["arch"], checkpoint=str(checkpoint) if checkpoint else None,
                                     model_kwargs=kwargs, preset=spec["preset"], out=str(art), overwrite=True,
                                     vae=vae if bank == "prior" else None, seed=0 if bank == "source" else bank_seed))
        out[bank] = str(art)
    return out


def step_cost(model, x, y, steps: int) -> dict:
    """Seconds per training step (forward, backward, AdamW) and the memory one step holds, counted:
    parameters + buffers, gradients and AdamW state of the trainable ones, activations saved for backward."""
    import torch
    import torch.nn.functional as F

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def one_step(record: bool):
        opt.zero_grad(set_to_none=True)
        if record:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    one_step(record=True)
    one_step(record=False)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        one_step(record=False)
    seconds = (time.perf_counter() - start) / steps
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    static = sum(t.numel() * t.element_size() for t in tensors.values())
    trainable = sum(p.numel() * p.element_size() for p in params)
    activations = sum(saved.values())
    return {"seconds_per_step": seconds, "memory_mb": (static + 3 * trainable + activations) / 2**20,
            "activations_mb": activations / 2**20}


def run_job(job: dict, settings: dict) -> dict:
    from weightgen.adapt import extend_banks, get_method
    from weightgen.adapt.incremental import model_batch, open_backbone, prepare_model, run_sequence
    from weightgen.adapt.trainer import TrainConfig
    from weightgen.data import get_task

    bank = job["bank"]
    art = job["artifacts"]["source" if bank.startswith("source") else bank]
    backbone = open_backbone(art, IMG_SIZE)
    if "+" in bank:  # e.g. source+pca2: 2 extra templates per bank from PCA of the other banks
        extra = bank.split("+", 1)[1]
        source, count = extra.rstrip("0123456789"), int(extra[len(extra.rstrip("0123456789")):])
        backbone.transform = lambda model: extend_banks(model, count, source=source, seed=0)
    # a job may override the protocol (bench_adapt_gap.py: learning rate and epochs of coefficient-only runs)
    config = TrainConfig(epochs=job.get("epochs", settings["epochs"]), batch_size=settings["batch_size"],
                         lr=job.get("lr", TrainConfig.lr))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_sequence(backbone, job["method"], settings["tasks"], settings["seeds"], config, tmp,
                              max_train=settings["max_train"], max_eval=settings["max_eval"])
    out = {**job, "rows": result["rows"], "matrices": {str(k): v for k, v in result["matrices"].items()},
           "exact_switch": result["exact_switch"], "seconds": time.perf_counter() - start}
    if bank == "source":
        task = get_task(settings["tasks"][0], settings["seeds"][0], max_train=settings["batch_size"], max_eval=8)
        x, y = model_batch(settings["tasks"][0], backbone, settings["seeds"][0], settings["batch_size"])
        model = prepare_model(backbone, get_method(job["method"]), task.num_classes, 0)
        out["step"] = step_cost(model, x[:settings["batch_size"]], y[:settings["batch_size"]], settings["step_steps"])
    return out


def worker(spec_path: str) -> int:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    import pytorch_lightning  # noqa: F401  (its import sets INFO; silence after)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    spec = json.loads(Path(spec_path).read_text())
    if spec["kind"] == "prepare":
        result = prepare(spec["backbone"], spec["settings"], Path(spec["cache"]), spec.get("vae"),
                         spec.get("bank_seed", 0))
    else:
        result = [run_job(job, spec["settings"]) for job in spec["jobs"]]
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------ parent side (no torch)

def call_worker(spec: dict, timeout: float) -> tuple[object, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        measured = run_measured([sys.executable, __file__, "--worker", str(Path(tmp) / "spec.json")],
                                timeout=timeout, env=env, cwd=REPO)
        if measured["rc"] != 0:
            tail = (measured["stderr"] or measured["stdout"]).strip().splitlines()[-15:]
            raise RuntimeError(f"worker failed (rc {measured['rc']}):\n" + "\n".join(tail))
        return json.loads(Path(spec["result"]).read_text()), measured


def mean_over_tasks(rows: list[dict], seeds: list[int]) -> tuple[float, float]:
    """Mean over tasks of test accuracy, then mean +- std over seeds."""
    per_seed = [statistics.fmean(r["test_acc"] for r in rows if r["seed"] == s) for s in seeds]
    return statistics.fmean(per_seed), (statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0)


def per_task(rows: list[dict], task: str) -> tuple[float, float]:
    accs = [r["test_acc"] for r in rows if r["task"] == task]
    return statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def max_forgetting(matrices: dict) -> float:
    return max((abs(m[i][j] - m[j][j]) for m in matrices.values() for i in range(len(m)) for j in range(i + 1)),
               default=0.0)


def summarize(results: list[dict], settings: dict) -> dict:
    out: dict = {}
    for r in results:
        rows = r["rows"]
        acc, std = mean_over_tasks(rows, settings["seeds"])
        entry = {
            "mean_acc": acc, "std_acc": std,
            "per_task": {t: per_task(rows, t) for t in settings["tasks"]},
            "trainable": rows[0]["trainable"], "trainable_with_head": rows[0]["trainable_with_head"],
            "task_file_bytes": statistics.fmean(x["task_file_bytes"] for x in rows),
            "train_seconds": statistics.fmean(x["train_seconds"] for x in rows),
            "train_seconds_per_step": statistics.fmean(x["seconds_per_step"] for x in rows),
            "exact_switch": r["exact_switch"], "max_forgetting": max_forgetting(r["matrices"]),
            "peak_rss_mb": r.get("peak_rss_mb"), "step": r.get("step"), "matrices": r["matrices"],
        }
        out.setdefault(r["backbone"], {}).setdefault("methods" if r["bank"] == "source" else "banks", {})
        key = r["method"] if r["bank"] == "source" else r["bank"]
        out[r["backbone"]]["methods" if r["bank"] == "source" else "banks"][key] = entry
        if r["bank"] == "source" and r["method"] == "recast":
            out[r["backbone"]].setdefault("banks", {})["source"] = entry
    return out


def targets(summary: dict) -> list[tuple[str, bool, str]]:
    checks = []
    for name, s in summary.items():
        m = s["methods"]
        exact = all(e["exact_switch"] for e in m.values()) and all(e["exact_switch"] for e in s.get("banks", {}).values())
        forget = max(e["max_forgetting"] for e in m.values())
        checks.append((f"{name}: zero forgetting, bit-exact task switching (every method)", exact and forget == 0,
                       f"exact switch {'all' if exact else 'NOT all'}; max forgetting {forget:.4f}"))
        if "recast" in m and "linear" in m:
            checks.append((f"{name}: recast beats linear (mean over tasks)", m["recast"]["mean_acc"] > m["linear"]["mean_acc"],
                           f"recast {m['recast']['mean_acc']:.3f} vs linear {m['linear']['mean_acc']:.3f}"))
        if "recast+melo" in m and "lora" in m:
            checks.append((f"{name}: recast+melo >= lora at r=1", m["recast+melo"]["mean_acc"] >= m["lora"]["mean_acc"],
                           f"recast+melo {m['recast+melo']['mean_acc']:.3f} vs lora {m['lora']['mean_acc']:.3f}"))
        if "full" in m and "recast" in m and m["recast"]["step"] and m["full"]["step"]:
            r, f = m["recast"]["step"]["seconds_per_step"], m["full"]["step"]["seconds_per_step"]
            checks.append((f"{name}: coefficient-only costs no more per step than full fine-tuning", r <= f,
                           f"recast {r * 1000:.1f} ms vs full {f * 1000:.1f} ms per step of "
                           f"{m['recast']['step'].get('batch', 64)}"))
        if "full" in m:
            full = m["full"]
            coef = {k: v for k, v in {**{f"method {k}": v for k, v in m.items() if k in COEFFICIENT_ONLY},
                                      **{f"banks {k}": v for k, v in s.get("banks", {}).items()}}.items()}
            best_name, best = max(coef.items(), key=lambda kv: kv[1]["mean_acc"])
            ratio, size = best["mean_acc"] / full["mean_acc"], best["task_file_bytes"] / full["task_file_bytes"]
            checks.append((f"{name}: best coefficient-only >= 90% of full's accuracy at <= 1% of its bytes",
                           ratio >= 0.9 and size <= 0.01,
                           f"{best_name}: {best['mean_acc']:.3f} = {ratio:.0%} of full's {full['mean_acc']:.3f}, "
                           f"{best['task_file_bytes']:,.0f} B = {size:.2%} of full's {full['task_file_bytes']:,.0f} B"))
        banks = s.get("banks", {})
        extra = {k: v for k, v in banks.items() if k.startswith("source+")}
        if "source" in banks and extra:
            best_name, best = max(extra.items(), key=lambda kv: kv[1]["mean_acc"])
            checks.append((f"{name}: (d) extra templates raise coefficient-only accuracy over (a)",
                           best["mean_acc"] > banks["source"]["mean_acc"],
                           f"{best_name} {best['mean_acc']:.3f} vs source {banks['source']['mean_acc']:.3f}"))
    return checks


def report(data: dict) -> str:
    settings, summary = data["settings"], data["summary"]
    tasks = settings["tasks"]
    lines = [f"# Adaptation benchmark{' (quick)' if data['quick'] else ''}", "",
             f"Tasks {', '.join(tasks)}; seeds {', '.join(map(str, settings['seeds']))}; {settings['epochs']} epochs, "
             f"batch {settings['batch_size']}, at most {settings['max_train']} training images per task, "
             f"input {IMG_SIZE}px. AdamW lr 2e-3, wd 1e-6, StepLR x0.1 at 1/3 and 2/3, clip 1.0; the epoch kept is "
             "the best on a validation split carved from the training data; test accuracy reported once. "
             "Accuracy: mean over tasks, then mean +- std over seeds.", "",
             f"Wall time {data['wall_s'] / 60:.1f} min with {data['jobs']} parallel jobs "
             f"({data['machine']['cpus']} CPUs, {data['machine']['cpu']}); load average at start "
             f"{data['machine']['loadavg']}.", ""]
    for name, s in summary.items():
        p = data["prepared"][name]["pretrain"]
        lines += [f"## {name} ({BACKBONES[name]['arch']}, {BACKBONES[name]['kwargs']})", "",
                  f"Source backbone: test accuracy {p['test_acc']:.3f} on the source glyph task "
                  f"({p['steps']} steps, {p['seconds']:.0f} s).", ""]
        rows = []
        for method, e in s["methods"].items():
            step = e["step"] or {}
            rows.append([method, f"{e['mean_acc']:.3f} +- {e['std_acc']:.3f}",
                         *[f"{e['per_task'][t][0]:.3f}" for t in tasks], f"{e['trainable']:,}",
                         f"{e['trainable_with_head']:,}", f"{e['task_file_bytes']:,.0f}", f"{e['train_seconds']:.1f}",
                         f"{step.get('seconds_per_step', float('nan')) * 1000:.1f}", f"{step.get('memory_mb', float('nan')):.1f}",
                         f"{e['peak_rss_mb']:.0f}" if e["peak_rss_mb"] else "-",
                         "yes" if e["exact_switch"] else "NO", f"{e['max_forgetting']:.3f}"])
        lines.append(markdown_table(["method", "test acc", *tasks, "trainable", "+ head", "bytes / task", "train s / task",
                                     "ms / step", "step MB", "job peak RSS MB", "exact switch", "max forgetting"], rows))
        lines += ["", "Bank sources for coefficient-only adaptation (method `recast`), question (d):", ""]
        lines.append(markdown_table(["banks from", "test acc", *tasks, "trainable", "+ head", "bytes / task"], [
            [b, f"{e['mean_acc']:.3f} +- {e['std_acc']:.3f}", *[f"{e['per_task'][t][0]:.3f}" for t in tasks],
             f"{e['trainable']:,}", f"{e['trainable_with_head']:,}", f"{e['task_file_bytes']:,.0f}"]
            for b, e in s.get("banks", {}).items()]))
        rec = s["methods"].get("recast")
        if rec:
            mats = list(rec["matrices"].values())
            lines += ["", "Accuracy matrix, `recast` (row: after learning that task; mean over seeds):", ""]
            lines.append(markdown_table(["after", *tasks], [
                [tasks[i], *[("" if mats[0][i][j] is None else f"{statistics.fmean(m[i][j] for m in mats):.3f}")
                             for j in range(len(tasks))]] for i in range(len(tasks))]))
        lines.append("")
    lines += ["## Targets", ""]
    lines.append(markdown_table(["target", "met", "numbers"], [[t, "yes" if ok else "**no**", n]
                                                                 for t, ok, n in data["targets"]], "lll"))
    lines += ["", "Notes: `ms / step` and `step MB` come from a separate measurement of forward + backward + AdamW "
              f"on one batch of {settings['batch_size']} (memory counted: parameters and buffers, gradients and "
              "AdamW state of the trainable ones, activations saved for backward). RECAST layers combine each "
              "bank's weight once per forward, not per sample. Task files hold what the method trains plus every "
              "BatchNorm buffer (exact switching), so a ResNet's coefficient-only file is dominated by its "
              "BatchNorm statistics and head.", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    summary = data["summary"]
    fig = Figure(figsize=(6 * len(summary), 8), layout="constrained")
    axes = fig.subplots(2, len(summary), squeeze=False)
    for col, (name, s) in enumerate(summary.items()):
        ax = axes[0][col]
        for method, e in s["methods"].items():
            ax.errorbar(e["task_file_bytes"], e["mean_acc"], yerr=e["std_acc"], fmt="o", capsize=3)
            ax.annotate(method, (e["task_file_bytes"], e["mean_acc"]), fontsize=8, xytext=(4, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("bytes per task file")
        ax.set_ylabel("test accuracy (mean over tasks)")
        ax.set_title(f"{name}: accuracy vs storage per task")
        banks = s.get("banks", {})
        bx = axes[1][col]
        bx.bar(range(len(banks)), [e["mean_acc"] for e in banks.values()], yerr=[e["std_acc"] for e in banks.values()],
               capsize=4)
        bx.set_xticks(range(len(banks)), list(banks), rotation=20, ha="right")
        bx.set_ylim(0, 1)
        bx.set_ylabel("test accuracy, method recast")
        bx.set_title(f"{name}: where the banks come from")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 tasks, tiny budgets (<= 2 min)")
    p.add_argument("--backbones", nargs="*", default=list(BACKBONES), help="subset of " + ", ".join(BACKBONES))
    p.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one torch thread each)")
    p.add_argument("--cache", default=str(REPO / "outputs" / "bench_adapt_cache"), help="pretrained backbones, artifacts")
    p.add_argument("--out", help="where bench_adapt[_quick].{md,json,png} go (default: docs/; --quick: outputs/)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--vae", help="VAE directory the `prior` banks are sampled from (default: the shipped one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    settings = QUICK if args.quick else FULL
    start = time.perf_counter()
    machine = machine_info()
    with ThreadPoolExecutor(args.jobs) as pool:
        prepared = dict(zip(args.backbones, [r[0] for r in pool.map(
            lambda b: call_worker({"kind": "prepare", "backbone": b, "settings": settings, "cache": args.cache,
                                   "vae": args.vae}, args.timeout), args.backbones)]))
        jobs = [{"backbone": b, "method": m, "bank": "source", "artifacts": prepared[b]}
                for b in args.backbones for m in settings["methods"][b]]
        jobs += [{"backbone": b, "method": "recast", "bank": bank, "artifacts": prepared[b]}
                 for b in args.backbones for bank in settings["banks"] if bank != "source"]
        # quick: one process per backbone (imports dominate); full: one per job (its own peak RSS)
        groups = [[j for j in jobs if j["backbone"] == b] for b in args.backbones] if args.quick else [[j] for j in jobs]
        groups.sort(key=lambda g: -sum(j["method"] == "full" or j["backbone"].startswith("vit") for j in g))
        results = []
        for group_results, measured in pool.map(
                lambda g: call_worker({"kind": "run", "jobs": g, "settings": settings}, args.timeout), groups):
            for r in group_results:
                r["peak_rss_mb"] = None if args.quick else measured["peak_rss_mb"]
                print(f"{r['backbone']:<14} {r['method']:<20} {r['bank']:<16} "
                      f"acc {mean_over_tasks(r['rows'], settings['seeds'])[0]:.3f}  {r['seconds']:.0f}s", flush=True)
                results.append(r)
    summary = summarize(results, settings)
    data = {"quick": args.quick, "settings": settings, "jobs": args.jobs, "machine": machine, "prepared": prepared,
            "summary": summary, "wall_s": time.perf_counter() - start, "results": results}
    data["targets"] = targets(summary)
    out = Path(args.out or REPO / ("outputs" if args.quick else "docs"))
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_adapt_quick" if args.quick else "bench_adapt"
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(report(data))
    plot(data, out / f"{stem}.png")
    print(report(data))
    print(f"wrote {out / stem}.{{md,json,png}} in {data['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
