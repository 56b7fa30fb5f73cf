"""Tables and a figure from a ``run_sequence`` result (text and a matplotlib Figure; callers write them)."""
from __future__ import annotations

import csv
import io
import statistics

RESULT_COLUMNS = ["task", "method", "seed", "val_acc", "test_acc", "trainable", "trainable_with_head",
                  "task_file_bytes", "train_seconds", "seconds_per_step", "steps", "epochs", "best_epoch",
                  "exact_switch", "train_images", "skipped_images", "task_file"]
EVALUATE_COLUMNS = ["task", "method", "seed", "test_acc"]


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return buf.getvalue()


def _fmt(value):
    return repr(value) if isinstance(value, float) else value  # repr: a float reads back bit for bit


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def matrix_rows(result: dict) -> list[dict]:
    """One row per (seed, after task i): accuracy on every task j <= i (blank above the diagonal)."""
    tasks = result["run"]["tasks"]
    rows = []
    for seed, matrix in result["matrices"].items():
        for i, accs in enumerate(matrix):
            rows.append({"seed": seed, "after_task": tasks[i],
                         **{t: ("" if a is None else repr(a)) for t, a in zip(tasks, accs)}})
    return rows


def mean_matrix(result: dict) -> list[list[float | None]]:
    mats = list(result["matrices"].values())
    n = len(mats[0])
    return [[None if mats[0][i][j] is None else statistics.fmean(m[i][j] for m in mats) for j in range(n)]
            for i in range(n)]


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def per_task_summary(rows: list[dict]) -> list[dict]:
    """Mean +- std over seeds, per task, in first-seen order."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        sel = [r for r in rows if r["task"] == task]
        test, val = mean_std([r["test_acc"] for r in sel]), mean_std([r["val_acc"] for r in sel])
        out.append({"task": task, "seeds": len(sel), "val": val, "test": test,
                    "trainable": sel[0]["trainable"], "trainable_with_head": sel[0]["trainable_with_head"],
                    "bytes": sel[0]["task_file_bytes"], "train_seconds": statistics.fmean(r["train_seconds"] for r in sel),
                    "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in sel),
                    "exact": all(r["exact_switch"] for r in sel)})
    return out


def results_markdown(result: dict) -> str:
    run, rows = result["run"], result["rows"]
    lines = [f"# Adaptation: {run['method']} on {run['arch']} ({run['backbone']})", "",
             f"Input {run['img_size']}px x {run['channels']} channel(s); seeds {', '.join(map(str, run['seeds']))}; "
             f"at least {run['train']['epochs']} epochs" + (f" or {run['steps']} steps" if run.get("steps") else "")
             + f", batch {run['train']['batch_size']}, lr {run['train']['lr']}"
             + (f", head from a linear probe" if run.get("head_init") == "probe" else "")
             + (f", augmentation {run['data']['augment']}" if (run.get("data") or {}).get("augment", "none") != "none" else "")
             + ". Checkpoint chosen on a validation split carved from the training data; test reported once.",
             *_norm_line(run), *_skipped_line(run),
             f"Exact task switching (bit-identical logits after every later task): "
             f"{'yes' if result['exact_switch'] else 'NO'}.", "", "## Per task (mean +- std over seeds)", ""]
    lines.append(_table(
        ["task", "val acc", "test acc", "trainable", "trainable + head", "task file bytes", "train s", "s / step",
         "exact switch"],
        [[s["task"], f"{s['val'][0]:.3f} +- {s['val'][1]:.3f}", f"{s['test'][0]:.3f} +- {s['test'][1]:.3f}",
          f"{s['trainable']:,}", f"{s['trainable_with_head']:,}", f"{s['bytes']:,}", f"{s['train_seconds']:.1f}",
          f"{s['seconds_per_step']:.4f}", "yes" if s["exact"] else "NO"] for s in per_task_summary(rows)]))
    lines += ["", "## Every run", ""]
    lines.append(_table(["task", "method", "seed", "val acc", "test acc", "trainable", "trainable + head",
                         "task file bytes", "train s"],
                        [[r["task"], r["method"], r["seed"], f"{r['val_acc']:.3f}", f"{r['test_acc']:.3f}",
                          f"{r['trainable']:,}", f"{r['trainable_with_head']:,}", f"{r['task_file_bytes']:,}",
                          f"{r['train_seconds']:.1f}"] for r in rows]))
    lines += ["", matrix_markdown(result)]
    return "\n".join(lines) + "\n"


def _norm_line(run: dict) -> list[str]:
    cfg = run.get("data_config")
    if not cfg:
        return []
    fmt = lambda v: "/".join(f"{x:.3g}" for x in v)  # noqa: E731
    return [f"Inputs normalised with mean {fmt(cfg['mean'])}, std {fmt(cfg['std'])} "
            f"({cfg['interpolation']} resize, crop {cfg['crop_pct']:.3g})."]


def _skipped_line(run: dict) -> list[str]:
    skipped = {t: n for t, n in (run.get("skipped_images") or {}).items() if n}
    if not skipped:
        return []
    return ["Unreadable images skipped (--skip-bad-images): " + ", ".join(f"{t}: {n}" for t, n in skipped.items()) + "."]


def matrix_markdown(result: dict) -> str:
    tasks = result["run"]["tasks"]
    mean = mean_matrix(result)
    body = [[f"after {tasks[i]}"] + ["" if a is None else f"{a:.3f}" for a in row] for i, row in enumerate(mean)]
    return ("## Accuracy matrix (test accuracy on each task after learning the row's task; mean over seeds)\n\n"
            + _table(["", *tasks], body) + "\n")


def figure(result: dict):
    """Test accuracy per task (mean +- std over seeds) beside the mean accuracy matrix."""
    from matplotlib.figure import Figure

    summary = per_task_summary(result["rows"])
    tasks = result["run"]["tasks"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax, mx = fig.subplots(1, 2)
    ax.bar(range(len(summary)), [s["test"][0] for s in summary], yerr=[s["test"][1] for s in summary], capsize=4)
    ax.set_xticks(range(len(summary)), [s["task"] for s in summary], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{result['run']['method']}: test accuracy per task")
    mean = mean_matrix(result)
    grid = [[float("nan") if a is None else a for a in row] for row in mean]
    im = mx.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    mx.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    mx.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
    for i, row in enumerate(mean):
        for j, a in enumerate(row):
            if a is not None:
                mx.text(j, i, f"{a:.2f}", ha="center", va="center", color="w" if a < 0.6 else "k", fontsize=8)
    mx.set_title("accuracy matrix (mean over seeds)")
    fig.colorbar(im, ax=mx, shrink=0.8)
    return fig
