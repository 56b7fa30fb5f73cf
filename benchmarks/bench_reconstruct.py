#!/usr/bin/env python
"""Whole-model reconstruction through the VAE: a digits-trained model, every non-head Linear/Conv2d weight
rebuilt by ``scripts/reconstruct.py`` (``encode``, ``mimic``), side by side with an older checkout.

    python benchmarks/bench_reconstruct.py --threads 2    # writes docs/bench_reconstruct.{md,json}
    python benchmarks/bench_reconstruct.py --checkpoint /tmp/r10t.safetensors --before /tmp/wg-old \\
        --runs encode mimic mimic-50 --before-runs mimic   # reuse a trained model; an old checkout's mimic beside
    python benchmarks/bench_reconstruct.py --checkpoint /tmp/r10t.safetensors --before /tmp/wg-main --runs mimic \\
        --threads 1 2 --repeats 3 --stem bench_reconstruct_speed   # time: medians of alternating processes

The model is trained here once (seeded, ``weightgen.classifier.train_classifier`` on the inputs
``weightgen.data`` gives for the ``digits`` task) and saved to ``--checkpoint`` (reused when it exists).
Each row is one fresh ``scripts/reconstruct.py --keep-head`` process (the command a user runs; wall and
CPU seconds include start-up), from this checkout or, for ``--before-runs``, from ``--before``, run one
after the other in the same call, so the two sides share the machine's load. Accuracy is measured here
from the written weights: as written, and after BatchNorm re-estimation on the train split. With
``--repeats N`` every row is N processes (before and now alternating, so both meet the same load) and
the table shows median seconds; ``--threads`` gives each thread count its own rows.
"""
from __future__ import annotations

import argparse
import json
import os
import filecmp
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, run_measured, write_outputs  # noqa: E402

RUNS = {  # row name -> reconstruct.py arguments (besides arch, checkpoint, kwargs, --keep-head, --out)
    "encode": ["--mode", "encode"],
    "mimic": ["--mode", "mimic"],  # the defaults: what `--mode mimic` does
    "mimic-50": ["--mode", "mimic", "--steps", "50", "--patience", "0"],  # the old default's steps, every one run
    "behaviour": ["--mode", "mimic", "--probe-task", "digits"],  # outputs + weights on the task's train split
}


def accuracy_of(arch: str, kwargs: dict, weights: dict, data) -> tuple[float, float]:
    """(test accuracy as written, test accuracy after BatchNorm re-estimation on the train split)."""
    import timm

    from weightgen.classifier import evaluate, reestimate_batchnorm

    model = timm.create_model(arch, **kwargs)
    model.load_state_dict(weights, strict=True)
    raw = evaluate(model, data.test)
    reestimate_batchnorm(model, data.train)
    return raw, evaluate(model, data.test)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _commit(checkout: Path) -> str:
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    marker = checkout / ".commit"  # a `git archive` export has no git: a .commit file names it
    return head.stdout.strip() or (marker.read_text().strip() if marker.is_file() else "unknown")


