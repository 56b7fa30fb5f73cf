#!/usr/bin/env python
"""Does a VAE-generated init train better than timm's default init?

For architectures that are NOT in the zoo the VAE was trained on, each seed builds the model twice:
timm's own init, and the same model with every Linear/Conv2d weight (head excepted) sampled from
the VAE prior. Both then train the same number of steps on scikit-learn digits with the same data
order; held-out test accuracy is reported as mean and spread over seeds.

    python benchmarks/bench_vae_init.py            # writes docs/bench_vae_init.{md,json,png}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table  # noqa: E402

# (label, timm arch, extra kwargs): none of these architectures / sizes is in the default zoo
ARCHS = {
    "resnet26-narrow": ("resnet26", {"channels": [32, 64, 128, 256]}),
    "resnet34-narrow": ("resnet34", {"channels": [16, 32, 64, 128]}),
    "vit-e128-d5": ("vit_tiny_patch16_224", {"embed_dim": 128, "depth": 5, "num_heads": 4, "global_pool": "avg"}),
}


def run_one(arch: str, kwargs: dict, init: str, seed: int, steps: int, data, vae_bundle, lr: float) -> tuple[float, float]:
    """Test accuracy after ``steps`` training steps from one init (fresh model, fixed seed).

    Returns (accuracy with the BatchNorm running statistics of training, accuracy after
    re-estimating them on training batches): after few steps the running averages lag behind the
    weights, which can swamp the effect of the init itself.
    """
    import torch

    from weightgen.digits import digits_model_kwargs, evaluate, reestimate_batchnorm, train_classifier
    from weightgen.models import create_model
    from weightgen.recast import head_names
    from weightgen.vae.prior import sample_weights

    torch.manual_seed(seed)
    model = create_model(arch, {**digits_model_kwargs(arch, data.image_size, data.in_chans), **kwargs})
    if init == "vae_prior":
        weights, _, fallback = sample_weights(model, *vae_bundle, seed=seed, skip=head_names(model))
        with torch.no_grad():
            for key, value in weights.items():
                model.get_parameter(key).copy_(value)
    train_classifier(model, data, steps, lr=lr, seed=seed)
    raw = evaluate(model, data.test)
    reestimate_batchnorm(model, data.train)
    return raw, evaluate(model, data.test)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="*", default=list(ARCHS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, nargs="*", default=[50, 150])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae", help="VAE directory (default: the shipped one)")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)

    from weightgen.digits import load_digits_data
    from weightgen.vae.prior import load_vae_bundle

    vae_bundle = load_vae_bundle(args.vae)
    data = load_digits_data(32, 1, seed=0)
    results, start = [], time.perf_counter()
    for label in args.archs:
        arch, kwargs = ARCHS[label]
        for seed in range(args.seeds):
            for init in ("timm", "vae_prior"):
                runs = {b: run_one(arch, kwargs, init, seed, b, data, vae_bundle, args.lr) for b in sorted(args.steps)}
                row = {"arch": label, "init": init, "seed": seed,
                       "accuracy_running_bn": {b: raw for b, (raw, _) in runs.items()},
                       "accuracy": {b: fresh for b, (_, fresh) in runs.items()}}
                results.append(row)
                print(f"{label:<16} seed {seed} {init:<9} " + " ".join(
                    f"{b} steps: {fresh:.3f} (running BN {raw:.3f})" for b, (raw, fresh) in runs.items()), flush=True)

    table = []
    for label in args.archs:
        for budget in sorted(args.steps):
            cells = [label, budget]
            means = {}
            for init in ("timm", "vae_prior"):
                accs = [r["accuracy"][budget] for r in results if r["arch"] == label and r["init"] == init]
                means[init] = statistics.mean(accs)
                cells.append(f"{means[init]:.3f} ± {statistics.pstdev(accs):.3f}")
            cells.append(f"{means['vae_prior'] - means['timm']:+.3f}")
            for init in ("timm", "vae_prior"):
                accs = [r["accuracy_running_bn"][budget] for r in results if r["arch"] == label and r["init"] == init]
                cells.append(f"{statistics.mean(accs):.3f} ± {statistics.pstdev(accs):.3f}")
            table.append(cells)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    header = ["architecture (not in zoo)", "train steps", "timm init", "VAE prior init", "difference",
              "timm (running BN)", "VAE prior (running BN)"]
    md = (f"# Generated init vs timm init on digits\n\n`python benchmarks/bench_vae_init.py` "
          f"({args.seeds} seeds, AdamW lr {args.lr}, batch 64; held-out test accuracy, mean ± std over seeds, "
          f"BatchNorm statistics re-estimated on training batches before evaluation for both inits; the "
          f"last two columns use the running statistics from training instead; "
          f"{time.perf_counter() - start:.0f} s on {info.get('cpu', 'CPU')}).\n\n"
          + markdown_table(header, table) + "\n")
    (out / "bench_vae_init.md").write_text(md)
    (out / "bench_vae_init.json").write_text(json.dumps({"machine": info, "results": results}, indent=2))
    _plot(results, args, out / "bench_vae_init.png")
    print(md)
    return 0


def _plot(results: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.archs), figsize=(4.5 * len(args.archs), 3.6), squeeze=False)
    for ax, label in zip(axes[0], args.archs):
        for init, colour in (("timm", "tab:gray"), ("vae_prior", "tab:blue")):
            rows = [r for r in results if r["arch"] == label and r["init"] == init]
            budgets = sorted(args.steps)
            means = [statistics.mean(r["accuracy"][b] for r in rows) for b in budgets]
            spread = [statistics.pstdev(r["accuracy"][b] for r in rows) for b in budgets]
            ax.errorbar(budgets, means, yerr=spread, marker="o", capsize=3, color=colour, label=init)
        ax.set_title(label)
        ax.set_xlabel("training steps")
        ax.set_ylabel("test accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
