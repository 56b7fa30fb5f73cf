"""Adaptation methods: what each trains (counts from shapes), that it applies only where it can, that the
function at init is the backbone's, and that merging folds LoRA / masks exactly or refuses clearly."""
from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from torch import nn

import weightgen as wg
from weightgen import export_dense, merge_and_unload  # the one of each: they reach every adapter
from weightgen.adapt import METHODS, get_method, trainable_counts
from weightgen.adapt.base import Wrapper
from weightgen.adapt.incremental import prepare_model
from weightgen.adapt.lora import LoRAConv2d
from weightgen.io import WeightgenError
from weightgen.layers import RecastConv2d, recast_layers

ARCHS = {"test_resnet": ("recast-conv", {}), "test_vit": ("recast-attn-mlp", {"img_size": 32})}


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(ARCHS))
def backbones(request):
    """(arch, dense model, recast model) with a 10-class head, eval mode."""
    arch = request.param
    preset, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    dense = timm.create_model(arch, num_classes=10, **kwargs).eval()
    recast = copy.deepcopy(dense)
    wg.recast(recast, preset=preset)
    return arch, dense, recast


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def expected_without_head(method: str, arch: str, dense: nn.Module, recast: nn.Module) -> int:
    """Per-task trainable numbers (head excluded), from the layer shapes."""
    coefficients = _numel(layer.coefficients for layer in recast_layers(recast).values())
    rank, blocks = METHODS[method].rank, getattr(dense, "blocks", [])
    norms = (nn.BatchNorm2d, nn.LayerNorm)
    head = set(dense.get_classifier().parameters())
    if method == "linear":
        return 0
    if method == "full":
        return _numel(p for p in dense.parameters() if p not in head)
    if method == "recast":
        return coefficients
    if method == "recast-norm":
        return coefficients + _numel(p for m in recast.modules() if isinstance(m, norms) for p in m.parameters())
    if method in ("lora", "recast+melo"):
        if arch == "test_vit":  # q and v of every block: A (r, dim) and B (dim, r) each
            lora = sum(2 * (rank * b.attn.qkv.in_features + b.attn.qkv.out_features // 3 * rank) for b in blocks)
        else:  # residual-stage convs (no downsample): A (r, in, k, k) and B (out, r, 1, 1)
            lora = sum(rank * m.weight[0].numel() + m.weight.shape[0] * rank for name, m in dense.named_modules()
                       if isinstance(m, nn.Conv2d) and name.startswith("layer") and "downsample" not in name)
        return lora + (coefficients if method == "recast+melo" else 0)
    if method == "recast+adaptformer":  # down (r, dim) + r, up (dim, r) + dim
        return coefficients + sum(2 * rank * b.mlp.fc1.in_features + rank + b.mlp.fc1.in_features for b in blocks)
    recast_convs = [m for m in recast_layers(recast).values() if isinstance(m, RecastConv2d)]
    if method == "recast+clr":  # depthwise 3x3 per output channel
        return coefficients + sum(9 * m.out_channels for m in recast_convs)
    if method == "recast+piggyback":  # one real mask value per conv weight
        return coefficients + sum(m.weight.numel() for m in recast_convs)
    raise AssertionError(method)


NOT_FOR = {"test_resnet": {"recast+adaptformer"}, "test_vit": {"recast+clr", "recast+piggyback"}}


@pytest.mark.parametrize("method", list(METHODS))
def test_counts_and_unchanged_function_at_init(backbones, method):
    arch, dense, recast = backbones
    m = get_method(method)
    model = copy.deepcopy(recast if m.needs_recast else dense)
    if method in NOT_FOR[arch]:
        with pytest.raises(WeightgenError, match=re.escape(f"method {method!r} does not apply to")) as err:
            m.check(model)
        assert "\n" not in str(err.value)
        return
    x = inputs()
    with torch.no_grad():
        before = model(x)
    m.apply(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    counts = trainable_counts(model)
    head = _numel(model.get_classifier().parameters())
    assert counts["without_head"] == expected_without_head(method, arch, dense, recast)
    assert counts["with_head"] == counts["without_head"] + head
    assert all(p.requires_grad for p in model.get_classifier().parameters())
    if method.startswith("recast"):
        assert all(not b.templates.requires_grad for b in model.recast_banks.values())


def test_recast_methods_refuse_a_plain_model(backbones):
    _, dense, _ = backbones
    for name in ("recast", "recast+melo"):
        with pytest.raises(WeightgenError, match="not recast"):
            get_method(name).check(dense)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(WeightgenError, match="recast\\+melo"):
        get_method("dora")


def test_apply_is_idempotent_and_refuses_a_second_method(backbones):
    _, _, recast = backbones
    model = copy.deepcopy(recast)
    get_method("recast+melo").apply(model)
    wrappers = sum(isinstance(m, Wrapper) for m in model.modules())
    counts = trainable_counts(model)
    get_method("recast+melo").apply(model)
    assert sum(isinstance(m, Wrapper) for m in model.modules()) == wrappers and trainable_counts(model) == counts
    with pytest.raises(WeightgenError, match="already set up for method 'recast\\+melo'"):
        get_method("recast").apply(model)


def _perturb(model: nn.Module) -> None:
    """Move every trainable tensor (LoRA B, masks, coefficients) as training would."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                if name.endswith("mask"):  # some mask values below the threshold
                    p.copy_(torch.rand(p.shape, generator=gen) * 2e-2)
                else:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("method", ["lora", "recast+melo", "recast+piggyback", "recast+clr", "recast+adaptformer"])
def test_merge_folds_lora_and_masks_or_refuses(backbones, method):
    arch, dense, recast = backbones
    if method in NOT_FOR[arch]:
        return
    m = get_method(method)
    model = copy.deepcopy(recast if m.needs_recast else dense)
    m.apply(model)
    _perturb(model)
    x = inputs(1)
    with torch.no_grad():
        adapted = model(x)
    if method in ("recast+clr", "recast+adaptformer"):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(WeightgenError, match="cannot merge"):
            export_dense(model)
        with pytest.raises(WeightgenError, match="cannot merge"):
            merge_and_unload(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # untouched
        return
    exported = export_dense(model)  # from a copy: the adapted model is untouched
    with torch.no_grad():
        assert torch.equal(model(x), adapted)
    merged = merge_and_unload(model)
    assert exported.keys() == merged.state_dict().keys()
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in exported.items())
    assert not any(isinstance(mod, Wrapper) for mod in merged.modules()) and not recast_layers(merged)
    plain = copy.deepcopy(dense)
    plain.load_state_dict(merged.state_dict())  # strict: the original architecture
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(x), dense(x), atol=1e-3)  # the adaptation is really in the weights


def test_one_merge_and_export_for_the_package_and_adapt():
    import weightgen.adapt as adapt
    import weightgen.recasting as recasting

    assert adapt.merge_and_unload is wg.merge_and_unload is recasting.merge_and_unload
    assert adapt.export_dense is wg.export_dense is recasting.export_dense


@pytest.mark.parametrize("method", ["recast+melo", "recast+adaptformer"])
def test_bank_merge_keeps_adapters_working_when_asked(backbones, method):
    arch, _, recast = backbones
    if method in NOT_FOR[arch]:
        return
    model = copy.deepcopy(recast)
    get_method(method).apply(model)
    _perturb(model)
    with torch.no_grad():
        adapted = model(inputs())
        wg.merge_and_unload(model, keep_adapters=True)  # banks only: the wrappers stay, over plain layers
        torch.testing.assert_close(model(inputs()), adapted, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, Wrapper) for m in model.modules()) and not recast_layers(model)
    assert model.__dict__.get("adapt_method") == method  # still set up for its method


class _Backbone:
    """What prepare_model reads of a backbone: a fresh model copy."""

    def __init__(self, arch: str):
        self.arch = arch

    def model(self, recast_model: bool = True) -> nn.Module:
        preset, kwargs = ARCHS[self.arch]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(self.arch, num_classes=10, **kwargs).eval()
        return wg.recast(model, preset=preset) if recast_model else model


@pytest.mark.parametrize("method", ["lora", "recast+melo", "recast+adaptformer"])
def test_the_run_seed_reaches_every_adapter_init(method):
    """Seeds 42 and 1998 give different adapter inits (LoRA A, AdaptFormer's down-projection); one seed
    gives the same init twice, and the caller's global RNG is left alone."""
    backbone = _Backbone("test_vit")
    m = get_method(method)

    def adapter_init(seed: int) -> dict[str, torch.Tensor]:
        model = prepare_model(backbone, m, 10, seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_A" in k or "down.weight" in k}

    rng = torch.get_rng_state()
    first, again, other = adapter_init(42), adapter_init(42), adapter_init(1998)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first and first.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_lora_conv_with_reflect_padding_runs_each_convolution_once(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    lora = LoRAConv2d(base, rank=2, alpha=4.0, seed=0)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen))
    x = torch.randn(2, 3, 8, 8, generator=gen)
    conv2d, calls = torch.nn.functional.conv2d, []
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    with torch.no_grad():
        out = lora(x)
    monkeypatch.undo()
    assert len(calls) == 3  # the base, A, and B: no convolution computed twice
    with torch.no_grad():
        torch.testing.assert_close(out, lora.fold()(x), rtol=1e-5, atol=1e-5)  # reflect padding kept for A


# ---------------------------------------------------------------- on a GPU (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_methods_task_switching_and_extra_templates_on_gpu(tmp_path, arch):
    from weightgen.adapt import extend_banks

    preset, kwargs = ARCHS[arch]
    x = inputs().cuda()
    for name, method in METHODS.items():
        if name in NOT_FOR[arch]:
            continue
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=10, **kwargs).eval().cuda()
        if method.needs_recast:
            wg.recast(model, preset=preset)
        with torch.no_grad():
            before = model(x)
        method.apply(model)
        assert all(t.is_cuda for t in model.state_dict().values()), name
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-3, atol=1e-4)  # TF32 convs on CUDA
        logits = []
        for t, classes in enumerate((10, 5)):
            if t:
                model.reset_classifier(classes)
                model.cuda()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            model.train()
            y = torch.arange(8, device="cuda") % classes
            for _ in range(2):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(torch.cat([x] * 4)), y).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                logits.append(model(x))
            wg.save_task(model, tmp_path / f"{name}-{t}.safetensors")
        wg.load_task(model, tmp_path / f"{name}-0.safetensors")
        with torch.no_grad():
            assert torch.equal(model(x), logits[0]), name
        if method.needs_recast:
            extend_banks(model, 1, "random")
            assert all(b.templates.is_cuda for b in model.recast_banks.values())
            with torch.no_grad():
                torch.testing.assert_close(model(x), logits[0], rtol=1e-5, atol=1e-6)


def test_library_errors_name_python_arguments_and_scripts_print_flags():
    from weightgen.adapt.trainer import TrainConfig

    for config, python, flag in [(TrainConfig(epochs=0), "epochs must be >= 1", "--epochs must be >= 1"),
                                 (TrainConfig(batch_size=0), "batch_size must be >= 1", "--batch-size must be >= 1"),
                                 (TrainConfig(lr=0.0), "lr must be > 0", "--lr must be > 0")]:
        with pytest.raises(WeightgenError) as info:
            config.validate()
        assert str(info.value) == python and info.value.cli == flag
