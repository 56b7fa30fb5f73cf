#!/usr/bin/env python
"""Are VAE prior samples copies of zoo models? A memorisation audit against the VAE's own zoo.

For every architecture in the zoo (same timm entry point and ``model_kwargs`` as the zoo's
models), ``--samples`` models are drawn from the VAE prior (every Linear/Conv2d weight but the
head; ``weightgen.vae.prior.sample_weights``). Each sample's nearest zoo model is the one with the
highest mean per-layer cosine over the Linear/Conv2d weights (head excluded: generators keep
timm's random head). Yardsticks:

* zoo siblings: each zoo model's nearest zoo model of the same architecture and another seed
  (checkpoints of the same run do not count);
* naive generators at comparable accuracy: (i) a zoo model plus Gaussian noise (std sigma x each
  layer's RMS, sigma bisected so the validation accuracy matches the samples'), (ii) averages of
  2+ zoo models of the same architecture; both with BatchNorm statistics re-estimated;
* timm's init trained for the same steps as the samples (what training alone does to closeness).

A prior sample keeps timm's random head, so it is at chance as sampled; each sample is therefore
also trained ``--train-steps`` steps (AdamW, the zoo model's lr) and audited again.

Controls drawn beside each sample: ``RMS-matched init`` (timm's init rescaled per layer to the VAE's
scale model: ``weightgen.studies.controls.rms_matched_init``) and, with ``--ppca``, ``PPCA prior``
(``ppca_sample_weights``), raw and trained like the samples.

Criterion (Target 4): each sample's nearest zoo model is no closer than zoo models of that
architecture are to one another (max sample cosine <= min sibling cosine).

Prediction similarity (function, not weights): on ``--probe-images`` test images, top-1 agreement
(``weightgen.metrics.prediction_agreement``) with the nearest zoo model of the same task, and linear
CKA of pre-logit features (``weightgen.metrics.linear_cka``) with the nearest zoo model of the
architecture; criterion: the samples' largest is below the median of the zoo's model-to-model
(nearest sibling of another seed) similarity.

    python benchmarks/bench_memorisation.py --zoo ZOO_DIR [--vae VAE_DIR] [--ppca PPCA_DIR] [--out docs]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, write_outputs  # noqa: E402

_START = time.perf_counter()
# Fresh models (samples, controls) use seeds from here on: a zoo model trained from seed s starts from
# timm's init at seed s, and stays close to it, so a control at the same seed would look like a copy.
SEED_OFFSET = 10_000


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f} s] {msg}", flush=True)


def _fresh(meta: dict, seed: int):
    import torch

    from weightgen.models import create_model

    with torch.random.fork_rng(devices=[]):  # timm's init uses the global RNG: seed it, leave ours alone
        torch.manual_seed(seed)
        return create_model(meta["arch"], meta.get("model_kwargs", {}))


def _accuracy(model, state: dict, data, split: str = "test") -> float:
    from weightgen.classifier import evaluate, reestimate_batchnorm

    model.load_state_dict(state)
    reestimate_batchnorm(model, data.train)
    return evaluate(model, getattr(data, split))


def _outputs(model, probe_x):
    """(features, logits) of the model as it stands (BatchNorm already re-estimated) on the probe inputs."""
    from weightgen.studies.audit import probe_outputs

    return probe_outputs(model, probe_x)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _task(meta: dict, override: str | None) -> str | None:
    """None: the default zoo's digits split (its model JSONs name no task)."""
    return override or meta.get("task")


