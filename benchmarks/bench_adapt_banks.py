#!/usr/bin/env python
"""Banks from a VAE's prior vs banks from timm's init, for coefficient-only adaptation (issue 8, target 5).

Runs only method `recast` of `bench_adapt.py`, with banks from (a) the prior of ``--vae`` and
(b) timm's random init, on its backbones (the cached pretrained ones: no pretraining), tasks, seeds
and protocol, at the protocol's learning rate (2e-3) and at 2e-2 (``bench_adapt_gap.py``: the larger
rate closes most of the coefficient-only gap). ``--compare-vae`` adds the prior of a second VAE
(e.g. the shipped one). The prior artifact is cached per VAE (a hash of its files), and every run's
result per (settings, backbone, banks, lr, artifact), so a rerun with a new VAE trains only its own
rows. The old prior's row of ``docs/bench_adapt.json`` is shown as read from that file.

    python benchmarks/bench_adapt_banks.py --vae DIR                      # docs/bench_adapt_banks.{md,json}
    python benchmarks/bench_adapt_banks.py --tasks digits --seeds 42 --epochs 1 --jobs 1 --out outputs  # smoke
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapt as ba  # noqa: E402
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

LRS = [2e-3, 2e-2]  # the protocol's, and bench_adapt_gap.py's
PROTOCOL_LR = 2e-3


def result_key(settings: dict, job: dict) -> str:
    """What a run's result depends on: the protocol, the backbone, the banks' artifact (path and report), the lr."""
    art = Path(job["artifacts"][job["bank"]])
    report = (art / "report.json").read_bytes() if (art / "report.json").is_file() else b""
    fields = [{k: settings[k] for k in ("tasks", "seeds", "epochs", "max_train", "max_eval", "batch_size")},
              job["backbone"], job["method"], job["bank"], job["lr"], str(art), hashlib.sha256(report).hexdigest()]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def run_cached(job: dict, settings: dict, results: Path, timeout: float) -> dict:
    path = results / f"{job['backbone']}-{job['bank']}-lr{job['lr']:g}-{result_key(settings, job)}.json"
    if path.is_file():
        written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
        return {**json.loads(path.read_text()), "label": job["label"], "cached": written}
    out = ba.call_worker({"kind": "run", "jobs": [job], "settings": settings}, timeout)[0][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)  # a killed run leaves no half-written result
    return {**out, "cached": None}


def entry(rows: list[dict], settings: dict) -> dict:
    acc, std = ba.mean_over_tasks(rows, settings["seeds"])
    return {"mean_acc": acc, "std_acc": std, "per_task": {t: ba.per_task(rows, t)[0] for t in settings["tasks"]},
            "trainable": rows[0]["trainable"]}


def paired_wins(a: list[dict], b: list[dict]) -> tuple[int, int]:
    """(task, seed) pairs where ``a``'s test accuracy is above ``b``'s, out of all pairs."""
    bs = {(r["task"], r["seed"]): r["test_acc"] for r in b}
    pairs = [(r["test_acc"], bs[(r["task"], r["seed"])]) for r in a if (r["task"], r["seed"]) in bs]
    return sum(x > y for x, y in pairs), len(pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", help="VAE directory whose prior gives the `prior` banks (default: the shipped one)")
    p.add_argument("--vae-name", help="its name in the tables (default: the directory's path)")
    p.add_argument("--compare-vae", help="a second VAE directory whose prior is run too (e.g. weightgen/assets/vae)")
    p.add_argument("--compare-name", help="its name in the tables (default: the directory's path)")
    p.add_argument("--bank-seed", type=int, default=0,
                   help="which draw of the prior and of timm's init the banks come from (0: bench_adapt's)")
    p.add_argument("--lrs", type=float, nargs="+", default=LRS, help="learning rates of the coefficient-only runs")
    p.add_argument("--backbones", nargs="+", default=list(ba.BACKBONES), choices=list(ba.BACKBONES))
    p.add_argument("--tasks", nargs="+", help="subset of the protocol's tasks (default: all, " +
                   ", ".join(ba.FULL["tasks"]) + ")")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the protocol's)")
    p.add_argument("--epochs", type=int, help="epochs per task (default: the protocol's)")
    p.add_argument("--reference", default=str(REPO / "docs" / "bench_adapt.json"), help="bench_adapt.py's full run")
    p.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one torch thread each)")
    p.add_argument("--cache", default=str(REPO / "outputs" / "bench_adapt_cache"), help="bench_adapt.py's cache")
    p.add_argument("--out", default=str(REPO / "docs"), help="where bench_adapt_banks.{md,json} go")
    p.add_argument("--stem", default="bench_adapt_banks", help="their file name without extension")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    args = p.parse_args(argv)
    if any(not lr > 0 for lr in args.lrs):
        p.error("--lrs must be > 0")
    for flag, vae in (("--vae", args.vae), ("--compare-vae", args.compare_vae)):
        if vae and not (Path(vae) / "vae.safetensors").is_file():
            p.error(f"{flag} {vae}: no vae.safetensors there")
    # the pretrain key reads pretrain_scale / pretrain_max_train: FULL's, so the cached backbones are reused
    settings = {**ba.FULL, "tasks": args.tasks or ba.FULL["tasks"], "seeds": args.seeds or ba.FULL["seeds"],
                "epochs": args.epochs or ba.FULL["epochs"]}
    unknown = set(settings["tasks"]) - set(ba.FULL["tasks"])
    if unknown:
        p.error(f"unknown tasks {sorted(unknown)}; choose from {ba.FULL['tasks']}")
    protocol = all(settings[k] == ba.FULL[k] for k in ("tasks", "seeds", "epochs"))
    vaes = {"new": args.vae}
    if args.compare_vae:
        vaes["compare"] = args.compare_vae
    names = {"new": args.vae_name or (args.vae or "shipped VAE"), "compare": args.compare_name or args.compare_vae}
    keys = {k: ba.vae_key(v) for k, v in vaes.items()}
    start = time.perf_counter()
    machine = machine_info()
    results_dir = Path(args.cache) / "bench_adapt_banks_results"
    with ThreadPoolExecutor(args.jobs) as pool:
        specs = [(b, k) for b in args.backbones for k in vaes]
        prepared = dict(zip(specs, [r[0] for r in pool.map(
            lambda s: ba.call_worker({"kind": "prepare", "backbone": s[0], "settings": settings, "cache": args.cache,
                                      "vae": vaes[s[1]], "bank_seed": args.bank_seed}, args.timeout), specs)]))
        jobs = []
        for b in args.backbones:
            for lr in args.lrs:
                for k in vaes:
                    jobs.append({"backbone": b, "method": "recast", "bank": "prior", "lr": lr,
                                 "label": f"prior: {names[k]} ({keys[k]})", "vae": k, "artifacts": prepared[(b, k)]})
                jobs.append({"backbone": b, "method": "recast", "bank": "timm_init", "lr": lr, "label": "timm_init",
                             "artifacts": prepared[(b, "new")]})
        runs = []
        for r in pool.map(lambda j: run_cached(j, settings, results_dir, args.timeout), jobs):
            print(f"{r['backbone']:<14} lr {r['lr']:<6g} {r['label']:<40} acc "
                  f"{ba.mean_over_tasks(r['rows'], settings['seeds'])[0]:.3f}  {r['seconds']:.0f}s"
                  f"{' (cached ' + r['cached'] + ')' if r['cached'] else ''}", flush=True)
            runs.append(r)

    reference = json.loads(Path(args.reference).read_text()) if Path(args.reference).is_file() else None
    ref_lr = f"{PROTOCOL_LR:g}"
    tasks = settings["tasks"]
    summary: dict = {}
    table, checks = [], []
    for b in args.backbones:
        summary[b] = {}
        for lr in args.lrs:
            mine = {r["label"]: r for r in runs if r["backbone"] == b and r["lr"] == lr}
            summary[b][f"{lr:g}"] = {label: entry(r["rows"], settings) for label, r in mine.items()}
            for label, e in summary[b][f"{lr:g}"].items():
                table.append([b, f"{lr:g}", label, f"{e['mean_acc']:.3f} ± {e['std_acc']:.3f}",
                              *[f"{e['per_task'][t]:.3f}" for t in tasks], mine[label]["cached"] or "now"])
            if lr == PROTOCOL_LR and reference and b in reference["summary"] and not args.bank_seed:
                ref = reference["summary"][b]["banks"]
                for bank in ("prior", "timm_init"):
                    if bank in ref:
                        e = ref[bank]
                        table.append([b, ref_lr, f"{bank}: docs/bench_adapt.json (the VAE shipped at its commit "
                                      f"{reference['machine'].get('git_commit', '?')})" if bank == "prior"
                                      else f"{bank}: docs/bench_adapt.json",
                                      f"{e['mean_acc']:.3f} ± {e['std_acc']:.3f}",
                                      *[f"{e['per_task'][t][0]:.3f}" if t in e["per_task"] else "-" for t in tasks],
                                      reference["machine"].get("date_utc", "-")])
            new = next(r for r in mine.values() if r.get("vae") == "new")
            timm = mine["timm_init"]
            (a, _), (c, _) = ba.mean_over_tasks(new["rows"], settings["seeds"]), \
                ba.mean_over_tasks(timm["rows"], settings["seeds"])
            wins, pairs = paired_wins(new["rows"], timm["rows"])
            checks.append({"backbone": b, "lr": lr, "prior": a, "timm_init": c, "met": a > c, "wins": wins,
                           "pairs": pairs})
    met_protocol = all(c["met"] for c in checks if c["lr"] == PROTOCOL_LR)
    met_all = all(c["met"] for c in checks)
    data = {"settings": settings, "protocol": protocol, "lrs": args.lrs, "vaes": vaes, "vae_keys": keys,
            "vae_names": {k: names[k] for k in vaes}, "machine": machine, "jobs": args.jobs,
            "prepared": {f"{b}/{k}": v for (b, k), v in prepared.items()}, "summary": summary, "target5": checks,
            "target5_met_protocol_lr": met_protocol, "target5_met_every_lr": met_all,
            "wall_s": time.perf_counter() - start,
            "runs": [{k: v for k, v in r.items() if k != "artifacts"} for r in runs]}
    cmd = "python benchmarks/bench_adapt_banks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# Bank sources for coefficient-only adaptation: VAE prior vs timm init", "",
        f"`{cmd.strip()}`, {machine['date_utc']}, commit {machine.get('git_commit', '?')}. Method `recast` "
        f"(coefficients + head) of `docs/bench_adapt.md` on its backbones, with banks sampled from a VAE's prior "
        f"(`weightgen.generate`, no checkpoint, seed {args.bank_seed}) or closed-form fits of timm's random init "
        f"(seed {args.bank_seed}). "
        f"Tasks {', '.join(tasks)}; seeds {', '.join(map(str, settings['seeds']))}; {settings['epochs']} epochs"
        f"{'' if protocol else ' (a REDUCED setting, not the full protocol)'}; learning rates "
        f"{', '.join(f'{lr:g}' for lr in args.lrs)}, all else as bench_adapt's protocol. Accuracy: mean over tasks, "
        f"then mean ± std over seeds. Rows marked docs/bench_adapt.json are read from that file (protocol lr "
        f"{ref_lr}), not rerun. Wall time {data['wall_s'] / 60:.1f} min with {args.jobs} parallel jobs "
        f"({machine['cpus']} CPUs, load average at start {machine['loadavg']}).", "",
        "VAEs: " + "; ".join(f"`{names[k]}` = {vaes[k] or 'weightgen/assets/vae'} (files sha256 {keys[k]})"
                             for k in vaes) + ".", "",
        markdown_table(["backbone", "lr", "banks from", "test acc", *tasks, "trained"], table,
                       "lrl" + "r" * (1 + len(tasks)) + "l"), "",
        f"`trained`: when that row's runs were trained: now, or read from this script's result cache "
        f"(`{results_dir.relative_to(REPO) if results_dir.is_relative_to(REPO) else results_dir}`, keyed by the "
        f"settings, backbone, banks, lr and the banks' artifact), or the date of docs/bench_adapt.json's run. "
        f"{sum(not r['cached'] for r in runs)} of {len(runs)} rows trained now.", "",
        "## Target 5: banks from the VAE prior beat banks from timm's init", "",
        markdown_table(["backbone", "lr", "prior", "timm_init", "met", "(task, seed) pairs where prior > timm_init"],
                       [[c["backbone"], f"{c['lr']:g}", f"{c['prior']:.3f}", f"{c['timm_init']:.3f}",
                         "yes" if c["met"] else "**no**", f"{c['wins']} / {c['pairs']}"] for c in checks], "lrrrlr"), "",
        f"At the protocol's lr {ref_lr} on every backbone: **{'met' if met_protocol else 'not met'}**; "
        f"at every lr: **{'met' if met_all else 'not met'}**.", ""])
    write_outputs(args.out, args.stem, text, data, indent=1, default=str, newline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
