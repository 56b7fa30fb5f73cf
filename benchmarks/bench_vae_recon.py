#!/usr/bin/env python
"""Reconstruction of held-out zoo models: VAE (decode of the latent mean) vs scikit-learn PCA.

    python benchmarks/bench_vae_recon.py --zoo zoo   # writes docs/bench_vae_recon.{md,json}

The VAE's held-out models (never seen in training) are read from its vae.json; PCA gets the same
number of components per 64-value token as the VAE has latent dimensions, fitted on the training
models' tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", required=True, help="the zoo the VAE was trained on")
    p.add_argument("--vae", help="VAE directory (default: the shipped one)")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)

    from weightgen.vae.data import list_zoo
    from weightgen.vae.prior import load_vae_bundle
    from weightgen.vae.train import reconstruction_vs_pca

    vae, meta = load_vae_bundle(args.vae)
    models = {m["model_id"]: m for m in list_zoo(args.zoo)}
    training = meta["training"]
    result = reconstruction_vs_pca(vae, [models[i] for i in training["train_models"]],
                                   [models[i] for i in training["val_models"]])
    summary = result["summary"]
    rows = [["all", summary["layers"], f"{summary['vae_mean_cosine']:.4f}", f"{summary['pca_mean_cosine']:.4f}"]]
    for kind in ("linear", "conv", "dwconv"):
        if f"vae_cosine_{kind}" in summary:
            count = sum(1 for r in result["layers"] if r["kind"] == kind)
            rows.append([kind, count, f"{summary[f'vae_cosine_{kind}']:.4f}", f"{summary[f'pca_cosine_{kind}']:.4f}"])
    info = machine_info()
    md = (f"# VAE reconstruction vs PCA on held-out zoo models\n\n`{info['command']}`, {info['date_utc']}. "
          f"Held-out models: {', '.join(training['val_models'])}. Mean per-layer cosine of the "
          f"normalised weights; latent size {summary['latent_dim']} per 64-value token for both.\n\n"
          + markdown_table(["layer kind", "layers", "VAE cosine", "PCA cosine"], rows) + "\n")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_vae_recon.md").write_text(md)
    (out_dir / "bench_vae_recon.json").write_text(json.dumps({"machine": info, **result}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
