"""The main job: weights for a timm architecture -> recast, fit, check, one artifact directory."""
from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapt.extend import extend_banks
from .artifact import save
from .cli import user_errors
from .config import PRESETS, RecastConfig, default_preset, preset_config
from .io import WeightgenError, check_checkpoint_path, check_output_dir, load_checkpoint, read_json
from .mimicry import METHODS, fit
from .mimicry.fidelity import compare_features, record_features
from .models import (check_arch, create_model, data_cfg, example_batch, model_from_state, open_residual_gates,
                     resolve_device)
from .bank import banks_of
from .layers import recast_layers
from .recasting import find_targets, head_names, inject, parameter_counts, plan_groups
from .tensorboard_log import log_fit
from .vae.prior import activation_ranges, default_vae_dir, load_vae_bundle, sample_weights

log = logging.getLogger(__name__)


@dataclass
class GenerateOptions:
    arch: str
    checkpoint: str | None = None
    pretrained: bool = False
    pretrained_file: str | None = None  # local weights loaded through timm (keeps the pretrained_cfg)
    model_kwargs: dict = field(default_factory=dict)
    preset: str | None = None
    target: str | None = None  # regex on module names, instead of a preset
    layers_per_group: int | None = None
    templates: int | None = None
    coef_sets: int = 2
    method: str = "closed_form"
    steps: int | None = None
    lr: float | None = None
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    logdir: str | None = None
    vae: str | None = None
    fidelity_batch: int = 4
    device: str = "cpu"  # where the model, the fit and the VAE run ("cuda", "cuda:1", ...)
    extra_templates: int = 0  # templates added to every bank after the fit, coefficients at zero
    extra_source: str = "random"  # where they come from: random, pca (other banks), vae (the prior)
    residual_gates: float | None = None  # prior only: open timm's zero-init residual gates to this value

    def output_dir(self) -> Path:
        """``out``, else ``outputs/<arch>-<source>-<method>-s<seed>`` (source: prior, pretrained or
        the checkpoint's file stem), so runs from different sources do not collide."""
        if self.out:
            return Path(self.out)
        source = (Path(self.checkpoint).stem if self.checkpoint else Path(self.pretrained_file).stem
                  if self.pretrained_file else "pretrained" if self.pretrained else "prior")
        return Path("outputs") / f"{self.arch}-{source}-{self.method.replace('+', '_')}-s{self.seed}"


def validate(opts: GenerateOptions) -> None:
    """Every check that needs no model, before any work is done."""
    if opts.preset and opts.target:
        raise WeightgenError("pass either --preset or --target, not both")
    if opts.preset and opts.preset not in PRESETS:
        raise WeightgenError(f"unknown preset {opts.preset!r}; choose from {', '.join(PRESETS)}")
    if sum(map(bool, (opts.checkpoint, opts.pretrained, opts.pretrained_file))) > 1:
        raise WeightgenError("pass one of --checkpoint, --pretrained, --pretrained-file")
    if opts.method not in METHODS:
        raise WeightgenError(f"unknown method {opts.method!r}; choose from {', '.join(METHODS)}")
    if opts.steps is not None and opts.steps < 0:
        raise WeightgenError("--steps must be >= 0")
    if opts.lr is not None and not opts.lr > 0:
        raise WeightgenError("--lr must be > 0")
    if opts.method == "closed_form" and opts.steps:
        raise WeightgenError("--steps has no effect with --method closed_form; use closed_form+gradient")
    if opts.method == "decoder" and not (opts.checkpoint or opts.pretrained or opts.pretrained_file):
        raise WeightgenError("--method decoder fits a given model: pass --checkpoint FILE or --pretrained")
    if opts.extra_templates < 0:
        raise WeightgenError("--extra-templates must be >= 0")
    if opts.extra_source not in ("random", "pca", "vae"):
        raise WeightgenError(f"unknown --extra-source {opts.extra_source!r}; choose from random, pca, vae")
    if opts.residual_gates is not None and (opts.checkpoint or opts.pretrained or opts.pretrained_file):
        raise WeightgenError("--residual-gates applies to weights from the prior; a given model keeps its own")
    if opts.residual_gates is not None and not opts.residual_gates > 0:
        raise WeightgenError("--residual-gates must be > 0")
    if opts.fidelity_batch < 1:
        raise WeightgenError("the fidelity batch must hold at least one input")
    resolve_device(opts.device)
    check_arch(opts.arch)  # input errors first: they are the real problem, not an existing output
    if opts.checkpoint:
        check_checkpoint_path(opts.checkpoint)
    check_output_dir(opts.output_dir(), opts.overwrite, kind="artifact")


def recast_config(model: torch.nn.Module, opts: GenerateOptions) -> RecastConfig:
    common = {"layers_per_group": opts.layers_per_group, "templates": opts.templates,
              "coef_sets": opts.coef_sets, "seed": opts.seed}
    with user_errors():
        if opts.target:
            return RecastConfig(target_modules=opts.target, **common)
        return preset_config(opts.preset or default_preset(model), **common)


def _lift_targets(model: torch.nn.Module, config: RecastConfig) -> dict[str, torch.Tensor]:
    """The weights ``inject`` will wrap, taken out of the model (meta placeholders stay in their place).

    ``inject`` then builds its banks and coefficients on the meta device, which costs no memory, and
    ``_materialise`` allocates them without writing them; the returned dict is the only reference to
    the weights, the fit target that ``fit(..., release_target=True)`` lets go bank by bank.
    """
    with user_errors():  # inject's own checks, before the model is touched
        groups = plan_groups(model, find_targets(model, config), config)
    modules = dict(model.named_modules())
    targets = {}
    for name in (name for group in groups for name in group.members):
        weight = modules[name].weight
        targets[f"{name}.weight"] = weight.detach()
        modules[name].weight = torch.nn.Parameter(torch.empty_like(weight, device="meta"),
                                                  requires_grad=weight.requires_grad)
    return targets


