#!/usr/bin/env python
"""Bank sources for coefficient-only adaptation: the VAE prior against two controls and timm's init.

Runs method `recast` (coefficients + head) of `bench_adapt.py` on its backbones, tasks, seeds and
protocol, with banks fitted in closed form (``weightgen.generate``, the backbone's preset) to a
dense model whose non-head Linear/Conv2d weights come from one of:

- ``prior``: the VAE's prior (``weightgen.vae.prior.sample_weights``);
- ``rms_matched``: timm's init rescaled per layer to the RMS the VAE's scale model predicts
  (``weightgen.studies.controls.rms_matched_init``): the prior's scale without its directions;
- ``ppca``: a probabilistic PCA prior with the VAE's latent size and scale model (``--ppca DIR``,
  ``ppca_sample_weights``): the prior's recipe with a linear Gaussian model in place of the VAE;
- ``timm_init``: timm's own init.

No source is pretrained: the banks are all the backbone has. ``--revive-norms G ...`` runs each source
with every all-zero norm weight set to G: timm zero-initialises the last BatchNorm of each
residual block, which leaves every bank of a ResNet behind a multiplication by 0 (its coefficients
get no gradient, and the features reach the head only through the 1x1 stride-2 shortcuts). Paired
differences (prior minus each control, same task and seed) get 95% t-intervals over the (task,
seed) pairs. Rows from banks fitted to the pretrained source backbone are read from
``docs/bench_adapt.json`` (protocol lr). Results are cached per (settings, backbone, banks, lr,
artifact).

    python benchmarks/bench_adapt_banks.py --ppca DIR                      # docs/bench_adapt_banks.{md,json}
    python benchmarks/bench_adapt_banks.py --tasks digits --seeds 42 --epochs 1 --jobs 1 --out outputs  # smoke
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapt as ba  # noqa: E402
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

LRS = [2e-3, 2e-2]  # the protocol's, and bench_adapt_gap.py's
PROTOCOL_LR = 2e-3
SOURCES = ("prior", "rms_matched", "ppca", "timm_init")
NAMES = {"prior": "VAE prior", "rms_matched": "RMS-matched timm init", "ppca": "PPCA prior", "timm_init": "timm init"}
TARGET = 0.5  # issue 14 point 5: banks drawn from the prior reach this coefficient-only accuracy


def bank_label(source: str, revive: float) -> str:
    """Job and cache name of a bank source (no '+': bench_adapt reads that as extra templates)."""
    return source if not revive else f"{source}-revive{revive:g}"


def display(source: str, revive: float) -> str:
    return NAMES[source] + (f", zero norms -> {revive:g}" if revive else "")


def files_key(root: Path | None, names: tuple[str, ...]) -> str | None:
    if root is None:
        return None
    digest = hashlib.sha256()
    for name in names:
        digest.update((root / name).read_bytes() if (root / name).is_file() else b"")
    return digest.hexdigest()[:10]


def build_artifact(backbone: str, source: str, revive: float, seed: int, vae_dir: str | None, vae_bundle, ppca,
                   keys: dict, root: Path) -> tuple[str, dict]:
    """Closed-form banks of a dense model whose weights come from ``source`` (cached by what they depend on)."""
    import torch

    from weightgen.adapt.pretrain import source_model_kwargs
    from weightgen.generate import GenerateOptions, generate
    from weightgen.io import save_tensors
    from weightgen.models import create_model, open_residual_gates
    from weightgen.recasting import head_names
    from weightgen.studies.controls import ppca_sample_weights, rms_matched_init
    from weightgen.vae.prior import sample_weights

    spec = ba.BACKBONES[backbone]
    kwargs = source_model_kwargs(spec["arch"], ba.IMG_SIZE, 10, spec["kwargs"])  # the head is reset per task
    fields = [backbone, spec, kwargs, source, revive, seed, keys["vae"] if source != "timm_init" else None,
              keys["ppca"] if source == "ppca" else None]
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    art = root / f"{backbone}-{bank_label(source, revive)}-s{seed}-{key}"
    info_path = art / "source.json"
    if info_path.is_file() and (art / "report.json").is_file():
        return str(art), json.loads(info_path.read_text())
    with torch.random.fork_rng(devices=[]):  # timm's init draws from the global RNG
        torch.manual_seed(seed)
        model = create_model(spec["arch"], kwargs)
    skip = head_names(model)
    fallback: list[str] = []
    if source == "prior":
        _, _, fallback = sample_weights(model, *vae_bundle, seed=seed, skip=skip, in_place=True)
    elif source == "rms_matched":
        _, _, fallback = rms_matched_init(model, vae_bundle[1], skip=skip, in_place=True)
    elif source == "ppca":
        _, _, fallback = ppca_sample_weights(model, ppca, vae_bundle[1], seed=seed, skip=skip, in_place=True)
    norms = [m for m in model.modules() if isinstance(m, ba_norm_types()) and getattr(m, "weight", None) is not None]
    zero = [m for m in norms if not m.weight.detach().abs().max() > 0]
    if revive:
        open_residual_gates(model, revive)
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = root / f".{art.name}.safetensors"
    save_tensors(checkpoint, model.state_dict())
    generate(GenerateOptions(arch=spec["arch"], checkpoint=str(checkpoint), model_kwargs=kwargs,
                             preset=spec["preset"], out=str(art), overwrite=True, seed=seed))
    checkpoint.unlink()
    info = {"source": source, "revive": revive, "seed": seed, "fallback_layers": len(fallback),
            "norm_layers": len(norms), "zero_norm_layers": len(zero)}
    tmp = info_path.with_name(".source.json.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, info_path)
    return str(art), info


def ba_norm_types():
    from torch import nn

    return (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def probe(art: str, settings: dict, cache: Path, cached_only: bool = False) -> dict | None:
    """Frozen-feature ceiling of a bank source: per task, a logistic-regression probe (L-BFGS) on the pre-logit
    features of the banks' model, BatchNorm statistics re-estimated on the task's training images (first seed)."""
    import torch

    from weightgen.adapt.incremental import (DataOptions, features, fit_probe, open_backbone, open_tasks,
                                             task_loaders)

    seed = settings["seeds"][0]
    report = (Path(art) / "report.json").read_bytes()
    key = hashlib.sha256(json.dumps([art, hashlib.sha256(report).hexdigest(), settings["tasks"], seed,
                                     settings["max_train"], settings["max_eval"]]).encode()).hexdigest()[:16]
    path = cache / f"{Path(art).name}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if cached_only:
        return None
    options = DataOptions(max_train=settings["max_train"], max_eval=settings["max_eval"])
    backbone = open_backbone(art, ba.IMG_SIZE)
    out = {}
    for task in open_tasks(settings["tasks"], seed, options):
        loaders = task_loaders(task, backbone.data, settings["batch_size"], seed, options)
        model = backbone.model()
        with torch.no_grad():  # BN statistics of these weights on this task (cumulative average)
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
                    m.momentum = None
            model.train()
            for x, _ in loaders["train"]:
                model(x)
        w, b = fit_probe(*features(model, loaders["train"]), task.num_classes)
        x, y = features(model, loaders["test"])
        out[task.name] = ((x @ w.T + b).argmax(1) == y).float().mean().item()
    out = {"per_task": out, "mean": statistics.fmean(out.values()), "seed": seed}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    return out


def result_key(settings: dict, job: dict) -> str:
    """What a run's result depends on: the protocol, the backbone, the banks' artifact (path and report), the lr."""
    art = Path(job["artifacts"][job["bank"]])
    report = (art / "report.json").read_bytes() if (art / "report.json").is_file() else b""
    fields = [{k: settings[k] for k in ("tasks", "seeds", "epochs", "max_train", "max_eval", "batch_size")},
              job["backbone"], job["method"], job["bank"], job["lr"], str(art), hashlib.sha256(report).hexdigest()]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def run_cached(job: dict, settings: dict, results: Path, timeout: float, cached_only: bool = False) -> dict | None:
    path = results / f"{job['backbone']}-{job['bank']}-lr{job['lr']:g}-{result_key(settings, job)}.json"
    if path.is_file():
        written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
        return {**json.loads(path.read_text()), "cached": written}
    if cached_only:
        return None
    out = ba.call_worker({"kind": "run", "jobs": [job], "settings": settings}, timeout)[0][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)  # a killed run leaves no half-written result
    return {**out, "cached": None}


def interval(values: list[float]) -> dict:
    """Mean and two-sided 95% t-interval of the mean."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def paired(a: list[dict], b: list[dict]) -> list[float]:
    """a's test accuracy minus b's over the (task, seed) pairs both have."""
    bs = {(r["task"], r["seed"]): r["test_acc"] for r in b}
    return [r["test_acc"] - bs[(r["task"], r["seed"])] for r in a if (r["task"], r["seed"]) in bs]


