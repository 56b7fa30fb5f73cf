#!/usr/bin/env python
"""Rebuild every Linear/Conv2d weight of a model through the VAE and measure what survives.

Writes weights.safetensors (the full state dict, reconstructed weights; loads strict=True into
timm.create_model(arch, **model_kwargs)), latents.safetensors (per layer: latents + scale) and
report.json (per-layer cosine, compression, function fidelity on inputs not probed, and with
--probe-task the task's test accuracy of the original and of the reconstruction).

--mode mimic fits every layer's latents jointly so that the decoded model's logits match the
original's on probe inputs (the train split of --probe-task, else seeded noise), plus a weight-error
term. With --probe-task, BatchNorm statistics are re-estimated on that train split before writing.
"""
from __future__ import annotations

import argparse
import os
import sys

# Before torch loads (OpenMP reads it once): worker threads sleep between parallel regions instead of
# spinning for up to ~3 ms, which on a busy machine holds the core the other thread waits for (two
# threads ran 3.6x slower than one there; docs/bench_generate_speed.md). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from weightgen.cli import HelpFormatter, keep_freed_memory, parse_kwargs, run_cli
from weightgen.reconstruct import (DECODE_DTYPES, DEFAULT_BEHAVIOUR_WEIGHT, DEFAULT_IMAGE_SIZE, DEFAULT_LR,
                                   DEFAULT_PATIENCE, DEFAULT_PROBE_SIZE, DEFAULT_STEPS, MODES, ReconstructOptions, reconstruct)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", required=True, help="timm model name of the checkpoint, e.g. resnet10t")
    p.add_argument("--checkpoint", required=True, help="the model's weights: .safetensors/.pt/.pth/.bin")
    p.add_argument("--model-kwargs", nargs="*", metavar="K=V",
                   help="forwarded to timm.create_model, e.g. num_classes=10 in_chans=1 (default: none)")
    p.add_argument("--vae", help="VAE directory (default: the VAE shipped in weightgen/assets/vae)")
    p.add_argument("--mode", choices=MODES, default="encode",
                   help="encode: one amortised pass (latent means); mimic: then optimise the latents "
                        "through the frozen decoder so that the model's outputs (and weights) match")
    p.add_argument("--steps", type=int, help=f"Adam steps of --mode mimic (default: {DEFAULT_STEPS})")
    p.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                   help="--mode mimic checks its validation score about 10 times and stops after this many checks "
                        "without a better one (0: run every step); the best state is kept either way")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate of --mode mimic (cosine decay)")
    p.add_argument("--probe-task", metavar="TASK",
                   help="weightgen.data task (digits, mnist, fashion, ..., imagefolder:PATH): mimic probes its train "
                        "split, BatchNorm is re-estimated on it, its val split checks the function and its test split "
                        "gives the accuracy (default: no task, seeded noise probes)")
    p.add_argument("--probe-size", type=int, default=DEFAULT_PROBE_SIZE,
                   help="probe inputs of --mode mimic (capped at the task's train split)")
    p.add_argument("--behaviour-weight", type=float, default=None,
                   help=f"weight of the output-matching term of --mode mimic; 0 fits the weights alone "
                        f"(default: {DEFAULT_BEHAVIOUR_WEIGHT} with --probe-task, else 0: matching the outputs "
                        f"on noise can cost real accuracy). Mimic keeps its best state on validation, the "
                        f"encode start included")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help="side of task images and probe noise (a model built for a fixed size keeps its own)")
    p.add_argument("--decode-dtype", choices=DECODE_DTYPES, default="auto",
                   help="precision of mimic's decoder passes (auto: bfloat16 on CPUs with AMX and on GPUs that "
                        "support it); the written weights are decoded in float32")
    p.add_argument("--keep-head", action="store_true", help="leave the classifier head's weights as they are")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe batch; same seed, same files")
    p.add_argument("--device", default="cpu", help="where the model and the VAE run: cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory weightgen wrote before (never other folders)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    opts = ReconstructOptions(
        arch=args.arch, checkpoint=args.checkpoint, out=args.out, model_kwargs=parse_kwargs(args.model_kwargs),
        vae=args.vae, mode=args.mode, steps=args.steps, lr=args.lr, keep_head=args.keep_head, seed=args.seed,
        device=args.device, overwrite=args.overwrite, probe_task=args.probe_task, probe_size=args.probe_size,
        behaviour_weight=args.behaviour_weight, image_size=args.image_size, decode_dtype=args.decode_dtype,
        patience=args.patience)
    out, report = reconstruct(opts, progress=True)
    print(f"{'layer':<32} {'shape':<20} {'cosine':>8} {'rel err':>8}")
    for row in report["layers"]:
        print(f"{row['name']:<32} {str(tuple(row['shape'])):<20} {row['cosine']:>8.4f} {row['rel_error']:>8.4f}")
    for row in report["kept"]:
        print(f"{row['name']:<32} {str(tuple(row['shape'])):<20} kept: {row['reason']}")
    t, fn = report["totals"], report["function"]
    if t["reconstructed"]:
        print(f"total: {t['reconstructed']} layers reconstructed, {t['kept']} kept; cosine mean {t['mean_cosine']:.4f} "
              f"median {t['median_cosine']:.4f} min {t['min_cosine']:.4f}; {t['latent_numbers']:,} latent numbers for "
              f"{t['weight_numbers']:,} weights ({t['compression']:.3f}x)")
    print(f"function on {fn['inputs']}: top-1 agreement {fn['top1_agreement']:.1%}, "
          f"logit error {fn['logits_rel_error']:.3f} (relative)")
    if report["batchnorm"]:
        print(f"BatchNorm statistics: {report['batchnorm']}")
    acc = report["accuracy"]
    if acc:
        print(f"{report['probe_task']} test accuracy ({acc['test_images']} images): original {acc['original']:.2%} "
              f"({acc['original_after_bn_reestimation']:.2%} after BatchNorm re-estimation), "
              f"reconstructed {acc['reconstructed']:.2%}")
    print(f"wrote {out}/ in {report['seconds']:.1f}s, fit {report['fit_seconds']:.1f}s "
          f"({report['mode']}, {report['steps']} steps): "
          "weights.safetensors, latents.safetensors, report.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