def _materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Banks and coefficients that ``inject`` built on the meta device, on ``device``: coefficients zero as
    ``inject`` makes them, templates allocated but not written (the closed-form fit writes every bank;
    untouched pages cost no memory until it does)."""
    for bank in banks_of(model).values():
        old = bank.templates
        bank.templates = torch.nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device),
                                            requires_grad=old.requires_grad)
    for layer in recast_layers(model).values():
        old = layer.coefficients
        layer.coefficients = torch.nn.Parameter(torch.zeros(old.shape, dtype=old.dtype, device=device),
                                                requires_grad=old.requires_grad)


def generate(opts: GenerateOptions, progress: bool = False) -> tuple[Path, dict]:
    """Run the whole job; returns the artifact directory and its report."""
    validate(opts)
    device = resolve_device(opts.device)
    start = time.perf_counter()
    from_prior = not (opts.checkpoint or opts.pretrained or opts.pretrained_file)
    vae = load_vae_bundle(opts.vae) if from_prior or opts.method == "decoder" else None
    extra: dict = {}
    if opts.checkpoint:
        # the model's tensors are the checkpoint's; recast() then drops the model's references
        # to the wrapped weights, so ``state`` is the only copy of them (the fit target)
        state = load_checkpoint(opts.checkpoint)
        pretrain_info = Path(opts.checkpoint).with_name("pretrain.json")
        if pretrain_info.is_file():  # scripts/pretrain.py's record: adaptation reads the input size from it
            extra["pretrain"] = read_json(pretrain_info)
        model = model_from_state(opts.arch, opts.model_kwargs, state, opts.checkpoint)
    else:
        # timm's init draws from the global RNG: seed it inside a fork, leaving the caller's RNG as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            model = create_model(opts.arch, opts.model_kwargs, pretrained=opts.pretrained,
                                 pretrained_file=opts.pretrained_file)
        if opts.pretrained or opts.pretrained_file:  # adaptation feeds the backbone what its cfg says
            extra["pretrained_cfg"] = data_cfg(model)
    model = model.to(device)
    if not from_prior:
        state = model.state_dict()  # the fit target, on the device (the same tensors on the CPU)
    else:
        # each layer goes straight into the model's weight as it is decoded: no dict of sampled copies
        # the returned dict (the model's own weights) is not kept: ``state`` below must be the last
        # reference to the wrapped weights, so that ``del state`` after the fit frees them
        stats, fallback = sample_weights(model, *vae, seed=opts.seed, skip=head_names(model), progress=progress,
                                         in_place=True)[1:]
        state = model.state_dict()  # the fit target: the model's own tensors, not a copy
        extra["prior"] = {"vae": str(opts.vae or default_vae_dir()), "layers": stats, "fallback_layers": fallback}
        if opts.residual_gates is not None:
            extra["prior"]["residual_gates"] = {"value": opts.residual_gates,
                                                "opened": open_residual_gates(model, opts.residual_gates)}
    config = recast_config(model, opts)

    with torch.no_grad():
        batch = example_batch(model, opts.fidelity_batch, opts.seed).to(device)
        reference = record_features(model, batch)
    # closed form: the banks fill one at a time while each bank's targets are let go, so the model never
    # holds a second full copy of its weights (peak memory about one model plus one bank, not two models)
    release = opts.method == "closed_form"
    if release:
        state = _lift_targets(model, config)
    with user_errors():
        inject(model, config)
    if release:
        _materialise(model, device)
    report = fit(model, state, opts.method, steps=opts.steps, lr=opts.lr, seed=opts.seed, progress=progress, vae=vae,
                 release_target=release)
    # what each bank was fitted with (a preset's template_ratio included), before any extension
    sizes = Counter(row["group"] for row in report["layers"])
    report["templates_per_bank"] = {g: config.templates_for(n) - config.extra_templates for g, n in sizes.items()}
    del state
    if not release:  # a gradient fit's graphs can hold cycles; the closed-form path leaves none (0 found)
        gc.collect()
    with torch.no_grad():
        recorded = record_features(model, batch)
        report["function"] = compare_features(reference, recorded)
        if from_prior:
            report["activations"] = activation_ranges(recorded, batch)
    if opts.extra_templates:
        report["extra_templates"] = {"count": opts.extra_templates, "source": opts.extra_source, "banks": extend_banks(
            model, opts.extra_templates, opts.extra_source, seed=opts.seed, vae=vae or opts.vae)}
        report["params"] = parameter_counts(model)  # the extended banks' counts
    source = ("checkpoint" if opts.checkpoint else "pretrained_file" if opts.pretrained_file
              else "pretrained" if opts.pretrained else "vae_prior")
    report.update(arch=opts.arch, model_kwargs=opts.model_kwargs, source=source, **extra)
    if opts.logdir:
        log_fit(opts.logdir, model, report)

    report["seconds_total"] = time.perf_counter() - start  # before saving, so report.json holds it
    out = save(model, opts.output_dir(), report, arch=opts.arch, model_kwargs=opts.model_kwargs,
               overwrite=opts.overwrite)
    return out, report