def entry(rows: list[dict], settings: dict) -> dict:
    acc, std = ba.mean_over_tasks(rows, settings["seeds"])
    return {"mean_acc": acc, "std_acc": std, "per_task": {t: ba.per_task(rows, t)[0] for t in settings["tasks"]},
            "trainable": rows[0]["trainable"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", help="VAE directory: its prior and its scale model (default: the shipped one)")
    p.add_argument("--ppca", help="PPCA prior directory (weightgen.studies.controls.save_ppca; latent size of the VAE); "
                                  "without it the ppca rows are left out")
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES), help="bank sources to run")
    p.add_argument("--revive-norms", type=float, nargs="+", default=[0.0],
                   help="run every source with its all-zero norm weights set to each value given (0: kept at 0, "
                        "timm's init; default 0). A backbone with no all-zero norms runs only 0")
    p.add_argument("--probe", action="store_true",
                   help="measure each source's frozen-feature probe ceiling (no coefficients trained; cached, and "
                        "cached probes are shown without this flag)")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: report the runs the cache holds (the rest are listed as not run)")
    p.add_argument("--bank-seed", type=int, default=0, help="which draw of each source the banks come from")
    p.add_argument("--lrs", type=float, nargs="+", default=LRS, help="learning rates of the coefficient-only runs")
    p.add_argument("--backbones", nargs="+", default=list(ba.BACKBONES), choices=list(ba.BACKBONES))
    p.add_argument("--tasks", nargs="+", help="subset of the protocol's tasks (default: all, " +
                   ", ".join(ba.FULL["tasks"]) + ")")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the protocol's)")
    p.add_argument("--epochs", type=int, help="epochs per task (default: the protocol's)")
    p.add_argument("--reference", default=str(REPO / "docs" / "bench_adapt.json"), help="bench_adapt.py's full run")
    p.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one torch thread each)")
    p.add_argument("--cache", default=str(REPO / "outputs" / "bench_adapt_cache"), help="artifact and result cache")
    p.add_argument("--out", default=str(REPO / "docs"), help="where the .md/.json go")
    p.add_argument("--stem", default="bench_adapt_banks", help="their file name without extension")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    args = p.parse_args(argv)
    if any(not lr > 0 for lr in args.lrs) or any(g < 0 for g in args.revive_norms):
        p.error("--lrs must be > 0 and --revive-norms >= 0")
    if args.vae and not (Path(args.vae) / "vae.safetensors").is_file():
        p.error(f"--vae {args.vae}: no vae.safetensors there")
    if "ppca" in args.sources and not args.ppca:
        args.sources = [s for s in args.sources if s != "ppca"]
    settings = {**ba.FULL, "tasks": args.tasks or ba.FULL["tasks"], "seeds": args.seeds or ba.FULL["seeds"],
                "epochs": args.epochs or ba.FULL["epochs"]}
    unknown = set(settings["tasks"]) - set(ba.FULL["tasks"])
    if unknown:
        p.error(f"unknown tasks {sorted(unknown)}; choose from {ba.FULL['tasks']}")
    protocol = all(settings[k] == ba.FULL[k] for k in ("tasks", "seeds", "epochs"))

    import torch

    from weightgen.studies.controls import load_ppca
    from weightgen.vae.prior import default_vae_dir, load_vae_bundle

    torch.set_num_threads(1)
    vae_bundle = load_vae_bundle(args.vae)
    try:
        ppca = load_ppca(args.ppca) if args.ppca else None
    except ValueError as e:
        p.error(str(e))
    if ppca is not None and ppca.latent_dim != vae_bundle[0].config.latent_dim:
        p.error(f"--ppca has latent size {ppca.latent_dim}, the VAE {vae_bundle[0].config.latent_dim}")
    keys = {"vae": files_key(Path(args.vae) if args.vae else default_vae_dir(), ("vae.json", "vae.safetensors")),
            "ppca": files_key(Path(args.ppca), ("ppca.json", "ppca.safetensors")) if args.ppca else None}
    start = time.perf_counter()
    machine = machine_info()
    cache = Path(args.cache)
    prepared, sources_info, variants = {}, {}, {}
    for b in args.backbones:
        variants[b] = []
        for g in args.revive_norms:
            for s in args.sources:
                art, info = build_artifact(b, s, g, args.bank_seed, args.vae, vae_bundle, ppca, keys,
                                           cache / "bench_adapt_banks_art")
                if g and not info["zero_norm_layers"]:
                    continue  # nothing to revive: the same banks as g = 0
                variants[b].append((s, g))
                prepared[(b, bank_label(s, g))] = art
                sources_info[f"{b}/{bank_label(s, g)}"] = info
                print(f"{b:<14} {display(s, g):<44} banks {art} (zero norms {info['zero_norm_layers']}/"
                      f"{info['norm_layers']})", flush=True)
    jobs = [{"backbone": b, "method": "recast", "bank": bank_label(s, g), "lr": lr, "source": s, "revive": g,
             "artifacts": {bank_label(s, g): prepared[(b, bank_label(s, g))]}}
            for b in args.backbones for lr in args.lrs for s, g in variants[b]]
    results_dir = cache / "bench_adapt_banks_results"
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = []
        missing = []
        for j, r in zip(jobs, pool.map(lambda j: run_cached(j, settings, results_dir, args.timeout,
                                                             args.cached_only), jobs)):
            if r is None:
                missing.append(f"{j['backbone']} lr {j['lr']:g} {display(j['source'], j['revive'])}")
                continue
            print(f"{r['backbone']:<14} lr {r['lr']:<6g} {display(r['source'], r['revive']):<44} acc "
                  f"{ba.mean_over_tasks(r['rows'], settings['seeds'])[0]:.3f}  {r['seconds']:.0f}s"
                  f"{' (cached ' + r['cached'] + ')' if r['cached'] else ''}", flush=True)
            runs.append(r)

    probes = {}
    for (b, label), art in prepared.items():  # cached probes are always shown; --probe measures the rest
        found = probe(art, settings, cache / "bench_adapt_banks_probe", not args.probe)
        if found is not None:
            probes[f"{b}/{label}"] = found
            print(f"{b:<14} {label:<28} probe {found['mean']:.3f}", flush=True)
    reference = json.loads(Path(args.reference).read_text()) if Path(args.reference).is_file() else None
    tasks = settings["tasks"]
    summary: dict = {}
    table, diffs, target = [], [], []
    for b in args.backbones:
        summary[b] = {}
        for lr in args.lrs:
            mine = {(r["source"], r["revive"]): r for r in runs if r["backbone"] == b and r["lr"] == lr}
            summary[b][f"{lr:g}"] = {bank_label(*k): entry(r["rows"], settings) for k, r in mine.items()}
            for (s, g), r in mine.items():
                e = summary[b][f"{lr:g}"][bank_label(s, g)]
                table.append([b, f"{lr:g}", display(s, g), f"{e['mean_acc']:.3f} ± {e['std_acc']:.3f}",
                              *[f"{e['per_task'][t]:.3f}" for t in tasks], r["cached"] or "now"])
            for g in args.revive_norms:
                if ("prior", g) not in mine:
                    continue
                for control in ("rms_matched", "ppca", "timm_init"):
                    if (control, g) in mine:
                        d = interval(paired(mine[("prior", g)]["rows"], mine[(control, g)]["rows"]))
                        diffs.append({"backbone": b, "lr": lr, "revive": g, "control": control, **d})
                acc = ba.mean_over_tasks(mine[("prior", g)]["rows"], settings["seeds"])[0]
                target.append({"backbone": b, "lr": lr, "revive": g, "prior": acc, "met": acc >= TARGET})
        # bench_adapt.py's own bank rows (protocol lr, its generate-from-prior path and VAE of its commit), for reference
        for bank, what in (("source", "pretrained source backbone"), ("prior", "VAE prior, as bench_adapt built it"),
                           ("timm_init", "timm init, as bench_adapt built it")):
            e = (reference or {}).get("summary", {}).get(b, {}).get("banks", {}).get(bank)
            if e:
                table.append([b, f"{PROTOCOL_LR:g}", f"{what}: docs/bench_adapt.json (commit "
                              f"{reference['machine'].get('git_commit', '?')})", f"{e['mean_acc']:.3f} ± {e['std_acc']:.3f}",
                              *[f"{e['per_task'][t][0]:.3f}" if t in e["per_task"] else "-" for t in tasks],
                              reference["machine"].get("date_utc", "-")])
    best = max(target, key=lambda t: t["prior"]) if target else None
    data = {"settings": settings, "protocol": protocol, "lrs": args.lrs, "vae": args.vae or "weightgen/assets/vae",
            "ppca": args.ppca, "ppca_info": ppca.info if ppca else None, "keys": keys, "machine": machine,
            "jobs": args.jobs, "bank_seed": args.bank_seed, "sources": sources_info,
            "prepared": {f"{b}/{k}": v for (b, k), v in prepared.items()}, "summary": summary,
            "differences": diffs, "target": target, "probes": probes, "not_run": missing, "target_met": bool(best and best["met"]),
            "wall_s": time.perf_counter() - start,
            "runs": [{k: v for k, v in r.items() if k != "artifacts"} for r in runs]}
    cmd = "python benchmarks/bench_adapt_banks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    source_rows = [[k.split("/")[0], display(v["source"], v["revive"]), f"{v['zero_norm_layers']} / {v['norm_layers']}",
                    v["fallback_layers"]]
                   + (([f"{probes[k]['mean']:.3f}", *[f"{probes[k]['per_task'][t]:.3f}" for t in tasks]] if k in probes
                       else ["not run"] + [""] * len(tasks)) if probes else [])
                   for k, v in sources_info.items()]
    text = "\n".join([
        "# Bank sources for coefficient-only adaptation: VAE prior, two controls, timm init", "",
        f"`{cmd.strip()}`, {machine['date_utc']}, commit {machine.get('git_commit', '?')}. Method `recast` "
        f"(coefficients + head) of `docs/bench_adapt.md` on its backbones, with banks fitted in closed form "
        f"(`weightgen.generate --checkpoint`, the backbone's preset) to a dense model drawn from each source "
        f"(draw {args.bank_seed}); nothing is pretrained. Sources: VAE prior (`{data['vae']}`), RMS-matched timm "
        f"init (timm's init rescaled per layer to the VAE's scale model), PPCA prior "
        f"({'`' + args.ppca + '`, latent size ' + str(ppca.latent_dim) + ', fitted on ' + str(len(ppca.info.get('train_models', []))) + ' train entries of `' + str(ppca.info.get('zoo')) + '`' if ppca else 'not run'}), "
        f"timm init. Tasks {', '.join(tasks)}; seeds {', '.join(map(str, settings['seeds']))}; "
        f"{settings['epochs']} epochs{'' if protocol else ' (a REDUCED setting, not the full protocol)'}; "
        f"learning rates {', '.join(f'{lr:g}' for lr in args.lrs)}, all else as bench_adapt's protocol. Accuracy: "
        f"mean over tasks, then mean ± std over seeds. Wall time {data['wall_s'] / 60:.1f} min with {args.jobs} "
        f"parallel jobs ({machine['cpus']} CPUs, load average at start {machine['loadavg']}).", "",
        "Banks: all-zero norm layers (timm's zero-init last BatchNorm of each residual block) out of all norm "
        "layers; layers that kept timm's init."
        + (f" Probe: frozen-feature ceiling, a logistic-regression probe (L-BFGS) on the banks' pre-logit features "
           f"with BatchNorm statistics re-estimated on each task's training images (seed {settings['seeds'][0]}); "
           f"no coefficient trained." if probes else ""), "",
        markdown_table(["backbone", "source", "zero norms", "fallback layers"]
                       + (["probe", *[f"probe {t}" for t in tasks]] if probes else []), source_rows,
                       "llrr" + ("r" * (1 + len(tasks)) if probes else "")), "",
        markdown_table(["backbone", "lr", "banks from", "test acc", *tasks, "trained"], table,
                       "lrl" + "r" * (1 + len(tasks)) + "l"), "",
        f"`trained`: now, or when the row was trained into this script's result cache (keyed by the settings, "
        f"backbone, banks, lr and artifact); rows marked docs/bench_adapt.json are read from that file, not rerun. "
        f"{sum(not r['cached'] for r in runs)} of {len(runs)} rows trained now."
        + (f" Not run (no cached result, `--cached-only`): {'; '.join(missing)}." if missing else ""), "",
        "## Prior minus each control (points; mean [95% t-interval] over (task, seed) pairs)", "",
        markdown_table(["backbone", "lr", "zero norms set to", "control", "pairs", "prior - control"],
                       [[d["backbone"], f"{d['lr']:g}", f"{d['revive']:g}" if d["revive"] else "kept (0)",
                         NAMES[d["control"]], d["n"],
                         f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"] for d in diffs],
                       "llllrr"), "",
        f"## Target (issue 14, point 5): banks drawn from the prior reach >= {TARGET} coefficient-only accuracy", "",
        markdown_table(["backbone", "lr", "zero norms set to", "prior", "met"],
                       [[t["backbone"], f"{t['lr']:g}", f"{t['revive']:g}" if t["revive"] else "kept (0)",
                         f"{t['prior']:.3f}", "yes" if t["met"] else "**no**"] for t in target], "lllrl"), "",
        f"Best prior row: {best['prior']:.3f} ({best['backbone']}, lr {best['lr']:g}): "
        f"**{'met' if best['met'] else 'not met'}**." if best else "", ""])
    write_outputs(args.out, args.stem, text, data, indent=1, default=str, newline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