def audit_group(metas: list[dict], refs: list[dict], args, vae_bundle, data_cache: dict, ppca=None) -> dict:
    """Every generator's accuracy and nearest-zoo cosine for one architecture on one task.

    ``metas``: the zoo's final models of that architecture and task (what noise and averages start
    from, and whose siblings are measured); ``refs``: every zoo model of the architecture (all
    tasks, checkpoints included), among which nearest neighbours are searched.
    """
    import torch
    from safetensors.torch import load_file

    from weightgen.classifier import train_classifier
    from weightgen.recasting import head_names
    from weightgen.metrics import linear_cka, prediction_agreement
    from weightgen.studies import audit
    from weightgen.studies.controls import ppca_sample_weights, rms_matched_init
    from weightgen.vae.codec import weight_layers
    from weightgen.vae.prior import sample_weights

    metas = [m for m in metas if "checkpoint_of" not in m] or metas
    first = metas[0]
    kwargs = first.get("model_kwargs", {})
    task = _task(first, args.task)
    key = (task, int(first.get("image_size") or kwargs.get("img_size") or 32), int(kwargs.get("in_chans", 1)))
    if key not in data_cache:
        data_cache[key] = audit.task_data(*key)
    data = data_cache[key]
    lr = float(first.get("lr", 1e-3))
    model = _fresh(first, 0)
    names = audit.compared_weights(model)
    noised = [f"{l['name']}.weight" for l in weight_layers(model) if l["direct"]]  # head too
    zoo = {m["model_id"]: load_file(m["weights"]) for m in refs}
    seed_of = {m["model_id"]: m.get("seed", m["model_id"]) for m in refs}
    split_of = {m["model_id"]: m.get("split", "train") for m in refs}
    own = [m["model_id"] for m in metas]  # this task's final models

    probe_x = data.test.tensors[0][:args.probe_images]
    # every zoo model's probe outputs, BatchNorm re-estimated as for every generated model
    zoo_out = {}
    for mid, state in zoo.items():
        _accuracy(model, state, data)
        zoo_out[mid] = _outputs(model, probe_x)

    def similar(out, exclude=None) -> dict:
        """Nearest zoo model by prediction agreement (same task: the classes mean the same) and by
        feature CKA (any task of the architecture)."""
        feats, logits = out
        agree = {m: prediction_agreement(logits, zoo_out[m][1]) for m in own if not (exclude and exclude(m))}
        cka = {m: linear_cka(feats, zoo_out[m][0]) for m in zoo if not (exclude and exclude(m))}
        best_a = max(agree, key=agree.get) if agree else None
        best_c = max(cka, key=cka.get) if cka else None
        return {"agreement": agree[best_a] if best_a else math.nan, "agreement_nearest": best_a,
                "cka": cka[best_c] if best_c else math.nan, "cka_nearest": best_c}

    def nearest(state, exclude=None, out=None):
        ref, cos = audit.nearest(state, zoo, names, exclude)
        row = {"nearest": ref, "nearest_split": split_of.get(ref), "cosine": cos}
        if out is not None:
            row.update(similar(out, exclude))
        return row

    rows = []
    for mid in own:  # zoo siblings: another seed of the same architecture
        sib = nearest(zoo[mid], exclude=lambda r, mid=mid: seed_of[r] == seed_of[mid], out=zoo_out[mid])
        if sib["nearest"] is not None:
            rows.append({"generator": "zoo siblings", "id": mid, "accuracy": next(
                m.get("test_accuracy") for m in metas if m["model_id"] == mid), **sib})
    say(f"  zoo: {len(own)} final model(s) on {task or 'digits (default zoo split)'}, {len(zoo)} of this "
        f"architecture in all, {len(rows)} with a sibling of another seed, {len(names)} layers compared")

    # how close a zoo model stays to the timm init it was trained from (same seed, same entry point)
    own_init = {mid: mean for mid in own if isinstance(seed_of[mid], int)
                for mean in [audit.mean_layer_cosine(zoo[mid], _state(_fresh(metas[0], seed_of[mid])), names)]}
    # noise floor: independent timm inits are this close to one another
    inits = [_state(_fresh(first, SEED_OFFSET + 500 + i)) for i in range(max(3, args.samples))]
    # three chance std (isotropic random weights), or the largest pair of inits if that is higher
    floor = max([3 * audit.chance_cosine_std(inits[0], names)]
                + [abs(audit.mean_layer_cosine(a, b, names)) for i, a in enumerate(inits) for b in inits[i + 1:]])
    del inits
    say(f"  zoo models vs their own timm init: {_range(list(own_init.values())) or 'n/a'}; "
        f"independent inits: |cos| <= {floor:.4f}")

    def draw(gen: str, s: int) -> dict:
        sample = _fresh(first, SEED_OFFSET + s)
        if gen == "VAE prior":
            sample_weights(sample, *vae_bundle, seed=s, skip=head_names(sample), in_place=True)
        elif gen == "RMS-matched init":
            rms_matched_init(sample, vae_bundle[1], skip=head_names(sample), in_place=True)
        elif gen == "PPCA prior":
            ppca_sample_weights(sample, ppca, vae_bundle[1], seed=s, skip=head_names(sample), in_place=True)
        return _state(sample)

    def measured(gen: str, ident: str, state: dict) -> dict:
        acc = _accuracy(model, state, data)
        return {"generator": gen, "id": ident, "accuracy": acc, **nearest(state, out=_outputs(model, probe_x))}

    drawn = ["VAE prior"] + (["RMS-matched init", "PPCA prior"] if ppca is not None else ["RMS-matched init"])
    for s in range(args.samples):
        starts = {gen: draw(gen, s) for gen in drawn}
        for gen, raw in starts.items():
            rows.append(measured(gen, f"sample {s}", raw))
        if args.train_steps:
            starts["timm init"] = _state(_fresh(first, SEED_OFFSET + s))
            for gen, start in starts.items():
                model.load_state_dict(start)
                train_classifier(model, data, args.train_steps, lr=lr, seed=s)
                rows.append(measured(f"{gen} + train", f"seed {s}", _state(model)))
        got = {r["generator"]: r for r in rows if r["id"] in (f"sample {s}", f"seed {s}")}
        say(f"  sample {s}: " + "; ".join(f"{g} acc {r['accuracy']:.3f} cos {r['cosine']:.3f} agree "
                                          f"{r['agreement']:.3f} cka {r['cka']:.3f}" for g, r in got.items()))

    # naive generator (i): a zoo model + noise, at the accuracy of the samples (raw and trained)
    targets = {"VAE prior": statistics.mean(r["accuracy"] for r in rows if r["generator"] == "VAE prior")}
    if args.train_steps:
        targets["VAE prior + train"] = statistics.mean(r["accuracy"] for r in rows
                                                        if r["generator"] == "VAE prior + train")
    for stage, target in targets.items():
        for i, mid in enumerate(own[:args.samples]):
            def val_accuracy(sigma, mid=mid, i=i):
                noisy = audit.with_relative_noise(zoo[mid], noised, sigma, torch.Generator().manual_seed(i))
                return _accuracy(model, noisy, data, "val")

            sigma, val_acc = audit.match_accuracy(val_accuracy, target, iterations=args.noise_iterations)
            noisy = audit.with_relative_noise(zoo[mid], noised, sigma, torch.Generator().manual_seed(i))
            rows.append({"generator": f"zoo + noise (matched to {stage})", "id": f"{mid} sigma {sigma:.3g}",
                         "sigma": sigma, "source": mid, "val_accuracy": val_acc,
                         "accuracy": _accuracy(model, noisy, data), **nearest(noisy, out=_outputs(model, probe_x))})
        say(f"  zoo + noise matched to {stage} ({target:.3f}): sigma "
            + ", ".join(f"{r['sigma']:.3g}" for r in rows if r["generator"].endswith(f"{stage})")))

    # naive generator (ii): averages of 2+ zoo models with different seeds
    seeds = {}
    for mid in own:
        seeds.setdefault(seed_of[mid], mid)  # one model per seed (the first listed)
    distinct = list(seeds.values())
    if len(distinct) >= 2:
        groups = [distinct[i:i + 2] for i in range(0, len(distinct) - 1)][:args.samples]
        if len(distinct) > 2:
            groups.append(distinct)
        for members in groups:
            mean = audit.average_states([zoo[m] for m in members])
            rows.append({"generator": "zoo average", "id": " + ".join(members), "members": members,
                         "accuracy": _accuracy(model, mean, data), **nearest(mean, out=_outputs(model, probe_x))})
        say("  zoo averages: " + ", ".join(f"acc {r['accuracy']:.3f} cos {r['cosine']:.3f}"
                                          for r in rows if r["generator"] == "zoo average"))

    sib = [r["cosine"] for r in rows if r["generator"] == "zoo siblings"]
    verdict, strict = {}, {}
    for stage in ("VAE prior", "VAE prior + train"):
        cos = [r["cosine"] for r in rows if r["generator"] == stage]
        if cos:
            strict[stage] = None if not sib else max(cos) <= min(sib)
            # within the noise floor a sample cannot be told from an independent init
            verdict[stage] = None if not sib else max(cos) <= max(min(sib), floor)
    # prediction similarity: every sample's nearest-zoo agreement / CKA below the zoo's own
    # model-to-model similarity (the median over zoo models of their nearest sibling's)
    prediction = {}
    for metric in ("agreement", "cka"):
        sib_m = [r[metric] for r in rows if r["generator"] == "zoo siblings" and r[metric] == r[metric]]
        for stage in [g for g in GENERATOR_ORDER if g not in ("zoo siblings",) and not g.startswith("zoo ")]:
            got = [r[metric] for r in rows if r["generator"] == stage and r[metric] == r[metric]]
            if got and sib_m:
                prediction[f"{stage}|{metric}"] = {"sample_max": max(got), "sample_mean": statistics.mean(got),
                                                   "zoo_median": statistics.median(sib_m), "zoo_min": min(sib_m),
                                                   "below": max(got) < statistics.median(sib_m)}
    return {"arch": first["arch"], "model_kwargs": kwargs, "task": task, "zoo_models": own, "references": list(zoo),
            "layers_compared": len(names), "rows": rows, "sibling_min": min(sib) if sib else None,
            "zoo_vs_own_init": own_init, "independent_init_floor": floor, "pass": verdict, "pass_strict": strict,
            "prediction_similarity": prediction, "probe_images": len(probe_x)}


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]  # a zoo JSON may lack its test accuracy
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _range(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f} – {max(values):.3f})" if values else ""


