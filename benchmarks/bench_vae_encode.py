#!/usr/bin/env python
"""Issue 8, targets 1-2: do held-out models keep their accuracy when rebuilt through a VAE?

    python benchmarks/bench_vae_encode.py --zoo /work/zoo-field [--vae new=DIR --vae old=weightgen/assets/vae]

Held-out models are the zoo's ``"split": "heldout"`` final models (new seeds of zoo architectures,
never seen in VAE training); held-out architectures are trained here on the digits task (seeded), from timm
entry points the zoo never uses. Every Linear/Conv2d weight except the classifier head is rebuilt
(``scripts/reconstruct.py --keep-head`` semantics: one ``weightgen.reconstruct.reconstruct`` call per
model and mode; ``mimic`` fits the outputs on the task's training images, ``--probe-task``), BatchNorm
statistics are re-estimated on the task's training split, and test
accuracy is compared with the original's. Beside each VAE: the per-token PCA oracle (k of 64 numbers
per token, fitted on the zoo's training models), which bounds what a linear code of that size keeps,
and two controls (``--ppca DIR``): the PPCA code at the first VAE's latent size (posterior mean, the
layer's own scale kept: ``weightgen.studies.controls.ppca_encode_weights``; fitted on the zoo's train
split when DIR holds none) and the RMS-matched timm init (timm's init of the architecture rescaled to
the VAE's scale model: no information from the model at all, the floor a code must beat).
Writes docs/bench_vae_encode.{md,json} (``--stem``).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, write_outputs  # noqa: E402

# timm entry points the field zoo never uses (weightgen/zoo.py lists what it uses), at digits size
NEW_ARCHS = {
    "resnet26d-narrow": ("resnet26d", {"channels": [16, 32, 64, 128], "stem_width": 16}, 1e-3),
    "deit-tiny-e64": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4,
                                                "num_heads": 2, "global_pool": "avg"}, 2e-3),
    "mobilenetv2_050": ("mobilenetv2_050", {}, 1e-3),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--zoo", required=True, help="a zoo with held-out models (scripts/build_zoo.py --preset field)")
    p.add_argument("--vae", action="append", default=[], metavar="LABEL=DIR",
                   help="a VAE to test (repeatable); default: the shipped one")
    p.add_argument("--pca-dims", default="16,56", help="per-token PCA oracle sizes (numbers of 64 per token)")
    p.add_argument("--mimic-steps", type=int, default=0,
                   help="also run --mode mimic (outputs on the task's training images) with the first --vae (0: skip)")
    p.add_argument("--max-models", type=int, default=0, help="at most this many held-out models (0: all)")
    p.add_argument("--new-archs", default=",".join(NEW_ARCHS), help="held-out architectures trained here ('' for none)")
    p.add_argument("--train-steps", type=int, default=300, help="digits training steps of each new architecture")
    p.add_argument("--ppca", help="PPCA prior directory (latent size of the first --vae): adds the ppca-encode and "
                                  "RMS-matched-init control rows; fitted on --zoo's train split when it holds none")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--stem", default="bench_vae_encode", help="output file name without extension")
    p.add_argument("--out", default="docs", help="where bench_vae_encode.{md,json} go")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file
    from scipy.stats import t as t_dist
    from sklearn.decomposition import PCA
    from tqdm.auto import tqdm

    from weightgen.classifier import evaluate, reestimate_batchnorm, train_classifier
    from weightgen.reconstruct import ReconstructOptions, reconstruct
    from weightgen.recasting import head_names
    from weightgen.vae.codec import weight_layers
    from weightgen.vae.data import list_zoo, split_by_model
    from weightgen.studies.controls import fit_ppca_on_zoo, load_ppca, ppca_encode_weights, rms_matched_init, save_ppca
    from weightgen.vae.prior import default_vae_dir, load_vae_bundle
    from weightgen.vae.tokenize import detokenize, layer_kind, tokenize
    from weightgen.zoo import ZOO_IMAGE_SIZE, create_zoo_model, zoo_data
    from weightgen.models import small_input_kwargs

    torch.set_num_threads(args.threads)
    vaes = [tuple(v.split("=", 1)) if "=" in v else (Path(v).name, v) for v in args.vae] or [("shipped", str(default_vae_dir()))]
    dims = [int(d) for d in args.pca_dims.split(",") if d]
    ppca, scale_meta = None, None
    if args.ppca:
        first_vae, scale_meta = load_vae_bundle(vaes[0][1])
        latent = first_vae.config.latent_dim
        if not (Path(args.ppca) / "ppca.json").is_file():
            save_ppca(fit_ppca_on_zoo(args.zoo, latent), args.ppca)
        ppca = load_ppca(args.ppca)
        if ppca.latent_dim != latent:
            raise SystemExit(f"error: --ppca has latent size {ppca.latent_dim}, the VAE {latent}")
    models = list_zoo(args.zoo)
    train_ids, held_ids = split_by_model(models)
    by_id = {m["model_id"]: m for m in models}
    held = [by_id[i] for i in held_ids if "checkpoint_of" not in by_id[i]]
    if args.max_models:
        held = held[:args.max_models]

    # per-token PCA oracle, fitted on tokens of the training models (at most 2,000 per layer)
    rng = np.random.default_rng(0)
    pool = []
    for mid in train_ids:
        meta = by_id[mid]
        state = load_file(meta["weights"])
        for layer in meta["layers"]:
            w = state[layer["name"] + ".weight"]
            v = tokenize(w, layer_kind(tuple(w.shape), layer.get("groups", 1)), layer["depth"]).values.numpy()
            pool.append(v[rng.permutation(len(v))[:2000]])
    pool = np.concatenate(pool)
    pool = pool[rng.permutation(len(pool))[:300_000]]
    pcas = {k: PCA(k, random_state=0).fit(pool) for k in dims}

    def task_accuracy(model, data):
        reestimate_batchnorm(model, data.train)
        return evaluate(model, data.test)

    def pca_rebuild(model, pca):
        heads, cosines = head_names(model), []
        with torch.no_grad():
            for spec in weight_layers(model):
                if spec["name"] in heads or not spec["direct"]:
                    continue
                w = model.get_parameter(spec["name"] + ".weight")
                t = tokenize(w, spec["kind"], spec["depth"])
                v = torch.from_numpy(pca.inverse_transform(pca.transform(t.values.numpy()))).float() * t.mask
                new = detokenize(v, t.shape, t.scale)
                cosines.append(torch.nn.functional.cosine_similarity(w.flatten(), new.flatten(), 0).item())
                w.copy_(new)
        return cosines

    cases = [("held-out model", m["model_id"], m["arch"], m["model_kwargs"], m.get("task"), m["weights"]) for m in held]
    tmp = tempfile.TemporaryDirectory()
    new_archs = [a for a in args.new_archs.split(",") if a]
    for name in new_archs:
        arch, kw, lr = NEW_ARCHS[name]
        kwargs = {**small_input_kwargs(arch, ZOO_IMAGE_SIZE, 1), **kw}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_zoo_model(arch, kwargs)
        train_classifier(model, zoo_data("digits", 1), args.train_steps, lr=lr, seed=0, progress=True)
        reestimate_batchnorm(model, zoo_data("digits", 1).train)
        path = Path(tmp.name) / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        cases.append(("held-out arch", name, arch, kwargs, "digits", str(path)))

    rows, results = [], []
    for group, mid, arch, kwargs, task, weights in tqdm(cases, desc="models"):
        data = zoo_data(task, int(kwargs.get("in_chans", 1)))
        model = create_zoo_model(arch, kwargs)
        model.load_state_dict(load_file(weights))
        original = task_accuracy(model, data)
        entry = {"group": group, "model": mid, "arch": arch, "task": task or "digits", "original": original,
                 "methods": {}}
        for k, pca in pcas.items():
            model.load_state_dict(load_file(weights))
            cos = pca_rebuild(model, pca)
            entry["methods"][f"pca-{k}"] = {"median_cosine": statistics.median(cos), "accuracy": task_accuracy(model, data),
                                            "compression": k / 64}
        if ppca is not None:
            model.load_state_dict(load_file(weights))
            _, stats, _ = ppca_encode_weights(model, ppca, skip=head_names(model), in_place=True)
            numbers = sum(st["tokens"] * ppca.latent_dim + 1 for st in stats)  # latents + one scale per layer
            count = sum(math.prod(model.get_parameter(st["name"] + ".weight").shape) for st in stats)
            entry["methods"][f"ppca-{ppca.latent_dim} encode"] = {
                "median_cosine": statistics.median(st["cosine"] for st in stats),
                "accuracy": task_accuracy(model, data), "compression": numbers / count}
            model.load_state_dict(load_file(weights))
            with torch.random.fork_rng(devices=[]):  # timm's init draws from the global RNG
                torch.manual_seed(0)
                fresh = create_zoo_model(arch, kwargs)
            rebuilt, _, _ = rms_matched_init(fresh, scale_meta, skip=head_names(fresh))
            with torch.no_grad():
                cos = []
                for name, w in rebuilt.items():
                    old = model.get_parameter(name)
                    cos.append(torch.nn.functional.cosine_similarity(old.flatten(), w.flatten(), 0).item())
                    old.copy_(w)
            entry["methods"]["rms-matched init"] = {"median_cosine": statistics.median(cos),
                                                    "accuracy": task_accuracy(model, data), "compression": 0.0}
        for label, vae_dir in vaes:
            mimic = args.mimic_steps and label == vaes[0][0]  # mimic with the first VAE only: it is the slow mode
            for mode, steps in (("encode", None),) + ((("mimic", args.mimic_steps),) if mimic else ()):
                opts = ReconstructOptions(arch=arch, checkpoint=weights, model_kwargs=kwargs, vae=vae_dir, mode=mode,
                                          steps=steps, keep_head=True, out=str(Path(tmp.name) / f"{mid}-{label}-{mode}"),
                                          probe_task=(task or "digits") if mode == "mimic" else None)
                t0 = time.perf_counter()
                out, report = reconstruct(opts)
                seconds = time.perf_counter() - t0
                model.load_state_dict(load_file(str(out / "weights.safetensors")))
                entry["methods"][f"{label} {mode}"] = {
                    "median_cosine": report["totals"]["median_cosine"], "accuracy": task_accuracy(model, data),
                    "compression": report["totals"]["compression"], "seconds": seconds}
        results.append(entry)

    methods = list(results[0]["methods"]) if results else []
    summary = {}
    for group in ("held-out model", "held-out arch"):
        sel = [r for r in results if r["group"] == group]
        if not sel:
            continue
        for m in methods:
            drops = [100 * (r["original"] - r["methods"][m]["accuracy"]) for r in sel]
            summary[f"{group} | {m}"] = {
                "models": len(sel), "mean_drop_points": statistics.fmean(drops), "worst_drop_points": max(drops),
                "median_layer_cosine": statistics.median(r["methods"][m]["median_cosine"] for r in sel),
                "compression": statistics.fmean(r["methods"][m]["compression"] for r in sel)}
    # paired differences in accuracy (points), each VAE mode minus each other method, over the group's models
    paired = []
    for group in ("held-out model", "held-out arch"):
        sel = [r for r in results if r["group"] == group]
        if len(sel) < 2:
            continue
        for m in [m for m in methods if m.endswith(" encode") or m.endswith(" mimic")]:
            if m.startswith("ppca-"):
                continue
            for other in [o for o in methods if o != m]:
                d = [100 * (r["methods"][m]["accuracy"] - r["methods"][other]["accuracy"]) for r in sel]
                half = float(t_dist.ppf(0.975, len(d) - 1)) * statistics.stdev(d) / math.sqrt(len(d))
                mean = statistics.fmean(d)
                paired.append({"group": group, "a": m, "b": other, "n": len(d), "mean": mean, "low": mean - half,
                               "high": mean + half})
    for r in results:
        rows.append([r["group"], r["model"], r["task"], f"{r['original']:.1%}"]
                    + [f"{r['methods'][m]['accuracy']:.1%} ({r['methods'][m]['median_cosine']:.2f})" for m in methods])
    srows = [[k.split(" | ")[0], k.split(" | ")[1], v["models"], f"{v['compression']:.3f}", f"{v['median_layer_cosine']:.3f}",
              f"{v['mean_drop_points']:+.1f}", f"{v['worst_drop_points']:+.1f}"] for k, v in summary.items()]
    info = machine_info()
    md = "\n".join([
        "# Held-out models rebuilt through the VAE (issue 8, targets 1-2)", "",
        f"`python benchmarks/bench_vae_encode.py --zoo {args.zoo} " + " ".join(f"--vae {a}" for a in args.vae)
        + (f" --mimic-steps {args.mimic_steps}" if args.mimic_steps else "")
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("ppca", args.ppca), ("max_models", args.max_models),
                                                               ("train_steps", args.train_steps)) if v)
        + (f" --new-archs '{args.new_archs}'" if args.new_archs != ",".join(NEW_ARCHS) else "")
        + (f" --stem {args.stem}" if args.stem != "bench_vae_encode" else "") + f"`, {info['date_utc']}, {info['cpu']}.", "",
        "Every Linear/Conv2d weight except the classifier head rebuilt; BatchNorm statistics re-estimated on the "
        "task's training split; test accuracy. `pca-k`: the per-token PCA oracle with k of 64 numbers per token. "
        "Compression: latent numbers over weight numbers. Drop: original minus rebuilt accuracy, in points "
        "(targets: held-out models within 1 point on average and 3 at worst with `encode`, 0.5 with `mimic`, "
        "median layer cosine >= 0.95; held-out architectures within 5 points)."
        + (f" Controls: `ppca-{ppca.latent_dim} encode` = the PPCA code at the VAE's latent size (`{args.ppca}`, fitted on "
           f"{len(ppca.info.get('train_models', []))} train entries of `{ppca.info.get('zoo')}`), posterior mean, the "
           "layer's own scale kept, compression counting latents plus one scale per layer; `rms-matched init` = "
           "timm's init (seed 0) rescaled to the VAE's scale model, keeping nothing of the model (0 numbers)."
           if ppca is not None else ""), "",
        markdown_table(["group", "method", "models", "compression", "median layer cos", "mean drop", "worst drop"], srows), "",
        "Paired differences in test accuracy (points): mean [95% t-interval] over the group's models.", "",
        markdown_table(["group", "a", "b", "models", "a - b"],
                       [[d["group"], d["a"], d["b"], d["n"], f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"]
                        for d in paired]) if paired else "(fewer than 2 models per group: no intervals)", "",
        "Per model: accuracy after rebuilding (median layer cosine).", "",
        markdown_table(["group", "model", "task", "original"] + methods, rows), ""])
    write_outputs(args.out, args.stem, md, {"machine": info, "args": vars(args), "summary": summary, "paired": paired,
                                                     "models": results})
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
