#!/usr/bin/env python
"""Does the structured zoo hold learned structure? Issue 14's two targets, measured on a built zoo.

    python benchmarks/bench_zoo_structure.py --zoo /work/zoo-structured [--no-speed]

Targets: (1) median cosine of final weights to their own init <= 0.5; (2) layers of held-out models
(``split`` heldout) that a per-token PCA-16 reconstructs at cosine >= 0.9, with tokens as the VAE sees
them (``weightgen.vae.tokenize``: rows cut into 64-value chunks, divided by the layer's power-of-two
scale) and the PCA fitted on the training models' tokens only. The same is measured for the change
from init (W - W_init, init re-drawn from each model's seed), and, as a control, for the held-out
models' own init weights (what the PCA gets on noise of the same shapes).

Also records the speed check behind the zoo's training loop: M models of one architecture trained at
once under ``torch.func.vmap`` against one after another (CPU-seconds per model, one torch thread).

Writes docs/bench_zoo_structure.{md,json}: build command and cost (from zoo.json), CPU model, load
average, per-family accuracy, cosine-to-init quantiles, held-out PCA-8/16/32 cosines (raw, delta, init).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

sys.path.insert(0, str(REPO))
KS = (8, 16, 32)


def _q(values, qs=(0.1, 0.25, 0.5, 0.75, 0.9)) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {f"q{int(q * 100)}": round(float(np.quantile(v, q)), 4) for q in qs}


def _layers(zoo_dir: Path, meta: dict, want_init: bool):
    """(layer record, trained weight, init weight or None) for every Linear/Conv2d of one model."""
    import torch
    from safetensors.torch import load_file

    from weightgen.zoo import create_zoo_model

    state = load_file(zoo_dir / f"{meta['model_id']}.safetensors")
    init = None
    if want_init:
        with torch.random.fork_rng(devices=[]):  # the build draws the init exactly so
            torch.manual_seed(meta["seed"])
            init = create_zoo_model(meta["arch"], meta["model_kwargs"]).state_dict()
    for rec in meta["layers"]:
        key = f"{rec['name']}.weight"
        yield rec, state[key].float(), (init[key].float() if init is not None else None)


def _tokens(weight, rec):
    from weightgen.vae.tokenize import layer_kind, tokenize

    kind = layer_kind(weight.shape, rec.get("groups", 1))
    return tokenize(weight, kind, rec["depth"]), kind


def _pca(train_tokens, k_max: int):
    """Mean and top-k_max principal directions of the training tokens (rows), float64."""
    import torch

    x = torch.cat(train_tokens).double()
    mean = x.mean(0)
    # covariance eigendecomposition: 64x64, exact, cheap for any number of tokens
    cov = (x - mean).T @ (x - mean) / len(x)
    evals, evecs = torch.linalg.eigh(cov)
    order = evals.argsort(descending=True)
    return mean, evecs[:, order[:k_max]], evals[order]


def _recon_cos(weight, rec, mean, basis, k: int) -> float:
    import torch

    from weightgen.vae.tokenize import detokenize

    tok, _ = _tokens(weight, rec)
    v = tok.values.double()
    b = basis[:, :k]
    r = (v - mean) @ b @ b.T + mean
    r = torch.where(tok.mask, r, torch.zeros_like(r))
    w = detokenize(r, tok.shape, tok.scale).flatten()
    o = weight.double().flatten()
    return float(w @ o / (w.norm() * o.norm()).clamp_min(1e-30))


RATE = 0.25  # numbers stored per weight for the two per-layer controls below


def _cos(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def _svd_cos(weight) -> float | None:
    """Cosine of the best rank-r approximation of the layer (out x fan_in) storing ~RATE numbers per weight."""
    import torch

    m = weight.reshape(weight.shape[0], -1).double()
    r = int(RATE * m.numel() / sum(m.shape))
    if r < 1 or r >= min(m.shape):
        return None
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    return _cos((u[:, :r] * sv[:r]) @ vh[:r], m)


def _kernels(weight):
    """A conv weight's spatial kernels as rows (N, kh*kw), normalised per layer by its RMS; None for 1x1/linear."""
    if weight.ndim != 4 or weight.shape[2] * weight.shape[3] == 1:
        return None
    k = weight.reshape(-1, weight.shape[2] * weight.shape[3]).double()
    return k / k.pow(2).mean().sqrt().clamp_min(1e-30)


