#!/usr/bin/env python
"""Interpolation benchmark: accuracy along weight-space and raw latent paths between two zoo models.

For each pair of zoo models of one architecture (and task), the study of ``scripts/interpolate.py``
runs with ``--no-residual --align``: weight-space lerp and the VAE's latent lerp / slerp decoded raw
(no end-point correction), each to b as trained and to b with its hidden units permuted to match a
(weight matching, ``weightgen.studies.align``; same function as b).

    python benchmarks/bench_interpolation.py --zoo /tmp/zoo-full        # auto pairs -> docs/bench_interpolation.*
    python benchmarks/bench_interpolation.py --zoo ZOO --vae VAE --pair vit-a vit-b --pair res-a res-b

Controls (``--ppca DIR``, a PPCA prior with the VAE's latent size; fitted on the zoo's train split
when DIR holds none): ``ppca_lerp`` (each layer's PPCA posterior-mean code of a and of b
interpolated, decoded with the scale interpolated geometrically: the linear code at the VAE's
latent size, raw like the VAE's paths), ``rms_lerp`` (weight lerp with each layer rescaled to the
geometric interpolation of the ends' RMS: the per-layer scale rule alone), each also to the
aligned b; and ``rms-matched init`` (timm's init rescaled to the VAE's scale model, head from a):
the accuracy floor of a model that keeps nothing of a or b.

Without ``--pair`` it picks up to ``--max-pairs`` pairs of one architecture, kwargs and task,
preferring held-out models (``"split": "heldout"``: never seen by the VAE), one pair per
architecture, ViTs, ResNets and ConvNeXts first. Checkpoints saved during a run (``checkpoint_of``) are not used.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

STEM = "bench_interpolation"
ORDER = ("weight_lerp", "weight_lerp_aligned", "latent_lerp", "latent_lerp_aligned", "latent_slerp",
         "latent_slerp_aligned")
ARCH_ORDER = ("vit", "resnet", "convnext")  # what the pair picker tries first (substring of the arch)


def _records(zoo: Path) -> dict[str, dict]:
    records = {}
    for path in sorted(zoo.glob("*.json")):
        if path.name == "zoo.json" or not path.with_suffix(".safetensors").is_file():
            continue
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "arch" in record and "model_kwargs" in record:
            records[path.stem] = record
    return records


def pick_pairs(records: dict[str, dict], max_pairs: int) -> list[tuple[str, str]]:
    """Up to ``max_pairs`` pairs (one per architecture) of final models sharing arch, kwargs and task."""
    groups: dict[str, list[str]] = {}
    for model_id, r in records.items():
        if r.get("checkpoint_of"):
            continue
        key = json.dumps([r["arch"], r["model_kwargs"], r.get("task")], sort_keys=True)
        groups.setdefault(key, []).append(model_id)
    candidates = []
    for ids in groups.values():
        if len(ids) < 2:
            continue
        # held-out first (the VAE never saw them), then by id (seed order)
        ids = sorted(ids, key=lambda i: (records[i].get("split") != "heldout", i))
        arch = records[ids[0]]["arch"]
        heldout = sum(records[i].get("split") == "heldout" for i in ids[:2])
        rank = next((k for k, name in enumerate(ARCH_ORDER) if name in arch), len(ARCH_ORDER))
        candidates.append((-heldout, rank, ids[0], arch, (ids[0], ids[1])))
    pairs, archs = [], set()
    for *_, arch, pair in sorted(candidates):
        if arch not in archs and len(pairs) < max_pairs:
            pairs.append(pair)
            archs.add(arch)
    return pairs


def run_pair(zoo: Path, a: str, b: str, args) -> dict:
    from weightgen.studies.interpolation import interpolate

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out, _ = interpolate(None, a, b, args.steps, Path(tmp) / "run", vae_dir=args.vae, zoo=zoo,
                                seed=args.seed, residual=False, align=True, device=args.device)
        summary = json.loads((out / "summary.json").read_text())
    records = [json.loads((zoo / f"{i}.json").read_text()) for i in (a, b)]
    alignment = summary["alignment"]
    return {
        "a": a, "b": b, "arch": summary["arch"], "model_kwargs": summary["model_kwargs"],
        "task": records[0].get("task"), "split_a": records[0].get("split", "train"),
        "split_b": records[1].get("split", "train"), "accuracy_data": summary["accuracy"],
        "alphas": summary["alphas"],
        # each path next to its aligned twin (summary.json sorts its keys)
        "methods": {m: summary["methods"][m] for m in ORDER if m in summary["methods"]},
        # the raw latent paths' own ends: each end decoded from its latents (alpha 0/1 are the checkpoints)
        "decoded_end_accuracy": {"a": summary["recon_accuracy_a"], "b": summary["recon_accuracy_b"],
                                 "b_aligned": alignment["recon_accuracy_b_aligned"]},
        "decoded_end_cosine": {"a": summary["recon_cosine_a"], "b": summary["recon_cosine_b"],
                               "b_aligned": alignment["recon_cosine_b_aligned"]},
        "alignment": {k: alignment[k] for k in (
            "path_cosine_before", "path_cosine_after", "cosine_before", "cosine_after", "units_moved",
            "units_permutable", "rounds", "max_logit_change", "skipped", "method")},
        "aligned_groups": len(alignment["groups"]),
        "weight_space_layers": summary["weight_space_layers"],
        "vae": summary["vae"], "steps": args.steps, "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_controls(zoo: Path, a: str, b: str, args, ppca, seed: int = 0) -> dict:
    """The control paths of one pair (see the module doc): accuracy and cosines at every alpha."""
    import math

    import torch

    from weightgen.models import create_model
    from weightgen.recasting import head_names
    from weightgen.studies.align import align_state
    from weightgen.studies.controls import rms_matched_init
    from weightgen.studies.interpolation import _TaskEval, _eval_setup, _load_end, _task, resolve_checkpoint
    from weightgen.vae.codec import weight_layers
    from weightgen.vae.prior import load_vae_bundle
    from weightgen.vae.tokenize import detokenize, tokenize
    from weightgen.data import get_task
    from weightgen.zoo import ZOO_DATA_SEED, ZOO_IMAGE_SIZE

    start = time.perf_counter()
    (pa, ra), (pb, rb) = resolve_checkpoint(a, zoo), resolve_checkpoint(b, zoo)
    meta = load_vae_bundle(args.vae)[1]
    task = _task((ra, rb), None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(ra["arch"], ra["model_kwargs"])
        state_a, state_b = _load_end(model, pa, "a"), _load_end(model, pb, "b")
        setup = _eval_setup(model, None, get_task(task, ZOO_DATA_SEED, image_size=ZOO_IMAGE_SIZE), True)
        evaluator = _TaskEval(model, task, *setup, seed=seed)
        heads = head_names(model)
        state_b_aligned, _ = align_state(model, state_a, state_b)
        layers = [l for l in weight_layers(model) if l["direct"] and l["name"] not in heads]
        keys = [f"{l['name']}.weight" for l in weight_layers(model) if l["direct"]]

        def flat(state):
            return torch.cat([state[k].reshape(-1).double() for k in keys])

        def cos(x, y):
            return torch.nn.functional.cosine_similarity(x, y, 0).item()

        def code(state):  # per layer: (PPCA posterior-mean tokens, log scale, Tokens) of the weight
            out = {}
            for l in layers:
                cell = ppca.cell(l["kind"], l["depth"]) if ppca else None
                if cell is None:
                    continue
                t = tokenize(state[f"{l['name']}.weight"], l["kind"], l["depth"], ppca.token_size)
                out[l["name"]] = (cell.reconstruct(t.values.float()) * t.mask, math.log(t.scale), t)
            return out

        def rms(w):
            return w.double().pow(2).mean().sqrt().item()

        paths = {}
        for suffix, end_b in (("", state_b), ("_aligned", state_b_aligned)):
            code_a, code_b = (code(state_a), code(end_b)) if ppca else ({}, {})
            fa, fb = flat(state_a), flat(end_b)

            def lerp_state(alpha, end_b=end_b):
                return {k: (1 - alpha) * state_a[k] + alpha * end_b[k] if state_a[k].is_floating_point() else state_a[k]
                        for k in state_a}

            def rms_state(alpha, end_b=end_b):
                state = lerp_state(alpha)
                for l in layers:
                    k = f"{l['name']}.weight"
                    target = math.exp((1 - alpha) * math.log(rms(state_a[k])) + alpha * math.log(rms(end_b[k])))
                    state[k] = state[k] * (target / max(rms(state[k]), 1e-12))
                return state

            def ppca_state(alpha, code_a=code_a, code_b=code_b):
                state = lerp_state(alpha)
                for name, (va, la, t) in code_a.items():
                    vb, lb, _ = code_b[name]
                    scale = math.exp((1 - alpha) * la + alpha * lb)
                    w = detokenize((1 - alpha) * va + alpha * vb, t.shape, scale, ppca.token_size)
                    state[f"{name}.weight"] = w.to(state[f"{name}.weight"])
                return state

            for method, fn in (("rms_lerp", rms_state), ("ppca_lerp", ppca_state)):
                if method == "ppca_lerp" and not ppca:
                    continue
                entry = {"accuracy": [], "cosine_a": [], "cosine_b": []}
                for alpha in torch.linspace(0, 1, args.steps, dtype=torch.float64).tolist():
                    state = fn(alpha)
                    f = flat(state)
                    entry["accuracy"].append(evaluator(state))
                    entry["cosine_a"].append(cos(f, fa))
                    entry["cosine_b"].append(cos(f, fb))
                acc = entry["accuracy"]
                entry["min_accuracy"] = min(acc)
                entry["barrier"] = min(acc[0], acc[-1]) - min(acc)
                paths[method + suffix] = entry
        fresh = create_model(ra["arch"], ra["model_kwargs"])
        floor = dict(state_a)
        floor.update({k: v for k, v in rms_matched_init(fresh, meta, skip=heads)[0].items()})
        floor_acc = evaluator(floor)
    return {"methods": paths, "rms_matched_init_accuracy": floor_acc, "seconds": round(time.perf_counter() - start, 1)}


def _at(result: dict, method: str, alpha: float) -> float | None:
    alphas = result["alphas"]
    i = min(range(len(alphas)), key=lambda k: abs(alphas[k] - alpha))
    return result["methods"][method]["accuracy"][i]


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def report(data: dict, stem: str = STEM) -> str:
    lines = ["# Interpolation between two zoo models: weight space vs raw latent paths, with weight matching", "",
             f"Command: `{data['machine']['command']}`  ", f"Zoo: `{data['zoo']}`, VAE: `{data['vae']}`, "
             f"{data['steps']} points per path, seed {data['seed']}, device {data['device']}, "
             f"{data['machine']['date_utc']}, commit {data['machine']['git_commit']}, wall {data['wall_s']:.0f}s.", "",
             "Paths from a to b: `weight_lerp` (every tensor linearly), `latent_lerp` / `latent_slerp` (the VAE's "
             "latents interpolated and decoded raw, `--no-residual`; biases, norms and the head lerp in weight "
             "space). `_aligned`: the same paths to b with its hidden units permuted to match a (weight matching, "
             "Git Re-Basin style; b's function is unchanged). Alpha 0 and 1 are the checkpoints themselves; the "
             "*decoded ends* row is where the raw latent paths would start and end (each end decoded from its own "
             "latents). Accuracy: held-out test split, BatchNorm re-estimated at every point. `control:` rows "
             "(when run): `rms_lerp` = weight lerp with each layer rescaled to the geometric interpolation of the "
             "ends' RMS (the per-layer scale rule alone); `ppca_lerp` = each layer's PPCA posterior-mean code "
             f"(`{data.get('ppca')}`, the VAE's latent size) of a and b interpolated and decoded raw, scale "
             "interpolated geometrically (the linear code at the VAE's latent size); `_aligned` to the aligned b; "
             "`rms-matched init` = timm's init rescaled to the VAE's scale model with a's head, BN re-estimated.", ""]
    for r in data["pairs"]:
        al = r["alignment"]
        controls = r.get("controls")
        lines += [f"## {r['a']} -> {r['b']} ({r['arch']}{', task ' + r['task'] if r['task'] else ''}; "
                  f"splits {r['split_a']} / {r['split_b']})", "",
                  f"Weight matching: {al['units_moved']}/{al['units_permutable']} units of b moved in "
                  f"{r['aligned_groups']} groups ({al['rounds']} rounds); Linear/Conv2d weight cosine a-b "
                  f"{al['path_cosine_before']:.4f} -> {al['path_cosine_after']:.4f} (VAE-path layers; all "
                  f"Linear/Conv2d: {al['cosine_before']:.4f} -> {al['cosine_after']:.4f}); logits of b changed by "
                  f"{al['max_logit_change']:.1e} (relative). Skipped blocks: "
                  f"{', '.join(s['module'] or s['kind'] for s in al['skipped']) or 'none'}. {r['seconds']:.0f}s.", ""]
        methods = list(r["methods"])
        rows = [[m, _fmt(_at(r, m, 0.0)), _fmt(_at(r, m, 0.5)), _fmt(_at(r, m, 1.0)),
                 _fmt(r["methods"][m].get("min_accuracy")), _fmt(r["methods"][m].get("barrier"))] for m in methods]
        dec = r["decoded_end_accuracy"]
        rows.append(["decoded ends (raw latent path limits)", _fmt(dec["a"]), "", f"{_fmt(dec['b'])} "
                     f"(aligned b: {_fmt(dec['b_aligned'])})", "", ""])
        if controls:
            ends = {m: e["accuracy"] for m, e in controls["methods"].items()}
            mid_i = min(range(len(r["alphas"])), key=lambda k: abs(r["alphas"][k] - 0.5))
            for m, e in controls["methods"].items():
                rows.append([f"control: {m}", _fmt(ends[m][0]), _fmt(ends[m][mid_i]), _fmt(ends[m][-1]),
                             _fmt(e["min_accuracy"]), _fmt(e["barrier"])])
            rows.append(["control: rms-matched init (keeps nothing of a or b)", "",
                         _fmt(controls["rms_matched_init_accuracy"]), "", "", ""])
        mid = min(r["alphas"], key=lambda x: abs(x - 0.5))
        lines += [markdown_table(["path", "acc @ 0", f"acc @ {mid:.2f}", "acc @ 1", "min", "barrier"], rows), ""]
        full = [[f"{alpha:.2f}", *(_fmt(r["methods"][m]["accuracy"][i]) for m in methods)]
                for i, alpha in enumerate(r["alphas"])]
        lines += ["<details><summary>accuracy at every alpha</summary>", "",
                  markdown_table(["alpha", *methods], full), "", "</details>", ""]
    lines += [f"![accuracy vs alpha]({stem}.png)", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    pairs = data["pairs"]
    fig = Figure(figsize=(6.5 * len(pairs), 10), layout="constrained")
    axes = fig.subplots(2, len(pairs), squeeze=False)
    colors = {"weight_lerp": "tab:gray", "latent_lerp": "tab:blue", "latent_slerp": "tab:orange"}
    for col, r in enumerate(pairs):
        top, bottom = axes[0][col], axes[1][col]
        for method, entry in r["methods"].items():
            base = method.removesuffix("_aligned")
            style = {"color": colors[base], "ls": "--" if base != method else "-",
                     "marker": "s" if base != method else "o", "ms": 3.5}
            if entry["accuracy"][0] is not None:
                top.plot(r["alphas"], entry["accuracy"], label=method, **style)
            bottom.plot(r["alphas"], entry["cosine_a"], label=method, **style)
        dec = r["decoded_end_accuracy"]
        if dec["a"] is not None:
            top.plot([0, 1, 1], [dec["a"], dec["b"], dec["b_aligned"]], "x", ms=9, color="tab:red",
                     label="decoded ends (raw latent limits)")
        al = r["alignment"]
        top.set(title=f"{r['a']} -> {r['b']}\n(dashed: b aligned, cosine {al['path_cosine_before']:.3f} -> "
                      f"{al['path_cosine_after']:.3f})", xlabel="alpha", ylabel="held-out accuracy", ylim=(0, 1.02))
        bottom.set(title="weight cosine to a along each path", xlabel="alpha",
                   ylabel="weight cosine (Linear/Conv2d)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from weightgen.io import WeightgenError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", required=True, help="zoo directory (scripts/build_zoo.py)")
    p.add_argument("--vae", help="VAE directory (default: the shipped VAE)")
    p.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"),
                   help="two model ids of the zoo (repeatable; default: picked, see above)")
    p.add_argument("--max-pairs", type=int, default=3, help="pairs picked without --pair (default: %(default)s)")
    p.add_argument("--steps", type=int, default=11, help="points per path, ends included (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--out", default=str(REPO / "docs"), help=f"where {STEM}.{{md,json,png}} go (default: docs/)")
    p.add_argument("--stem", default=STEM, help="output file name without extension (default: %(default)s)")
    p.add_argument("--ppca", help="PPCA prior directory (the VAE's latent size): adds the control paths; fitted on "
                                  "--zoo's train split when it holds none")
    p.add_argument("--no-controls", action="store_true", help="leave out the control paths and the init floor")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    if not zoo.is_dir():
        raise WeightgenError(f"zoo directory {zoo} not found")
    records = _records(zoo)
    pairs = [tuple(pair) for pair in args.pair] if args.pair else pick_pairs(records, args.max_pairs)
    if not pairs:
        raise WeightgenError(f"no two models of one architecture, kwargs and task in {zoo}; name them with --pair")
    start = time.perf_counter()
    machine = machine_info()
    ppca = None
    if args.ppca and not args.no_controls:
        from weightgen.studies.controls import fit_ppca_on_zoo, load_ppca, save_ppca
        from weightgen.vae.prior import load_vae_bundle

        latent = load_vae_bundle(args.vae)[0].config.latent_dim
        if not (Path(args.ppca) / "ppca.json").is_file():
            save_ppca(fit_ppca_on_zoo(zoo, latent), args.ppca)
        ppca = load_ppca(args.ppca)
        if ppca.latent_dim != latent:
            raise WeightgenError(f"--ppca has latent size {ppca.latent_dim}, the VAE {latent}")
    results = []
    for a, b in pairs:
        print(f"interpolating {a} -> {b} ...", flush=True)
        results.append(run_pair(zoo, a, b, args))
        if not args.no_controls:
            results[-1]["controls"] = run_controls(zoo, a, b, args, ppca, args.seed)
    data = {"zoo": str(zoo), "vae": results[0]["vae"], "steps": args.steps, "seed": args.seed,
            "device": args.device, "threads": args.threads, "machine": machine,
            "wall_s": time.perf_counter() - start, "pairs": results}
    out = Path(args.out)
    data["ppca"] = args.ppca
    write_outputs(out, args.stem, report(data, args.stem), data, default=str, newline=True)
    plot(data, out / f"{args.stem}.png")
    print(f"wrote {out / args.stem}.{{md,json,png}} in {data['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    from weightgen.cli import run_cli

    sys.exit(run_cli(lambda: main(sys.argv[1:])))
