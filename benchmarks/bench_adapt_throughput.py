#!/usr/bin/env python
"""Images per second of adapt's training loop (train_task, through Lightning) against a plain PyTorch loop.

Same model object, same in-memory batches, batch size, precision, optimizer (AdamW on the trainable
parameters, StepLR, gradient clipping at 1.0) and memory format, for the methods ``recast`` and
``full`` (weightgen.adapt.get_method on a recast timm backbone). The two loops take turns, repeat
after repeat (the order flips each repeat), so the load of a shared machine hits both alike; each
repeat's pace counts the steps after a warm-up, from the start of step ``--warmup`` to the end of the
last step (data fetching between steps included, Trainer setup and the final validation not). The
table gives medians and the median of the per-repeat ratios adapt / plain (target: >= 0.9).

Data loading alone: the same task through weightgen.data.images (``open_task``, ``image_config``,
``make_loader``, flip + random-resized-crop) at ``--workers`` 0 and 2, images per second with no
model: loading is not the bottleneck when it outpaces the training loop.

    python benchmarks/bench_adapt_throughput.py          # CPU, 32 px -> docs/bench_adapt_throughput.{md,json}
    # on a GPU (not measured here: none was lent):
    python benchmarks/bench_adapt_throughput.py --device cuda --precision bf16-mixed --size 224 \\
        --archs vit_small_patch16_224 resnet34 --batch 128 --stem bench_adapt_throughput_cuda
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

CLASSES = 10


def build(arch: str, size: int, method_name: str, seed: int = 0):
    """A recast timm backbone (preset by family) with ``method_name`` applied, as adapt.py prepares it."""
    import timm
    import torch

    import weightgen as wg
    from weightgen.adapt import get_method
    from weightgen.config import preset_config
    from weightgen.recasting import merge_and_unload

    kwargs = {"num_classes": CLASSES}
    vit = "vit" in arch
    if vit:  # a ViT at a small side keeps 8x8 patches' worth of tokens
        kwargs.update(img_size=size, patch_size=16 if size >= 128 else 4)
    torch.manual_seed(seed)
    model = timm.create_model(arch, **kwargs)
    wg.recast(model, preset_config("recast-attn" if vit else "recast-resnet"))
    method = get_method(method_name)
    if not method.needs_recast:
        model = merge_and_unload(model)
    method.check(model)
    model.reset_classifier(CLASSES)
    method.apply(model, seed=seed)
    return model


def plain_loop(model, loader, config, device, warmup: int) -> tuple[float, int]:
    """What train_task does per step, by hand: returns (seconds from step ``warmup``'s start, steps timed)."""
    import torch
    import torch.nn.functional as F

    model.to(device).train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.max_steps
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, math.ceil(steps / 3)), gamma=0.1)
    amp = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "16-mixed")
    forward = torch.compile(model) if config.compile else model
    start = None
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if config.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return seconds, steps - warmup


def adapt_loop(model, data, val, config, warmup: int) -> tuple[float, int]:
    from weightgen.adapt.trainer import train_task

    summary = train_task(model, data, val, config, seed=0)
    clock = summary["step_clock"]
    return clock["end"] - clock["starts"][warmup], len(clock["starts"]) - warmup