GENERATOR_ORDER = ["zoo siblings", "VAE prior", "RMS-matched init", "PPCA prior", "zoo + noise (matched to VAE prior)",
                   "VAE prior + train", "RMS-matched init + train", "PPCA prior + train",
                   "zoo + noise (matched to VAE prior + train)", "timm init + train", "zoo average"]


def report(groups: list[dict], args, info: dict, vae_dir: str, seconds: float) -> str:
    summary, detail, pred = [], [], []
    for g in groups:
        label = g["zoo_models"][0].rsplit("-s", 1)[0] if len(g["zoo_models"]) else g["arch"]
        verdicts = []
        for stage, ok in g["pass"].items():
            strict = g["pass_strict"][stage]
            verdicts.append(f"{stage}: " + ("n/a (no sibling)" if ok is None else
                                            ("pass" if strict else "pass (within floor)") if ok else "**fail**"))
        sample = [r["cosine"] for r in g["rows"] if r["generator"] == "VAE prior"]
        trained = [r["cosine"] for r in g["rows"] if r["generator"] == "VAE prior + train"]
        own = list(g["zoo_vs_own_init"].values())
        summary.append([label, f"`{g['arch']}`", len(g["zoo_models"]),
                        f"{statistics.mean(own):.3f}" if own else "", f"{g['independent_init_floor']:.4f}",
                        "" if g["sibling_min"] is None else f"{g['sibling_min']:.3f}",
                        f"{max(sample):.3f}", f"{max(trained):.3f}" if trained else "", "; ".join(verdicts)])
        for gen in GENERATOR_ORDER:
            rows = [r for r in g["rows"] if r["generator"] == gen]
            if not rows:
                continue
            name = gen.replace("+ train", f"+ {args.train_steps} steps")
            detail.append([label, name, len(rows), _cell([r["accuracy"] for r in rows]),
                           _range([r["cosine"] for r in rows]),
                           _range([r["agreement"] for r in rows if r.get("agreement") == r.get("agreement")]),
                           _range([r["cka"] for r in rows if r.get("cka") == r.get("cka")])])
        for key, v in g.get("prediction_similarity", {}).items():
            stage, metric = key.split("|")
            pred.append([label, stage.replace("+ train", f"+ {args.train_steps} steps"), metric,
                         f"{v['sample_mean']:.3f}", f"{v['sample_max']:.3f}", f"{v['zoo_median']:.3f}",
                         f"{v['zoo_min']:.3f}", "below" if v["below"] else "**not below**"])
    passed = [ok for g in groups for ok in g["pass"].values() if ok is not None]
    overall = ("no architecture has zoo models of two seeds: the criterion cannot be checked" if not passed else
               f"{sum(passed)} of {len(passed)} checks pass")
    pred_checks = [v["below"] for g in groups for v in g.get("prediction_similarity", {}).values()]
    pred_overall = f"{sum(pred_checks)} of {len(pred_checks)} prediction-similarity checks below the zoo's own"
    return "\n".join([
        "# Memorisation audit: are VAE prior samples copies of zoo models?",
        "",
        f"`{info['command']}`: zoo `{args.zoo}`, VAE `{vae_dir}`; {args.samples} prior samples per zoo architecture "
        f"(same timm entry point and kwargs as the zoo's models); cosine = mean over the Linear/Conv2d weights "
        f"(classifier head excluded) of the cosine of the flattened tensors, against the closest zoo model of "
        f"that architecture (any task, checkpoints included). Accuracy: held-out test split of each model's task, BatchNorm statistics "
        f"re-estimated on 20 training batches. A raw prior sample keeps timm's random head, so it sits at "
        f"chance; it is also trained {args.train_steps} steps (AdamW at the zoo model's lr) and audited again, "
        f"next to timm's init trained the same way. Noise: std sigma x layer RMS on every Linear/Conv2d weight "
        f"(head included), sigma bisected on the validation split to the samples' mean accuracy. "
        f"{seconds:.0f} s on {info['cpus']} CPUs ({info['cpu']}), {args.threads} torch thread(s).",
        "",
        f"Criterion: every sample's nearest zoo model is no closer than the zoo's models (another seed, same "
        f"architecture) are to their nearest sibling, i.e. max sample cosine <= min sibling cosine; where both "
        f"sit below the floor (3 x the std of the cosine between independent random weights of these shapes, "
        f"sqrt(sum 1/numel) / layers, or the largest |cosine| between independent timm inits if higher) "
        f"the difference is noise and the check passes \"within floor\". Result: {overall}. "
        f"Fresh models (samples, timm controls, floor) use seeds {SEED_OFFSET}+, because a zoo model stays "
        f"close to the timm init of its own seed (column 'zoo model vs own init').",
        "",
        markdown_table(["zoo architecture", "timm", "zoo models", "zoo model vs own init", "independent-init floor",
                        "min sibling cos", "max sample cos (raw)", f"max sample cos (+{args.train_steps} steps)",
                        "criterion"], summary, align="llrrrrrrl"),
        "",
        "## Every generator",
        "",
        markdown_table(["zoo architecture", "generator", "models", "test accuracy", "nearest-zoo cosine mean (min – max)",
                        "nearest-zoo top-1 agreement", "nearest-zoo feature CKA"],
                       detail, align="llrrlll"),
        "",
        "## Prediction similarity",
        "",
        f"Result: {pred_overall}.",
        "",
        f"On {groups[0].get('probe_images', args.probe_images) if groups else args.probe_images} test images of the "
        "task, every model's BatchNorm statistics re-estimated (zoo models too): top-1 agreement "
        "(`weightgen.metrics.prediction_agreement`) with the nearest zoo model of the same architecture and task "
        "(the classes mean the same), and linear CKA of the pre-logit features (`weightgen.metrics.linear_cka`) "
        "with the nearest zoo model of the architecture, any task. Zoo model-to-model: each zoo model's nearest "
        "zoo model of another seed (its siblings). Criterion: the samples' largest nearest-zoo similarity is "
        "below the median of the zoo's own. A raw sample keeps timm's random head: its agreement is near "
        "chance by construction and only its CKA is informative; after training both are. The zoo + noise and "
        "zoo average rows show what a copy scores. Caveat: a model less accurate than the zoo cannot agree "
        "with it much more than its accuracy allows, so below-the-zoo agreement is easy to pass; the sharper "
        "test is against a copy at the same accuracy (zoo + noise matched to the trained samples) and against "
        "timm's init trained as long (a generator that merely starts training somewhere).",
        "",
        markdown_table(["zoo architecture", "generator", "measure", "sample mean", "sample max", "zoo median",
                        "zoo min", "criterion"], pred, align="lllrrrrl"),
        "",
    ])


