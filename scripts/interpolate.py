#!/usr/bin/env python
"""Interpolate two checkpoints of one architecture in weight space and through the VAE's latent space.

    python scripts/interpolate.py --zoo zoo --a vit-e32-d1-s0 --b vit-e32-d1-s1 --steps 6 --out outputs/interp

Zoo models (ids with --zoo, or zoo .safetensors files) bring their architecture and kwargs.
--align adds every path to b with its hidden units permuted to match a (weight matching, same function).
"""
from __future__ import annotations

import argparse
import json
import sys

from weightgen.cli import HelpFormatter, parse_kwargs, run_cli
from weightgen.data import TASKS
from weightgen.studies.interpolation import interpolate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", help="timm model name both checkpoints were built with (default: from the zoo records)")
    p.add_argument("--model-kwargs", nargs="*", metavar="K=V",
                   help="forwarded to timm.create_model (default: from the zoo records, else none)")
    p.add_argument("--zoo", help="zoo directory: --a/--b are then model ids of that zoo")
    p.add_argument("--a", required=True, help="start checkpoint (.safetensors/.pt/.pth/.bin) or zoo model id")
    p.add_argument("--b", required=True, help="end checkpoint or zoo model id, same architecture")
    p.add_argument("--steps", type=int, required=True, help="points on each path, ends included (>= 2)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vae", help="VAE directory (default: the shipped VAE)")
    p.add_argument("--task", help="weightgen.data task the accuracy is measured on (its test split, split seed 0; "
                                  "default: the zoo models' own task, else digits): " + ", ".join(TASKS))
    p.add_argument("--image-size", type=int, help="task image size for CNNs (default 32, the zoo's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent paths and of BatchNorm re-estimation")
    p.add_argument("--no-residual", action="store_true",
                   help="decode latent paths raw, without fading in each end's decoding error")
    p.add_argument("--align", action="store_true",
                   help="also interpolate to b with its hidden units permuted to match a (weight matching, "
                        "Git Re-Basin): methods <method>_aligned")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--logdir", help="write TensorBoard scalars here")
    p.add_argument("--device", default="cpu",
                   help="where the models, the VAE and the evaluation run: cpu, cuda or cuda:N (default: %(default)s)")
    return p.parse_args(argv)


def table(rows: list[dict]) -> str:
    key = "accuracy" if rows[0]["accuracy"] is not None else "cosine_b"
    methods = list(dict.fromkeys(r["method"] for r in rows))  # METHODS, then their _aligned twins
    width = max(13, *map(len, methods))
    lines = [f"{key} along each path", f"{'alpha':>6} " + " ".join(f"{m:>{width}}" for m in methods)]
    for alpha in dict.fromkeys(r["alpha"] for r in rows):
        values = {r["method"]: r[key] for r in rows if r["alpha"] == alpha}
        lines.append(f"{alpha:>6.3f} " + " ".join(f"{values[m]:>{width}.4f}" for m in methods))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, rows = interpolate(args.arch, args.a, args.b, args.steps, args.out, vae_dir=args.vae,
                            residual=not args.no_residual,
                            model_kwargs=None if args.model_kwargs is None else parse_kwargs(args.model_kwargs),
                            zoo=args.zoo, seed=args.seed,
                            overwrite=args.overwrite, logdir=args.logdir, progress=True,
                            image_size=args.image_size, device=args.device, align=args.align, task=args.task)
    summary = json.loads((out / "summary.json").read_text())
    print(table(rows))
    recon = (f"VAE reconstruction of the ends (not used at alpha 0/1): weight cosine "
             f"a {summary['recon_cosine_a']:.4f}, b {summary['recon_cosine_b']:.4f}")
    if summary["recon_accuracy_a"] is not None:
        recon += f"; accuracy a {summary['recon_accuracy_a']:.4f}, b {summary['recon_accuracy_b']:.4f}"
    print(recon)
    if "alignment" in summary:
        info = summary["alignment"]
        print(f"weight matching: {info['units_moved']}/{info['units_permutable']} units of b moved, weight cosine "
              f"to a {info['path_cosine_before']:.4f} -> {info['path_cosine_after']:.4f}, "
              f"logits changed by {info['max_logit_change']:.1e} (relative)")
    print(f"wrote {out} in {summary['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