def _kernel_cos(weight, fit) -> float | None:
    k = _kernels(weight)
    if k is None or k.shape[1] not in fit:
        return None
    mean, basis = fit[k.shape[1]]
    r = (k - mean) @ basis @ basis.T + mean
    return _cos(r, k)


def structure(zoo_dir: Path) -> dict:
    index = json.loads((zoo_dir / "zoo.json").read_text())
    metas = [json.loads((zoo_dir / f"{m}.json").read_text()) for m in index["models"]]
    finals = [m for m in metas if "checkpoint_of" not in m]
    train = [m for m in finals if m.get("split", "train") == "train"]
    held = [m for m in finals if m.get("split") == "heldout"]
    if not train or not held:
        raise SystemExit("the zoo needs models of split train and heldout")
    t0 = time.perf_counter()
    fits = {}
    for what in ("raw", "delta"):
        toks = []
        for meta in train:
            for rec, w, w0 in _layers(zoo_dir, meta, what == "delta"):
                toks.append(_tokens(w - w0 if what == "delta" else w, rec)[0].values.float())
        fits[what] = _pca(toks, max(KS))
    # kernel-aligned PCA: one per kernel size, on the training models' spatial kernels, keeping
    # ceil(RATE * size) directions (3x3: 3 of 9; 7x7: 13 of 49)
    import math

    import torch

    kern: dict[int, list] = {}
    for meta in train:
        for rec, w, _ in _layers(zoo_dir, meta, False):
            k = _kernels(w)
            if k is not None:
                kern.setdefault(k.shape[1], []).append(k)
    kfit = {}
    for size, ks in kern.items():
        x = torch.cat(ks)
        mean = x.mean(0)
        evals, evecs = torch.linalg.eigh((x - mean).T @ (x - mean) / len(x))
        kfit[size] = (mean, evecs[:, evals.argsort(descending=True)[:math.ceil(RATE * size)]])
    rows = []  # one per held-out layer
    for meta in held:
        for rec, w, w0 in _layers(zoo_dir, meta, True):
            kind = _tokens(w, rec)[1]
            row = {"model_id": meta["model_id"], "family": meta.get("family"), "layer": rec["name"], "kind": kind,
                   "numel": w.numel(), "cos_init": rec.get("cos_init")}
            for what, weight in (("raw", w), ("init", w0)):
                row[f"{what}_svd"] = _svd_cos(weight)
                row[f"{what}_kernel"] = _kernel_cos(weight, kfit)
            for what, weight in (("raw", w), ("delta", w - w0), ("init", w0)):
                fit = fits["delta" if what == "delta" else "raw"]
                for k in KS:
                    row[f"{what}_pca{k}"] = round(_recon_cos(weight, rec, fit[0], fit[1], k), 5)
            rows.append(row)
    summary = {}
    for what in ("raw", "delta", "init"):
        for k in KS:
            vals = [r[f"{what}_pca{k}"] for r in rows]
            weights = [r["numel"] for r in rows]
            summary[f"{what}_pca{k}"] = {
                "mean": round(statistics.fmean(vals), 4), "median": round(statistics.median(vals), 4),
                "param_weighted_mean": round(sum(v * n for v, n in zip(vals, weights)) / sum(weights), 4),
                "frac_ge_0.9": round(sum(v >= 0.9 for v in vals) / len(vals), 4)}
    for key in ("svd", "kernel"):
        for what in ("raw", "init"):
            vals = [r[f"{what}_{key}"] for r in rows if r[f"{what}_{key}"] is not None]
            summary[f"{what}_{key}"] = {"layers": len(vals), "mean": round(statistics.fmean(vals), 4) if vals else None,
                                        "frac_ge_0.9": round(sum(v >= 0.9 for v in vals) / len(vals), 4) if vals else None}
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        by_kind[kind] = {"layers": len(sel), **{f"{w}_pca16": round(statistics.fmean(r[f"{w}_pca16"] for r in sel), 4)
                                                for w in ("raw", "delta", "init")}}
    spectra = {what: [round(float(e), 6) for e in (fit[2] / fit[2].sum())[:32]] for what, fit in fits.items()}
    return {"fits": fits, "index": index, "finals": finals, "train_models": len(train), "heldout_models": len(held),
            "heldout_layers": rows, "pca_summary": summary, "pca_by_kind": by_kind,
            "explained_variance_ratio": spectra, "pca_seconds": round(time.perf_counter() - t0, 1)}


