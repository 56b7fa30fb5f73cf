#!/usr/bin/env python
"""Decoder mimicry vs closed form at equal storage, on digits ViTs of the zoo.

    python benchmarks/bench_decoder.py --zoo zoo   # writes docs/bench_decoder.{md,json}

Per model, the ViT's attention and MLP linears (preset ``recast-attn-mlp``) go into banks of
``--layers-per-group`` same-shape layers, and three fits are compared:

* ``closed_form exact``: as many templates as layers per bank (exact by construction);
* ``closed_form 1/4``: a quarter of the templates (the storage the decoder needs);
* ``decoder``: starts from the exact fit and stores each template as VAE latents (16 numbers per
  64 weights: a quarter), ``--steps`` Adam steps on the per-layer cosine.

Storage is counted without and WITH the VAE decoder's own parameters (which any user of the
decoded templates needs). Function is measured on the dense export: top-1 agreement with the
original model and accuracy on the zoo's held-out digits test split.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table  # noqa: E402


def run_one(zoo: str, model_id: str, vae_bundle, layers_per_group: int, steps: int, seed: int) -> list[dict]:
    import torch

    import weightgen
    from weightgen.bank import banks_of
    from weightgen.data import model_splits
    from weightgen.layers import recast_layers
    from weightgen.zoo import ZOO_DATA_SEED, create_zoo_model, load_zoo_model

    original, meta = load_zoo_model(zoo, model_id)
    target = {k: v.detach().clone() for k, v in original.state_dict().items()}
    data = model_splits(meta.get("task") or "digits", ZOO_DATA_SEED, meta["model_kwargs"].get("img_size", 32),
                        meta["model_kwargs"].get("in_chans", 1))
    x, y = data.test.tensors
    with torch.no_grad():
        reference = original(x).argmax(-1)
    vae, _ = vae_bundle
    decoder_params = sum(p.numel() for p in vae.decoder.parameters())
    vae_params = sum(p.numel() for p in vae.parameters())
    rows = []
    for name, templates, method in (("closed_form exact", layers_per_group, "closed_form"),
                                    ("closed_form 1/4", max(1, layers_per_group // 4), "closed_form"),
                                    (f"decoder ({steps} steps)", layers_per_group, "decoder")):
        model, _ = load_zoo_model(zoo, model_id)
        config = weightgen.preset_config("recast-attn-mlp", layers_per_group=layers_per_group,
                                         templates=templates, seed=seed)
        weightgen.recast(model, config, init="empty")
        start = time.perf_counter()
        report = weightgen.fit(model, target, method, steps=steps if method == "decoder" else None, seed=seed,
                               vae=vae_bundle if method == "decoder" else None)
        seconds = time.perf_counter() - start
        coefficients = sum(layer.coefficients.numel() for layer in recast_layers(model).values())
        template_numbers = sum(bank.templates.numel() for bank in banks_of(model).values())
        stored = report["decoder"]["stored_numbers"] if method == "decoder" else template_numbers
        dense = create_zoo_model(meta["arch"], meta["model_kwargs"]).eval()
        dense.load_state_dict(weightgen.export_dense(model), strict=True)
        with torch.no_grad():
            predicted = dense(x).argmax(-1)
        rows.append({
            "model": model_id, "fit": name, "banks": len(banks_of(model)),
            "layers": len(recast_layers(model)), "templates_per_bank": templates,
            "stored_numbers": stored + coefficients,
            "stored_with_decoder": stored + coefficients + (decoder_params if method == "decoder" else 0),
            "mean_cosine": report["mean_cosine"], "min_cosine": report["min_cosine"],
            "top1_agreement": (predicted == reference).float().mean().item(),
            "accuracy": (predicted == y).float().mean().item(),
            "original_accuracy": (reference == y).float().mean().item(),
            "seconds": round(seconds, 2), "decoder_params": decoder_params, "vae_params": vae_params,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", required=True, help="a zoo built by scripts/build_zoo.py (default zoo)")
    p.add_argument("--models", nargs="+", default=["test_vit-s0", "vit-e64-d4-s0"],
                   help="zoo model ids (default: test_vit-s0, held out from the shipped VAE's training, "
                        "and vit-e64-d4-s0, one of its training models)")
    p.add_argument("--vae", help="VAE directory (default: the shipped one)")
    p.add_argument("--layers-per-group", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs")
    p.add_argument("--stem", default="bench_decoder", help="output file name without extension")
    args = p.parse_args(argv)

    import torch

    from weightgen.vae.prior import load_vae_bundle

    torch.set_num_threads(args.threads)
    bundle = load_vae_bundle(args.vae)
    seen = set(bundle[1].get("training", {}).get("train_models", []))
    rows = [row for model_id in args.models
            for row in run_one(args.zoo, model_id, bundle, args.layers_per_group, args.steps, args.seed)]
    info = machine_info()
    table = [[f"{r['model']} ({'in' if r['model'] in seen else 'held out from'} VAE training)", r["fit"],
              f"{r['banks']} x {r['templates_per_bank']}", f"{r['stored_numbers']:,}",
              f"{r['stored_with_decoder']:,}", f"{r['mean_cosine']:.4f}", f"{r['min_cosine']:.4f}",
              f"{100 * r['top1_agreement']:.1f}%", f"{r['accuracy']:.4f}", f"{r['seconds']:.1f}"] for r in rows]
    decoder = rows[0]["decoder_params"]
    latent = bundle[0].config.latent_dim
    md = (f"# Decoder mimicry vs closed form by stored numbers\n\n`{info['command']}`, {info['date_utc']}, "
          f"load average {info['loadavg'][0]}, {args.threads} torch thread(s).\n\n"
          f"Preset `recast-attn-mlp`, banks of up to {args.layers_per_group} same-shape layers. Stored numbers "
          f"= templates (or, for the decoder, {latent} latents per 64 weights + one log scale per template) + "
          f"coefficients; the column after counts the VAE decoder's own {decoder:,} parameters too "
          f"(the whole VAE has {rows[0]['vae_params']:,}). Top-1 agreement of the dense export with the "
          f"original model and accuracy on the zoo's digits test split "
          f"({len(rows) and rows[0]['original_accuracy']:.4f} for the first model's original).\n\n"
          + markdown_table(["model", "fit", "banks x templates", "stored numbers", "stored + decoder",
                            "mean cos", "min cos", "top-1 agreement", "accuracy", "fit s"], table) + "\n")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.stem}.md").write_text(md)
    (out_dir / f"{args.stem}.json").write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows},
                                                          indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
