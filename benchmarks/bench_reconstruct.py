#!/usr/bin/env python
"""Whole-model reconstruction through the VAE (issue 8): a digits-trained model, every non-head
Linear/Conv2d weight rebuilt with ``encode``, ``mimic`` on the weights alone and ``mimic`` on the
model's outputs; per-layer cosine, digits test accuracy (after BatchNorm re-estimation) and seconds.

    python benchmarks/bench_reconstruct.py --threads 2    # writes docs/bench_reconstruct.{md,json}
    python benchmarks/bench_reconstruct.py --arch resnet10t --vae my_vae/ --out /tmp/bench

The model is trained here (seeded, ``weightgen.classifier.train_classifier`` on the inputs
``weightgen.data`` gives for the ``digits`` task, so ``--probe-task digits`` sees what it was trained
on), saved as a checkpoint, and each row is one ``weightgen.reconstruct.reconstruct`` call (what
``scripts/reconstruct.py --keep-head --probe-task digits`` runs). Accuracy is measured here again
from the written weights: as written, and after one more BatchNorm re-estimation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, write_outputs  # noqa: E402


def accuracy_of(arch: str, kwargs: dict, weights: dict, data) -> tuple[float, float]:
    """(test accuracy as written, test accuracy after BatchNorm re-estimation on the train split)."""
    import timm

    from weightgen.classifier import evaluate, reestimate_batchnorm

    model = timm.create_model(arch, **kwargs)
    model.load_state_dict(weights, strict=True)
    raw = evaluate(model, data.test)
    reestimate_batchnorm(model, data.train)
    return raw, evaluate(model, data.test)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet10t", help="timm architecture trained on digits")
    p.add_argument("--train-steps", type=int, default=300, help="training steps of the digits model")
    p.add_argument("--mimic-steps", type=int, help="Adam steps of --mode mimic (default: reconstruct's)")
    p.add_argument("--behaviour-weight", type=float, help="weight of the output term (default: reconstruct's)")
    p.add_argument("--probe-size", type=int, help="probe images (default: reconstruct's)")
    p.add_argument("--vae", help="VAE directory (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's init, training, split and probe")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the speed target is for 2)")
    p.add_argument("--out", default="docs", help="where bench_reconstruct.{md,json} go")
    args = p.parse_args(argv)

    import timm
    import torch
    from safetensors.torch import load_file, save_file
    from weightgen.classifier import evaluate, train_classifier
    from weightgen.data import model_splits
    from weightgen.models import small_input_kwargs
    from weightgen.reconstruct import DEFAULT_BEHAVIOUR_WEIGHT, DEFAULT_PROBE_SIZE, DEFAULT_STEPS, \
        ReconstructOptions, reconstruct

    torch.set_num_threads(args.threads)
    load_start = [round(x, 2) for x in os.getloadavg()]
    data = model_splits("digits", args.seed, 32, 1)
    kwargs = small_input_kwargs(args.arch, 32, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = timm.create_model(args.arch, **kwargs)
    start = time.perf_counter()
    train_classifier(model, data, args.train_steps, seed=args.seed, progress=True)
    train_seconds = time.perf_counter() - start
    original_acc = evaluate(model, data.test)
    steps = DEFAULT_STEPS if args.mimic_steps is None else args.mimic_steps
    weight = DEFAULT_BEHAVIOUR_WEIGHT if args.behaviour_weight is None else args.behaviour_weight
    probe_size = DEFAULT_PROBE_SIZE if args.probe_size is None else args.probe_size
    results = {"arch": args.arch, "model_kwargs": kwargs, "train_steps": args.train_steps, "threads": args.threads,
               "train_seconds": train_seconds, "params": sum(p.numel() for p in model.parameters()),
               "test_images": len(data.test.tensors[1]), "vae": args.vae, "runs": {}}
    rows = []
    runs = {"encode": {"mode": "encode"},
            "mimic (weights only)": {"mode": "mimic", "steps": steps, "behaviour_weight": 0.0},
            "mimic (behaviour)": {"mode": "mimic", "steps": steps, "behaviour_weight": weight}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.safetensors"
        save_file(model.state_dict(), str(ckpt))
        _, bn = accuracy_of(args.arch, kwargs, load_file(str(ckpt)), data)
        results["original"] = {"test_accuracy": original_acc, "after_bn_reestimation": bn}
        rows.append(["original", "-", "-", "-", "-", f"{original_acc:.2%}", f"{bn:.2%}", "-", "-", "-", "-"])
        for i, (name, run) in enumerate(runs.items()):
            opts = ReconstructOptions(arch=args.arch, checkpoint=str(ckpt), out=str(Path(tmp) / str(i)),
                                      model_kwargs=kwargs, vae=args.vae, keep_head=True, seed=args.seed,
                                      probe_task="digits", probe_size=probe_size, **run)
            loads = [round(x, 2) for x in os.getloadavg()]
            out, report = reconstruct(opts, progress=True)
            raw, bn = accuracy_of(args.arch, kwargs, load_file(str(out / "weights.safetensors")), data)
            t, fn = report["totals"], report["function"]
            results["runs"][name] = {
                "totals": t, "steps": report["steps"], "behaviour_weight": report["behaviour_weight"],
                "decode_dtype": report["decode_dtype"], "probe": report["probe"], "batchnorm": report["batchnorm"],
                "seconds": report["seconds"], "fit_seconds": report["fit_seconds"], "cpu_seconds": report["cpu_seconds"],
                "fit_cpu_seconds": report["fit_cpu_seconds"], "function": fn,
                "report_accuracy": report["accuracy"], "test_accuracy": raw, "after_bn_reestimation": bn,
                "kept": report["kept"], "layers": report["layers"], "loss_history": report["loss_history"],
                "loadavg_before": loads, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
            rows.append([f"{name}, {report['steps']} steps" if report["steps"] else name, t["reconstructed"],
                         f"{t['mean_cosine']:.3f}", f"{t['min_cosine']:.3f}", f"{fn['logits_rel_error']:.3f}",
                         f"{raw:.2%}", f"{bn:.2%}", f"{t['compression']:.3f}",
                         f"{report['fit_seconds']:.0f} ({report['fit_cpu_seconds']:.0f})",
                         f"{report['seconds']:.0f} ({report['cpu_seconds']:.0f})", f"{loads[0]}"])
    info = machine_info()
    behaviour = results["runs"]["mimic (behaviour)"]
    md = (f"# Whole-model reconstruction through the VAE\n\n`{info['command']}`, {info['date_utc']}, "
          f"{info['cpu']} ({info['cpus']} cores, torch threads {args.threads}, load average {load_start[0]} at the "
          f"start, {info['loadavg'][0]} at the end: the machine is shared, so seconds are upper bounds).\n\n"
          f"{args.arch} ({results['params']:,} parameters, {json.dumps(kwargs)}) trained {args.train_steps} steps "
          f"on the `digits` task ({train_seconds:.0f} s); every Linear/Conv2d weight except the classifier head "
          f"rebuilt through the VAE ({args.vae or 'the shipped one'}) with `--probe-task digits`, so BatchNorm "
          f"statistics are re-estimated on the train split before the weights are written. Test accuracy on the "
          f"{results['test_images']} digits test images, measured here from the written weights, and after one more "
          f"re-estimation (20 train batches of 64). Logit error: ||f_hat - f|| / ||f|| on the "
          f"{behaviour['function']['batch_size']} val images (never probed). mimic: Adam, cosine-decayed "
          f"learning rate, decoder passes in {behaviour['decode_dtype']}; behaviour: "
          f"output weight {behaviour['behaviour_weight']}, minibatches of {behaviour['probe']['batch']} of "
          f"{behaviour['probe']['size']} train images, BatchNorm {behaviour['probe']['batchnorm']}. Compression: "
          f"latent numbers (16 per 64-value token, plus one scale per layer) over weight numbers. Seconds: wall clock (CPU seconds of "
          f"all threads in brackets, which a busy machine inflates less) of the fit and of the whole `reconstruct` "
          f"call (load, encode, fit, BatchNorm re-estimation, accuracy, write); load: the 1-minute load average when "
          f"the call started.\n\n"
          + markdown_table(["weights", "layers", "mean cos", "min cos", "logit error", "test acc",
                            "after BN re-est.", "compression", "fit s (cpu)", "total s (cpu)", "load"], rows) + "\n")
    write_outputs(args.out, "bench_reconstruct", md, {"machine": info, "loadavg_start": load_start, **results},
                  newline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