def _real_layers(path: Path):
    """(record, weight) for every float 2-D/4-D tensor of a safetensors or .pt/.pth state dict."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                               weights_only=True)
    items = [(k, v.float()) for k, v in sd.items() if v.is_floating_point() and v.ndim in (2, 4)
             and min(v.shape[:2]) > 0 and "embeddings" not in k]  # token/position tables are not layers
    last = max(1, len(items) - 1)
    for i, (k, v) in enumerate(items):
        groups = v.shape[0] if v.ndim == 4 and v.shape[1] == 1 and v.shape[0] > 1 else 1
        yield {"name": k, "groups": groups, "depth": i / last}, v


def real_weights(paths: list[Path], fit) -> list[dict]:
    """Per file: the zoo's raw PCA on its layers, and a PCA fitted on that file's own tokens (in-sample)."""
    import statistics as st

    out = []
    for path in paths:
        layers = list(_real_layers(path))
        own = _pca([_tokens(w, rec)[0].values.float() for rec, w in layers], max(KS))
        row = {"file": path.name, "layers": len(layers), "params": sum(w.numel() for _, w in layers)}
        for k in KS:
            zoo_cos = [_recon_cos(w, rec, fit[0], fit[1], k) for rec, w in layers]
            own_cos = [_recon_cos(w, rec, own[0], own[1], k) for rec, w in layers]
            row[f"zoo_pca{k}"] = round(st.fmean(zoo_cos), 4)
            row[f"own_pca{k}"] = round(st.fmean(own_cos), 4)
        svd = [c for c in (_svd_cos(w) for _, w in layers) if c is not None]
        row["svd"] = round(st.fmean(svd), 4) if svd else None
        out.append(row)
    return out


def vmap_speed(models: int = 4, steps: int = 20) -> list[dict]:
    """CPU-seconds per model: a vmap ensemble against the per-model loop (one torch thread)."""
    import torch

    from weightgen.ensemble import EnsembleConfig, train_ensemble
    from weightgen.zoo import create_zoo_model, structured_data, structured_zoo_specs

    torch.set_num_threads(1)
    x, y = structured_data("mnist")["train"]
    out = []
    firsts = {}  # each family's first spec: its architecture and recipe
    for spec in structured_zoo_specs():
        firsts.setdefault(spec.family, spec)
    for family, spec in firsts.items():
        cfg = EnsembleConfig(steps=steps, batch_size=64, optimizer=spec.optimizer)
        row = {"family": family, "config": spec.model_id.split("-r")[0], "models": models, "steps": steps}
        for use_vmap in (True, False):
            ms = []
            for s in range(models):
                torch.manual_seed(s)
                ms.append(create_zoo_model(spec.arch, spec.model_kwargs))
            c0, t0 = time.process_time(), time.perf_counter()
            train_ensemble(ms, [(x, y)] * models, cfg, [spec.lr] * models, [spec.weight_decay] * models,
                           list(range(models)), use_vmap=use_vmap)
            key = "vmap" if use_vmap else "loop"
            row[f"{key}_cpu_s_per_model"] = round((time.process_time() - c0) / models, 2)
            row[f"{key}_wall_s"] = round(time.perf_counter() - t0, 1)
        row["loop_speedup"] = round(row["vmap_cpu_s_per_model"] / row["loop_cpu_s_per_model"], 2)
        out.append(row)
    return out


def _fmt(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def report(res: dict, speed: list[dict] | None, zoo_dir: Path, command: str | None) -> str:
    index, finals = res["index"], res["finals"]
    build = index.get("build", {})
    meds = [m["cos_init_median"] for m in finals]
    all_layers = [layer["cos_init"] for m in finals for layer in m["layers"]]
    s = res["pca_summary"]
    lines = ["# Structured zoo: does it hold learned structure?", "",
             f"Zoo: `{zoo_dir}` ({len(finals)} models: {res['train_models']} train, {res['heldout_models']} held out; "
             f"{index['total_params']:,} parameters).",
             f"Built with: `{command or 'python scripts/build_zoo.py --preset structured --out ' + str(zoo_dir) + ' --jobs 2'}`",
             "",
             f"Build cost (zoo.json): {index['cpu_seconds']:.0f} CPU-seconds of training (sum over models), "
             f"{build.get('seconds', float('nan')):.0f} s wall with {build.get('jobs', '?')} jobs"
             + (f" (the last run's wall time: it resumed {build['resumed_specs']} models that an earlier, stopped run "
                f"had finished)" if build.get("resumed_specs") else "") + ", load average "
             f"{build.get('load_average_1min', '?')} at the end of the build (2 shared cores; other jobs ran "
             f"beside it). Device: {build.get('device', 'cpu')}.", "",
             "## Targets", "",
             markdown_table(["target", "measured", "met"], [
                 ["median cosine to init <= 0.5 (median over models of each model's median layer)",
                  f"{statistics.median(meds):.3f}", "yes" if statistics.median(meds) <= 0.5 else "no"],
                 ["held-out layers reconstructed by per-token PCA-16 at cosine >= 0.9 (raw weights; mean over layers)",
                  f"{s['raw_pca16']['mean']:.3f} (fraction >= 0.9: {s['raw_pca16']['frac_ge_0.9']:.2f})",
                  "yes" if s["raw_pca16"]["mean"] >= 0.9 else "no"],
                 ["same, for the change from init W - W_init",
                  f"{s['delta_pca16']['mean']:.3f} (fraction >= 0.9: {s['delta_pca16']['frac_ge_0.9']:.2f})",
                  "yes" if s["delta_pca16"]["mean"] >= 0.9 else "no"],
             ], "llr"), "",
             "## Per family", "",
             ]
    fam_rows = []
    for fam in sorted({m.get("family") for m in finals}):
        sel = [m for m in finals if m.get("family") == fam]
        acc = [m["test_accuracy"] for m in sel]
        cos = [m["cos_init_median"] for m in sel]
        fam_rows.append([fam, len(sel), ", ".join(sorted({m["task"] for m in sel})), f"{statistics.fmean(acc):.3f}",
                         f"{min(acc):.3f}-{max(acc):.3f}", f"{statistics.median(cos):.3f}",
                         f"{min(cos):.3f}-{max(cos):.3f}"])
    lines += [markdown_table(["family", "models", "tasks", "mean test acc", "acc range", "median cos to init",
                              "cos range"], fam_rows), "",
              "Cosine to init over all layers of all models: " + ", ".join(f"{k} {v}" for k, v in _q(all_layers).items())
              + "; over models (each model's median layer): " + ", ".join(f"{k} {v}" for k, v in _q(meds).items()) + ".",
              "", "## Held-out reconstruction by per-token PCA", "",
              "PCA fitted on the training models' tokens (64 values per token, each layer divided by its power-of-two "
              "RMS scale as in `weightgen.vae.tokenize`); cosine between a held-out layer and its reconstruction, "
              "over held-out layers. `init` is the control: the held-out models' own init weights through the raw PCA.",
              "",
              markdown_table(["weights", "PCA-8 mean", "PCA-16 mean", "PCA-16 median", "PCA-16 param-weighted",
                              "PCA-16 frac >= 0.9", "PCA-32 mean"],
                             [[w, _fmt(s[f"{w}_pca8"]["mean"]), _fmt(s[f"{w}_pca16"]["mean"]),
                               _fmt(s[f"{w}_pca16"]["median"]), _fmt(s[f"{w}_pca16"]["param_weighted_mean"]),
                               _fmt(s[f"{w}_pca16"]["frac_ge_0.9"], 2), _fmt(s[f"{w}_pca32"]["mean"])]
                              for w in ("raw", "delta", "init")]), "",
              f"Where the structure is: two per-layer codes at {RATE} numbers per weight on the same held-out layers "
              "(trained against the same models' init). `SVD`: best rank-r approximation of each layer as an "
              "(out x fan_in) matrix; `kernel PCA`: the spatial kernels of conv layers with kernels larger than 1x1 "
              "(3x3, 7x7), each layer scaled to unit RMS, through a PCA fitted per kernel size on the training models' "
              "kernels and keeping ceil(size/4) directions (3 of 9: 0.33 numbers per weight; 13 of 49: 0.27).", "",
              markdown_table(["code", "layers", "trained mean", "trained frac >= 0.9", "init mean"],
                             [[name, s[f"raw_{key}"]["layers"], _fmt(s[f"raw_{key}"]["mean"]),
                               _fmt(s[f"raw_{key}"]["frac_ge_0.9"], 2), _fmt(s[f"init_{key}"]["mean"])]
                              for name, key in (("per-layer SVD", "svd"), ("kernel PCA", "kernel"))]), "",
              "By layer kind (PCA-16 mean):", "",
              markdown_table(["kind", "layers", "raw", "delta", "init"],
                             [[k, v["layers"], _fmt(v["raw_pca16"]), _fmt(v["delta_pca16"]), _fmt(v["init_pca16"])]
                              for k, v in res["pca_by_kind"].items()]), "",
              "Explained variance of the first 16 principal directions (raw tokens): "
              f"{sum(res['explained_variance_ratio']['raw'][:16]):.3f}; delta tokens: "
              f"{sum(res['explained_variance_ratio']['delta'][:16]):.3f} (iid noise: 0.25).", ""]
    if res.get("real"):
        lines += ["## Real pretrained weights (docs/real_weights.md) through the same PCA", "",
                  "`zoo` = the PCA fitted on the structured zoo's training tokens; `own` = a PCA fitted on that "
                  "file's own tokens (in-sample, an upper reference); `SVD` = per-layer SVD at "
                  f"{RATE} numbers per weight. Mean cosine over the file's 2-D/4-D weights (embedding tables left out).",
                  "",
                  markdown_table(["file", "layers", "params"] + [f"{w} PCA-{k}" for w in ("zoo", "own") for k in KS]
                                 + ["SVD"],
                                 [[r["file"], r["layers"], f"{r['params']:,}"] + [_fmt(r[f"{w}_pca{k}"])
                                  for w in ("zoo", "own") for k in KS] + [_fmt(r["svd"])] for r in res["real"]]), ""]
    if speed:
        lines += ["## Training loop: vmap ensemble against one model at a time", "",
                  "Same update rule (weightgen.ensemble.train_ensemble, use_vmap True/False), mnist, batch 64, "
                  "one torch thread, CPU-seconds per model; the zoo uses the faster.", "",
                  markdown_table(["family", "config", "models", "steps", "vmap CPU-s/model", "loop CPU-s/model",
                                  "vmap / loop"],
                                 [[r["family"], r["config"], r["models"], r["steps"], r["vmap_cpu_s_per_model"],
                                   r["loop_cpu_s_per_model"], r["loop_speedup"]] for r in speed]), ""]
    lines += ["## Models", "",
              markdown_table(["model", "family", "task", "split", "opt", "lr", "wd", "aug", "params", "test acc",
                              "median cos to init", "min layer cos"],
                             [[m["model_id"], m.get("family"), m.get("task"), m.get("split"), m.get("optimizer"),
                               m["lr"], m.get("weight_decay"), m.get("aug"), f"{m['params']:,}",
                               f"{m['test_accuracy']:.3f}", f"{m['cos_init_median']:.3f}",
                               f"{min(layer['cos_init'] for layer in m['layers']):.3f}"] for m in finals]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True, help="a zoo built with --preset structured")
    p.add_argument("--build-command", default=None, help="the command that built it (for the report)")
    p.add_argument("--real", nargs="*", default=[], help="real pretrained state dicts (.safetensors/.pt/.pth)")
    p.add_argument("--no-speed", action="store_true", help="skip the vmap-vs-loop timing")
    p.add_argument("--out-dir", default=str(REPO / "docs"))
    p.add_argument("--stem", default="bench_zoo_structure")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    zoo_dir = Path(args.zoo)
    res = structure(zoo_dir)
    res["real"] = real_weights([Path(r) for r in args.real], res["fits"]["raw"]) if args.real else []
    speed = None if args.no_speed else vmap_speed()
    md = report(res, speed, zoo_dir, args.build_command)
    md += f"\nMachine: {machine_info()['cpu']}, load average now {machine_info()['loadavg']}.\n"
    data = {"machine": machine_info(), "zoo": str(zoo_dir), "build_command": args.build_command,
            "zoo_index": res["index"], "pca_summary": res["pca_summary"], "pca_by_kind": res["pca_by_kind"],
            "explained_variance_ratio": res["explained_variance_ratio"], "heldout_layers": res["heldout_layers"],
            "real_weights": res["real"], "speed": speed, "pca_seconds": res["pca_seconds"],
            "models": [{k: m.get(k) for k in ("model_id", "family", "task", "split", "optimizer", "lr",
                                               "weight_decay", "aug", "params", "test_accuracy", "val_accuracy",
                                               "cos_init_median")} | {"cos_init_layers": {
                                                   layer["name"]: layer["cos_init"] for layer in m["layers"]}}
                       for m in res["finals"]]}
    write_outputs(args.out_dir, args.stem, md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