def run_row(checkout: Path, args: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    load, cpu, system = round(os.getloadavg()[0], 2), _children_cpu(), _children_sys()
    run = run_measured([sys.executable, str(checkout / "scripts" / "reconstruct.py"), *args], cwd=checkout, env=env)
    if run["rc"] != 0:
        raise SystemExit(f"reconstruct.py {' '.join(args)} ({checkout}) failed: {run['stderr'][-600:]}")
    return {"wall_s": run["wall_s"], "cpu_s": _children_cpu() - cpu, "sys_s": _children_sys() - system,
            "load_at_start": load, "peak_rss_mb": run["peak_rss_mb"]}


def _children_sys() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime


_TIMES = ("wall_s", "cpu_s", "sys_s", "load_at_start", "peak_rss_mb", "fit_cpu_seconds", "fit_seconds")


def _medians(runs: list[dict]) -> dict:
    """The first run's record with each time replaced by the median over ``runs`` (ranges kept beside)."""
    merged = {**runs[0], "repeats": len(runs)}
    for key in _TIMES:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            merged[key], merged[f"range_{key}"] = statistics.median(values), [min(values), max(values)]
    return merged


def measure_all(args, before_threads: list[int]) -> tuple[dict, list[float]]:
    """Train or load the model, run every row; returns the results and the load average at the start."""
    import timm
    import torch
    from safetensors.torch import load_file, save_file
    from weightgen.classifier import evaluate, train_classifier
    from weightgen.data import model_splits
    from weightgen.models import small_input_kwargs

    torch.set_num_threads(args.threads[0])
    load_start = [round(x, 2) for x in os.getloadavg()]
    data = model_splits("digits", args.seed, 32, 1)
    kwargs = small_input_kwargs(args.arch, 32, 1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "model.safetensors"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = timm.create_model(args.arch, **kwargs)
        train_seconds = None
        if ckpt.is_file():
            model.load_state_dict(load_file(str(ckpt)), strict=True)
        else:
            start = time.perf_counter()
            train_classifier(model, data, args.train_steps, seed=args.seed, progress=True)
            train_seconds = time.perf_counter() - start
            save_file(model.state_dict(), str(ckpt))
        original_acc = evaluate(model, data.test)
        _, original_bn = accuracy_of(args.arch, kwargs, load_file(str(ckpt)), data)
        results = {"arch": args.arch, "model_kwargs": kwargs, "train_steps": args.train_steps, "threads": args.threads,
                   "repeats": args.repeats,
                   "train_seconds": train_seconds, "params": sum(p.numel() for p in model.parameters()),
                   "test_images": len(data.test.tensors[1]), "vae": args.vae,
                   "original": {"test_accuracy": original_acc, "after_bn_reestimation": original_bn}, "rows": []}
        sides = [("before", Path(args.before).resolve(), [r for r in args.runs if r in args.before_runs])] \
            if args.before else []
        sides.insert(0, ("now", REPO, args.runs))
        plan = [(run, threads, label, checkout) for run in args.runs for threads in args.threads
                for label, checkout, runs in sides if run in runs and (label == "now" or threads in before_threads)]
        # before, then now, per run and thread count
        plan.sort(key=lambda item: (list(RUNS).index(item[0]), args.threads.index(item[1]), item[2] != "before"))
        kw = [f"{k}={v}" for k, v in kwargs.items()]
        groups = {}  # (run, threads) -> its rows, measured side by side
        for item in plan:
            groups.setdefault(item[:2], []).append(item)
        for (run, threads), items in groups.items():
            measured: dict = {}
            for rep in range(args.repeats):  # alternating: both sides meet the same load
                for _, _, label, checkout in items:
                    out = Path(tmp) / f"{run}-{threads}-{label}-{rep}"
                    run_args = list(RUNS[run])
                    if label == "before" and "--patience" in run_args:  # an older reconstruct.py may not know it
                        at = run_args.index("--patience")
                        del run_args[at:at + 2]
                    cli = ["--arch", args.arch, "--checkpoint", str(ckpt), "--model-kwargs", *kw, "--keep-head",
                           "--seed", str(args.seed), "--out", str(out), *run_args] + (["--vae", args.vae] if args.vae else [])
                    m = run_row(checkout, cli, threads)
                    report = json.loads((out / "report.json").read_text())
                    m.update(fit_seconds=report.get("fit_seconds"), fit_cpu_seconds=report.get("fit_cpu_seconds"))
                    first = Path(tmp) / f"{run}-{threads}-{label}-0"
                    if rep:  # the same weights each time (a thread count's own rounding, but no randomness)
                        m["same_weights_as_first"] = filecmp.cmp(out / "weights.safetensors",
                                                                 first / "weights.safetensors", shallow=False)
                        shutil.rmtree(out)
                    measured.setdefault(label, {"report": report, "dir": first, "checkout": checkout,
                                                "runs": []})["runs"].append(m)
            for label, side in measured.items():
                report, checkout = side["report"], side["checkout"]
                raw, bn = accuracy_of(args.arch, kwargs, load_file(str(side["dir"] / "weights.safetensors")), data)
                selection = report.get("selection") or {}
                row = {"run": run, "code": label, "commit": _commit(checkout), "args": RUNS[run], "threads": threads,
                       **_medians(side["runs"]), "runs": side["runs"],
                       "steps": report["steps"], "steps_run": selection.get("stopped_step", report["steps"]),
                       "kept_step": selection.get("kept_step"), "totals": report["totals"],
                       "logits_rel_error": report["function"]["logits_rel_error"],
                       "test_accuracy": raw, "after_bn_reestimation": bn, "loss_history": report["loss_history"],
                       "scores": selection.get("scores")}
                results["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("loss_history", "scores")}), flush=True)
            if set(measured) == {"before", "now"}:
                pair = [measured[k]["dir"] / "weights.safetensors" for k in ("before", "now")]
                results["rows"][-1]["same_weights_as_before"] = filecmp.cmp(*pair, shallow=False)
            for side in measured.values():
                shutil.rmtree(side["dir"], ignore_errors=True)
    return results, load_start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet10t", help="timm architecture trained on digits")
    p.add_argument("--train-steps", type=int, default=300, help="training steps of the digits model")
    p.add_argument("--checkpoint", help="the trained model: reused when the file exists, else trained and saved "
                                        "there (default: trained into a temporary directory)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=["encode", "mimic", "mimic-50", "behaviour"])
    p.add_argument("--before", help="an older checkout whose reconstruct.py runs --before-runs beside this one's")
    p.add_argument("--before-runs", nargs="*", choices=list(RUNS), default=["mimic"])
    p.add_argument("--vae", help="VAE directory (default: each checkout's shipped one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's init, training, split and probe")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="torch threads (OMP_NUM_THREADS) of the processes, one set of rows per value (the target is for 2)")
    p.add_argument("--before-threads", type=int, nargs="*",
                   help="thread counts at which the --before checkout runs (default: every --threads value)")
    p.add_argument("--repeats", type=int, default=1, help="processes per row, before and now alternating; medians shown")
    p.add_argument("--stem", default="bench_reconstruct", help="docs/STEM.{md,json}")
    p.add_argument("--out", default="docs", help="where STEM.{md,json} go")
    p.add_argument("--note-file", help="a text file whose paragraphs go under the table")
    p.add_argument("--results-from", metavar="JSON",
                   help="STEM.json of an earlier run: render its rows again (with --note-file), measuring nothing")
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.threads) < 1:
        p.error("--repeats and --threads must be >= 1")
    before_threads = args.threads if args.before_threads is None else args.before_threads

    if args.results_from:  # re-render an earlier run (e.g. with a note), measuring nothing
        earlier = json.loads(Path(args.results_from).read_text())
        load_start, info = earlier.pop("loadavg_start"), earlier.pop("machine")
        results = earlier
        info["rendered"] = machine_info()["date_utc"]
    else:
        results, load_start = measure_all(args, before_threads)
        info = machine_info()
        info["before_commit"] = _commit(Path(args.before).resolve()) if args.before else None
    original_acc, original_bn = results["original"]["test_accuracy"], results["original"]["after_bn_reestimation"]
    note = Path(args.note_file).read_text().strip() if args.note_file else ""
    results["note"] = note
    table = [["original", "-", "-", "-", "-", "-", "-", "-", f"{original_acc:.2%}", f"{original_bn:.2%}", "-", "-", "-",
              "-", "-"]]

    def spread(r: dict, key: str) -> str:
        return f"{r[key]:.1f}" + (f" ({r['range_' + key][0]:.1f}-{r['range_' + key][1]:.1f})"
                                  if r.get("repeats", 1) > 1 else "")

    for r in results["rows"]:
        t = r["totals"]
        steps = "-" if not r["steps"] else f"{r['steps_run']} of {r['steps']} (kept {r['kept_step']})"
        table.append([r["run"], f"{r['code']} ({r['commit']})", r["threads"], r.get("repeats", 1), steps,
                      f"{t['mean_cosine']:.4f}", f"{t['min_cosine']:.4f}", f"{r['logits_rel_error']:.3f}",
                      f"{r['test_accuracy']:.2%}", f"{r['after_bn_reestimation']:.2%}", spread(r, "wall_s"),
                      spread(r, "cpu_s"), f"{r['sys_s']:.1f}",
                      spread(r, "fit_cpu_seconds") if r["fit_cpu_seconds"] is not None else "-",
                      f"{r['load_at_start']:.2f}"])
    ratios = []
    for run in RUNS:
        for threads in results["threads"]:
            pair = {r["code"]: r for r in results["rows"] if r["run"] == run and r["threads"] == threads}
            if {"before", "now"} <= set(pair):
                same = pair["now"].get("same_weights_as_before")
                ratios.append(f"`{run}`, {threads} thread(s): now / before = "
                              f"{pair['now']['cpu_s'] / pair['before']['cpu_s']:.2f}x CPU seconds, "
                              f"{pair['now']['wall_s'] / pair['before']['wall_s']:.2f}x wall seconds"
                              + ("" if same is None else "; weights.safetensors byte-identical" if same
                                 else "; weights.safetensors differ"))
    results["ratios"] = ratios
    before_note = (f" `before` rows run commit {info['before_commit']} (with its own defaults: the steps column "
                   f"says how many it ran); `now` rows this checkout." if info.get("before_commit") else "")
    md = (f"# Whole-model reconstruction through the VAE\n\n`{info['command']}`, {info['date_utc']}, "
          f"{info['cpu']} ({info['cpus']} cores, torch threads {', '.join(map(str, results['threads']))} as the rows say, load average "
          f"{load_start[0]} at the start, {info['loadavg'][0]} at the end: the machine is shared, so seconds are "
          f"upper bounds; compare rows by their load), commit {info['git_commit']}.\n\n"
          f"{results['arch']} ({results['params']:,} parameters, {json.dumps(results['model_kwargs'])}) trained "
          f"{results['train_steps']} steps on the "
          f"`digits` task; every Linear/Conv2d weight except the classifier head rebuilt through the VAE "
          f"({results['vae'] or 'the shipped one'}) by one `scripts/reconstruct.py --keep-head` process per row "
          f"(arguments in the json); the rows ran one after the other ({results.get('repeats', 1)} process(es) per row, before "
          f"and now alternating; seconds are medians with their range).{before_note} `mimic` is the default "
          f"command (no probe task: weights only, BatchNorm statistics copied); `mimic-50` runs 50 steps with no "
          f"early stop; `behaviour` adds `--probe-task digits` (outputs + weights, BatchNorm re-estimated). Steps: "
          f"run of requested (the step whose state was kept on validation, 0 = the encode start). Test accuracy "
          f"on the {results['test_images']} digits test images from the written weights, and after BatchNorm "
          f"re-estimation on the train split. Logit error: ||f_hat - f|| / ||f|| on the function-check inputs. "
          f"Seconds: wall and CPU (user + system, all threads) of the whole process, start-up and imports "
          f"included; sys s: the system part of cpu s (page faults, mostly); fit cpu s: the mimic loop alone "
          f"(steps and validation checks); load: the 1-minute load average when each process started (median).\n\n"
          + markdown_table(["run", "code", "threads", "runs", "steps", "mean cos", "min cos", "logit error",
                            "test acc", "after BN re-est.", "wall s", "cpu s", "sys s", "fit cpu s", "load"], table) + "\n"
          + ("\n" + "\n".join(f"- {line}" for line in ratios) + "\n" if ratios else "")
          + (f"\n{note}\n" if note else ""))
    write_outputs(args.out, args.stem, md, {"machine": info, "loadavg_start": load_start, **results},
                  newline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
