import json
import math

import pytest
import timm
import torch

from weightgen.io import WeightgenError
from weightgen.studies import audit


def _state(seed: int, shapes=((16, 8), (4, 3, 3, 3))) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def test_layer_cosines_identity_sign_and_mean():
    a = _state(0)
    names = list(a)
    assert torch.allclose(audit.layer_cosines(a, a, names), torch.ones(2, dtype=torch.float64))
    flipped = {"l0.weight": -a["l0.weight"], "l1.weight": a["l1.weight"] * 3.0}  # scale does not count
    assert audit.layer_cosines(a, flipped, names).tolist() == pytest.approx([-1.0, 1.0])
    assert audit.mean_layer_cosine(a, flipped, names) == pytest.approx(0.0)  # layers weigh equally


def test_layer_cosines_refuse_mismatched_shapes():
    a, b = _state(0), _state(1, shapes=((16, 8), (4, 3, 1, 1)))
    with pytest.raises(ValueError, match="shapes differ"):
        audit.layer_cosines(a, b, list(a))


def test_nearest_finds_the_closest_reference_and_honours_exclude():
    a = _state(0)
    names = list(a)
    refs = {"far": _state(1), "near": audit.with_relative_noise(a, names, 0.1, torch.Generator().manual_seed(2))}
    ref_id, cos = audit.nearest(a, refs, names)
    assert ref_id == "near" and cos > 0.98
    ref_id, cos = audit.nearest(a, refs, names, exclude=lambda r: r == "near")
    assert ref_id == "far" and abs(cos) < 0.5
    assert audit.nearest(a, {}, names)[0] is None


def test_relative_noise_sets_the_expected_cosine_and_leaves_the_input():
    a = {"w.weight": torch.randn(200, 200, generator=torch.Generator().manual_seed(0)), "bn.bias": torch.zeros(3)}
    before = a["w.weight"].clone()
    noisy = audit.with_relative_noise(a, ["w.weight"], 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a["w.weight"], before)
    # independent noise of equal RMS: cos = 1 / sqrt(1 + sigma^2)
    assert audit.mean_layer_cosine(a, noisy, ["w.weight"]) == pytest.approx(1 / math.sqrt(2), abs=0.01)
    assert torch.equal(noisy["bn.bias"], a["bn.bias"])


def test_average_of_two_independent_states_sits_at_cos_one_over_root_two():
    a, b = _state(0, shapes=((300, 300),)), _state(1, shapes=((300, 300),))
    a["n"], b["n"] = torch.tensor(1), torch.tensor(5)
    mean = audit.average_states([a, b])
    assert audit.mean_layer_cosine(mean, a, ["l0.weight"]) == pytest.approx(1 / math.sqrt(2), abs=0.01)
    assert mean["n"].item() == 1  # integer buffers are not averaged


def test_match_accuracy_finds_the_level_of_a_monotone_curve():
    def accuracy_at(sigma):  # 1.0 for small noise, chance (0.1) for large; 0.55 at sigma = 1
        return 0.1 + 0.9 / (1 + sigma ** 2)

    sigma, acc = audit.match_accuracy(accuracy_at, 0.55)
    assert sigma == pytest.approx(1.0, rel=0.05) and acc == pytest.approx(0.55, abs=0.01)
    assert audit.match_accuracy(accuracy_at, 1.5) == (1e-3, accuracy_at(1e-3))  # unreachable: the edges
    assert audit.match_accuracy(accuracy_at, 0.0)[0] == 30.0


def test_compared_weights_skip_the_head_and_non_weights():
    model = timm.create_model("resnet18", num_classes=10, in_chans=1, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
    names = audit.compared_weights(model)
    assert "conv1.weight" in names and "fc.weight" not in names
    assert all(n.endswith(".weight") and "bn" not in n for n in names)


def test_zoo_models_errors_and_architecture_key(tmp_path):
    with pytest.raises(WeightgenError, match="does not exist"):
        audit.zoo_models(tmp_path / "missing")
    with pytest.raises(WeightgenError, match="no usable models"):
        audit.zoo_models(tmp_path)
    a = {"arch": "resnet18", "model_kwargs": {"b": 1, "a": 2}}
    b = {"arch": "resnet18", "model_kwargs": {"a": 2, "b": 1}}
    assert audit.architecture_key(a) == audit.architecture_key(b)
    assert audit.architecture_key(a) != audit.architecture_key({**a, "model_kwargs": {"a": 3, "b": 1}})
    json.dumps(audit.architecture_key(a))


def test_task_data_none_is_the_default_zoo_split_and_a_name_a_data_task():
    from weightgen.data import get_task
    from weightgen.zoo import zoo_data

    data, zoo = audit.task_data(None, 32, 1), zoo_data(None)
    assert torch.equal(data.test.tensors[0], zoo.test.tensors[0])
    named = audit.task_data("digits", 32, 1)
    assert named.test.tensors[0].shape[1:] == (1, 32, 32)
    assert len(named.test) == len(get_task("digits", 0).test[1])


def test_chance_cosine_std_matches_independent_random_models():
    shapes = ((40, 30), (8, 4, 3, 3), (100,))
    names = [f"l{i}.weight" for i in range(3)]
    cosines = torch.tensor([audit.mean_layer_cosine(_state(2 * i, shapes), _state(2 * i + 1, shapes), names)
                            for i in range(300)])
    expected = audit.chance_cosine_std(_state(0, shapes), names)
    assert abs(cosines.mean().item()) < 3 * expected / math.sqrt(300) * 2
    assert cosines.std().item() == pytest.approx(expected, rel=0.15)


def test_probe_outputs_are_the_models_logits_and_pre_logit_features():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=5)
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats, logits = audit.probe_outputs(model, x, batch_size=3)  # batches of 3, 3, 1
    assert feats.shape == (7, model.num_features) and logits.shape == (7, 5)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert torch.allclose(logits, model.get_classifier()(feats), atol=1e-5)
