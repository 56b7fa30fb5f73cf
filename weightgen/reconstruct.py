"""Reconstruction of a whole model through the VAE: every Linear/Conv2d weight -> latents -> weight.

Each layer is stored as its per-token latents plus one scale, and rebuilt as
``decode_layer(vae, latents, shape, kind, depth, scale)``. ``encode`` is one amortised pass (latent
means, decoded, scaled to the layer's RMS); ``mimic`` then optimises every layer's latents and log
scale jointly through the frozen decoder (Adam, cosine learning-rate decay) on

    behaviour_weight * ||f_hat(x) - f(x)||^2 / ||f(x)||^2  +  mean over layers ||W_hat - W||^2 / ||W||^2

where f is the original model, f_hat the decoded one and x a minibatch of probe inputs: the train
split of ``probe_task`` (BatchNorm layers in train mode, i.e. on batch statistics, which is what the
model has once its statistics are re-estimated on that data; they are re-estimated before writing),
or seeded noise without a task (BatchNorm on the checkpoint's own statistics, which are written as
they are). ``behaviour_weight=0`` fits the weights alone, and is the default without a probe task
(fitting noise inputs' outputs can cost real accuracy). The state kept is the best on validation,
the encode start included, so mimic never ends worse than ``encode`` on that score: with a task,
accuracy on its val split (then the logit error there); without one, the weight error plus the
behaviour term on a held-out noise batch. A step decodes every layer once without a
graph, back-propagates the loss through the model to the decoded weights, then re-decodes each
layer's tokens a window-aligned chunk at a time with a graph to carry those gradients to its latents:
memory is bounded by one chunk, which stays in cache (a step costs 0.75x of a whole-layer pass). Chunks
start at multiples of the VAE's window, so every token sees the window it sees in a whole-layer decode;
the weights that are written are decoded by ``decode_layer``.
Layers the VAE cannot take (a kind it never saw, a parametrized weight, the head with
``keep_head``) keep their weights and are listed as ``kept`` with the reason.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .classifier import evaluate, reestimate_batchnorm
from .data import TASKS, get_task, to_model_input
from .data.photos import TASKS as COLOUR_TASKS
from .io import WeightgenError, atomic_directory, check_checkpoint_path, check_output_dir, load_checkpoint, \
    save_tensors, write_json
from .mimicry.fidelity import compare_features, cosine, record_features
from .models import check_arch, example_batch, input_side, input_size, model_from_state, resolve_device
from .recasting import head_names
from .vae.codec import decode_layer, encode_layer, rms, weight_layers
from .vae.prior import default_vae_dir, load_vae_bundle, trained_kinds, vae_on
from .vae.tokenize import condition

log = logging.getLogger(__name__)

MODES = ("encode", "mimic")
DEFAULT_STEPS = 20  # docs/bench_reconstruct.md: 95% of 50 steps' cosine gain over encode, at 0.41x the CPU time
DEFAULT_PATIENCE = 3  # checks without a better score before mimic stops early
DEFAULT_LR = 5e-2
DEFAULT_BEHAVIOUR_WEIGHT = 3.0
DEFAULT_PROBE_SIZE = 2048
DEFAULT_IMAGE_SIZE = 32
PROBE_BATCH = 128  # probe inputs per optimiser step
GRAD_CHUNK = 4096  # tokens per graph in a mimic step: a power of two, so chunks keep the VAE's windows
FIDELITY_CAP = 512  # held-out task inputs of the function check
DECODE_DTYPES = ("auto", "float32", "bfloat16")
WEIGHTS_FILE, LATENTS_FILE, REPORT_FILE = "weights.safetensors", "latents.safetensors", "report.json"
LATENTS_FORMAT = "weightgen-latents/1"


@dataclass
class ReconstructOptions:
    arch: str
    checkpoint: str
    out: str
    model_kwargs: dict = field(default_factory=dict)
    vae: str | None = None  # VAE directory (default: the shipped one)
    mode: str = "encode"
    steps: int | None = None  # mimic only (default DEFAULT_STEPS)
    patience: int = DEFAULT_PATIENCE  # mimic stops after this many checks without a better score; 0: never
    lr: float = DEFAULT_LR
    keep_head: bool = False
    seed: int = 0  # the probe inputs and the function check's batch
    device: str = "cpu"
    overwrite: bool = False
    fidelity_batch: int = 8  # noise inputs of the function check without a probe task
    probe_task: str | None = None  # a weightgen.data task: probe on its train split (None: seeded noise)
    probe_size: int = DEFAULT_PROBE_SIZE  # probe inputs (capped at the task's train split)
    # mimic: weight of the output-matching term (None: DEFAULT_BEHAVIOUR_WEIGHT with a probe task, else 0)
    behaviour_weight: float | None = None
    image_size: int = DEFAULT_IMAGE_SIZE  # side of task images and probe noise (models without a fixed size)
    decode_dtype: str = "auto"  # mimic's decoder passes: auto = bfloat16 where the hardware has it


def validate(opts: ReconstructOptions) -> None:
    """Every check that needs no model, before any work is done."""
    if opts.mode not in MODES:
        raise WeightgenError(f"unknown mode {opts.mode!r}; choose from {', '.join(MODES)}")
    if opts.steps is not None and opts.steps < 0:
        raise WeightgenError("--steps must be >= 0")
    if opts.mode == "encode" and opts.steps:
        raise WeightgenError("--steps has no effect with --mode encode; use --mode mimic")
    if not opts.lr > 0:
        raise WeightgenError("--lr must be > 0")
    if opts.patience < 0:
        raise WeightgenError("--patience must be >= 0")
    if opts.fidelity_batch < 1:
        raise WeightgenError("the fidelity batch must hold at least one input")
    if opts.probe_size < 2:  # BatchNorm in train mode needs two inputs
        raise WeightgenError("--probe-size must be >= 2")
    if opts.behaviour_weight is not None and not opts.behaviour_weight >= 0:
        raise WeightgenError("--behaviour-weight must be >= 0")
    if opts.image_size < 8:
        raise WeightgenError("--image-size must be >= 8")
    if opts.decode_dtype not in DECODE_DTYPES:
        raise WeightgenError(f"unknown decode dtype {opts.decode_dtype!r}; choose from {', '.join(DECODE_DTYPES)}")
    if opts.probe_task is not None:
        name = opts.probe_task.strip()
        if name not in TASKS and not (name.startswith("imagefolder:") and name.partition(":")[2]):
            raise WeightgenError(f"unknown --probe-task {opts.probe_task!r}; known: "
                                 f"{', '.join(t for t in TASKS if t != 'imagefolder:PATH')}, imagefolder:PATH")
        if name in COLOUR_TASKS:  # the probe path feeds grayscale task tensors (to_model_input)
            raise WeightgenError(f"--probe-task {name} is a colour task; reconstruct probes grayscale tasks "
                                 f"(digits, mnist, ...) or imagefolder:PATH")
    if not opts.out:
        raise WeightgenError("name an output directory (--out DIR)")
    resolve_device(opts.device)
    check_arch(opts.arch)
    check_checkpoint_path(opts.checkpoint)
    check_output_dir(opts.out, opts.overwrite, kind="reconstruction")


class _Layer:
    """One layer's target weight, latents and log scale, on the model's device."""

    def __init__(self, vae, spec: dict, weight: torch.Tensor):
        self.vae, self.name, self.shape = vae, spec["name"], spec["shape"]
        self.kind, self.depth = spec["kind"], spec["depth"]
        self.target = weight.detach().float()  # the model's own tensor when float32: no copy
        self.dtype = weight.dtype  # what the model computes in
        self.cond = condition(self.shape, self.kind, self.depth, vae.config.token_size).to(weight.device)
        mu, _ = encode_layer(vae, weight.detach(), self.kind, self.depth)
        unit = decode_layer(vae, mu, self.shape, self.kind, self.depth, 1.0, self.cond)
        # the decoder sees normalised tokens: the scale is the layer's RMS over the decoded RMS
        scale = rms(self.target) / max(rms(unit), 1e-30)
        self.latents = mu.float().clone().requires_grad_(True)  # (tokens, latent_dim)
        self.log_scale = torch.tensor(math.log(max(scale, 1e-30)), device=weight.device).requires_grad_(True)
        self.target_norm2 = self.target.pow(2).sum().clamp(min=1e-30)
        # the target in the decoder's token layout (N, token_size), and where real weights sit (None: everywhere)
        self.target_tokens = self.as_tokens(self.target)
        padded = math.prod(self.shape[1:]) % vae.config.token_size
        self.mask = self.as_tokens(torch.ones_like(self.target)) if padded else None

    def decode(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.log_scale.exp() if scale is None else scale
        return decode_layer(self.vae, self.latents, self.shape, self.kind, self.depth, scale, self.cond)

    def as_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of the layer's shape in the token layout (N, token_size): rows cut into tokens, the last
        token of each row zero padded, no normalisation (``weightgen.vae.tokenize``'s order)."""
        size = self.vae.config.token_size
        out, row = self.shape[0], math.prod(self.shape[1:])
        padded = tensor.new_zeros(out, -(-row // size) * size, dtype=torch.float32)
        padded[:, :row] = tensor.detach().reshape(out, row)
        return padded.view(-1, size)

    def step_gradients(self, autocast, weight_factor: float, behaviour: torch.Tensor | None) -> float:
        """Set the gradients of ``weight_factor * weight_error + <weight, behaviour>`` w.r.t. the latents and
        log scale, one window-aligned chunk of tokens per graph; returns the weight term's value.

        ``behaviour``: the behaviour loss's gradient w.r.t. the decoded weight (the layer's shape), or None.
        """
        grad_z = torch.empty_like(self.latents)
        log_scale = self.log_scale.detach().requires_grad_(True)
        grad_s, value = torch.zeros_like(log_scale), 0.0
        push = None if behaviour is None else self.as_tokens(behaviour)
        count = self.latents.shape[0]
        for i in range(0, count, GRAD_CHUNK):
            z = self.latents.detach()[i:i + GRAD_CHUNK].requires_grad_(True)
            with autocast():
                values = self.vae.decode(z, self.cond[i:i + GRAD_CHUNK])  # (c, token_size), unit scale
            weight = values.float() * log_scale.exp()
            diff = weight - self.target_tokens[i:i + GRAD_CHUNK]
            if self.mask is not None:
                diff = diff * self.mask[i:i + GRAD_CHUNK]  # padding is not part of the weight
            term = diff.pow(2).sum() * (weight_factor / self.target_norm2)
            value += term.item()
            if push is not None:
                term = term + (weight * push[i:i + GRAD_CHUNK]).sum()  # padding rows of ``push`` are zero
            grad_z[i:i + GRAD_CHUNK], grad = torch.autograd.grad(term, [z, log_scale])
            grad_s += grad
        self.latents.grad, self.log_scale.grad = grad_z, grad_s
        return value

    def weight_error(self, weight: torch.Tensor) -> torch.Tensor:
        """||W_hat - W||^2 / ||W||^2: direction and scale, every layer alike whatever its norm."""
        return (weight.float().reshape(self.shape) - self.target).pow(2).sum() / self.target_norm2


def decode_autocast(dtype: str, device: torch.device):
    """The autocast context of mimic's decoder passes (the written weights are always decoded in float32).

    ``auto`` picks bfloat16 where it is fast: a CUDA GPU that supports it, a CPU with AMX tiles
    (several times faster than float32 there); float32 elsewhere.
    """
    if dtype == "auto":
        fast = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                else device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        dtype = "bfloat16" if fast else "float32"
    if dtype == "float32":
        return dtype, contextlib.nullcontext
    return dtype, lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class _Probe:
    """What the behaviour term matches: inputs, the original model's logits on them, BatchNorm's mode."""

    inputs: torch.Tensor  # (n, C, H, W) on the model's device
    logits: torch.Tensor  # (n, classes) of the original model in eval mode
    bn_train: bool  # BatchNorm on batch statistics (real data) or on the checkpoint's statistics (noise)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.inputs.shape[0]
        if n <= PROBE_BATCH:
            return self.inputs, self.logits
        idx = torch.arange(step * PROBE_BATCH, (step + 1) * PROBE_BATCH, device=self.inputs.device) % n  # cycles
        return self.inputs[idx], self.logits[idx]


def _behaviour(model: nn.Module, probe: _Probe, weights: dict[str, torch.Tensor], step: int,
               buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """||f_hat(x) - f(x)||^2 / ||f(x)||^2 on one probe minibatch, with the decoded weights swapped in."""
    x, ref = probe.batch(step)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if probe.bn_train else []
    try:
        for m in bns:
            m.train()
        # buffers: copies, so train-mode BatchNorm updates them and not the model's statistics
        out = functional_call(model, {**weights, **buffers}, (x,))
    finally:
        for m in bns:
            m.eval()
    return (out.float() - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-30)


class _Score:
    """What mimic's kept state maximises (higher is better), told what a mimic step already computed.

    ``measure(weights, weight_error)``: ``weights`` the decoded weights keyed ``name.weight`` (None: it
    decodes them), ``weight_error`` the mean relative weight error of that state (None: it computes it).
    A mimic step's pass already holds both for the state it starts from, so a check costs no decode.
    """

    def __init__(self, measure: Callable[[dict | None, float | None], float]):
        self.measure = measure

    def __call__(self, weights: dict | None = None, weight_error: float | None = None) -> float:
        return self.measure(weights, weight_error)


def _decoded(layers: list[_Layer]) -> dict[str, torch.Tensor]:
    """Every layer's weight as the model computes with it, keyed ``name.weight`` (no graph)."""
    with torch.no_grad():
        return {f"{layer.name}.weight": layer.decode().to(layer.dtype).reshape(layer.shape) for layer in layers}


def _mimic(layers: list[_Layer], steps: int, lr: float, progress: bool, model: nn.Module | None = None,
           probe: _Probe | None = None, behaviour_weight: float = 0.0, decode_dtype: str = "float32",
           score: Callable[[], float] | None = None, checks: int = 10,
           patience: int | None = DEFAULT_PATIENCE, final: dict | None = None) -> tuple[list[float], dict]:
    """Adam with cosine decay on the joint loss. With ``score`` (higher is better), it is measured at
    the start and about ``checks`` times more (the last step included), and the layers end at the
    best-scoring state; else at the final one. With ``patience``, the fit stops once that many checks
    in a row found no better score than the best (the best is kept either way). Returns (loss per
    step, selection record: kept step, scores, the step it stopped at).

    A check of the state a step starts from runs inside that step: a :class:`_Score` is handed the
    weight error of the step's pass and (with a behaviour term) the weights it decoded, so it decodes
    nothing again; a plain ``score()`` decodes for itself. Only the final state is decoded for its check;
    when that state is kept, ``final`` (a dict, if given) receives those weights, so the caller need not
    decode them again. Both hold in float32 only: a bfloat16 pass is not what the checks measure.
    """
    params = [t for layer in layers for t in (layer.latents, layer.log_scale)]
    every = max(1, math.ceil(steps / max(1, checks)))
    best: dict = {}
    reuse = isinstance(score, _Score) and decode_dtype == "float32"

    def check(step: int, known: dict | None = None) -> bool:
        """Score the current state (``step`` updates in); True when patience says stop here."""
        value = score(**known) if known is not None else score()
        if not best or value > best["score"]:  # ties keep the earlier state (the start first)
            best.update(score=value, step=step, state=[t.detach().clone() for t in params])
        best.setdefault("scores", []).append((step, value))
        since_best = sum(1 for checked, _ in best["scores"] if checked > best["step"])
        return patience is not None and since_best >= patience and step < steps

    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    behave = behaviour_weight > 0 and probe is not None and model is not None
    _, autocast = decode_autocast(decode_dtype, layers[0].latents.device)
    buffers = {k: v.clone() for k, v in model.named_buffers()} if behave and probe.bn_train else {}
    history = []
    for step in tqdm(range(steps), desc="reconstruct (mimic)", disable=not progress):
        checking = score is not None and step % every == 0  # the state this step starts from (0: encode's)
        if checking and not reuse and check(step):
            break
        grads, value, known = {}, 0.0, {}
        if behave:
            # 1. every layer decoded once, no graph; 2. the loss's gradient w.r.t. each decoded weight
            with torch.no_grad(), autocast():
                weights = {layer.name: layer.decode().to(layer.dtype).reshape(layer.shape).requires_grad_(True)
                           for layer in layers}
            loss = _behaviour(model, probe, {f"{n}.weight": w for n, w in weights.items()}, step, buffers)
            names = list(weights)
            for name, g in zip(names, torch.autograd.grad(loss, [weights[n] for n in names])):
                grads[name] = g * behaviour_weight
            value += behaviour_weight * loss.item()
            if checking and reuse:
                known["weights"] = {f"{n}.weight": w.detach() for n, w in weights.items()}
            del weights, loss
        opt.zero_grad(set_to_none=True)
        # 3. one chunk's graph at a time: the weight term plus the behaviour gradient reaching it, w.r.t. the
        # latents only (no gradient for the decoder's own weights: half the backward's cost)
        weight_value = sum(layer.step_gradients(autocast, 1.0 / len(layers), grads.get(layer.name))
                           for layer in layers)
        value += weight_value
        if checking and reuse and check(step, {**known, "weight_error": weight_value}):
            break  # before the update: the state checked is the one this step started from
        del known
        history.append(value)
        opt.step()
        sched.step()
    else:
        if score is not None:
            decoded = _decoded(layers) if reuse else None
            check(steps, {"weights": decoded} if reuse else None)
            if final is not None and decoded is not None and best["step"] == steps:
                final.update(decoded)
    if not best:
        return history, {"kept_step": steps, "scores": [], "stopped_step": steps}
    with torch.no_grad():
        for t, saved in zip(params, best["state"]):
            t.copy_(saved)
    return history, {"kept_step": best["step"], "scores": best["scores"], "stopped_step": len(history)}


@torch.no_grad()
def _task_score(model: nn.Module, layers: list[_Layer], val: tuple[torch.Tensor, torch.Tensor],
                reference: torch.Tensor, bn_train: bool, weights: dict | None = None) -> float:
    """Val accuracy of the decoded weights (``weights``: already decoded), then (tie-break) minus the
    relative logit error there."""
    weights = _decoded(layers) if weights is None else weights
    buffers = {k: v.clone() for k, v in model.named_buffers()} if bn_train else {}
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if bn_train else []
    x, y = val
    try:
        for m in bns:
            m.train()  # batch statistics of each val chunk, as the probe saw: BN is re-estimated before writing
        out = torch.cat([functional_call(model, {**weights, **buffers}, (x[i:i + 256],)).float()
                         for i in range(0, len(x), 256)])
    finally:
        for m in bns:
            m.eval()
    error = ((out - reference).pow(2).mean() / reference.pow(2).mean().clamp(min=1e-30)).item()
    return (out.argmax(1) == y.to(out.device)).float().mean().item() - 1e-3 * min(error, 1.0)


@torch.no_grad()
def _weight_score(model: nn.Module, layers: list[_Layer], probe: _Probe | None, behaviour_weight: float,
                  weights: dict | None = None, weight_error: float | None = None) -> float:
    """Minus the mimic objective on held-out inputs: the weight error, plus the behaviour term.

    ``weights`` / ``weight_error``: that state's, already computed (a weights-only score then decodes nothing).
    """
    held_out = probe is not None and behaviour_weight > 0
    if weights is None and (weight_error is None or held_out):
        weights = _decoded(layers)
    value = (sum(layer.weight_error(weights[f"{layer.name}.weight"]).item() for layer in layers) / len(layers)
             if weight_error is None else weight_error)
    if held_out:
        value += behaviour_weight * _behaviour(model, probe, weights, 0, {}).item()
    return -value


def _model_side(model: nn.Module, image_size: int) -> tuple[int, int]:
    """(channels, side) of the model's inputs: a model built for a fixed size keeps it."""
    return input_size(model)[0], input_side(model, image_size)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + PROBE_BATCH]).float() for i in range(0, x.shape[0], PROBE_BATCH)])


