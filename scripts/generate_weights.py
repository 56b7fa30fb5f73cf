#!/usr/bin/env python
"""Generate RECAST weights (template banks + coefficients) for any timm architecture."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# Before torch loads (OpenMP reads it once): worker threads sleep between parallel regions instead of
# spinning for up to ~3 ms, which on a busy machine holds the core the other thread waits for (two
# threads ran 3.6x slower than one there; docs/bench_generate_speed.md). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from weightgen.cli import (HelpFormatter, artifact_listing, fit_kind, group_table, keep_freed_memory, parse_kwargs,
                           run_cli, total_line)
from weightgen.config import PRESETS
from weightgen.generate import GenerateOptions, generate
from weightgen.mimicry import DEFAULT_LR, DEFAULT_STEPS, METHODS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", required=True, help="any timm model name, e.g. resnet50")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="weights to mimic: .safetensors/.pt/.pth/.bin (default: sample "
                                          "the weights from the VAE prior)")
    src.add_argument("--pretrained", action="store_true",
                     help="mimic timm's hub weights (needs a network, or HF_HUB_OFFLINE=1 with them in the local cache)")
    src.add_argument("--pretrained-file", metavar="FILE",
                     help="mimic your own weights file for --arch, loaded through timm's pretrained mechanism "
                          "(pretrained_cfg_overlay file=FILE): the backbone keeps the arch's pretrained_cfg "
                          "(mean, std, input size) for adaptation")
    p.add_argument("--vae", help="VAE directory for prior generation / --method decoder "
                                 "(default: the VAE shipped in weightgen/assets/vae)")
    p.add_argument("--model-kwargs", nargs="*", metavar="K=V",
                   help="forwarded to timm.create_model, e.g. num_classes=10 (default: none)")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--preset", choices=list(PRESETS),
                     help="which layers get banks (default: the paper's variant for the family)")
    tgt.add_argument("--target", help="regex on full module names, instead of a preset")
    p.add_argument("--layers-per-group", type=int,
                   help="at most this many consecutive same-shape layers share a bank (default: all of them)")
    p.add_argument("--templates", type=int,
                   help="templates per bank; fewer than the bank's layers is a compressed fit "
                        "(default: layers per group, an exact fit)")
    p.add_argument("--coef-sets", type=int, default=2, help="K coefficient sets per layer")
    p.add_argument("--method", choices=METHODS, default="closed_form", help="how templates are fitted")
    p.add_argument("--steps", type=int, help="optimisation steps of gradient methods "
                   f"(default: {', '.join(f'{m} {s}' for m, s in DEFAULT_STEPS.items())})")
    p.add_argument("--lr", type=float, help="learning rate of gradient methods "
                   f"(default: {', '.join(f'{m} {v:g}' for m, v in DEFAULT_LR.items())})")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw; same seed, same files")
    p.add_argument("--out", help="output directory (default: outputs/ARCH-SOURCE-METHOD-sSEED)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory weightgen wrote before (never other folders)")
    p.add_argument("--extra-templates", type=int, default=0, metavar="N",
                   help="after the fit, add N templates to every bank with zero coefficients (the start point "
                        "is unchanged): more directions for coefficient-only adaptation (default: %(default)s)")
    p.add_argument("--extra-source", choices=("random", "pca", "vae"), default="random",
                   help="extra templates: random at the bank's RMS, pca of the other same-shape banks, or "
                        "drawn from the VAE prior (default: %(default)s)")
    p.add_argument("--residual-gates", type=float, metavar="G",
                   help="from the prior only: set the residual-branch gates timm starts at zero (ResNet's last "
                        "BatchNorm of each block, ConvNeXt's layer scale) to G, so that the generated branches "
                        "and the banks fitted to them act (0.25 let prior banks adapt: docs/bench_adapt_banks.md) "
                        "(default: timm's zeros)")
    p.add_argument("--logdir", help="write a TensorBoard run here, e.g. runs/x (default: none)")
    p.add_argument("--device", default="cpu",
                   help="where the model, the fit and the VAE run: cpu, cuda or cuda:N (default: %(default)s); "
                        "a seed gives the same result on any device, to float rounding")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    opts = GenerateOptions(
        arch=args.arch, checkpoint=args.checkpoint, pretrained=args.pretrained, vae=args.vae,
        pretrained_file=args.pretrained_file,
        model_kwargs=parse_kwargs(args.model_kwargs), preset=args.preset, target=args.target,
        layers_per_group=args.layers_per_group, templates=args.templates, coef_sets=args.coef_sets,
        method=args.method, steps=args.steps, lr=args.lr, seed=args.seed, out=args.out,
        overwrite=args.overwrite, logdir=args.logdir, device=args.device,
        extra_templates=args.extra_templates, extra_source=args.extra_source,
        residual_gates=args.residual_gates)
    out, report = generate(opts, progress=True)
    print(group_table(report))
    print(total_line(report))
    print(f"wrote {out} in {report['seconds_total']:.1f}s")
    print(fit_kind(report))
    print(artifact_listing(out))
    print(next_steps(args, out))
    return 0


def next_steps(args: argparse.Namespace, out) -> str:
    """Commands worth trying next, built from this run's own arguments."""
    argv = ["python", "scripts/generate_weights.py", "--arch", args.arch]
    argv += (["--checkpoint", args.checkpoint] if args.checkpoint else ["--pretrained-file", args.pretrained_file]
             if args.pretrained_file else ["--pretrained"] if args.pretrained else [])
    argv += ["--model-kwargs", *args.model_kwargs] if args.model_kwargs else []  # the suggestions must run as shown
    for flag, value in (("--preset", args.preset), ("--target", args.target), ("--layers-per-group", args.layers_per_group)):
        argv += [flag, str(value)] if value is not None else []
    base = shlex.join(argv)
    if args.templates is None and args.method == "closed_form":
        fit = f"  a compressed fit (1 template per bank):  {base} --templates 1 --out {out}-t1"
    else:
        fit = (f"  refine the fit by gradient:  {base} --templates {args.templates or 1} "
               f"--method closed_form+gradient --out {out}-refined")
    lines = ["next:", fit]
    if not args.logdir:
        lines.append("  TensorBoard (per-layer cosines):  add --logdir runs/x to a command, then: tensorboard --logdir runs")
    else:
        lines.append(f"  see this run in TensorBoard:  tensorboard --logdir {args.logdir}")
    if (Path(__file__).parent / "adapt.py").is_file():
        lines.append(f"  adapt to a task (trains coefficients only):  python scripts/adapt.py --backbone {out} "
                     f"--tasks digits --out results/{Path(out).name}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
