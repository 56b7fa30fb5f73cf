"""Weight matching (weightgen.studies.align): permuting b's hidden units keeps its function and moves it toward a."""
from __future__ import annotations

import pytest
import torch

from weightgen.models import create_model, example_batch
from weightgen.studies import align as align_mod
from weightgen.studies.align import align_state, function_change, permutation_groups, weight_cosine_states

CASES = {
    # heads (4) and within-head q/k and v permutations, Mlp, the residual stream with tokens
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 32, "num_heads": 4, "img_size": 16,
                                     "patch_size": 4, "num_classes": 10, "in_chans": 1}),
    # BasicBlocks, streams split at conv shortcuts
    "resnet18": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "num_classes": 10, "in_chans": 1}),
    # deep stem, Bottlenecks (two chains sharing conv2), avg-pool + conv shortcuts
    "test_resnet": ("test_resnet", {"num_classes": 10, "in_chans": 1}),
    # Mlp blocks, a stream per stage through depthwise convs, LayerNorms and layer scales
    "test_convnext": ("test_convnext", {"num_classes": 10, "in_chans": 1}),
}


def _state(model, seed: int) -> dict[str, torch.Tensor]:
    """model's init for ``seed`` with every float tensor jittered: BN affine/statistics differ per
    channel, so a permutation that forgot one of them would change the logits."""
    torch.manual_seed(seed)
    fresh = create_model(*CASES[model])
    g = torch.Generator().manual_seed(100 + seed)
    out = {}
    for key, value in fresh.state_dict().items():
        if value.is_floating_point():
            value = value + 0.1 * torch.randn(value.shape, generator=g)
            value = value.abs() + 0.1 if key.endswith("running_var") else value
        out[key] = value
    return out


def _logits(model, state, batch):
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(batch)


@pytest.mark.parametrize("case", sorted(CASES))
def test_alignment_keeps_b_function_and_raises_cosine(case):
    model = create_model(*CASES[case])
    state_a, state_b = _state(case, 0), _state(case, 1)
    aligned, report = align_state(model, state_a, state_b)
    assert report["skipped"] == [] and report["units_moved"] > 0.5 * report["units_permutable"] > 0
    assert set(aligned) == set(state_b)
    assert any(not torch.equal(aligned[k], state_b[k]) for k in state_b)
    batch = example_batch(model, 4, seed=1)
    ref = _logits(model, state_b, batch)
    assert torch.allclose(_logits(model, aligned, batch), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert function_change(model, state_b, aligned, batch) < 1e-5
    assert report["cosine_before"] == pytest.approx(weight_cosine_states(model, state_a, state_b))
    assert report["cosine_after"] == pytest.approx(weight_cosine_states(model, state_a, aligned))
    assert report["cosine_after"] > report["cosine_before"] + 0.04
    kinds = {g["kind"] for g in report["groups"]}
    assert kinds == {"vit": {"attention", "mlp", "stream"}, "resnet18": {"conv", "stream"},
                     "test_resnet": {"conv", "stream"}, "test_convnext": {"mlp", "stream"}}[case]


@pytest.mark.parametrize("case", ["vit", "test_resnet", "test_convnext"])
def test_recovers_a_scrambled_copy_of_a(case):
    """b = a with random unit permutations (function unchanged): matching must undo them exactly."""
    model = create_model(*CASES[case])
    state_a = _state(case, 0)
    groups, _ = permutation_groups(model)
    g = torch.Generator().manual_seed(7)
    for group in groups:  # a random permutation of every group, heads moved as blocks
        d = group.n // group.heads
        heads = torch.randperm(group.heads, generator=g)
        group.perms = [torch.cat([heads[i] * d + torch.randperm(d, generator=g) for i in range(group.heads)])
                       for _ in group.sets]
    moves = align_mod._moves_by_key(groups)
    scrambled = {k: align_mod._apply(v, moves[k]) if k in moves else v.clone() for k, v in state_a.items()}
    batch = example_batch(model, 4, seed=2)
    assert function_change(model, state_a, scrambled, batch) < 1e-5
    assert weight_cosine_states(model, state_a, scrambled) < 0.5
    aligned, report = align_state(model, state_a, scrambled)
    assert report["cosine_after"] == pytest.approx(1.0, abs=1e-9)
    assert all(torch.equal(aligned[k], state_a[k]) for k in state_a)


def test_unsupported_variants_are_skipped_with_a_reason():
    arch, kwargs = CASES["vit"]
    model = create_model(arch, {**kwargs, "qk_norm": True})  # per-head q/k norm: no within-head moves
    torch.manual_seed(0)
    state_a = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state_b = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    aligned, report = align_state(model, state_a, state_b)
    assert {(s["module"], s["reason"]) for s in report["skipped"]} == {
        (f"blocks.{i}.attn", "q_norm is not Identity") for i in range(2)}
    assert {g["kind"] for g in report["groups"]} == {"mlp", "stream"}
    assert function_change(model, state_b, aligned, example_batch(model, 4)) < 1e-5
    # streams off: only the blocks' own units move, the stream tensors' stream axis stays
    only, blocks_only = align_state(model, state_a, state_b, streams=False)
    assert {g["kind"] for g in blocks_only["groups"]} == {"mlp"}
    # what matching maximises (inner product of all parameters): adding the streams never ends lower
    keys = [name for name, _ in model.named_parameters()]

    def inner(state):
        return sum(float((state_a[k].double() * state[k].double()).sum()) for k in keys)

    assert inner(aligned) >= inner(only) > inner(state_b)
