#!/usr/bin/env python
"""Generate RECAST weights (template banks + coefficients) for any timm architecture."""
from __future__ import annotations

import argparse
import sys

from weightgen.cli import group_table, parse_kwargs, run_cli, total_line
from weightgen.config import PRESETS
from weightgen.generate import GenerateOptions, generate
from weightgen.mimicry import METHODS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", required=True, help="any timm model name, e.g. resnet50")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="weights to mimic: .safetensors/.pt/.pth/.bin")
    src.add_argument("--pretrained", action="store_true", help="timm hub weights (needs a network)")
    p.add_argument("--vae", help="VAE directory for prior generation / --method decoder")
    p.add_argument("--model-kwargs", nargs="*", metavar="K=V", help="forwarded to timm.create_model")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--preset", choices=list(PRESETS), help="default: the paper's variant for the family")
    tgt.add_argument("--target", help="regex on full module names")
    p.add_argument("--layers-per-group", type=int)
    p.add_argument("--templates", type=int, help="templates per bank (default: layers per group, exact)")
    p.add_argument("--coef-sets", type=int, default=2, help="K coefficient sets per layer")
    p.add_argument("--method", choices=METHODS, default="closed_form")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default under outputs/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--logdir", help="write a TensorBoard run here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = GenerateOptions(
        arch=args.arch, checkpoint=args.checkpoint, pretrained=args.pretrained, vae=args.vae,
        model_kwargs=parse_kwargs(args.model_kwargs), preset=args.preset, target=args.target,
        layers_per_group=args.layers_per_group, templates=args.templates, coef_sets=args.coef_sets,
        method=args.method, steps=args.steps, lr=args.lr, seed=args.seed, out=args.out,
        overwrite=args.overwrite, logdir=args.logdir)
    out, report = generate(opts, progress=True)
    print(group_table(report))
    print(total_line(report))
    print(f"wrote {out} in {report['seconds_total']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
