#!/usr/bin/env python
"""Whole-model reconstruction through the VAE (issue 8's baseline): a digits-trained model, every
non-head Linear/Conv2d weight rebuilt with ``encode`` and with ``mimic``; per-layer cosine and digits
test accuracy before / after (after BatchNorm re-estimation).

    python benchmarks/bench_reconstruct.py            # writes docs/bench_reconstruct.{md,json}

The model is trained here (seeded, ``weightgen.digits``), saved as a checkpoint, and each mode is one
``weightgen.reconstruct.reconstruct`` call (what ``scripts/reconstruct.py --keep-head`` runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table  # noqa: E402


def accuracy_of(arch: str, kwargs: dict, weights: dict, data) -> tuple[float, float]:
    """(test accuracy as loaded, test accuracy after BatchNorm re-estimation on the train split)."""
    import timm

    from weightgen.digits import evaluate, reestimate_batchnorm

    model = timm.create_model(arch, **kwargs)
    model.load_state_dict(weights, strict=True)
    raw = evaluate(model, data.test)
    reestimate_batchnorm(model, data.train)
    return raw, evaluate(model, data.test)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet10t", help="timm architecture trained on digits")
    p.add_argument("--train-steps", type=int, default=300, help="training steps of the digits model")
    p.add_argument("--mimic-steps", type=int, default=100, help="Adam steps of --mode mimic")
    p.add_argument("--vae", help="VAE directory (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's init, training and probe batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="docs", help="where bench_reconstruct.{md,json} go")
    args = p.parse_args(argv)

    import timm
    import torch
    from safetensors.torch import load_file, save_file

    from weightgen.digits import digits_model_kwargs, evaluate, load_digits_data, train_classifier
    from weightgen.reconstruct import ReconstructOptions, reconstruct

    torch.set_num_threads(args.threads)
    data = load_digits_data(32, 1, seed=args.seed)
    kwargs = digits_model_kwargs(args.arch, 32, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = timm.create_model(args.arch, **kwargs)
    start = time.perf_counter()
    train_classifier(model, data, args.train_steps, seed=args.seed, progress=True)
    train_seconds = time.perf_counter() - start
    original_acc = evaluate(model, data.test)
    results = {"arch": args.arch, "model_kwargs": kwargs, "train_steps": args.train_steps,
               "train_seconds": train_seconds, "params": sum(p.numel() for p in model.parameters()),
               "test_images": len(data.test.tensors[1]), "modes": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.safetensors"
        save_file(model.state_dict(), str(ckpt))
        raw, bn = accuracy_of(args.arch, kwargs, load_file(str(ckpt)), data)
        results["original"] = {"test_accuracy": original_acc, "after_bn_reestimation": bn}
        rows.append(["original", "-", "-", "-", "-", f"{original_acc:.1%}", f"{bn:.1%}", "-", "-"])
        for mode, steps in (("encode", None), ("mimic", args.mimic_steps)):
            opts = ReconstructOptions(arch=args.arch, checkpoint=str(ckpt), out=str(Path(tmp) / mode),
                                      model_kwargs=kwargs, vae=args.vae, mode=mode, steps=steps, keep_head=True,
                                      seed=args.seed)
            out, report = reconstruct(opts, progress=True)
            raw, bn = accuracy_of(args.arch, kwargs, load_file(str(out / "weights.safetensors")), data)
            t = report["totals"]
            results["modes"][mode] = {"totals": t, "steps": report["steps"], "seconds": report["seconds"],
                                      "fit_seconds": report["fit_seconds"], "function": report["function"],
                                      "test_accuracy": raw, "after_bn_reestimation": bn, "kept": report["kept"],
                                      "layers": report["layers"], "loss_first": (report["loss_history"] or [None])[0],
                                      "loss_best": min(report["loss_history"], default=None)}
            rows.append([f"{mode} ({report['steps']} steps)" if report["steps"] else mode, t["reconstructed"],
                         f"{t['mean_cosine']:.3f}", f"{t['median_cosine']:.3f}", f"{t['min_cosine']:.3f}",
                         f"{raw:.1%}", f"{bn:.1%}", f"{t['compression']:.3f}", f"{report['seconds']:.0f}"])
    info = machine_info()
    md = (f"# Whole-model reconstruction through the VAE\n\n`{info['command']}`, {info['date_utc']}, "
          f"{info['cpu']} ({info['cpus']} cores, torch threads {args.threads}, load {info['loadavg'][0]}).\n\n"
          f"{args.arch} ({results['params']:,} parameters, {json.dumps(kwargs)}) trained {args.train_steps} steps "
          f"on digits ({train_seconds:.0f} s); every Linear/Conv2d weight except the classifier head rebuilt through "
          f"the VAE ({args.vae or 'the shipped one'}); accuracy on the {results['test_images']} digits test images, "
          f"as loaded and after BatchNorm re-estimation (20 train batches of 64). Compression: latent numbers "
          f"(16 per 64-value token, plus one scale per layer) over weight numbers. Seconds: the whole "
          f"`reconstruct` call (load, encode, fit, check, write).\n\n"
          + markdown_table(["weights", "layers", "mean cos", "median cos", "min cos", "test acc", "after BN re-est.",
                            "compression", "seconds"], rows) + "\n")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_reconstruct.md").write_text(md)
    (out_dir / "bench_reconstruct.json").write_text(json.dumps({"machine": info, **results}, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
