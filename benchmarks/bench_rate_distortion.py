#!/usr/bin/env python
"""Rate-distortion of weight codes: accuracy drop (BatchNorm re-estimated) against stored numbers per weight.

    python benchmarks/bench_rate_distortion.py --zoo /work/zoo-structured \\
        --vae z16=/tmp/vae-z16 --vae z4=/tmp/vae-z4 [--vae v2=weightgen/assets/vae] [--mimic-steps 20]

For every held-out model of a structured zoo (``split`` heldout; nothing of theirs is fitted on), every
Linear/Conv2d weight goes through one code at a time, the rest of the model (biases, norms, position
embeddings) is kept; BatchNorm statistics are re-estimated on the model's own train split
(``weightgen.classifier.reestimate_batchnorm``) and test accuracy (``weightgen.classifier.evaluate``) is
compared with the original weights' under the same re-estimation. Codes:

* ``svd``: per layer, the best rank-r approximation of the (out x fan_in) matrix, r = floor(rate * numel /
  (out + fan_in)); a layer where r < 1 or r * (out + fan_in) >= numel is left dense.
* ``pca``: per-token PCA (the tokens of ``weightgen.vae.tokenize``: rows cut into 64-value chunks, the
  last one zero padded, each layer divided by its power-of-two scale) fitted on the zoo's training
  models; k = rate * 64 directions; stored: k per token plus 1 scale per layer. Shared: basis and mean.
* ``recast``: closed-form RECAST banks (``weightgen.mimicry.closed_form.solve_bank``) over the model's
  layers of one shape: n templates for L layers store n * numel + n * L numbers, n = floor(rate * L *
  numel / (numel + L)); a shape with n < 1 (or n >= L, or L = 1) is left dense.
* ``encode`` (one per VAE): latent means of every token, decoded, scaled to the layer's RMS
  (``weightgen.reconstruct``'s start); stored: latent_dim per token plus 1 scale per layer. Shared: the
  decoder's parameters.
* ``mimic`` (one per VAE): from encode's start, latents and log-scales optimised through the frozen
  decoder on weight error + 3.0 x the output-matching loss on the model's own train split, keeping the
  best state on the whole val split (the start included), as ``weightgen.reconstruct`` does with
  ``--probe-task``; run here through its internals so that the splits are the zoo's own.

Storage is counted per model: every stored number of the coded layers, dense layers in full; the
denominator is the numbers in all Linear/Conv2d weights. Shared parts (PCA basis, VAE decoder) are
reported both without amortisation and amortised over the held-out models served here.

Writes docs/bench_rate_distortion.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, markdown_table, write_outputs  # noqa: E402

sys.path.insert(0, str(REPO))
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from weightgen.classifier import evaluate, reestimate_batchnorm  # noqa: E402
from weightgen.metrics import cosine  # noqa: E402
from weightgen.mimicry.closed_form import solve_bank  # noqa: E402
from weightgen.vae.codec import weight_layers  # noqa: E402
from weightgen.vae.tokenize import detokenize, tokenize  # noqa: E402
from weightgen.zoo import create_zoo_model, structured_data  # noqa: E402

RATES = (0.0625, 0.125, 0.25, 0.5, 1.0)
BN_BATCH = 500
RATE_SLACK = 1.05  # "at the same rate": a linear code may store up to 5% more
VAL_CAP = None  # the whole val split: its first 512 images are class-skewed on some tasks (greek: 66 vs 34 per class)
PROBE_SIZE = 2048
BEHAVIOUR_WEIGHT = 3.0


# ---- the zoo -------------------------------------------------------------------------------------

def zoo_models(zoo: Path) -> tuple[list[dict], list[dict]]:
    index = json.loads((zoo / "zoo.json").read_text())
    metas = [json.loads((zoo / f"{m}.json").read_text()) | {"model_id": m} for m in index["models"]]
    metas = [m for m in metas if "checkpoint_of" not in m]
    return [m for m in metas if m.get("split", "train") == "train"], [m for m in metas if m.get("split") == "heldout"]


def load_model(zoo: Path, meta: dict) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # building draws an init that the state dict overwrites
        model = create_zoo_model(meta["arch"], meta["model_kwargs"])
    model.load_state_dict(load_file(zoo / f"{meta['model_id']}.safetensors"))
    return model.eval()


def accuracy(model: nn.Module, weights: dict[str, torch.Tensor] | None, data: dict) -> float:
    """Test accuracy of ``model`` with ``weights`` swapped in, BatchNorm re-estimated on the train split."""
    m = copy.deepcopy(model)
    if weights:
        with torch.no_grad():
            for name, w in weights.items():
                m.get_parameter(f"{name}.weight").copy_(w.reshape(m.get_parameter(f"{name}.weight").shape))
    # the whole train split in batches of 500, as the zoo's build: the default (first 20 batches of 64) sees
    # only classes 0-3 of mnist, whose train split is sorted by class
    n = len(data["train"][1])
    reestimate_batchnorm(m, TensorDataset(*data["train"]), batches=math.ceil(n / BN_BATCH), batch_size=BN_BATCH)
    return evaluate(m, TensorDataset(*data["test"]))


# ---- linear codes --------------------------------------------------------------------------------

def svd_code(weight: torch.Tensor, rate: float) -> tuple[torch.Tensor, int]:
    m = weight.reshape(weight.shape[0], -1).double()
    out, fan_in = m.shape
    r = int(rate * m.numel() / (out + fan_in))
    if r < 1 or r * (out + fan_in) >= m.numel():
        return weight, m.numel()  # left dense
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float().reshape(weight.shape), r * (out + fan_in)


def fit_token_pca(zoo: Path, train: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (64,) and all principal directions (64, 64), largest first, of the training models' tokens."""
    toks = []
    for meta in train:
        model = load_model(zoo, meta)
        for spec in weight_layers(model):
            toks.append(tokenize(model.get_parameter(f"{spec['name']}.weight").detach(), spec["kind"],
                                 spec["depth"]).values.double())
    x = torch.cat(toks)
    mean = x.mean(0)
    evals, evecs = torch.linalg.eigh((x - mean).T @ (x - mean) / len(x))
    return mean, evecs[:, evals.argsort(descending=True)]


