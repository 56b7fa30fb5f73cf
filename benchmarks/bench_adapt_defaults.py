#!/usr/bin/env python
"""How adapt.py's per-method defaults were chosen: a learning-rate sweep on VALIDATION splits of
built-in tasks, then the chosen settings' test accuracy against a logistic regression on the same
frozen features, and LP-FT (head started from a linear probe) against a random head.

Backbone: a small ResNet pretrained here on the source glyph task (weightgen.adapt.pretrain,
cached), mimicked into banks (closed form). Small data on purpose (``--max-train`` images per task,
as a user's small folder): the step budget (``--steps``) must give enough updates.

    python benchmarks/bench_adapt_defaults.py   # docs/adapt_defaults.{md,json} (~15 min, 1 thread)
    python benchmarks/bench_adapt_defaults.py --render docs/adapt_defaults.json  # only re-write the Markdown
    python benchmarks/bench_adapt_defaults.py --render A.json B.json  # merge runs made in parallel

Stage 1 (selection): every method x lr, ``--sweep-seeds`` seeds, mean VALIDATION accuracy over the
tasks; the best lr per method is its default. Stage 2 (report): the chosen lr per method with
``--seeds`` seeds, test accuracy (mean and 95% t interval over seeds), random vs probe head, and
scikit-learn's LogisticRegression on the frozen backbone's features (the linear target).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

ARCH, KWARGS, PRESET = "resnet18", {"channels": [16, 32, 64, 128]}, "recast-resnet"
METHODS = ["linear", "recast", "recast-norm", "lora", "full"]
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
TASKS = ["latin", "mnist"]


def backbone(cache: Path, pre_epochs: int, templates: int | None = None, coef_sets: int = 2,
             preset: str = PRESET, extra: int = 0) -> Path:
    from weightgen.adapt.pretrain import pretrain
    from weightgen.config import preset_config
    from weightgen.generate import GenerateOptions, generate

    key = hashlib.sha256(json.dumps([ARCH, KWARGS, pre_epochs, "images/1"]).encode()).hexdigest()[:8]
    root = cache / f"{ARCH}-w16-{key}"
    src, info, _ = pretrain(ARCH, root / "src", epochs=pre_epochs, img_size=32, seed=0, model_kwargs=KWARGS,
                            max_train=4000, max_eval=1000)
    # the banks' config in the name: a change of preset or --templates never reuses older banks
    config = preset_config(preset, templates=templates, coef_sets=coef_sets).to_dict()
    if extra:  # random templates added after the fit (seed 0): part of the banks' identity
        config["extra_templates"] = extra
    art = root / f"art-{hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]}"
    if not (art / "report.json").is_file():
        generate(GenerateOptions(arch=ARCH, checkpoint=str(src / "model.safetensors"), model_kwargs=info["model_kwargs"],
                                 preset=preset, templates=templates, coef_sets=coef_sets, extra_templates=extra,
                                 out=str(art), overwrite=True))
    return art


def bank_layout(art: Path, preset: str = PRESET, extra: int = 0) -> str:
    """'templates/layers' per bank, from the artifact's report (fitted templates; the extra random ones
    change nothing at the start point, so the fit stays exact), prefixed by a preset other than PRESET
    and followed by the extra templates: 'all: 1/1, 3/3, ... +4 random'."""
    report = json.loads((art / "report.json").read_text())
    layers: dict[str, int] = {}
    for row in report["layers"]:
        layers[row["group"]] = layers.get(row["group"], 0) + 1
    out = ", ".join(f"{report['templates_per_bank'][g]}/{n}" for g, n in layers.items())
    return (f"{preset}: " if preset != PRESET else "") + out + (f" +{extra} random" if extra else "")


def run(bb, method: str, lr: float, seeds: list[int], args, head_init: str = "random") -> list[dict]:
    from weightgen.adapt.incremental import DataOptions, run_sequence
    from weightgen.adapt.trainer import TrainConfig

    config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=lr)
    options = DataOptions(max_train=args.max_train, max_eval=args.max_eval)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_sequence(bb, method, TASKS, seeds, config, tmp, options=options, steps=args.steps,
                              head_init=head_init)
    return [{k: r[k] for k in ("task", "method", "seed", "val_acc", "test_acc", "train_seconds", "steps",
                               "task_file_bytes")} | {"lr": lr, "head_init": head_init} for r in result["rows"]]


def logistic_baseline(bb, seeds: list[int], args) -> list[dict]:
    """sklearn LogisticRegression (C chosen on val from a small grid) on the frozen backbone's features."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from weightgen.adapt.incremental import DataOptions, features, open_tasks, task_loaders

    options = DataOptions(max_train=args.max_train, max_eval=args.max_eval)
    model = bb.model(recast_model=False)
    rows = []
    for seed in seeds:
        for task in open_tasks(TASKS, seed, options):
            loaders = task_loaders(task, bb.data, 256, seed, options)
            from weightgen.adapt.incremental import plain_train_loader
            xs = {s: features(model, loaders[s] if s != "train" else plain_train_loader(task, bb.data, seed, options))
                  for s in ("train", "val", "test")}
            scaler = StandardScaler().fit(xs["train"][0].numpy())
            z = {s: scaler.transform(xs[s][0].numpy()) for s in xs}
            best = None
            for c in (0.01, 0.1, 1.0, 10.0):
                clf = LogisticRegression(C=c, max_iter=2000).fit(z["train"], xs["train"][1].numpy())
                val = float((clf.predict(z["val"]) == xs["val"][1].numpy()).mean())
                if best is None or val > best[0]:
                    best = (val, c, float((clf.predict(z["test"]) == xs["test"][1].numpy()).mean()))
            rows.append({"task": task.name, "method": "logreg (sklearn)", "seed": seed, "val_acc": best[0],
                         "test_acc": best[2], "C": best[1]})
    return rows


