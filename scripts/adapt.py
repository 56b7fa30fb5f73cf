#!/usr/bin/env python
"""Learn a sequence of tasks on a RECAST backbone, each task a tiny file; or re-evaluate the files.

Each task starts from the backbone, trains only what the method trains (recast: the coefficients
and the head), keeps the epoch with the best accuracy on a validation split carved from the
training data, and is written to OUT/tasks/<task>-s<seed>.safetensors. After every task, all
earlier task files are loaded back and re-tested (the accuracy matrix; switching must be exact).

OUT gets results.csv/.md, accuracy_matrix.csv/.md, adapt.png and adapt.json, written atomically.
--evaluate OUT reloads every task file onto --backbone and writes OUT/evaluate.csv.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

from weightgen.adapt import METHODS
from weightgen.adapt.incremental import (DEFAULT_EPOCHS, DEFAULT_STEPS, METHOD_DEFAULTS, RUN_FILE, DataOptions,
                                         check_run, evaluate_results, method_defaults, open_backbone, run_sequence)
from weightgen.adapt.report import (EVALUATE_COLUMNS, RESULT_COLUMNS, figure, matrix_markdown, matrix_rows,
                                    results_markdown, to_csv)
from weightgen.adapt.trainer import TrainConfig
from weightgen.cli import accelerator_for, run_cli
from weightgen.data import MAX_EVAL, MAX_TRAIN, TASKS
from weightgen.data.images import AUGMENTS
from weightgen.io import WeightgenError, add_output_file, atomic_directory, write_json

DEFAULT_SEEDS = "42,1998,3142592"
KIND = "adapt-results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--backbone", required=True, help="artifact directory from generate_weights.py")
    p.add_argument("--tasks", default="digits,mnist",
                   help="comma-separated tasks, learned in this order" + d + "; known: " + "; ".join(TASKS))
    p.add_argument("--method", default="recast", help="adaptation method" + d + "; one of: " + ", ".join(METHODS))
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="comma-separated seeds; each one sets the data split, the initialisation of the "
                        "head and of the method's adapters (LoRA, AdaptFormer), and the batch order" + d)
    p.add_argument("--out", help="results directory (required unless --evaluate)")
    p.add_argument("--evaluate", metavar="RESULTS_DIR",
                   help="reload every task file of RESULTS_DIR onto --backbone; write RESULTS_DIR/evaluate.csv")
    p.add_argument("--logdir", help="TensorBoard scalars per task: LOGDIR/<backbone>-<sha8>/<method>/<task>-s<seed>/")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="at least this many epochs per task" + d)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="training budget in optimizer steps: each task trains max(--epochs, ceil(steps / batches "
                        "per epoch)) epochs, so a small task still gets enough updates; 0: --epochs only" + d)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop each task after this many optimizer steps, mid-epoch if need be (quick runs; "
                        "validation still ends the run) (default: no cap)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size, over all --devices together" + d)
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate; StepLR x0.1 at 1/3 and 2/3 (default: the method's own, "
                        + ", ".join(f"{m} {v['lr']:g}" for m, v in METHOD_DEFAULTS.items())
                        + "; see docs/adapt_defaults.md)")
    p.add_argument("--head-init", choices=("random", "probe"), default=None,
                   help="the task head's start: random, or a logistic-regression probe on the frozen features "
                        "(LP-FT) (default: the method's own)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side (default: the backbone's: what pretrain.py recorded, else its model's "
                        "pretrained_cfg, e.g. 224 for an ImageNet backbone)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="input normalisation mean, 1 or per-channel values (default: the backbone's, from "
                        "pretrain.py's record or its pretrained_cfg)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="input normalisation std (as --mean)")
    p.add_argument("--augment", choices=AUGMENTS, default="none",
                   help="training augmentation: none, flip-crop (random-resized-crop + flip), timm (its full "
                        "recipe: RandAugment, random erasing)" + d)
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes decoding images (pin_memory and persistent workers on CUDA)" + d)
    p.add_argument("--max-train", type=int, default=None,
                   help=f"cap on training images per task (default: {MAX_TRAIN} for a built-in task, none for "
                        "imagefolder:/csv: data)")
    p.add_argument("--max-eval", type=int, default=None,
                   help=f"cap on val and test images per task (default: {MAX_EVAL} for a built-in task, none for "
                        "imagefolder:/csv: data)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="drop unreadable images (counted in results) instead of stopping with an error")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where evaluation runs, and training unless "
                                                   "--accelerator says otherwise" + d)
    p.add_argument("--accelerator", default=None, help="Lightning accelerator (default: from --device)")
    p.add_argument("--devices", default="1", help="Lightning devices; several run DDP, one process each, "
                                                   "rank 0 writes the results" + d)
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp" + d)
    p.add_argument("--precision", default="32-true",
                   help="Lightning precision: 32-true, bf16-mixed, 16-mixed (CUDA only)" + d)
    p.add_argument("--channels-last", action="store_true", help="CNNs: model and inputs in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    p.add_argument("--overwrite", action="store_true", help="replace a results directory weightgen wrote")
    return p.parse_args(argv)


def split(text: str, what: str, cast=str) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise WeightgenError(f"bad --{what} {text!r}: expected a comma-separated list of integers") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return adapt(args)
    except KeyboardInterrupt:  # the results directory is written only when complete
        raise WeightgenError("interrupted; nothing was written") from None


def adapt(args: argparse.Namespace) -> int:
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # after its import, which sets INFO
    if args.evaluate:
        rows = evaluate_results(args.backbone, args.evaluate, device=args.device, workers=args.workers)
        # into the results directory weightgen wrote (its manifest lists the new file), atomically
        path = add_output_file(Path(args.evaluate), "evaluate.csv", to_csv(rows, EVALUATE_COLUMNS), kind=KIND)
        for r in rows:
            print(f"{r['task']:<12} seed {r['seed']:<8} test acc {r['test_acc']:.4f}")
        print(f"wrote {path}")
        return 0
    if not args.out:
        raise WeightgenError("pass --out DIR (or --evaluate RESULTS_DIR)")
    tasks, seeds = split(args.tasks, "tasks"), split(args.seeds, "seeds", int)
    if args.steps < 0:
        raise WeightgenError("--steps must be >= 0")
    if args.max_steps is not None and args.max_steps < 1:
        raise WeightgenError("--max-steps must be >= 1")
    defaults = method_defaults(args.method)
    train_kw = dict(epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr if args.lr is not None else defaults["lr"],
                    accelerator=accelerator_for(args.device, args.accelerator),
                    devices=int(args.devices) if args.devices.isdigit() else args.devices,
                    progress=True, logdir=args.logdir, max_steps=args.max_steps)
    # speed/many-device options: fields of TrainConfig (trainer.py); passed only when asked
    extra = {"strategy": args.strategy, "precision": args.precision,
             "channels_last": args.channels_last or None, "compile": args.compile or None}
    fields = set(TrainConfig.__dataclass_fields__)
    for key, value in extra.items():
        if value is None:
            continue
        if key not in fields:
            raise WeightgenError(f"--{key.replace('_', '-')} is not supported by this trainer")
        train_kw[key] = value
    config = TrainConfig(**train_kw)
    config.validate()
    options = DataOptions(max_train=args.max_train, max_eval=args.max_eval, augment=args.augment,
                          workers=args.workers, skip_bad=args.skip_bad_images)
    options.validate()
    head_init = args.head_init or defaults.get("head_init", "random")
    backbone = open_backbone(args.backbone, args.img_size, mean=args.mean, std=args.std)
    opened = check_run(backbone, args.method, tasks, seeds, options)  # before anything is written
    if rank_zero_only.rank != 0:  # a process Lightning's DDP launched for another device: it trains, rank 0 writes
        run_sequence(backbone, args.method, tasks, seeds, config, args.out, device=args.device, options=options,
                     steps=args.steps or None, head_init=head_init, opened=opened)
        return 0
    with atomic_directory(args.out, args.overwrite, kind=KIND) as tmp:
        result = run_sequence(backbone, args.method, tasks, seeds, config, tmp, device=args.device,
                              options=options, steps=args.steps or None, head_init=head_init,
                              opened=opened)
        (tmp / "results.csv").write_text(to_csv(result["rows"], RESULT_COLUMNS))
        (tmp / "results.md").write_text(results_markdown(result))
        (tmp / "accuracy_matrix.csv").write_text(to_csv(matrix_rows(result), ["seed", "after_task", *tasks]))
        (tmp / "accuracy_matrix.md").write_text(matrix_markdown(result))
        figure(result).savefig(tmp / "adapt.png", dpi=120)
        write_json(tmp / RUN_FILE, {**result["run"], "exact_switch": result["exact_switch"]})
    print(results_markdown(result))
    print(f"wrote {args.out}; re-evaluate from the files alone with:\n"
          f"  python scripts/adapt.py --backbone {args.backbone} --evaluate {args.out}")
    if not result["exact_switch"]:
        print("warning: a task file did not reproduce its logits bit for bit (see exact_switch)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
