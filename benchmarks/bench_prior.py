#!/usr/bin/env python
"""Latent prior of the weight VAE: per-cell diagonal Gaussian vs diagonal Gaussian mixture.

    python benchmarks/bench_prior.py                       # shipped VAE, /tmp/zoo-full -> docs/bench_prior.{md,json}
    python benchmarks/bench_prior.py --zoo ZOO --vae DIR   # any zoo / VAE

Both densities are fitted (as ``fit_priors`` does: 512 latent means per layer) on the training
models' layers and judged on held-out models' layers, which neither the densities nor (with the
VAE's own split) the VAE saw:

* held-out log-likelihood per latent token (nats; higher is better);
* sample quality, per held-out layer: latents drawn from the prior (as ``sample_weights`` does)
  vs the layer's real latent means (MMD^2, and nearest-neighbour distances both ways), and the
  layer decoded from them, rescaled to the real layer's RMS, vs the real layer (MMD^2 of the
  64-value tokens, entry kurtosis, stable rank). N(0, I) (no density) and the decoding of the
  real latents (the VAE's reconstruction) frame the numbers;
* sampling time for a ViT-Huge-sized token count (~10M tokens over 390 layers), and
  ``sample_weights`` end to end on a timm model (resnet50).

Split: the zoo's own (model JSONs saying ``"split": "heldout"``), else the VAE's own held-out
models when the zoo holds them (the rest train), else a seeded ``split_by_model``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, write_outputs  # noqa: E402

METHODS = ("none", "gaussian", "mixture")
LABELS = {"none": "N(0, I) (no density)", "gaussian": "diagonal Gaussian (old)", "mixture": "Gaussian mixture (new)",
          "recon": "VAE reconstruction (reference)"}


def choose_split(models: list[dict], meta: dict, seed: int) -> tuple[list[str], list[str], str]:
    from weightgen.vae.data import split_by_model

    ids = sorted(m["model_id"] for m in models)
    if any(m.get("split") == "heldout" for m in models):  # split_by_model follows the zoo's own split
        train, held = split_by_model(models, 0.2, seed)
        return train, held, "the zoo's 'split' field"
    training = meta.get("training", {})
    held = sorted(set(training.get("val_models", [])) & set(ids))
    if held and set(ids) - set(held):
        return sorted(set(ids) - set(held)), held, "the VAE's own held-out models"
    train, held = split_by_model(models, 0.2, seed)
    return train, held, f"split_by_model(val_fraction=0.2, seed={seed})"


def mmd2(x, y, bandwidth: float) -> float:
    """Unbiased MMD^2 with an RBF kernel (x, y: (n, d), (m, d))."""
    import torch

    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth ** 2))  # noqa: E731
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def median_distance(x) -> float:
    import torch

    d = torch.cdist(x, x)
    return float(d[~torch.eye(len(x), dtype=torch.bool)].median().clamp_min(1e-6))


def kurtosis(w) -> float:
    w = w.double().flatten()
    c = w - w.mean()
    return float(c.pow(4).mean() / c.pow(2).mean().clamp_min(1e-30) ** 2)


def stable_rank(w) -> float:
    import torch

    m = w.double().reshape(w.shape[0], -1)
    s = torch.linalg.svdvals(m)
    return float(s.pow(2).sum() / s[0].pow(2).clamp_min(1e-30))


def subsample(x, n: int, generator):
    import torch

    return x if len(x) <= n else x[torch.randperm(len(x), generator=generator)[:n]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", required=True, help="model zoo (scripts/build_zoo.py)")
    p.add_argument("--vae", help="VAE directory (default: the shipped one)")
    p.add_argument("--out", default="docs")
    p.add_argument("--stem", default="bench_prior", help="output file stem under --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens per held-out layer for the statistics")
    p.add_argument("--time-tokens", type=int, default=10_000_000, help="tokens drawn for the sampling time")
    p.add_argument("--time-layers", type=int, default=390, help="layers those tokens are split over")
    p.add_argument("--time-repeats", type=int, default=5, help="timed repeats per density (best kept)")
    p.add_argument("--e2e-arch", default="resnet50", help="timm model timed end to end with sample_weights "
                   "(best of 2 per density; '' to skip)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from weightgen.vae.codec import (decode_layer, encode_layer, fit_latent_density, latent_log_prob, rms,
                                     sample_latents, weight_layers)
    from weightgen.vae.data import list_zoo
    from weightgen.vae.prior import load_vae_bundle
    from weightgen.vae.tokenize import KINDS, tokenize
    from weightgen.vae.train import _DENSITY_TOKENS_PER_LAYER, iter_layers

    vae, meta = load_vae_bundle(args.vae)
    vae = vae.eval().requires_grad_(False)
    dim, size = vae.config.latent_dim, vae.config.token_size
    models = list_zoo(args.zoo)
    by_id = {m["model_id"]: m for m in models}
    train_ids, held_ids, split_source = choose_split(models, meta, args.seed)

    gen = torch.Generator().manual_seed(args.seed)
    records = []
    with torch.no_grad():
        for model, layer, kind, weight in iter_layers([by_id[i] for i in train_ids]):
            mu, _ = encode_layer(vae, weight, kind, layer["depth"])
            if mu.shape[0] > _DENSITY_TOKENS_PER_LAYER:
                mu = mu[torch.randperm(mu.shape[0], generator=gen)[:_DENSITY_TOKENS_PER_LAYER]]
            records.append((kind, layer["depth"], mu, model["model_id"]))
    densities, fit_s = {"none": None}, {}
    for family in ("gaussian", "mixture"):
        start = time.perf_counter()
        densities[family] = fit_latent_density(records, dim, family=family, seed=args.seed)
        fit_s[family] = time.perf_counter() - start
    components = {kind: [len(c["weights"]) for c in densities["mixture"][kind]["mixture"]] for kind in KINDS}

    rows = []
    with torch.no_grad():
        for j, (model, layer, kind, weight) in enumerate(iter_layers([by_id[i] for i in held_ids])):
            depth, shape = layer["depth"], tuple(weight.shape)
            mu, _ = encode_layer(vae, weight, kind, depth)
            pick = torch.Generator().manual_seed(args.seed + j)
            real_lat = subsample(mu.float(), args.eval_tokens, pick)
            real_tok = subsample(tokenize(weight.float(), kind, depth, size).values.float(), args.eval_tokens, pick)
            lat_bw, tok_bw = median_distance(real_lat), median_distance(real_tok)
            target = rms(weight)
            row = {"model": model["model_id"], "layer": layer["name"], "kind": kind, "depth": depth,
                   "shape": list(shape), "tokens": mu.shape[0], "real_kurtosis": kurtosis(weight),
                   "real_stable_rank": stable_rank(weight)}
            candidates = {"recon": mu}
            for method in METHODS:
                row[f"{method}_loglik"] = float(latent_log_prob(densities[method], kind, depth, mu).mean())
                candidates[method] = sample_latents(densities[method], kind, depth, mu.shape[0], dim,
                                                    torch.Generator().manual_seed(args.seed + j))
            for method, lat in candidates.items():
                decoded = decode_layer(vae, lat, shape, kind, depth, 1.0).float()
                decoded *= target / max(rms(decoded), 1e-12)
                tok = subsample(tokenize(decoded, kind, depth, size).values.float(), args.eval_tokens, pick)
                row[f"{method}_token_mmd2"] = mmd2(tok, real_tok, tok_bw)
                row[f"{method}_kurtosis_err"] = abs(math.log(kurtosis(decoded) / row["real_kurtosis"]))
                row[f"{method}_stable_rank_err"] = abs(math.log(stable_rank(decoded) / row["real_stable_rank"]))
                if method != "recon":
                    sample_lat = subsample(lat.float(), args.eval_tokens, pick)
                    d = torch.cdist(sample_lat, real_lat)
                    row[f"{method}_latent_mmd2"] = mmd2(sample_lat, real_lat, lat_bw)
                    row[f"{method}_nn_sample_to_real"] = float(d.min(1).values.mean())
                    row[f"{method}_nn_real_to_sample"] = float(d.min(0).values.mean())
            rows.append(row)

    def mean(key, sel=None, weight_by_tokens=False):
        sel = rows if sel is None else sel
        if not sel or key not in sel[0]:
            return None
        w = np.array([r["tokens"] for r in sel], float) if weight_by_tokens else np.ones(len(sel))
        return float(np.average([r[key] for r in sel], weights=w))

    metrics = ["loglik", "latent_mmd2", "nn_sample_to_real", "nn_real_to_sample", "token_mmd2",
               "kurtosis_err", "stable_rank_err"]
    summary = {m: {f"{k}": mean(f"{m}_{k}", weight_by_tokens=(k == "loglik")) for k in metrics}
               for m in (*METHODS, "recon")}
    per_kind = {kind: {m: {k: mean(f"{m}_{k}", [r for r in rows if r["kind"] == kind], k == "loglik")
                           for k in ("loglik", "latent_mmd2", "token_mmd2")} for m in METHODS}
                for kind in KINDS if any(r["kind"] == kind for r in rows)}
    layer_wins = {k: sum(r[f"mixture_{k}"] < r[f"gaussian_{k}"] for r in rows)
                  for k in ("latent_mmd2", "token_mmd2", "nn_sample_to_real", "nn_real_to_sample")}
    layer_wins["loglik"] = sum(r["mixture_loglik"] > r["gaussian_loglik"] for r in rows)

    # sampling time: a ViT-Huge-sized draw (linear layers over all depths); the two densities take
    # turns so that load from other processes hits both alike; best of --time-repeats each
    per_layer = args.time_tokens // args.time_layers
    timing = {"gaussian": math.inf, "mixture": math.inf}
    for _ in range(args.time_repeats):
        for name in timing:
            g = torch.Generator().manual_seed(args.seed)
            start = time.perf_counter()
            for i in range(args.time_layers):
                sample_latents(densities[name], "linear", i / max(args.time_layers - 1, 1), per_layer, dim, g)
            timing[name] = min(timing[name], time.perf_counter() - start)
    # and end to end: sample_weights (latent draw + decode + rescale) for a whole timm model
    end_to_end = {}
    if args.e2e_arch:
        import timm

        from weightgen.vae.prior import sample_weights
        from weightgen.vae.tokenize import token_count

        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(args.e2e_arch)
        end_to_end = {"arch": args.e2e_arch, "gaussian": math.inf, "mixture": math.inf,
                      "tokens": sum(token_count(layer["shape"], size) for layer in weight_layers(model))}
        for _ in range(2):
            for name in ("gaussian", "mixture"):
                start = time.perf_counter()
                sample_weights(model, vae, {**meta, "latent_density": densities[name]}, seed=args.seed, in_place=True)
                end_to_end[name] = min(end_to_end[name], time.perf_counter() - start)

    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    table = [[LABELS[m], fmt(summary[m]["loglik"], ".2f") if m != "recon" else "-",
              fmt(summary[m]["latent_mmd2"], ".4f"), fmt(summary[m]["nn_sample_to_real"], ".3f"),
              fmt(summary[m]["nn_real_to_sample"], ".3f"), fmt(summary[m]["token_mmd2"], ".4f"),
              fmt(summary[m]["kurtosis_err"], ".3f"), fmt(summary[m]["stable_rank_err"], ".3f")]
             for m in (*METHODS, "recon")]
    kind_table = [[kind, LABELS[m], fmt(v[m]["loglik"], ".2f"), fmt(v[m]["latent_mmd2"], ".4f"),
                   fmt(v[m]["token_mmd2"], ".4f")] for kind, v in per_kind.items() for m in METHODS]
    info = machine_info()
    n = len(rows)
    md = (f"# Latent prior: diagonal Gaussian vs Gaussian mixture\n\n`{info['command']}`, {info['date_utc']}, "
          f"{info['cpu']} (1 thread; load average {info['loadavg'][0]} on {info['cpus']} CPUs at the end: timings are "
          f"noisy, the two densities take turns). Zoo `{args.zoo}`, VAE `{args.vae or 'shipped'}` (latent size {dim}). "
          f"Split: {split_source}: {len(train_ids)} training models ({len(records)} layers, "
          f"{sum(r[2].shape[0] for r in records)} latent tokens) fit both densities; {len(held_ids)} held-out "
          f"models ({', '.join(held_ids)}; {n} layers) judge them. Mixture components per kind and depth "
          f"bucket (each with the N(0, I) backstop of weight 1 / (training models in the cell + 1) as its last): {', '.join(f'{k} {v}' for k, v in components.items())}. Fit time: Gaussian "
          f"{fit_s['gaussian']:.2f} s, mixture {fit_s['mixture']:.1f} s.\n\n"
          "Held-out log-likelihood: nats per latent token, token-weighted (higher is better). Other columns: "
          "means over held-out layers (lower is better); each layer is sampled as `sample_weights` does "
          f"(seeded), with up to {args.eval_tokens} tokens per layer compared; MMD^2 is unbiased with an RBF "
          "kernel of the real tokens' median distance; NN = mean distance to the nearest neighbour in latent "
          "space (sample->real: are samples on the data; real->sample: is the data covered); kurtosis / "
          "stable-rank errors are |log(sampled / real)| of the decoded layer, rescaled to the real RMS.\n\n"
          + markdown_table(["prior", "held-out loglik", "latent MMD^2", "NN sample->real", "NN real->sample",
                            "token MMD^2", "kurtosis err", "stable-rank err"], table)
          + f"\n\nLayers where the mixture beats the Gaussian (of {n}): "
          + ", ".join(f"{k} {v}" for k, v in layer_wins.items()) + ".\n\nPer layer kind:\n\n"
          + markdown_table(["kind", "prior", "held-out loglik", "latent MMD^2", "token MMD^2"], kind_table, "llrrr")
          + f"\n\nSampling time ({args.time_tokens:,} tokens over {args.time_layers} linear layers, latent size {dim}, "
          f"best of {args.time_repeats}, taking turns, CPU generator): Gaussian {timing['gaussian']:.2f} s, mixture "
          f"{timing['mixture']:.2f} s ({timing['mixture'] / timing['gaussian']:.2f}x)."
          + (f" End to end, `sample_weights` on timm `{args.e2e_arch}` ({end_to_end['tokens']:,} tokens, draw + "
             f"decode + rescale, best of 2): Gaussian {end_to_end['gaussian']:.2f} s, mixture "
             f"{end_to_end['mixture']:.2f} s ({end_to_end['mixture'] / end_to_end['gaussian']:.2f}x)." if end_to_end else "")
          + "\n")
    write_outputs(args.out, args.stem, md, {"machine": info, "zoo": args.zoo, "vae": args.vae, "split": split_source,
                                            "train_models": train_ids, "held_out_models": held_ids,
                                            "components": components, "fit_seconds": fit_s, "summary": summary,
                                            "per_kind": per_kind, "layer_wins": layer_wins,
                                            "sampling_seconds": timing, "end_to_end_seconds": end_to_end,
                                            "layers": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