def ci95(values: list[float]) -> tuple[float, float]:
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5)


def per_seed_mean(rows: list[dict], key: str) -> dict[int, float]:
    out: dict[int, list[float]] = {}
    for r in rows:
        out.setdefault(r["seed"], []).append(r[key])
    return {s: statistics.fmean(v) for s, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(REPO / "outputs" / "bench_adapt_defaults_cache"))
    p.add_argument("--out", default=str(REPO / "docs"))
    p.add_argument("--stem", default="adapt_defaults")
    p.add_argument("--max-train", type=int, default=300)
    p.add_argument("--max-eval", type=int, default=300)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--templates", type=int, help="templates per bank (default: the preset's rule)")
    p.add_argument("--coef-sets", type=int, default=2, help="K coefficient sets per layer")
    p.add_argument("--preset", default=PRESET, help="bank layout (generate_weights.py --preset)")
    p.add_argument("--extra-templates", type=int, default=0,
                   help="random templates added to every bank after the fit (generate_weights.py --extra-templates)")
    p.add_argument("--sweep-seeds", default="0")
    p.add_argument("--seeds", default="42,1998,3142592")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lrs", default=",".join(map(str, LRS)))
    p.add_argument("--resume", help="a .partial.json of an interrupted run with the same settings: its rows are reused")
    p.add_argument("--max-lr", action="append", default=["full=0.003", "lora=0.01", "recast-norm=0.03"], metavar="METHOD=LR",
                   help="skip lrs above LR for METHOD in the sweep (e.g. full=0.01: AdamW on every weight)")
    p.add_argument("--final-methods", default="linear,recast",
                   help="methods of stage 2 ('' = all of --methods; 'none' = the sweep only, no logistic regression)")
    p.add_argument("--probe-methods", default="linear,recast", help="methods also run with the LP-FT probe head")
    p.add_argument("--render", metavar="JSON", nargs="+",
                   help="only write the docs from finished runs' .json files (merged: e.g. one per method, run in "
                        "parallel on the same backbone) or an interrupted run's .partial.json (marked as partial)")
    args = p.parse_args(argv)
    if args.render:
        try:
            data = merge([json.loads(Path(f).read_text()) for f in args.render])
        except (OSError, ValueError, KeyError) as err:
            print(f"error: --render: {err}", file=sys.stderr)
            return 2
        write_outputs(args.out, args.stem, markdown(data), data)
        return 0
    import torch

    torch.set_num_threads(1)
    from weightgen.adapt.incremental import open_backbone

    start = time.perf_counter()
    art = backbone(Path(args.cache), args.pretrain_epochs, args.templates, args.coef_sets, args.preset,
                   args.extra_templates)
    bb = open_backbone(art)
    methods, lrs = args.methods.split(","), [float(x) for x in args.lrs.split(",")]
    sweep_seeds, seeds = [int(s) for s in args.sweep_seeds.split(",")], [int(s) for s in args.seeds.split(",")]
    data = {"settings": vars(args), "arch": ARCH, "kwargs": KWARGS, "tasks": TASKS, "machine": machine_info(),
            "banks": bank_layout(art, args.preset, args.extra_templates), "argv": list(sys.argv[1:] if argv is None else argv),
            "sweep": [], "final": [], "logreg": []}
    partial = Path(args.cache) / f"{args.stem}.partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    resumed = json.loads(Path(args.resume).read_text()) if args.resume else {}
    done = resumed.get("sweep", [])
    if resumed:  # where the reused rows came from
        data["resumed"] = {"file": args.resume, "argv": resumed.get("argv"), "settings": resumed.get("settings")}
    caps = {k: float(v) for k, v in (x.split("=") for x in args.max_lr)}
    data["sweep_skipped"] = {m: [lr for lr in lrs if lr > caps[m]] for m in caps}
    for method in methods:
        for lr in lrs:
            if lr > caps.get(method, float("inf")):
                continue
            old = [r for r in done if r["method"] == method and r["lr"] == lr and r["seed"] in sweep_seeds]
            if old:
                data["sweep"] += old
                continue
            data["sweep"] += run(bb, method, lr, sweep_seeds, args)
            partial.write_text(json.dumps(data, indent=1))
            print(f"[{time.perf_counter() - start:.0f}s] sweep {method} lr {lr:g}", flush=True)
    data["chosen"] = chosen = choose(data["sweep"])
    finals = [] if args.final_methods == "none" else args.final_methods.split(",") if args.final_methods else methods
    for method in finals:
        for head in ("random", "probe") if method in args.probe_methods.split(",") else ("random",):
            data["final"] += run(bb, method, chosen[method], seeds, args, head)
            partial.write_text(json.dumps(data, indent=1))
            print(f"[{time.perf_counter() - start:.0f}s] final {method} {head}", flush=True)
    data["logreg"] = logistic_baseline(bb, seeds, args) if finals else []
    data["seconds"] = time.perf_counter() - start
    write_outputs(args.out, args.stem, markdown(data), data)
    partial.unlink(missing_ok=True)
    return 0


def exact(banks: str | None) -> bool:
    """Whether every bank of a layout 't/l, t/l, ...' has at least as many templates as layers: the
    closed-form fit is then exact, and the dense model (what linear, lora and full train) the source's."""
    if not banks:
        return False
    fitted = banks.rpartition(": ")[2].split(" +")[0]  # without a preset prefix and extra random templates
    return all(int(t) >= int(n) for t, n in (b.split("/") for b in fitted.split(", ")))


def merge(runs: list[dict]) -> dict:
    """One record from runs on the same backbone: rows concatenated (a row twice is an error), the
    logistic regression from the first run that has it, seconds summed (CPU time of the parts).

    Runs on other banks of the same source are merged only when every fit is exact (the same dense
    model); their methods are then named with their bank layout, e.g. 'recast [8/2, ...]', and runs with
    another step budget with it, e.g. 'recast [450 steps]'."""
    if len({(r["arch"], json.dumps(r["kwargs"]), r["settings"]["pretrain_epochs"]) for r in runs}) > 1:
        raise ValueError("the runs were made on different backbones")
    first = runs[0].get("banks")
    if any(r.get("banks") != first for r in runs) and not all(exact(r.get("banks")) for r in runs):
        raise ValueError("the runs were made on different banks, not all exact fits")
    data = dict(runs[0])
    data["parts"] = [{k: r.get(k) for k in ("argv", "settings", "resumed", "seconds", "banks")} for r in runs]
    steps = runs[0]["settings"]["steps"]
    for r in runs:  # a variant's rows are named by what differs: its banks, its step budget
        banks = r.get("banks") or ""
        label = [(f"{banks.split(', ')[0]}, ...{' +' + banks.split(' +')[1] if ' +' in banks else ''}")]
        label = label if r.get("banks") != first else []
        label += [f"{r['settings']['steps']} steps"] if r["settings"]["steps"] != steps else []
        for row in (r["sweep"] + r["final"]) if label else []:
            row["method"] = f"{row['method']} [{'; '.join(label)}]"
    for key in ("sweep", "final"):
        data[key] = [row for r in runs for row in r[key]]
        ids = [(row["method"], row["lr"], row["seed"], row["task"], row.get("head_init")) for row in data[key]]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a {key} row appears in two runs")
    data["logreg"] = next((r["logreg"] for r in runs if r.get("logreg")), [])
    data["chosen"] = choose(data["sweep"])
    data["partial"] = any("seconds" not in r for r in runs)
    if not data["partial"]:
        data["seconds"] = sum(r["seconds"] for r in runs)
    return data


def commands(data: dict) -> str:
    """The commands of a merged record: each part, and the run its sweep rows were reused from."""
    out = ["Merged with `--render` from runs made in parallel on this backbone (1 thread each):", ""]
    for part in data["parts"]:
        secs = f" ({part['seconds'] / 60:.0f} min)" if part.get("seconds") else " (partial)"
        out.append(f"- `python benchmarks/bench_adapt_defaults.py {shlex.join(part['argv'])}`{secs}" if part.get("argv")
                   else f"- a run with settings {part['settings']}{secs}")
        if part.get("resumed"):
            r = part["resumed"]
            out.append(f"  - its sweep rows reused from a run with "
                       + (f"`{shlex.join(r['argv'])}`" if r.get("argv") else f"settings {r.get('settings')}"))
    return "\n".join(out)


def notes(data: dict, finals: dict, diff) -> list[str]:
    """What the tables say, in sentences computed from them (the bank mechanics are tested in
    tests/test_presets.py)."""
    swept = {r["method"] for r in data["sweep"]}
    out = ["- The sweep has one seed per lr; differences between neighbouring lrs below ~0.01 are within seed noise."]
    missing = [m for m in METHODS if m not in swept]
    if missing:
        out.append(f"- Not swept in this record: {', '.join(missing)}. Their adapt.py defaults were chosen by an "
                   "earlier run of this benchmark on the same source checkpoint fitted with 1 template per bank "
                   "(a compressed fit, so a slightly different dense model); see this file's git history.")
    preset, extra = data["settings"].get("preset", PRESET), data["settings"].get("extra_templates", 0)
    if preset != PRESET or extra:
        out.append(f"- Banks: preset `{preset}`" + (" (every conv: stem, residual and shortcut convs; exact fit)"
                                                      if preset == "all" else "")
                   + (f" plus {extra} random templates per bank (`generate_weights.py --extra-templates {extra}`; "
                      "coefficients start at zero, so the dense model is the source's and `linear` sees the same "
                      "features)" if extra else "") + ". The lr is adapt.py's default for each method, not re-swept "
                   "for this layout unless the sweep above lists other lrs.")
    elif exact(data.get("banks")):
        out.append("- Banks: `recast-resnet` gives every bank of >= 2 layers at least 2 templates (`min_templates=2`). "
                   "Before, each ResNet-18 bank (2 layers) held 1 template: a coefficient could only rescale its "
                   "conv, which the BatchNorm after it undoes (relative coefficient gradients ~1e-5), and `recast` "
                   "equalled `linear` to the last digit. With 2 templates for 2 layers the fit is exact and a "
                   "coefficient can turn its conv's weight within the plane of its block's two fitted convs; "
                   "BatchNorm still removes the scale, so each layer has about one useful direction per "
                   "coefficient set average (8 layers here).")
    for m, head in finals:
        if m.startswith("recast") and head == "random" and ("linear", "random") in finals:
            mean, half = diff((m, "random"), ("linear", "random"))
            verdict = "is above 0" if mean - half > 0 else "is below 0" if mean + half < 0 else "includes 0"
            target = (": the target is " + ("met" if mean - half > 0 else "not met")) if m == "recast" else ""
            out.append(f"- `{m}` - `linear`: {100 * mean:+.1f} +- {100 * half:.1f} points over "
                       f"{len(finals[(m, head)])} seeds; the interval {verdict}{target}.")
    tested = {m for m, _ in finals}
    for m in dict.fromkeys(r["method"] for r in data["sweep"]):
        if m not in tested:
            val = statistics.fmean(r["val_acc"] for r in data["sweep"] if r["method"] == m and r["lr"] == data["chosen"][m])
            out.append(f"- `{m}`: swept only (best validation {val:.3f} at lr {data['chosen'][m]:g}); not carried "
                       "to the test stage.")
    if len(data.get("parts", [])) > 1:
        out.append("- The parts ran in parallel on a shared machine: training seconds are not comparable between "
                   "methods.")
    if ("linear", "random") in finals and ("logreg", "-") in finals:
        mean, half = diff(("linear", "random"), ("logreg", "-"))
        out.append(f"- `linear` - logistic regression: {100 * mean:+.1f} +- {100 * half:.1f} points; "
                   + ("within 3 points on the mean" if mean > -0.03 else "more than 3 points below on the mean")
                   + ("." if mean - half > -0.03 else ", and the interval reaches below -3."))
    return out


def choose(sweep: list[dict]) -> dict[str, float]:
    """Per method, the lr with the best mean validation accuracy (ties: the smaller lr)."""
    chosen = {}
    for method in dict.fromkeys(r["method"] for r in sweep):
        lrs = sorted({r["lr"] for r in sweep if r["method"] == method})
        val = {lr: statistics.fmean(r["val_acc"] for r in sweep if r["method"] == method and r["lr"] == lr) for lr in lrs}
        chosen[method] = max(val, key=lambda lr: (val[lr], -lr))
    return chosen


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = ["# Per-method defaults for adapt.py", "",
             f"Backbone: {data['arch']} {data['kwargs']} pretrained by weightgen.adapt.pretrain on the source glyph "
             f"task ({s['pretrain_epochs']} epochs, 32 px, grayscale), banks by closed form (preset {s.get('preset', PRESET)}"
             + (f" plus {s['extra_templates']} random templates per bank" if s.get("extra_templates") else "") + ", "
             f"templates/layers per bank: {data.get('banks', '1/2 each (before min_templates)')}, "
             f"K={s.get('coef_sets', 2)}). "
             f"Tasks {', '.join(data['tasks'])}, {s['max_train']} training / {s['max_eval']} validation and test "
             f"images each, batch {s['batch_size']}, a {s['steps']}-step budget. "
             + (commands(data) if len(data.get("parts", [])) > 1 else
                f"Command: `python benchmarks/bench_adapt_defaults.py` "
                + (f"({data['seconds'] / 60:.0f} min, 1 thread)." if "seconds" in data else
                   "(**partial**: interrupted at the deadline on a shared, overloaded 2-core machine; rendered with "
                   "--render from its .partial.json; the missing rows were not run).") + f" Settings: {s}"), "",
             f"## 1. Selection: mean VALIDATION accuracy over tasks and seeds {s['sweep_seeds']}", ""]
    lrs = sorted({r["lr"] for r in data["sweep"]})
    methods = list(dict.fromkeys(r["method"] for r in data["sweep"]))
    rows = []
    for m in methods:
        row = [m]
        for lr in lrs:
            v = [r["val_acc"] for r in data["sweep"] if r["method"] == m and r["lr"] == lr]
            if not v:
                row.append("(skipped)")
                continue
            cell = f"{statistics.fmean(v):.3f}"
            row.append(f"**{cell}**" if data["chosen"][m] == lr else cell)
        rows.append(row)
    lines += [markdown_table(["method", *(f"lr {lr:g}" for lr in lrs)], rows), "",
              "Bold: the chosen lr (best validation mean; ties go to the smaller lr).", "",
              f"## 2. Test accuracy at the chosen lr, seeds {s['seeds']} (mean over tasks per seed; "
              "mean +- 95% t interval over seeds)", ""]
    rows = []
    finals = {}
    for m in dict.fromkeys(r["method"] for r in data["final"]):
        for head in ("random", "probe"):
            sel = [r for r in data["final"] if r["method"] == m and r["head_init"] == head]
            if not sel:
                continue
            per = per_seed_mean(sel, "test_acc")
            finals[(m, head)] = per
            mean, half = ci95(list(per.values()))
            by_task = {t: statistics.fmean(r["test_acc"] for r in sel if r["task"] == t) for t in data["tasks"]}
            rows.append([m, f"{data['chosen'][m]:g}", head, f"{mean:.3f} +- {half:.3f}",
                         *(f"{by_task[t]:.3f}" for t in data["tasks"]),
                         f"{statistics.fmean(r['train_seconds'] for r in sel):.1f}",
                         f"{statistics.fmean(r['task_file_bytes'] for r in sel):,.0f}"])
    if data.get("logreg"):
        per = per_seed_mean(data["logreg"], "test_acc")
        finals[("logreg", "-")] = per
        mean, half = ci95(list(per.values()))
        by_task = {t: statistics.fmean(r["test_acc"] for r in data["logreg"] if r["task"] == t) for t in data["tasks"]}
        rows.append(["logreg (sklearn, frozen features, C on val)", "-", "-", f"{mean:.3f} +- {half:.3f}",
                     *(f"{by_task[t]:.3f}" for t in data["tasks"]), "-", "-"])
    lines += [markdown_table(["method", "lr", "head", "test acc", *data["tasks"], "train s / task", "task bytes"],
                             rows), "", "## 3. Targets (paired over seeds: the difference's mean +- 95% t interval)", ""]

    def diff(a, b):
        sa, sb = finals[a], finals[b]
        return ci95([sa[k] - sb[k] for k in sa if k in sb])

    for label, a, b in [("linear (random head) - logreg", ("linear", "random"), ("logreg", "-")),
                        ("linear (probe head) - logreg", ("linear", "probe"), ("logreg", "-")),
                        ("recast - linear (random heads)", ("recast", "random"), ("linear", "random")),
                        ("recast - linear (probe heads)", ("recast", "probe"), ("linear", "probe")),
                        ("recast: probe - random head", ("recast", "probe"), ("recast", "random")),
                        ("full: probe - random head", ("full", "probe"), ("full", "random"))] + [
            (f"{m} - linear (random heads)", (m, "random"), ("linear", "random"))
            for m, _ in finals if m.startswith("recast") and m != "recast"]:
        if a in finals and b in finals:
            m, h = diff(a, b)
            lines.append(f"- {label}: {m:+.3f} +- {h:.3f}")
    lines += ["", "Targets: `linear` within 3 points of the logistic regression (its difference > -0.03); "
              "`recast` above `linear` by more than the seed-to-seed spread (interval above 0).", "",
              "## Notes", "", *notes(data, finals, diff), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
