#!/usr/bin/env python
"""Do models drawn from the prior work? Accuracy of prior samples against the zoo and two init controls.

For every architecture of a zoo (same timm entry point and ``model_kwargs`` as its models),
``--samples`` models are drawn from each generator, every Linear/Conv2d weight included (the head
too: a generated head is what a zero-shot accuracy needs):

* ``timm init``: timm's own init (fresh seeds);
* ``RMS-matched``: timm's init with each layer rescaled to the RMS a VAE's scale model predicts
  (``weightgen.studies.controls.rms_matched_init``): what a per-layer scale alone gives;
* ``PPCA``: probabilistic PCA of the zoo's 64-value tokens, the VAE's latent size and the first
  VAE's scale model (``ppca_sample_weights``; fitted on the train split of ``--zoo`` unless ``--ppca``
  is given);
* ``VAE``: the VAE prior (``weightgen.vae.prior.sample_weights``), for each ``--vae LABEL=DIR``.

Each model, the zoo's own included, is measured the same way on its architecture's task (the task
most of its zoo models learned), from a fixed subset of the zoo's own split (``structured_data``):
BatchNorm statistics re-estimated on the ``--probe-train`` images, then

* linear probe: logistic regression (sklearn, standardised features) on the frozen pre-logit
  features of ``--probe-train`` training images, accuracy on ``--probe-test`` test images;
* zero-shot: the model's own head on the same test images (no training at all).

Targets (issue 14, item 4), per architecture and generator:

* gap: (median probe accuracy of the samples - that of the RMS-matched control) / (zoo median -
  RMS-matched median) >= 0.5, with a 95% bootstrap interval over the samples;
* task: zero-shot median >= 0.9 x the zoo's median zero-shot accuracy on the task. A generator
  without task conditioning cannot know which output unit is which class: it misses this by
  construction, and the row says so.

    python benchmarks/bench_generation.py --zoo /work/zoo-structured --samples 100 [--vae v2=DIR ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, write_outputs  # noqa: E402

_START = time.perf_counter()
SEED_OFFSET = 10_000  # fresh models never reuse a zoo model's init seed
BOOTSTRAP = 2000


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f} s] {msg}", flush=True)


def _fresh(meta: dict, seed: int):
    import torch

    from weightgen.models import create_model

    with torch.random.fork_rng(devices=[]):  # timm's init draws from the global RNG: seed it, leave ours alone
        torch.manual_seed(seed)
        return create_model(meta["arch"], meta.get("model_kwargs", {}))


class Probe:
    """The fixed probe data of one task and the two measures of a model on it."""

    def __init__(self, task: str, n_train: int, n_test: int, seed: int = 0):
        import torch

        from weightgen.zoo import structured_data

        data = structured_data(task)
        gen = torch.Generator().manual_seed(seed)
        xtr, ytr = data["train"]
        idx = torch.randperm(len(ytr), generator=gen)[:n_train]
        self.xtr, self.ytr = xtr[idx], ytr[idx]
        xte, yte = data["test"]
        idx = torch.randperm(len(yte), generator=gen)[:n_test]
        self.xte, self.yte = xte[idx], yte[idx]
        self.task = task
        self.seed = seed

    def measure(self, model) -> dict:
        import numpy as np
        import torch
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from weightgen.classifier import reestimate_batchnorm
        from weightgen.studies.audit import probe_outputs

        reestimate_batchnorm(model, torch.utils.data.TensorDataset(self.xtr), batches=len(self.xtr) // 64)
        ftr, _ = probe_outputs(model, self.xtr)
        fte, logits = probe_outputs(model, self.xte)
        zero_shot = (logits.argmax(-1) == self.yte).double().mean().item()
        ftr, fte = ftr.double().numpy(), fte.double().numpy()
        if not (np.isfinite(ftr).all() and np.isfinite(fte).all()):
            return {"probe": float("nan"), "zero_shot": zero_shot, "finite": False}
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=1.0, random_state=self.seed))
        clf.fit(ftr, self.ytr.numpy())
        probe = float((clf.predict(fte) == self.yte.numpy()).mean())
        return {"probe": probe, "zero_shot": zero_shot, "finite": True}


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def revive_zero_norms(model) -> int:
    """Open timm's zero residual gates to 1 (``weightgen.models.open_residual_gates``), in every generator
    alike: a generator writes only Linear/Conv2d weights, so a generated ResNet or ConvNeXt would compute
    (almost) only its shortcuts whatever was drawn, and every generator would look alike."""
    from weightgen.models import open_residual_gates

    return open_residual_gates(model, 1.0)


def gap_closed(samples: list[float], control: list[float], zoo_median: float, seed: int = 0) -> dict:
    """(median(samples) - median(control)) / (zoo median - median(control)), with a 95% bootstrap interval
    (samples and control resampled; the zoo median held fixed: the zoo has only a few models per task)."""
    import numpy as np

    s, c = np.asarray([v for v in samples if v == v]), np.asarray([v for v in control if v == v])
    denom = zoo_median - np.median(c)
    point = float((np.median(s) - np.median(c)) / denom) if denom > 0 else float("nan")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(BOOTSTRAP):
        cs = np.median(rng.choice(c, len(c)))
        d = zoo_median - cs
        if d > 0:
            boots.append((np.median(rng.choice(s, len(s))) - cs) / d)
    lo, hi = (np.percentile(boots, [2.5, 97.5]).tolist() if boots else [float("nan")] * 2)
    return {"point": point, "ci95": [lo, hi], "met": bool(point >= 0.5) if point == point else None}


def run_arch(metas: list[dict], args, generators: dict, ppca_of: dict) -> dict:
    from collections import Counter

    import torch
    from safetensors.torch import load_file

    from weightgen.studies.controls import ppca_sample_weights, rms_matched_init
    from weightgen.vae.prior import sample_weights

    tasks = Counter(m["task"] for m in metas)
    task = sorted(tasks, key=lambda t: (-tasks[t], t))[0]
    probe = Probe(task, args.probe_train, args.probe_test, args.probe_seed)
    first = metas[0]
    label = first["model_id"].rsplit("-r", 1)[0] if "-r" in first["model_id"] else first["arch"]
    rows = []
    for m in sorted(metas, key=lambda m: m["model_id"]):
        model = _fresh(m, 0)
        model.load_state_dict(load_file(m["weights"]))
        r = probe.measure(model)
        rows.append({"generator": "zoo" if m["task"] == task else "zoo (other task)", "id": m["model_id"],
                     "task": m["task"], **r})
    say(f"  {label} on {task}: zoo probe " + ", ".join(f"{r['probe']:.3f}" for r in rows if r["generator"] == "zoo"))

    timings = {}
    for gen, (kind, bundle) in generators.items():
        t0 = time.perf_counter()
        for s in range(args.samples):
            model = _fresh(first, SEED_OFFSET + s)
            if kind == "timm":
                pass
            elif kind == "rms":
                rms_matched_init(model, bundle[1], in_place=True)
            elif kind == "ppca":
                ppca_sample_weights(model, ppca_of[gen], bundle[1], seed=s, in_place=True)
            else:
                sample_weights(model, *bundle, seed=s, in_place=True)
            if args.revive_zero_norms:
                revive_zero_norms(model)
            rows.append({"generator": gen, "id": f"seed {s}", **probe.measure(model)})
        timings[gen] = (time.perf_counter() - t0) / args.samples
        got = [r for r in rows if r["generator"] == gen]
        say(f"  {gen}: probe median {_median([r['probe'] for r in got]):.3f}, zero-shot median "
            f"{_median([r['zero_shot'] for r in got]):.3f} ({timings[gen]:.2f} s/sample)")
    return {"label": label, "arch": first["arch"], "model_kwargs": first.get("model_kwargs", {}), "task": task,
            "probe_train": len(probe.ytr), "probe_test": len(probe.yte), "rows": rows,
            "seconds_per_sample": timings}


def targets(group: dict, generators: dict, controls: dict) -> list[dict]:
    """Gap and zero-shot targets of each learned generator (PPCA, VAE) in one architecture."""
    zoo = [r for r in group["rows"] if r["generator"] == "zoo"]
    zoo_probe = _median([r["probe"] for r in zoo])
    zoo_zero = _median([r["zero_shot"] for r in zoo])
    out = []
    for gen, (kind, _) in generators.items():
        if kind in ("timm", "rms"):
            continue
        control = controls[gen]
        probe = [r["probe"] for r in group["rows"] if r["generator"] == gen]
        zero = [r["zero_shot"] for r in group["rows"] if r["generator"] == gen]
        ctrl = [r["probe"] for r in group["rows"] if r["generator"] == control]
        ratio = _median(zero) / zoo_zero if zoo_zero > 0 else float("nan")
        out.append({"generator": gen, "control": control, "zoo_probe_median": zoo_probe,
                    "control_probe_median": _median(ctrl), "probe_median": _median(probe),
                    "gap": gap_closed(probe, ctrl, zoo_probe), "zoo_zero_shot_median": zoo_zero,
                    "zero_shot_median": _median(zero), "zero_shot_ratio": ratio,
                    "zero_shot_met": bool(ratio >= 0.9) if ratio == ratio else None})
    return out


def _fmt(v: float) -> str:
    return "n/a" if v != v else f"{v:.3f}"


def _spread(values: list[float]) -> str:
    values = sorted(v for v in values if v == v)
    if not values:
        return "n/a"
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]"


def report(groups: list[dict], args, info: dict, generators: list[str], ppca_note: str, seconds: float) -> str:
    table, tgt = [], []
    order = ["zoo", "zoo (other task)"] + list(generators)
    for g in groups:
        for gen in order:
            rows = [r for r in g["rows"] if r["generator"] == gen]
            if not rows:
                continue
            sps = g["seconds_per_sample"].get(gen)
            table.append([g["label"], g["task"], gen, len(rows), _spread([r["probe"] for r in rows]),
                          _spread([r["zero_shot"] for r in rows]), "" if sps is None else f"{sps:.2f}"])
        for t in g["targets"]:
            lo, hi = t["gap"]["ci95"]
            gap_met = {True: "met", False: "**missed**", None: "n/a"}[t["gap"]["met"]]
            zero_met = {True: "met", False: "**missed**", None: "n/a"}[t["zero_shot_met"]]
            cond = "no task input"
            tgt.append([g["label"], t["generator"], _fmt(t["zoo_probe_median"]), _fmt(t["control_probe_median"]),
                        _fmt(t["probe_median"]), f"{_fmt(t['gap']['point'])} [{_fmt(lo)}, {_fmt(hi)}]", gap_met,
                        f"{_fmt(t['zero_shot_median'])} / {_fmt(t['zoo_zero_shot_median'])} = "
                        f"{_fmt(t['zero_shot_ratio'])}", f"{zero_met} ({cond})"])
    all_t = [t for g in groups for t in g["targets"]]
    met_gap = sum(1 for t in all_t if t["gap"]["met"])
    met_zero = sum(1 for t in all_t if t["zero_shot_met"])
    vae_lines = [f"- `{k}`: {v}" for k, v in args.vae_descriptions.items()]
    return "\n".join([
        "# Generation: do models drawn from the prior work?",
        "",
        f"`{info['command']}`: zoo `{args.zoo}`; {args.samples} models per generator and architecture; "
        f"{seconds:.0f} s on {info['cpus']} CPUs ({info['cpu']}), {args.threads} torch thread(s), "
        f"machine shared with other jobs.",
        "",
        "Generators (every Linear/Conv2d weight drawn, the classifier head included; biases and norms at timm's "
        f"init; fresh models use timm seeds {SEED_OFFSET}+"
        + ("; the residual-branch gates timm starts at zero, the last BatchNorm scale of each ResNet block "
           "(`zero_init_last`) and ConvNeXt's layer scale `gamma` (1e-6), set to 1 in every generator alike, or "
           "a generated ResNet or ConvNeXt would compute (almost) only its shortcuts whatever was drawn; the zoo's "
           "trained ConvNeXt layer scales are 0.06-0.16" if args.revive_zero_norms
           else "; timm's zero residual-branch gates kept (`--keep-zero-norms`)") + "):",
        "- `timm init`: timm's own init.",
        "- `RMS-matched (X)`: timm's init, each layer rescaled to the RMS that VAE X's scale model predicts "
        "(`controls.rms_matched_init`).",
        f"- `PPCA (X)`: {ppca_note}, scaled by VAE X's scale model (`controls.ppca_sample_weights`).",
        *vae_lines,
        "",
        f"Measure: each model on its architecture's task (the task most of its zoo models learned), on a fixed "
        f"subset of the zoo's own split (`weightgen.zoo.structured_data`, subset seed {args.probe_seed}): BatchNorm "
        f"statistics re-estimated on {args.probe_train} training images; **linear probe** = logistic regression "
        f"(sklearn, standardised, C=1) on the frozen pre-logit features of those {args.probe_train} images, "
        f"accuracy on {args.probe_test} test images; **zero-shot** = the model's own head on the same test images. "
        "Cells: median [quartiles]. `zoo (other task)`: zoo models of the architecture trained on another task, "
        "probed on this one (transfer; not in the zoo median). Chance is 0.1 (10 classes).",
        "",
        markdown_table(["architecture", "task", "generator", "models", "linear probe", "zero-shot", "s/model"],
                       table, align="lllrrrr"),
        "",
        "## Targets",
        "",
        "Gap: (sample median - RMS-matched median) / (zoo median - RMS-matched median) of the linear-probe "
        "accuracy, with the RMS-matched control of the same scale model; target >= 0.5; 95% bootstrap "
        f"interval ({BOOTSTRAP} resamples of samples and control; the zoo median fixed). Task: zero-shot median "
        "/ zoo zero-shot median, target >= 0.9 with no training.",
        "",
        markdown_table(["architecture", "generator", "zoo median", "RMS-matched median", "sample median",
                        "gap closed [95% CI]", "gap target", "zero-shot: samples / zoo = ratio", "task target"],
                       tgt, align="llrrrrlrl"),
        "",
        f"Gap target met in {met_gap} of {len(all_t)} (architecture, generator) cells; task target met in "
        f"{met_zero} of {len(all_t)}.",
        "",
        "Task target: no generator here takes a task as input (the VAE's conditioning vector is the layer's "
        "kind, shape, depth and position: `weightgen.vae.tokenize.COND_FIELDS`), so a generated head cannot "
        "know which output unit is which class, and zero-shot accuracy is at chance by construction. Reaching "
        "it would take a task-conditioned decoder (a task embedding, e.g. class-mean features of a few labelled "
        "images, as an extra conditioning input, trained on a zoo with several models per task) or a "
        "head fitted afterwards, which is training.",
        "",
        "![probe accuracy per architecture](bench_generation.png)",
        "",
    ])


COLOURS = {"zoo": "black", "zoo (other task)": "tab:gray", "timm init": "tab:brown"}


def plot(groups: list[dict], generators: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = ["zoo", "zoo (other task)"] + generators
    palette = ["tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:red", "tab:cyan", "tab:olive"]
    colours = dict(COLOURS)
    for gen in generators:
        if gen not in colours:
            colours[gen] = palette[len([c for c in colours if c not in COLOURS]) % len(palette)]
    n = len(groups)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, g in zip(axes.flat, groups):
        present = [gen for gen in order if any(r["generator"] == gen for r in g["rows"])]
        for i, gen in enumerate(present):
            vals = np.array([r["probe"] for r in g["rows"] if r["generator"] == gen and r["probe"] == r["probe"]])
            zero = np.array([r["zero_shot"] for r in g["rows"] if r["generator"] == gen])
            if len(vals) > 4:
                ax.boxplot([vals], positions=[i], widths=0.6, showfliers=False,
                           medianprops={"color": colours[gen], "linewidth": 2})
            ax.scatter(i + rng.uniform(-0.22, 0.22, len(vals)), vals, s=9, alpha=0.5, color=colours[gen])
            if len(zero):
                ax.scatter([i + 0.35], [np.median(zero)], marker="x", s=40, color=colours[gen])
        zoo = [r["probe"] for r in g["rows"] if r["generator"] == "zoo"]
        if zoo:
            ax.axhline(float(np.median(zoo)), color="black", linestyle="--", linewidth=1)
        ax.axhline(0.1, color="gray", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("linear-probe test accuracy")
        ax.set_title(f"{g['label']} on {g['task']}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Linear probe on frozen features (dots, box) and zero-shot median (x); "
                 "dashed: zoo median, dotted: chance", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish(results: list[dict], args, generators: list[str], ppca_note: str, vaes: dict, seconds: float,
           parts: list[str]) -> None:
    info = machine_info()
    if parts:  # a merge: the commands that measured, not this one
        info["command"] = " ; ".join(parts)
    md = report(results, args, info, generators, ppca_note, seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, generators, out / f"{args.stem}.png")
    write_outputs(args.out, args.stem, md,
                  {"machine": info, "zoo": args.zoo, "vaes": vaes, "vae_descriptions": args.vae_descriptions,
                   "ppca": ppca_note, "generators": generators, "samples": args.samples,
                   "probe_train": args.probe_train, "probe_test": args.probe_test, "probe_seed": args.probe_seed,
                   "revive_zero_norms": args.revive_zero_norms, "threads": args.threads,
                   "groups": results, "seconds": round(seconds, 1)}, default=str)


def merge(args) -> int:
    """One report from the JSON outputs of runs on disjoint architectures (same settings)."""
    from weightgen.io import WeightgenError

    parts = []
    for path in args.merge:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise WeightgenError(f"cannot read {path}: {err}") from None
    first = parts[0]
    keys = ("zoo", "generators", "samples", "probe_train", "probe_test", "probe_seed", "revive_zero_norms", "ppca")
    for part, path in zip(parts[1:], args.merge[1:]):
        if any(part.get(k) != first.get(k) for k in keys):
            raise WeightgenError(f"{path} was measured with other settings than {args.merge[0]}")
    for k in ("zoo", "samples", "probe_train", "probe_test", "probe_seed", "revive_zero_norms", "threads"):
        setattr(args, k, first[k])
    args.vae_descriptions = first["vae_descriptions"]
    groups = [g for part in parts for g in part["groups"]]
    seconds = sum(part["seconds"] for part in parts)
    finish(groups, args, first["generators"], first["ppca"], first["vaes"], seconds,
           [part["machine"]["command"] for part in parts])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=False, help="a structured zoo (scripts/build_zoo.py --preset structured)")
    p.add_argument("--vae", action="append", default=[], metavar="LABEL=DIR",
                   help="a VAE to sample (repeatable); default: the shipped one as 'v2'")
    p.add_argument("--describe", action="append", default=[], metavar="LABEL=TEXT",
                   help="one line on how VAE LABEL was trained, for the report")
    p.add_argument("--ppca", help="PPCA prior directory (controls.save_ppca); default: fitted here on the "
                                  "train split of --zoo at the first VAE's latent size")
    p.add_argument("--samples", type=int, default=100, help="models per generator and architecture (default 100)")
    p.add_argument("--probe-train", type=int, default=512, help="probe training images (default 512)")
    p.add_argument("--probe-test", type=int, default=500, help="probe test images (default 500)")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the probe subset (default 0)")
    p.add_argument("--archs", nargs="+", help="only zoo models whose label (e.g. resnet18-w8-d1) starts with one of these")
    p.add_argument("--keep-zero-norms", dest="revive_zero_norms", action="store_false",
                   help="keep timm's zero residual gates (ResNet zero_init_last BatchNorm, ConvNeXt layer scale 1e-6) "
                        "in generated models; by default they are set to 1 in every generator alike, so the "
                        "generated residual branches count")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only write the report from these outputs of earlier runs (e.g. one per --archs shard)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="docs", help="output folder (default docs)")
    p.add_argument("--stem", default="bench_generation", help="output file stem (default bench_generation)")
    args = p.parse_args(argv)

    import torch

    from weightgen.io import WeightgenError
    from weightgen.studies import audit
    from weightgen.studies.controls import fit_ppca_on_zoo, load_ppca
    from weightgen.vae.prior import default_vae_dir, load_vae_bundle

    if args.merge:
        return merge(args)
    if not args.zoo:
        raise WeightgenError("--zoo is required (unless --merge)")
    if args.samples < 1 or args.probe_train < 64 or args.probe_test < 10:
        raise WeightgenError("--samples must be >= 1, --probe-train >= 64, --probe-test >= 10")
    torch.set_num_threads(args.threads)
    vaes = {}
    for spec in args.vae or [f"v2={default_vae_dir()}"]:
        if "=" not in spec:
            raise WeightgenError(f"--vae takes LABEL=DIR, got {spec!r}")
        label, path = spec.split("=", 1)
        vaes[label] = (path, load_vae_bundle(path))
    args.vae_descriptions = {}
    for spec in args.describe:
        label, _, text = spec.partition("=")
        args.vae_descriptions[f"VAE ({label})"] = text
    for label, (path, _) in vaes.items():
        args.vae_descriptions.setdefault(f"VAE ({label})", f"the VAE prior in `{path}`")
    if args.ppca:
        ppca, ppca_note = load_ppca(args.ppca), f"the PPCA prior in `{args.ppca}`"
    else:
        latent = next(iter(vaes.values()))[1][0].config.latent_dim
        say(f"fitting a PPCA (latent {latent}) on the train split of {args.zoo}")
        ppca = fit_ppca_on_zoo(args.zoo, latent)
        ppca_note = (f"PPCA of the 64-value tokens per layer kind and depth quarter, latent {latent}, fitted here on "
                     f"the {len(ppca.info['train_models'])} train-split models of `{args.zoo}`")
    generators, controls, ppca_of = {"timm init": ("timm", None)}, {}, {}
    for label, (_, bundle) in vaes.items():
        generators[f"RMS-matched ({label})"] = ("rms", bundle)
    for label, (_, bundle) in list(vaes.items())[:1]:  # one PPCA row (the first VAE's scale model): time
        generators[f"PPCA ({label})"] = ("ppca", bundle)
        ppca_of[f"PPCA ({label})"] = ppca
        controls[f"PPCA ({label})"] = f"RMS-matched ({label})"
    for label, (_, bundle) in vaes.items():
        generators[f"VAE ({label})"] = ("vae", bundle)
        controls[f"VAE ({label})"] = f"RMS-matched ({label})"
    models = [m for m in audit.zoo_models(args.zoo) if "checkpoint_of" not in m]
    if any("task" not in m for m in models):
        raise WeightgenError(f"{args.zoo}: every model JSON needs a 'task' (a structured zoo)")
    by_arch: dict[str, list[dict]] = {}
    for m in models:
        by_arch.setdefault(audit.architecture_key(m), []).append(m)
    groups = list(by_arch.values())
    if args.archs:
        groups = [g for g in groups if any(m["model_id"].startswith(tuple(args.archs)) for m in g)]
        if not groups:
            raise WeightgenError(f"no zoo architecture starts with one of {args.archs}")
    results = []
    for i, metas in enumerate(groups, 1):
        say(f"[{i}/{len(groups)}] {metas[0]['arch']} {json.dumps(metas[0].get('model_kwargs', {}), sort_keys=True)}")
        g = run_arch(metas, args, generators, ppca_of)
        g["targets"] = targets(g, generators, controls)
        results.append(g)
    seconds = time.perf_counter() - _START
    finish(results, args, list(generators), ppca_note, {k: v[0] for k, v in vaes.items()}, seconds, [])
    return 0


if __name__ == "__main__":
    from weightgen.cli import run_cli

    sys.exit(run_cli(main))
