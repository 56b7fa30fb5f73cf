#!/usr/bin/env python
"""Train a WeightVAE on a model zoo (scripts/build_zoo.py) and export it as safetensors + JSON.

Lightning's accelerator/devices/strategy/num_nodes pass through, so the same script trains on GPUs
or several nodes with DDP.
"""
from __future__ import annotations

import argparse
import json
import sys

from weightgen.cli import HelpFormatter, run_cli
from weightgen.io import WeightgenError
from weightgen.vae.model import ARCHS, VAEConfig
from weightgen.vae.train import train_vae


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--zoo", required=True, help="directory written by scripts/build_zoo.py")
    p.add_argument("--out", required=True, help="output directory (vae.safetensors + vae.json)")
    p.add_argument("--logdir", help="TensorBoard logs (and Lightning checkpoints for resuming); default: none")
    p.add_argument("--max-epochs", type=int, default=30, help="training epochs (default: %(default)s; the shipped VAE: 4 epochs capped at 4,000 steps, see README)")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per batch")
    p.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (-1: no limit); the LR schedule spans min(steps, epochs)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes (Lightning max_time), whatever --max-epochs says")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--latent-dim", type=int, default=VAEConfig.latent_dim, help="latent numbers per 64-value token")
    p.add_argument("--hidden", type=int, default=VAEConfig.hidden,
                   help="width of the encoder/decoder (MLP hidden size, or transformer model width)")
    p.add_argument("--arch", choices=ARCHS, default="mlp",
                   help="mlp: each token alone; transformer: tokens attend to their window of the same layer")
    p.add_argument("--layers", type=int, default=VAEConfig.layers, help="blocks in encoder and in decoder")
    p.add_argument("--window", type=int, default=32, help="tokens per attention window (transformer only)")
    p.add_argument("--heads", type=int, default=VAEConfig.heads, help="attention heads (transformer only)")
    p.add_argument("--mask-ratio", type=float, default=0.0,
                   help="training only: fraction of tokens the encoder sees as zeros (masking augmentation)")
    p.add_argument("--permute-rows", action="store_true",
                   help="training only: permute each layer's output units afresh every epoch (augmentation)")
    p.add_argument("--beta", type=float, default=VAEConfig.beta, help="final KL weight")
    p.add_argument("--max-tokens-per-layer", type=int, default=4096,
                   help="cap on tokens taken from one layer (a fixed seeded subset), so big layers do not dominate")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches")
    p.add_argument("--resume", help="a Lightning .ckpt (under --logdir) to resume from")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a VAE directory weightgen wrote before (never other folders)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    p.add_argument("--devices", default="auto", help="Lightning devices: a count, a list, or auto")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--num-nodes", type=int, default=1, help="Lightning nodes, for multi-node DDP")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = VAEConfig(latent_dim=args.latent_dim, hidden=args.hidden, layers=args.layers, arch=args.arch,
                           window=args.window if args.arch == "transformer" else 1, heads=args.heads,
                           mask_ratio=args.mask_ratio, beta=args.beta)
    except ValueError as err:
        raise WeightgenError(str(err)) from None
    out, summary = train_vae(
        args.zoo, args.out, logdir=args.logdir, max_epochs=args.max_epochs, batch_size=args.batch_size,
        lr=args.lr, config=config, max_tokens_per_layer=args.max_tokens_per_layer, seed=args.seed,
        overwrite=args.overwrite, resume=args.resume, permute_rows=args.permute_rows,
        trainer_kwargs={"accelerator": args.accelerator, "devices": args.devices, "strategy": args.strategy,
                        "num_nodes": args.num_nodes, "max_steps": args.max_steps,
                        **({"max_time": {"minutes": args.max_minutes}} if args.max_minutes else {})})
    if summary.get("rank", 0) != 0:  # another DDP process: rank 0 exports and reports
        return 0
    print(json.dumps(summary["reconstruction"], indent=2))
    print(f"wrote {out} in {summary['seconds']:.0f}s")
    if summary["warning"]:  # logged in full above; repeated short at the end, where it is seen
        recon = summary["reconstruction"]
        print(f"WARNING: held-out cosine VAE {recon['vae_mean_cosine']:.4f} < PCA {recon['pca_mean_cosine']:.4f}: "
              "undertrained, train longer (--max-epochs) or on a bigger zoo before using it")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