def pca_code(weight: torch.Tensor, spec: dict, mean: torch.Tensor, basis: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    tok = tokenize(weight.detach(), spec["kind"], spec["depth"])
    b = basis[:, :k]
    r = (tok.values.double() - mean) @ b @ b.T + mean
    r = torch.where(tok.mask, r, torch.zeros_like(r))
    stored = tok.values.shape[0] * k + 1  # k coefficients per token, one scale per layer
    return detokenize(r.float(), tok.shape, tok.scale), stored


def recast_code(weights: dict[str, torch.Tensor], rate: float) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Closed-form banks over layers of one shape at about ``rate`` numbers per weight."""
    groups: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        groups.setdefault(tuple(w.shape), []).append(name)
    out, stored = {}, {}
    for shape, names in groups.items():
        numel, count = math.prod(shape), len(names)
        n = int(rate * count * numel / (numel + count))
        if n < 1 or n >= count:
            for name in names:
                out[name], stored[name] = weights[name], numel
            continue
        templates, coef = solve_bank([weights[name] for name in names], n)
        for i, name in enumerate(names):
            out[name] = (coef[i] @ templates).reshape(shape)
            stored[name] = (n * numel) // count + n  # templates shared by the group, n coefficients each
        stored[names[0]] += (n * numel) % count
    return out, stored


# ---- VAE codes -----------------------------------------------------------------------------------

def decoder_params(vae) -> int:
    return sum(p.numel() for p in vae.decoder.parameters())


def vae_codes(model: nn.Module, vae, meta: dict, data: dict, steps: int, lr: float, seed: int) -> dict:
    """encode and mimic weights for one model through one VAE, as weightgen.reconstruct does (its internals)."""
    from weightgen.reconstruct import _Layer
    from weightgen.vae.prior import trained_kinds

    known = trained_kinds(meta)
    specs = weight_layers(model)
    layers = [_Layer(vae, s, model.get_parameter(f"{s['name']}.weight")) for s in specs if s["kind"] in known]
    dense = [s for s in specs if s["kind"] not in known]

    def decoded() -> tuple[dict, dict]:
        with torch.no_grad():
            w = {layer.name: layer.decode().reshape(layer.shape).float() for layer in layers}
        stored = {layer.name: layer.latents.numel() + 1 for layer in layers}
        for s in dense:  # a kind the VAE never saw stays as it is, counted in full
            w[s["name"]] = model.get_parameter(f"{s['name']}.weight").detach().clone()
            stored[s["name"]] = math.prod(s["shape"])
        return w, stored

    t0 = time.perf_counter()
    enc_w, enc_stored = decoded()
    encode_s = time.perf_counter() - t0
    history, selection, mimic_s, mimic_cpu = _run_mimic(model, layers, data, steps, lr, seed)
    mim_w, mim_stored = decoded()
    return {"encode": (enc_w, enc_stored, {"seconds": round(encode_s, 2)}),
            "mimic": (mim_w, mim_stored, {"seconds": round(mimic_s, 1), "cpu_seconds": round(mimic_cpu, 1),
                                          "steps": steps, "lr": lr, "kept_step": selection["kept_step"],
                                          "val_scores": selection["scores"], "dense_layers": len(dense)})}


class _FactorLayer:
    """The linear control of mimic: one layer as rank-r SVD factors A @ B (each at unit RMS) times exp(log_scale),
    optimised by weightgen.reconstruct's mimic loop exactly as the VAE's latents are (duck-typed ``_Layer``)."""

    def __init__(self, spec: dict, weight: torch.Tensor, r: int):
        self.name, self.shape, self.dtype = spec["name"], tuple(weight.shape), weight.dtype
        self.target = weight.detach().float()
        m = self.target.reshape(self.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        a, b = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
        ra, rb = a.pow(2).mean().sqrt(), b.pow(2).mean().sqrt()
        self.rows = a.shape[0]
        self.latents = torch.cat([(a / ra).reshape(-1), (b / rb).reshape(-1)]).float().requires_grad_(True)
        self.log_scale = torch.tensor(math.log(float(ra * rb))).requires_grad_(True)
        self.r = r
        self.target_norm2 = self.target.pow(2).sum().clamp(min=1e-30)

    def decode(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.log_scale.exp() if scale is None else scale
        a = self.latents[:self.rows * self.r].reshape(self.rows, self.r)
        b = self.latents[self.rows * self.r:].reshape(self.r, -1)
        return (a @ b).reshape(self.shape) * scale

    def weight_error(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float().reshape(self.shape) - self.target).pow(2).sum() / self.target_norm2


def svd_mimic(model: nn.Module, data: dict, rate: float, steps: int, lr: float, seed: int) -> tuple:
    """Per-layer SVD at ``rate``, then its factors optimised by mimic's loop (same loss, steps, lr, selection)."""
    specs = weight_layers(model)
    layers, stored, dense = [], {}, {}
    for s in specs:
        w = model.get_parameter(f"{s['name']}.weight").detach()
        m = w.reshape(w.shape[0], -1)
        r = int(rate * m.numel() / sum(m.shape))
        if r < 1 or r * sum(m.shape) + 1 >= m.numel():
            dense[s["name"]], stored[s["name"]] = w.clone(), m.numel()
        else:
            layers.append(_FactorLayer(s, w, r))
            stored[s["name"]] = r * sum(m.shape) + 1  # the factors and one scale
    history, selection, seconds, cpu = _run_mimic(model, layers, data, steps, lr, seed)
    with torch.no_grad():
        weights = {layer.name: layer.decode().reshape(layer.shape).float() for layer in layers} | dense
    return weights, stored, {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "steps": steps, "lr": lr,
                             "kept_step": selection["kept_step"], "val_scores": selection["scores"],
                             "dense_layers": len(dense)}


def _run_mimic(model: nn.Module, layers: list, data: dict, steps: int, lr: float, seed: int):
    """weightgen.reconstruct's mimic loop on the zoo's splits: behaviour on a train-split probe, best on val."""
    from weightgen.reconstruct import _logits, _mimic, _Probe, _task_score

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x_train, _ = data["train"]
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    inputs = x_train[perm[:PROBE_SIZE]]
    probe = _Probe(inputs, _logits(model, inputs), bn_train=has_bn)
    # shuffled: the score runs BatchNorm on batch statistics of 256-image chunks, and mnist's val split is
    # sorted by class
    order = torch.randperm(len(data["val"][1]), generator=torch.Generator().manual_seed(seed + 1))[:VAL_CAP]
    xv, yv = data["val"][0][order], data["val"][1][order]
    ref = _logits(model, xv)
    score = lambda: _task_score(model, layers, (xv, yv), ref, has_bn)  # noqa: E731
    t0, c0 = time.perf_counter(), time.process_time()
    history, selection = _mimic(layers, steps, lr, False, model, probe, BEHAVIOUR_WEIGHT, "float32", score)
    return history, selection, time.perf_counter() - t0, time.process_time() - c0


# ---- one model -----------------------------------------------------------------------------------

def run_model(zoo: Path, meta: dict, rates, pca, vaes: dict, steps: int, lr: float, seed: int, log,
              linear: bool = True, svd_mimic_rates=(), svd_mimic_steps: int = 0) -> list[dict]:
    model = load_model(zoo, meta)
    data = structured_data(meta["task"])
    specs = weight_layers(model)
    orig = {s["name"]: model.get_parameter(f"{s['name']}.weight").detach().clone() for s in specs}
    total = sum(w.numel() for w in orig.values())
    other = sum(p.numel() for p in model.parameters()) - total
    base = accuracy(model, None, data)
    rows = []

    def record(code: str, rate_target, weights: dict, stored: dict, shared: int, extra: dict | None = None):
        acc = accuracy(model, weights, data)
        own = sum(stored.values())
        cos = [cosine(weights[n], orig[n]) for n in orig]
        rows.append({"model_id": meta["model_id"], "family": meta["family"], "task": meta["task"], "code": code,
                     "rate_target": rate_target, "stored": own, "shared": shared, "weights": total,
                     "other_params": other, "rate": own / total, "base_acc": base, "acc": acc,
                     "drop_points": 100 * (base - acc), "mean_cosine": statistics.fmean(cos),
                     "test_images": len(data["test"][1]), **(extra or {})})
        log(f"{meta['model_id']:32s} {code:14s} rate {own / total:.3f} acc {acc:.3f} (base {base:.3f}) "
            f"cos {statistics.fmean(cos):.3f}")

    for rate in rates if linear else ():
        out, st = {}, {}
        for s in specs:
            out[s["name"]], st[s["name"]] = svd_code(orig[s["name"]], rate)
        record("svd", rate, out, st, 0)
        k = max(1, min(64, round(rate * 64)))
        out, st = {}, {}
        for s in specs:
            out[s["name"]], st[s["name"]] = pca_code(orig[s["name"]], s, pca[0], pca[1], k)
        record("pca", rate, out, st, 64 * k + 64)
        out, st = recast_code(orig, rate)
        record("recast", rate, out, st, 0)
    for rate in svd_mimic_rates:
        w, st, extra = svd_mimic(model, data, rate, svd_mimic_steps, lr, seed)
        record(f"svd-mimic-{svd_mimic_steps}steps", rate, w, st, 0, extra)
    for name, (vae, vmeta, vae_steps) in vaes.items():
        res = vae_codes(model, vae, vmeta, data, steps if vae_steps is None else vae_steps, lr, seed)
        for code in ("encode", "mimic"):
            w, st, extra = res[code]
            record(f"{code}-{name}", vae.config.latent_dim / 64, w, st, decoder_params(vae), extra)
    return rows


# ---- real pretrained weights, by weight cosine only -------------------------------------------------

def real_weights(paths: list[Path], rates, pca, vaes: dict, log) -> list[dict]:
    """Per file and code: stored numbers per weight and mean cosine of its 2-D/4-D weights (no task to score)."""
    from bench_zoo_structure import _real_layers

    from weightgen.reconstruct import _Layer
    from weightgen.vae.tokenize import layer_kind

    out = []
    for path in paths:
        layers = []
        for rec, w in _real_layers(path):
            kind = layer_kind(w.shape, rec["groups"])
            layers.append(({"name": rec["name"], "shape": tuple(w.shape), "kind": kind, "depth": rec["depth"]}, w))
        orig = {s["name"]: w for s, w in layers}
        total = sum(w.numel() for w in orig.values())

        def record(code, target, weights, stored, shared=0):
            cos = [cosine(weights[n], orig[n]) for n in orig]
            out.append({"file": path.name, "code": code, "rate_target": target, "layers": len(orig), "weights": total,
                        "rate": sum(stored.values()) / total, "shared": shared, "mean_cosine": statistics.fmean(cos),
                        "weighted_cosine": sum(c * orig[n].numel() for c, n in zip(cos, orig)) / total})
            log(f"{path.name:28s} {code:12s} rate {out[-1]['rate']:.3f} cos {out[-1]['mean_cosine']:.3f}")

        for rate in rates:
            w, st = {}, {}
            for s, weight in layers:
                w[s["name"]], st[s["name"]] = svd_code(weight, rate)
            record("svd", rate, w, st)
            k = max(1, min(64, round(rate * 64)))
            w, st = {}, {}
            for s, weight in layers:
                w[s["name"]], st[s["name"]] = pca_code(weight, s, pca[0], pca[1], k)
            record("pca", rate, w, st, 64 * k + 64)
            record("recast", rate, *recast_code(orig, rate))
        for name, (vae, _, _) in vaes.items():
            with torch.no_grad():
                coded = [(_Layer(vae, s, weight), s) for s, weight in layers]
                w = {s["name"]: layer.decode().reshape(s["shape"]).float() for layer, s in coded}
            record(f"encode-{name}", vae.config.latent_dim / 64, w,
                   {s["name"]: layer.latents.numel() + 1 for layer, s in coded}, decoder_params(vae))
    return out


# ---- summary ---------------------------------------------------------------------------------------

def aggregate(rows: list[dict], zoo_weights: int) -> list[dict]:
    """One point per (code, rate target): summed storage over models, mean drop with its 95% interval."""
    from scipy import stats

    points = {}
    for r in rows:
        points.setdefault((r["code"], r["rate_target"]), []).append(r)
    out = []
    for (code, target), sel in sorted(points.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        weights = sum(r["weights"] for r in sel)
        stored = sum(r["stored"] for r in sel)
        shared = sel[0]["shared"]
        drops = [r["drop_points"] for r in sel]
        mean = statistics.fmean(drops)
        half = (stats.t.ppf(0.975, len(drops) - 1) * statistics.stdev(drops) / math.sqrt(len(drops))
                if len(drops) > 1 else float("nan"))
        out.append({"code": code, "rate_target": target, "models": len(sel), "rate": stored / weights,
                    "rate_amortised": (stored + shared) / weights, "shared": shared,
                    "rate_amortised_zoo": stored / weights + shared / zoo_weights,
                    "rate_shared_alone_per_model": shared / (weights / len(sel)),
                    "drop_mean": mean, "drop_ci95": half, "drop_max": max(drops),
                    "mean_cosine": statistics.fmean(r["mean_cosine"] for r in sel),
                    **({"mimic_seconds_mean": statistics.fmean(r["seconds"] for r in sel)} if code.startswith("mimic")
                       else {})})
    return out


def _redundant(code: str) -> bool:
    """encode does not depend on mimic's steps: encode-<vae>-<n>steps repeats encode-<vae>."""
    return code.startswith("encode-") and code.endswith("steps")


def _mean_ci(values: list[float]) -> tuple[float, float]:
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def pareto(points: list[dict], key: str) -> set[tuple]:
    """(code, rate_target) of the points no other point beats in both rate and mean drop."""
    front = set()
    for p in points:
        if not any(q[key] <= p[key] and q["drop_mean"] <= p["drop_mean"]
                   and (q[key] < p[key] or q["drop_mean"] < p["drop_mean"]) for q in points):
            front.add((p["code"], p["rate_target"]))
    return front


def targets(points: list[dict], rows: list[dict], key: str) -> list[list]:
    front = pareto(points, key)
    linear = [p for p in points if not p["code"].startswith(("mimic", "encode"))]  # svd-mimic included
    out = []
    for p in points:
        code = p["code"]
        if not code.startswith(("mimic", "encode")) or _redundant(code):
            continue
        rate = p[key]
        # the best linear code at no more than 5% more storage than this point (rates of the codes differ a little:
        # padding, dense layers), which favours the linear codes
        cheaper = [q for q in linear if q[key] <= RATE_SLACK * rate]
        best = min(cheaper, key=lambda q: q["drop_mean"]) if cheaper else None
        if best is None:
            beats, met = "no linear code at this rate", "no"
        else:  # paired over models: this code's drop minus the best linear code's, with its 95% t-interval
            mine = {r["model_id"]: r["drop_points"] for r in rows if r["code"] == code
                    and r["rate_target"] == p["rate_target"]}
            theirs = {r["model_id"]: r["drop_points"] for r in rows if r["code"] == best["code"]
                      and r["rate_target"] == best["rate_target"]}
            diff = [mine[m] - theirs[m] for m in mine if m in theirs]
            mean, half = _mean_ci(diff)
            met = "yes" if mean + half < 0 else "no" if mean - half > 0 else "not shown (interval includes 0)"
            beats = (f"{mean:+.2f} ± {half:.2f} points vs the best linear code at <= 1.05 x this rate ({best['code']} "
                     f"{best['rate_target']}: {best['drop_mean']:+.2f} at {best[key]:.3f}; {len(diff)} models)")
        if code.startswith("mimic"):
            out.append([f"{code} on the Pareto front at rate <= 0.5 (rate {rate:.3f})",
                        "on the front" if (code, p["rate_target"]) in front else "not on the front",
                        ("yes" if (code, p["rate_target"]) in front else "no") if rate <= 0.5 else "n/a (rate > 0.5)"])
            out.append([f"{code} within 0.5 points at rate <= 0.25 (rate {rate:.3f})", f"{p['drop_mean']:+.2f}",
                        ("yes" if p["drop_mean"] <= 0.5 else "no") if rate <= 0.25 else "n/a (rate > 0.25)"])
        else:
            out.append([f"{code} within 2 points at rate <= 0.25 (rate {rate:.3f})", f"{p['drop_mean']:+.2f}",
                        ("yes" if p["drop_mean"] <= 2 else "no") if rate <= 0.25 else "n/a (rate > 0.25)"])
        out.append([f"{code} beats every linear code at its rate ({rate:.3f})", beats, met])
    return out


def plot(points: list[dict], path: Path, title: str) -> None:
    import logging

    from matplotlib.figure import Figure

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font fallback chatter

    fig = Figure(figsize=(14, 6))
    for i, (key, name) in enumerate((("rate", "without the shared parts"),
                                     ("rate_amortised", "decoder / PCA basis amortised over the models served"))):
        _panel(fig.add_subplot(1, 2, i + 1), points, key, f"{title}\n{name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _panel(ax, points: list[dict], key: str, title: str) -> None:
    import matplotlib

    codes = sorted({p["code"] for p in points if not _redundant(p["code"])})
    colours = matplotlib.colormaps["tab10"]
    markers = {"svd": "o", "pca": "s", "recast": "^", "svd-mimic": "v", "encode": "X", "mimic": "D"}
    for i, code in enumerate(codes):
        sel = sorted((p for p in points if p["code"] == code), key=lambda p: p[key])
        marker = next((m for prefix, m in sorted(markers.items(), key=lambda kv: -len(kv[0]))
                       if code.startswith(prefix)), "P")
        ax.errorbar([p[key] for p in sel], [p["drop_mean"] for p in sel],
                    yerr=[0 if math.isnan(p["drop_ci95"]) else p["drop_ci95"] for p in sel], color=colours(i % 10),
                    marker=marker, markersize=7, capsize=3, alpha=0.85, label=code,
                    linestyle="-" if len(sel) > 1 else "none")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ticks = [-2, -1, 0, 0.5, 1, 2, 5, 10, 20, 50, 100]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_xticks([0.0625, 0.125, 0.25, 0.5, 1, 2], ["1/16", "1/8", "1/4", "1/2", "1", "2"])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylim(-1, 100)
    ax.set_xlabel("stored numbers per weight (log scale)")
    ax.set_ylabel("accuracy drop, points (BN re-estimated; symlog)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")


def report(points, rows, vae_info, args, machine, seconds) -> str:
    lines = ["# Rate-distortion of weight codes on held-out zoo models", "",
             f"Command: `{machine['command']}`", ""]
    for cmd, secs, load in getattr(args, "part_commands", []):
        lines += [f"- part: `{cmd}` ({secs:.0f} s wall, load average at its end {load})"]
    lines += ["",
             f"Machine: {machine['cpu']} ({machine['cpus']} cores, shared), load average at the end "
             f"{machine['loadavg']}, torch {machine['torch']}, commit {machine['git_commit']}; "
             f"{seconds:.0f} s wall" + (" (summed over the parts, which ran two at a time)"
                                        if getattr(args, "part_commands", None) else "") + ".", "",
             f"Zoo: `{args.zoo}`; {len({r['model_id'] for r in rows})} held-out models (split `heldout`; the PCA and "
             "the VAEs saw only the training models). Accuracy is test accuracy with BatchNorm re-estimated on the "
             "model's whole train split (batches of 500, as the zoo's build), for the original and for every code alike; drop = original - "
             "coded, in points, mean over models with its 95% t-interval. Test sets hold 359-1,000 images, so one "
             "image is 0.1-0.28 points.", "",
             "Rate = stored numbers / numbers in all Linear/Conv2d weights (per-layer scales, depthwise layers, "
             "padding and layers a code leaves dense counted). Biases, norms and position embeddings are kept by every "
             f"code and counted in neither ({rows[0]['other_params'] / (rows[0]['other_params'] + rows[0]['weights']):.1%}"
             " of the first model's parameters). `amortised` adds the shared parts (PCA basis and mean, VAE decoder) "
             f"divided over the {len({r['model_id'] for r in rows})} models served here.", ""]
    if vae_info:
        lines += ["VAEs (`held-out cosine`: mean cosine of the held-out models' layers through encode-decode, "
                  "against a PCA of the same latent size, as scripts/train_vae.py reports it):", "",
                  markdown_table(["name", "path", "latent/token", "decoder params", "training", "trained on",
                                  "val models", "val = zoo's heldout, no leak", "held-out cosine VAE / PCA"],
                                 [[n, f"`{v['path']}`", v["latent_dim"], f"{v['decoder']:,}", v.get("training", "?"),
                                   v["trained_on"], v["val_models"], v["no_leak"],
                                   f"{v.get('heldout_cosine_vae') or float('nan'):.3f} / "
                                   f"{v.get('heldout_cosine_pca') or float('nan'):.3f}"]
                                  for n, v in vae_info.items()]), ""]
    lines += ["## Targets", "",
              "Judged twice: on the rate without the shared parts, and on the rate with the decoder / PCA basis "
              "amortised over the held-out models served here. `beats every linear code`: the paired difference "
              "(over models) of drops against the linear point (svd-mimic included) with the least drop among those "
              "storing at most 1.05 x as much, with its 95% t-interval; met when the interval is below 0.", "",
              "Without amortisation:", "",
              markdown_table(["target", "measured", "met"], targets(points, rows, "rate"), "lll"), "",
              "Amortised over the held-out models served here:", "",
              markdown_table(["target", "measured", "met"], targets(points, rows, "rate_amortised"), "lll"), "",
              "## Points", "",
              "`rate amortised (zoo)` divides the shared parts over all the zoo's models instead (what a decoder "
              "serving the whole zoo costs).", "",
              markdown_table(["code", "rate target", "models", "rate", "rate amortised", "rate amortised (zoo)",
                              "drop (points)", "95% CI", "max drop", "mean cosine", "mimic s/model"],
                             [[p["code"], p["rate_target"], p["models"], f"{p['rate']:.4f}", f"{p['rate_amortised']:.4f}",
                               f"{p['rate_amortised_zoo']:.4f}",
                               f"{p['drop_mean']:+.2f}", f"±{p['drop_ci95']:.2f}", f"{p['drop_max']:+.2f}",
                               f"{p['mean_cosine']:.3f}",
                               f"{p['mimic_seconds_mean']:.0f}" if "mimic_seconds_mean" in p else ""]
                              for p in points]), ""]
    mim = [r for r in rows if "kept_step" in r]
    if mim:
        starts = {(r["model_id"], r["code"]): r for r in rows}

        def start(r):  # what mimic started from: the VAE's encode, or plain SVD at the same rate target
            if r["code"].startswith("mimic-"):
                return starts.get((r["model_id"], "encode-" + r["code"][len("mimic-"):]))
            return next((q for q in rows if q["model_id"] == r["model_id"] and q["code"] == "svd"
                         and q["rate_target"] == r["rate_target"]), None)

        lines += ["## Mimic against its start", "",
                  "The kept state is the best on the whole (shuffled) val split, the start included: val accuracy at "
                  "the start and at the kept step, and test accuracy (BN re-estimated) of the start (VAE encode, or "
                  "plain SVD for svd-mimic) and of mimic.", "",
                  markdown_table(["model", "code", "rate target", "steps", "kept step", "val start", "val kept",
                                  "test start", "test mimic", "never worse on test", "seconds", "CPU-s"],
                                 [[r["model_id"], r["code"], r["rate_target"], r["steps"], r["kept_step"],
                                   f"{r['val_scores'][0][1]:.3f}", f"{max(v for _, v in r['val_scores']):.3f}",
                                   f"{start(r)['acc']:.3f}" if start(r) else "-", f"{r['acc']:.3f}",
                                   ("yes" if r["acc"] >= start(r)["acc"] else "NO") if start(r) else "-",
                                   r["seconds"], r["cpu_seconds"]] for r in mim]), ""]
    lines += ["## Per model", "",
              markdown_table(["model", "code", "rate target", "rate", "base acc", "acc", "drop", "mean cosine"],
                             [[r["model_id"], r["code"], r["rate_target"], f"{r['rate']:.4f}", f"{r['base_acc']:.3f}",
                               f"{r['acc']:.3f}", f"{r['drop_points']:+.2f}", f"{r['mean_cosine']:.3f}"]
                              for r in rows]), ""]
    return "\n".join(lines)


def vae_training(path: Path) -> dict:
    """How a VAE was trained and how it reconstructs held-out layers against PCA, from its vae.json."""
    try:
        meta = json.loads((path / "vae.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    t, c, rec = meta.get("training", {}), meta.get("config", {}), meta.get("training", {}).get("reconstruction", {})
    return {"training": f"{c.get('arch')} hidden {c.get('hidden')}, {c.get('layers')} layers, window "
                        f"{c.get('window')}, beta {c.get('beta')}; {t.get('epochs')} epochs, {t.get('steps')} steps, "
                        f"{t.get('seconds', 0):.0f} s",
            "heldout_cosine_vae": rec.get("vae_mean_cosine"), "heldout_cosine_pca": rec.get("pca_mean_cosine")}


def run(args, zoo: Path, train: list[dict], held: list[dict]) -> tuple[dict, list[dict]]:
    from weightgen.vae.prior import load_vae_bundle, vae_on

    vaes, vae_info = {}, {}
    zoo_held = {m["model_id"] for m in zoo_models(zoo)[1]}
    for item in args.vae:
        name, _, path = item.partition("=")
        path, _, vae_steps = path.partition("@")
        vae, vmeta = load_vae_bundle(path)
        vaes[name] = (vae_on(vae, torch.device("cpu")), vmeta, int(vae_steps) if vae_steps else None)
        training = vmeta.get("training", {})
        val, fitted = set(training.get("val_models", [])), set(training.get("train_models", []))
        vae_info[name] = {"path": path, "latent_dim": vae.config.latent_dim, "arch": vae.config.arch,
                          "decoder": decoder_params(vae), "trained_on": f"{len(fitted)} models",
                          "val_models": len(val),
                          "no_leak": ("NO: it trained on held-out models" if fitted & zoo_held else
                                      "yes" if val == zoo_held else "yes (another zoo)")}
    pca = None if args.no_linear and not args.real else fit_token_pca(zoo, train)
    if args.real:
        return vae_info, real_weights([Path(f) for f in args.real], args.rates, pca, vaes,
                                      lambda s: print(s, file=sys.stderr, flush=True))
    rows = []
    for meta in held:
        rows += run_model(zoo, meta, args.rates, pca, vaes, args.mimic_steps, args.mimic_lr, args.seed,
                          lambda s: print(s, file=sys.stderr, flush=True), linear=not args.no_linear,
                          svd_mimic_rates=args.svd_mimic_rates, svd_mimic_steps=args.svd_mimic_steps)
    return vae_info, rows


def real_report(args, vae_info: dict, rows: list[dict], seconds: float) -> int:
    machine = machine_info()
    md = "\n".join([
        "# Rate against weight cosine on real pretrained weights (no task: cosine only)", "",
        f"Command: `{machine['command']}`", "",
        f"Machine: {machine['cpu']}, load average at the end {machine['loadavg']}; {seconds:.0f} s wall.", "",
        "Files from docs/real_weights.md; every float 2-D/4-D weight except embedding tables. Codes as in "
        "docs/bench_rate_distortion.md (the PCA and the VAEs fitted on the structured zoo's training models: these "
        "architectures are unseen). Rate = stored numbers / weights, shared parts not counted (`shared` gives them). "
        "Cosine is the wrong yardstick for function (see the zoo curve); it is all these files allow here.", "",
        markdown_table(["file", "code", "rate target", "rate", "shared", "mean cosine", "param-weighted cosine"],
                       [[r["file"], r["code"], r["rate_target"], f"{r['rate']:.4f}", f"{r['shared']:,}",
                         f"{r['mean_cosine']:.3f}", f"{r['weighted_cosine']:.3f}"] for r in rows]), ""])
    write_outputs(args.out_dir, args.stem, md, {"machine": machine, "vaes": vae_info, "rows": rows,
                                               "seconds": round(seconds, 1)})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True, help="a zoo built with --preset structured")
    p.add_argument("--vae", action="append", default=[], metavar="NAME=DIR[@STEPS]",
                   help="a VAE to run encode and mimic with (STEPS: its mimic steps, default --mimic-steps)")
    p.add_argument("--svd-mimic-rates", type=float, nargs="*", default=[],
                   help="rates at which per-layer SVD factors go through mimic's loop too (the linear control of mimic)")
    p.add_argument("--svd-mimic-steps", type=int, default=100)
    p.add_argument("--real", nargs="+", metavar="FILE",
                   help="instead of the zoo's models: real pretrained state dicts (docs/real_weights.md), by weight "
                        "cosine only (no task to score them on)")
    p.add_argument("--no-linear", action="store_true", help="only the VAE codes (e.g. a run to merge with another)")
    p.add_argument("--rates", type=float, nargs="+", default=list(RATES), help="rate targets of the linear codes")
    p.add_argument("--mimic-steps", type=int, default=20)
    p.add_argument("--mimic-lr", type=float, default=5e-2)
    p.add_argument("--models", nargs="*", help="held-out model ids (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only merge the rows of earlier runs' JSON (e.g. one run per model subset) into one report")
    p.add_argument("--out-dir", default=str(REPO / "docs"))
    p.add_argument("--stem", default="bench_rate_distortion")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    zoo = Path(args.zoo)
    train, held = zoo_models(zoo)
    if args.models:
        held = [m for m in held if m["model_id"] in args.models]
    if not held:
        print("error: no held-out models selected", file=sys.stderr)
        return 2
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        vae_info = {k: v for part in parts for k, v in part["vaes"].items()}
        compute_s = sum(part["seconds"] for part in parts)
        args.part_commands = [(part["machine"]["command"], part["seconds"], part["machine"]["loadavg"]) for part in parts]
        held = sorted({r["model_id"] for r in rows})
    else:
        vae_info, rows = run(args, zoo, train, held)
        compute_s = None
    if args.real:
        return real_report(args, vae_info, rows, time.perf_counter() - t0)
    for v in vae_info.values():
        v.update(vae_training(Path(v["path"])))
    zoo_weights = sum(math.prod(layer["shape"]) for m in train + zoo_models(zoo)[1] for layer in m["layers"])
    points = aggregate(rows, zoo_weights)
    seconds = time.perf_counter() - t0
    machine = machine_info()
    md = report(points, rows, vae_info, args, machine, seconds if compute_s is None else compute_s)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(points, out / f"{args.stem}.png", f"{len(held)} held-out zoo models: accuracy drop vs numbers per weight")
    md += f"\n![rate-distortion]({args.stem}.png)\n"
    write_outputs(out, args.stem, md, {"machine": machine, "zoo": str(zoo), "vaes": vae_info, "points": points,
                                       "rows": rows, "seconds": round(seconds if compute_s is None else compute_s, 1),
                                       "merged_from": args.merge})
    return 0


if __name__ == "__main__":
    sys.exit(main())