def loading_rate(task: str, model, size: int, batch: int, workers: int, batches: int) -> float:
    """Images per second of the image pipeline alone (decode + transform + collate), first batch excluded."""
    from weightgen.data.images import image_config, make_loader, open_task

    data = open_task(task, seed=0)
    cfg = image_config(model, img_size=size)
    loader = make_loader(data.dataset("train", cfg, augment="flip-crop", seed=0), batch, train=True,
                         workers=workers, seed=0)
    n, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 0:
            start = time.perf_counter()  # workers started, first batch in hand
            continue
        n += len(y)
        if i == batches:
            break
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, 16-mixed")
    p.add_argument("--size", type=int, default=32, help="input side in pixels")
    p.add_argument("--archs", nargs="+", default=["resnet18", "vit_tiny_patch16_224"], help="timm architectures")
    p.add_argument("--methods", nargs="+", default=["recast", "full"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="steps per repeat and loop")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of each repeat's pace")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--task", default="digits", help="task for the data-loading rows")
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared test machine)")
    p.add_argument("--out", default=str(REPO / "docs"))
    p.add_argument("--stem", default="bench_adapt_throughput")
    args = p.parse_args(argv)

    import logging
    import warnings

    import torch

    from weightgen.adapt.trainer import TrainConfig

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|Precision).*")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    config = TrainConfig(epochs=1, batch_size=args.batch, lr=2e-3, accelerator=accelerator, devices=1,
                         max_steps=args.steps, precision=args.precision, channels_last=args.channels_last,
                         compile=args.compile)
    config.validate()
    gen = torch.Generator().manual_seed(0)
    n = args.steps * args.batch
    channels = 3
    x = torch.randn(n, channels, args.size, args.size, generator=gen)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    val = (x[:args.batch], y[:args.batch])
    from weightgen.adapt.trainer import make_loader

    rows, raw = [], []
    for arch in args.archs:
        for method in args.methods:
            model = build(arch, args.size, method)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rates = {"adapt": [], "plain": []}
            ratios = []
            for r in range(args.repeats):
                order = ("adapt", "plain") if r % 2 == 0 else ("plain", "adapt")
                got = {}
                for which in order:
                    if which == "adapt":
                        seconds, steps = adapt_loop(model, (x, y), val, config, args.warmup)
                    else:
                        loader = make_loader(x, y, args.batch, shuffle=True, seed=0)
                        seconds, steps = plain_loop(model, loader, config, device, args.warmup)
                    got[which] = steps * args.batch / seconds
                    rates[which].append(got[which])
                ratios.append(got["adapt"] / got["plain"])
                print(f"{arch} {method} repeat {r}: adapt {got['adapt']:.1f} img/s, plain {got['plain']:.1f} img/s",
                      file=sys.stderr)
            model.cpu()
            row = {"arch": arch, "method": method, "trainable": trainable,
                   "adapt_img_s": statistics.median(rates["adapt"]), "plain_img_s": statistics.median(rates["plain"]),
                   "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                   "adapt_all": rates["adapt"], "plain_all": rates["plain"], "ratios": ratios}
            raw.append(row)
            rows.append([arch, method, f"{trainable:,}", f"{row['plain_img_s']:.1f}", f"{row['adapt_img_s']:.1f}",
                         f"{row['ratio_median']:.3f}", f"{row['ratio_min']:.3f} - {row['ratio_max']:.3f}"])

    loading = []
    if args.size <= 64 or device.type == "cuda":
        for arch in args.archs[:1]:
            model = build(arch, args.size, "full")
            for w in args.workers:
                rate = loading_rate(args.task, model, args.size, args.batch, w, batches=args.steps)
                loading.append({"arch": arch, "task": args.task, "workers": w, "img_s": rate})
    slowest_train = min(min(r["adapt_img_s"], r["plain_img_s"]) for r in raw)
    fastest_train = max(max(r["adapt_img_s"], r["plain_img_s"]) for r in raw)

    info = machine_info()
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu"]
    md = [f"# adapt's training loop vs a plain PyTorch loop ({args.device}, {args.precision}, {args.size} px)", "",
          f"Device: **{info['device']}** ({info['cpus']} CPUs, load average {info['loadavg']} at the end; "
          f"torch {info['torch']}, {args.threads} torch thread(s)). Command: `{info['command']}`.", "",
          f"Batch {args.batch}, {args.steps} steps per repeat of which the first {args.warmup} are warm-up, "
          f"{args.repeats} repeats, the two loops in turns (order flipped each repeat); random "
          f"{channels}x{args.size}x{args.size} inputs held in memory; channels_last {args.channels_last}, "
          f"compile {args.compile}. The machine is shared and noisy: read the ratios (each from one repeat's "
          f"interleaved pair), not the absolute rates.", "",
          markdown_table(["arch", "method", "trainable", "plain img/s", "adapt img/s", "adapt / plain (median)",
                          "range over repeats"], rows), ""]
    if loading:
        md += ["## Data loading alone", "",
               f"`{args.task}` through `weightgen.data.images` (`open_task`, `image_config` of {loading[0]['arch']}, "
               f"`make_loader`, flip + random-resized-crop to {args.size} px), batch {args.batch}, no model; "
               f"first batch (worker start) excluded.", "",
               markdown_table(["workers", "images / s", "x the fastest training loop above"],
                              [[r["workers"], f"{r['img_s']:.0f}", f"{r['img_s'] / fastest_train:.1f}"]
                               for r in loading]), ""]
    write_outputs(args.out, args.stem, "\n".join(md), {
        "machine": info, "args": vars(args), "throughput": raw, "loading": loading,
        "slowest_train_img_s": slowest_train, "fastest_train_img_s": fastest_train})
    return 0


if __name__ == "__main__":
    sys.exit(main())