def _task_data(opts: ReconstructOptions, model: nn.Module, device: torch.device) -> dict:
    """The probe task's splits as model inputs: train (probe, BatchNorm), val (function check), test (accuracy)."""
    task = get_task(opts.probe_task, opts.seed)
    channels, side = _model_side(model, opts.image_size)
    data = {stage: (to_model_input(task.split(stage)[0], channels, side), task.split(stage)[1])
            for stage in ("train", "val", "test")}
    if not len(data["train"][1]) >= 2:
        raise WeightgenError(f"task {task.name!r} has fewer than 2 training images to probe with")
    perm = torch.randperm(len(data["train"][1]), generator=torch.Generator().manual_seed(opts.seed))
    probe = data["train"][0][perm[:opts.probe_size]].to(device)
    return {"task": task, "data": data, "probe": probe, "side": side}


def resolved_behaviour_weight(opts: ReconstructOptions) -> float:
    if opts.behaviour_weight is not None:
        return opts.behaviour_weight
    return DEFAULT_BEHAVIOUR_WEIGHT if opts.probe_task else 0.0


def _val_subset(task: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to FIDELITY_CAP val images in a seeded order: weightgen.data's splits are sorted by class, so
    their first images (and the BN batches of _task_score) would hold only the first classes."""
    x, y = task["data"]["val"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:FIDELITY_CAP]
    return x[order], y[order]


def _selection_score(opts: ReconstructOptions, model: nn.Module, layers: list[_Layer], task: dict | None,
                     has_bn: bool, behaviour_weight: float, device: torch.device) -> _Score:
    """What mimic's kept state maximises: the task's val split, else held-out noise (seed + 2)."""
    if task:
        x, y = _val_subset(task, opts.seed)
        x = x.to(device)
        reference = _logits(model, x).float()
        return _Score(lambda weights, _: _task_score(model, layers, (x, y), reference, has_bn, weights))
    held_out = None
    if behaviour_weight > 0:
        side = _model_side(model, opts.image_size)[1]
        inputs = example_batch(model, min(opts.probe_size, PROBE_BATCH), opts.seed + 2, max_side=side).to(device)
        held_out = _Probe(inputs, _logits(model, inputs), bn_train=False)
    return _Score(lambda weights, error: _weight_score(model, layers, held_out, behaviour_weight, weights, error))


def _accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    return evaluate(model, TensorDataset(*data))


def _reestimate_bn(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor]) -> None:
    reestimate_batchnorm(model, TensorDataset(*train))


def _load(opts: ReconstructOptions, device: torch.device) -> tuple[nn.Module, nn.Module, dict]:
    """The checkpoint's model (its tensors, no random init) and the VAE, both on ``device``."""
    vae, meta = load_vae_bundle(opts.vae)
    state = load_checkpoint(opts.checkpoint)
    with torch.random.fork_rng(devices=[]):  # a model that cannot be built on meta draws timm's init
        model = model_from_state(opts.arch, opts.model_kwargs, state, opts.checkpoint)
    del state
    return model.to(device).eval(), vae_on(vae, device), meta


def _function_inputs(opts: ReconstructOptions, model: nn.Module, task: dict | None,
                     device: torch.device) -> tuple[torch.Tensor, str]:
    """The inputs of the function check (never the probe) and what they are."""
    if task:  # held out from the probe: the val split
        batch = _val_subset(task, opts.seed)[0].to(device)
        return batch, f"{task['task'].name} val split ({batch.shape[0]} images, not probed)"
    batch = example_batch(model, opts.fidelity_batch, opts.seed).to(device)
    return batch, f"seeded noise (seed {opts.seed}), not the probe noise"


def _original_accuracy(model: nn.Module, task: dict | None, batch: torch.Tensor) -> dict | None:
    """The checkpoint's test accuracy on the probe task (as stored, and with BatchNorm re-estimated)."""
    if not task:
        return None
    classes = _logits(model, batch[:1]).shape[-1]
    if classes != task["task"].num_classes:
        log.warning("the model has %d outputs and task %s %d classes: no accuracy", classes,
                    task["task"].name, task["task"].num_classes)
        return None
    original = copy.deepcopy(model)
    accuracy = {"test_images": len(task["data"]["test"][1]), "original": _accuracy(original, task["data"]["test"])}
    _reestimate_bn(original, task["data"]["train"])
    accuracy["original_after_bn_reestimation"] = _accuracy(original, task["data"]["test"])
    return accuracy


def _select_layers(model: nn.Module, vae: nn.Module, meta: dict, keep_head: bool,
                   progress: bool) -> tuple[list[_Layer], list[dict]]:
    """Every weight layer encoded through the VAE, and those kept as they are (with why)."""
    known, heads = trained_kinds(meta), head_names(model)
    layers, kept = [], []
    for spec in tqdm(weight_layers(model), desc="encoding layers", disable=not progress):
        reason = ("classifier head (keep_head)" if keep_head and spec["name"] in heads
                  else f"the VAE never saw {spec['kind']} layers" if spec["kind"] not in known
                  else "weight is not a plain tensor (parametrized)" if not spec["direct"] else None)
        if reason:
            kept.append({"name": spec["name"], "shape": list(spec["shape"]), "kind": spec["kind"], "reason": reason})
            continue
        layers.append(_Layer(vae, spec, model.get_parameter(f"{spec['name']}.weight")))
    if kept:
        log.warning("kept %d layers as they are (e.g. %s: %s)", len(kept), kept[0]["name"], kept[0]["reason"])
    return layers, kept


def _behaviour_probe(opts: ReconstructOptions, model: nn.Module, task: dict | None, has_bn: bool,
                     device: torch.device) -> tuple[_Probe, dict]:
    """The probe inputs and the original model's logits on them, for mimic's behaviour term."""
    if task:
        inputs, source = task["probe"], f"{task['task'].name} train split"
    else:
        side = _model_side(model, opts.image_size)[1]
        # not the function check's noise (seed + 1), at the probe side: cheap for any input size
        inputs = example_batch(model, opts.probe_size, opts.seed + 1, max_side=side).to(device)
        source = "seeded noise (weightgen.models.example_batch)"
    probe = _Probe(inputs, _logits(model, inputs), bn_train=bool(task) and has_bn)
    info = {"source": source, "task": task["task"].name if task else None, "size": inputs.shape[0],
            "batch": min(PROBE_BATCH, inputs.shape[0]), "image_side": inputs.shape[-1],
            "batchnorm": (None if not has_bn else "train mode (batch statistics)" if probe.bn_train
                          else "eval mode (the checkpoint's statistics)")}
    return probe, info


@torch.no_grad()
def _write_back(model: nn.Module, layers: list[_Layer],
                decoded: dict | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Decode every layer into the model's weight; one report row and the stored latents per layer.

    ``decoded``: float32 weights of the current state keyed ``name.weight``, already decoded (mimic's last check).
    """
    rows, latents = [], {}
    decoded = decoded or {}
    for layer in layers:
        scale = layer.log_scale.detach().exp().float().reshape(1)  # stored: the decode uses exactly this
        z = layer.latents.detach().float().contiguous()
        weight = decoded.get(f"{layer.name}.weight")
        if weight is None or weight.dtype != torch.float32:  # the same bits: one scale, one decode
            weight = layer.decode(scale).reshape(layer.shape)
        latents[f"{layer.name}.latents"], latents[f"{layer.name}.scale"] = z, scale
        numbers = math.prod(layer.shape)
        rows.append({"name": layer.name, "shape": list(layer.shape), "kind": layer.kind, "depth": layer.depth,
                     "cosine": cosine(weight, layer.target),
                     "rel_error": ((weight - layer.target).norm() / layer.target.norm().clamp(min=1e-30)).item(),
                     "scale": scale.item(), "latent_numbers": z.numel() + 1, "weight_numbers": numbers})
        param = model.get_parameter(f"{layer.name}.weight")
        param.copy_(weight.to(param.dtype))  # after the row: the target may be this very tensor
    return rows, latents


def _function_change(reference, model: nn.Module, batch: torch.Tensor, inputs: str) -> dict:
    """How far the reconstructed model's features and logits moved from the original's."""
    recorded = record_features(model, batch)
    function = compare_features(reference, recorded)
    ref_logits, logits = reference[1].float(), recorded[1].float()
    function["logits_rel_error"] = ((logits - ref_logits).norm() / ref_logits.norm().clamp(min=1e-30)).item()
    function.pop("block_cosine", None)  # per-block detail: the min below says enough
    function["inputs"] = inputs
    return function


def _totals(rows: list[dict], kept: list[dict]) -> dict:
    cosines = [r["cosine"] for r in rows]
    latent_numbers = sum(r["latent_numbers"] for r in rows)
    weight_numbers = sum(r["weight_numbers"] for r in rows)
    return {"reconstructed": len(rows), "kept": len(kept),
            "mean_cosine": statistics.fmean(cosines) if cosines else None,
            "median_cosine": statistics.median(cosines) if cosines else None,
            "min_cosine": min(cosines) if cosines else None,
            "mean_rel_error": statistics.fmean(r["rel_error"] for r in rows) if rows else None,
            "latent_numbers": latent_numbers, "weight_numbers": weight_numbers,
            "compression": latent_numbers / weight_numbers if weight_numbers else None}


def reconstruct(opts: ReconstructOptions, progress: bool = False) -> tuple[Path, dict]:
    """Run the whole job; returns the output directory and its report."""
    validate(opts)
    device = resolve_device(opts.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    model, vae, meta = _load(opts, device)
    task = _task_data(opts, model, device) if opts.probe_task else None
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    batch, function_inputs = _function_inputs(opts, model, task, device)
    reference = record_features(model, batch)
    accuracy = _original_accuracy(model, task, batch)
    layers, kept = _select_layers(model, vae, meta, opts.keep_head, progress)

    steps = (DEFAULT_STEPS if opts.steps is None else opts.steps) if opts.mode == "mimic" else 0
    behaviour_weight = resolved_behaviour_weight(opts) if steps else 0.0
    probe, probe_info = _behaviour_probe(opts, model, task, has_bn, device) if behaviour_weight else (None, None)
    decode_dtype = decode_autocast(opts.decode_dtype, device)[0] if steps else None
    fit_start, fit_cpu = time.perf_counter(), time.process_time()
    score = _selection_score(opts, model, layers, task, has_bn, behaviour_weight, device) if steps else None
    final: dict = {}
    history, selection = _mimic(layers, steps, opts.lr, progress, model, probe, behaviour_weight,
                                decode_dtype or "float32", score, patience=opts.patience or None, final=final
                                ) if steps and layers else ([], None)
    fit_seconds, fit_cpu_seconds = time.perf_counter() - fit_start, time.process_time() - fit_cpu
    del probe

    rows, latents = _write_back(model, layers, final)
    del final
    batchnorm = "copied from the checkpoint" if has_bn else None
    if task and has_bn:  # the decoded weights make other activations: statistics of the task's train split
        _reestimate_bn(model, task["data"]["train"])
        batchnorm = f"re-estimated on the {task['task'].name} train split"
    if accuracy is not None:
        accuracy["reconstructed"] = _accuracy(model, task["data"]["test"])
    report = {
        "arch": opts.arch, "model_kwargs": opts.model_kwargs, "checkpoint": str(opts.checkpoint),
        "vae": str(opts.vae or default_vae_dir()), "mode": opts.mode, "steps": steps,
        "lr": opts.lr if steps else None, "keep_head": opts.keep_head, "seed": opts.seed, "device": str(device),
        "behaviour_weight": behaviour_weight if steps else None, "decode_dtype": decode_dtype,
        "probe_task": opts.probe_task, "probe": probe_info, "batchnorm": batchnorm, "accuracy": accuracy,
        "layers": rows, "kept": kept, "totals": _totals(rows, kept),
        "function": _function_change(reference, model, batch, function_inputs),
        "loss_history": history,
        "selection": selection,
        "decode": "weight = weightgen.vae.codec.decode_layer(vae, latents, shape, kind, depth, scale)",
        "fit_seconds": fit_seconds,
        "fit_cpu_seconds": fit_cpu_seconds,  # all threads of this process: what a busy machine does not inflate
    }
    metadata = {"format": LATENTS_FORMAT, "vae": report["vae"], "arch": opts.arch}
    with atomic_directory(opts.out, opts.overwrite, kind="reconstruction") as tmp:
        save_tensors(tmp / WEIGHTS_FILE, model.state_dict(), {"format": "weightgen-reconstruction/1", "arch": opts.arch})
        save_tensors(tmp / LATENTS_FILE, latents, metadata)
        report["seconds"] = time.perf_counter() - start
        report["cpu_seconds"] = time.process_time() - cpu_start
        write_json(tmp / REPORT_FILE, report)
    return Path(opts.out), report


__all__ = ["ReconstructOptions", "reconstruct", "validate", "MODES", "DEFAULT_STEPS", "DEFAULT_PATIENCE", "DEFAULT_LR",
           "DEFAULT_BEHAVIOUR_WEIGHT", "DEFAULT_PROBE_SIZE", "DEFAULT_IMAGE_SIZE", "DECODE_DTYPES"]