def rerender(args) -> int:
    """The Markdown report of an earlier run, from its JSON (the report's wording may have changed since)."""
    from weightgen.io import WeightgenError

    try:
        data = json.loads(Path(args.from_json).read_text())
    except (OSError, ValueError) as err:
        raise WeightgenError(f"cannot read {args.from_json}: {err}") from None
    for key in ("zoo", "samples", "train_steps", "ppca", "probe_images"):
        setattr(args, key, data.get(key, getattr(args, key, None)))
    md = report(data["groups"], args, data["machine"], data["vae"], data["seconds"])
    out = Path(args.out) / f"{args.stem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", help="the zoo the VAE was trained on (scripts/build_zoo.py output; required unless "
                                 "--from-json)")
    p.add_argument("--vae", help="VAE directory (default: the shipped one, weightgen/assets/vae)")
    p.add_argument("--samples", type=int, default=5, help="prior samples per zoo architecture (default 5)")
    p.add_argument("--train-steps", type=int, default=50,
                   help="train each sample this many steps and audit it again (0: raw samples only; default 50)")
    p.add_argument("--archs", nargs="+", help="only zoo models whose timm entry point is one of these")
    p.add_argument("--with-siblings-only", action="store_true",
                   help="audit only architectures with zoo models of 2+ seeds (where the criterion can be checked)")
    p.add_argument("--task", help="task of every zoo model (default: each model JSON's 'task'; none: the "
                                  "default zoo's digits split)")
    p.add_argument("--all-tasks", action="store_true",
                   help="audit each architecture on every task its zoo models learned (default: on the task "
                        "with the most final models; neighbours are searched over all tasks either way)")
    p.add_argument("--noise-iterations", type=int, default=8, help="bisection steps for the noise level (default 8)")
    p.add_argument("--ppca", help="PPCA prior directory (weightgen.studies.controls.save_ppca) for the PPCA control "
                                  "rows (default: no PPCA rows; the RMS-matched control always runs)")
    p.add_argument("--probe-images", type=int, default=500,
                   help="test images on which predictions and features are compared (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="docs", help="output folder (default docs)")
    p.add_argument("--stem", default="bench_memorisation",
                   help="output file stem (default bench_memorisation; summarise_init_gain.py reads that JSON)")
    p.add_argument("--from-json", metavar="JSON",
                   help="only rewrite the Markdown report from an earlier run's JSON output (no measuring)")
    args = p.parse_args(argv)
    if args.from_json:
        return rerender(args)

    import torch

    from weightgen.io import WeightgenError
    from weightgen.studies import audit
    from weightgen.vae.prior import default_vae_dir, load_vae_bundle

    if not args.zoo:
        raise WeightgenError("--zoo is required (unless --from-json)")
    if args.samples < 1 or args.train_steps < 0 or args.noise_iterations < 1:
        raise WeightgenError("--samples and --noise-iterations must be >= 1, --train-steps >= 0")
    torch.set_num_threads(args.threads)
    vae_bundle = load_vae_bundle(args.vae)
    ppca = None
    if args.ppca:
        from weightgen.studies.controls import load_ppca

        try:
            ppca = load_ppca(args.ppca)
        except ValueError as err:
            raise WeightgenError(str(err)) from None
    if args.probe_images < 10:
        raise WeightgenError("--probe-images must be >= 10")
    models = audit.zoo_models(args.zoo)
    if args.archs:
        models = [m for m in models if m["arch"] in args.archs]
        if not models:
            raise WeightgenError(f"no zoo model has an architecture among {args.archs}")
    by_arch: dict[str, list[dict]] = {}
    for meta in models:
        by_arch.setdefault(audit.architecture_key(meta), []).append(meta)
    groups = []  # (final models of one task, every model of the architecture)
    for refs in by_arch.values():
        tasks: dict = {}
        for meta in refs:
            if "checkpoint_of" not in meta:
                tasks.setdefault(_task(meta, args.task), []).append(meta)
        chosen = list(tasks.values()) if args.all_tasks else [max(tasks.values(), key=len)] if tasks else []
        groups += [(finals, refs) for finals in chosen]
    try:
        vae_dir = str(default_vae_dir().relative_to(Path(__file__).resolve().parents[1])) if not args.vae else args.vae
    except ValueError:
        vae_dir = str(default_vae_dir())
    if args.with_siblings_only:
        groups = [(f, r) for f, r in groups if len({m.get("seed", m["model_id"]) for m in f}) >= 2]
        if not groups:
            raise WeightgenError(f"no architecture in {args.zoo} has zoo models of two or more seeds")
    say(f"{len(models)} zoo models, {len(by_arch)} architectures, {len(groups)} to audit")
    results, data_cache = [], {}
    for i, (finals, refs) in enumerate(groups, 1):
        say(f"[{i}/{len(groups)}] {finals[0]['arch']} {json.dumps(finals[0].get('model_kwargs', {}), sort_keys=True)}"
            f" on {_task(finals[0], args.task) or 'digits'}")
        results.append(audit_group(finals, refs, args, vae_bundle, data_cache, ppca))
    info = machine_info()
    seconds = time.perf_counter() - _START
    md = report(results, args, info, vae_dir, seconds)
    checks = [ok for g in results for ok in g["pass"].values() if ok is not None]
    write_outputs(args.out, args.stem, md,
                  {"machine": info, "zoo": args.zoo, "vae": vae_dir, "samples": args.samples,
                   "train_steps": args.train_steps, "criterion_checks": len(checks), "criterion_passed": sum(checks),
                   "ppca": args.ppca, "probe_images": args.probe_images,
                   "groups": results, "seconds": round(seconds, 1)},
                  default=str)
    return 0


if __name__ == "__main__":
    from weightgen.cli import run_cli

    sys.exit(run_cli(main))
