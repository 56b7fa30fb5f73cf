#!/usr/bin/env python
"""Pretrain a source backbone offline: any timm arch on a many-class glyph task (Cyrillic letters
and symbols, disjoint from every downstream task), at a small input size, with Lightning; in
grayscale, or in colour (--source glyphs-colour: an RGB backbone).

Records channels, input size and the mean/std it normalised with: adaptation feeds the same.

Writes OUT/model.safetensors and OUT/pretrain.json; the same arguments reuse an existing output.
Prints the generate_weights.py command that turns the backbone into template banks.
"""
from __future__ import annotations

import argparse
import logging
import sys

from weightgen.cli import accelerator_for, parse_kwargs, run_cli
from weightgen.io import WeightgenError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", required=True, help="any timm model name, e.g. resnet18 or vit_tiny_patch16_224")
    p.add_argument("--out", required=True, help="output directory, e.g. backbones/r18-src")
    p.add_argument("--epochs", type=int, default=10, help="training epochs over the source task")
    p.add_argument("--img-size", type=int, default=32, help="input side in pixels (recorded for adaptation)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate, StepLR x0.1 at 1/3 and 2/3 (default: 2e-3 for glyphs, 1e-2 for glyphs-colour)")
    p.add_argument("--max-train", type=int, default=6000, help="cap on source training images")
    p.add_argument("--max-eval", type=int, default=1500, help="cap on source validation and test images")
    p.add_argument("--source", choices=("glyphs", "glyphs-colour"), default="glyphs",
                   help="source task: grayscale glyphs (1 channel), or glyphs in random colours (3 channels)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="input normalisation mean (default: the arch's pretrained_cfg's); recorded")
    p.add_argument("--std", type=float, nargs="+", default=None, help="input normalisation std (as --mean)")
    p.add_argument("--augment", choices=("none", "flip-crop", "timm"), default="none", help="training augmentation")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="data split, init and data order")
    p.add_argument("--model-kwargs", nargs="*", metavar="K=V", default=[],
                   help="forwarded to timm.create_model, over in_chans (1, or 3 for glyphs-colour) and the source class count "
                        "(ViTs also get img_size and patch_size=img_size/4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (sets --accelerator when that is not given)")
    p.add_argument("--accelerator", default=None, help="Lightning accelerator; None: from --device")
    p.add_argument("--devices", default="1", help="Lightning devices")
    p.add_argument("--logdir", default=None, help="write TensorBoard scalars here")
    p.add_argument("--overwrite", action="store_true", help="retrain and replace an output weightgen wrote")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from weightgen.adapt.pretrain import pretrain

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # after its import, which sets INFO

    try:
        out, info, reused = pretrain(
            args.arch, args.out, epochs=args.epochs, img_size=args.img_size, seed=args.seed,
            model_kwargs=parse_kwargs(args.model_kwargs), batch_size=args.batch_size, lr=args.lr,
            max_train=args.max_train, max_eval=args.max_eval, accelerator=accelerator_for(args.device, args.accelerator),
            devices=int(args.devices) if args.devices.isdigit() else args.devices, logdir=args.logdir,
            progress=True, overwrite=args.overwrite, source=args.source, mean=args.mean, std=args.std,
            augment=args.augment, workers=args.workers)
    except KeyboardInterrupt:
        raise WeightgenError("interrupted; nothing was written") from None
    what = "reused (same arguments)" if reused else f"trained in {info['seconds']:.0f}s"
    print(f"{args.arch} on {info['source_task']['name']} ({info['source_task']['classes']} classes, "
          f"{info['img_size']}px): test accuracy {info['test_acc']:.3f}; {what}; in {out}")
    print("next, make template banks from it:")
    print(f"  {info['generate_command']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
