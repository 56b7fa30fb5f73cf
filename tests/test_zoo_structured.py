"""The structured zoo: ensemble training, sharded builds that merge into one run's bytes, resuming."""
import dataclasses
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import weightgen.zoo as zoo
from weightgen.cli import run_cli
from weightgen.ensemble import (EnsembleConfig, augment, onecycle_factor, reestimate_batchnorm, train_ensemble,
                                weight_cosines)
from weightgen.zoo import (ZooError, build_zoo_resumable, layer_records, merge_zoo_shards, shard_specs,
                           staging_dir, structured_zoo_specs, tiny_structured_specs)

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("build_zoo_script", ROOT / "scripts" / "build_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("one") / "zoo"
        return out, build_zoo_resumable(out, tiny_structured_specs(), progress=False, name="tiny_structured")
    finally:
        torch.set_num_threads(threads)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name not in ("zoo.json", ".weightgen.json")}


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in zoo.TIMING_KEYS} for r in records]


def test_onecycle_factor_matches_torch():
    steps = 50
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, cycle_momentum=False)
    for step in range(steps):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * onecycle_factor(step, steps), rel=1e-6, abs=1e-12)
        opt.step()
        sched.step()


def test_augment_is_seeded_and_off_at_zero():
    x = torch.rand(5, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert augment(x, 0.0, g) is x
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    a = augment(x, 1.0, torch.Generator().manual_seed(3))
    b = augment(x, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x, atol=1e-3)


def _tiny_resnets(n):
    out = []
    for s in range(n):
        torch.manual_seed(s)
        out.append(timm.create_model("resnet18", num_classes=10, in_chans=1, layers=[1, 1, 1, 1],
                                     channels=[4, 8, 8, 16]))
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_update_matches_torch_optimizers(optimizer):
    from weightgen.ensemble import _update

    cfg = EnsembleConfig(steps=3, optimizer=optimizer)
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 5, generator=gen)
    grads = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    ref = torch.nn.Parameter(p0.clone())
    opt = (torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01) if optimizer == "sgd"
           else torch.optim.AdamW([ref], lr=0.1, weight_decay=0.01))
    mine, state = p0.clone(), (torch.zeros(4, 5), torch.zeros(4, 5))
    for step, g in enumerate(grads):
        ref.grad = g.clone()
        opt.step()
        _update(mine, g, state, 0.1, 0.01, cfg, step)
    assert torch.allclose(mine, ref.detach(), atol=1e-6) and not torch.allclose(mine, p0)


def test_vmap_ensemble_matches_the_loop():
    # Same update rule, BatchNorm stats included, whether the models train stacked under vmap or one by one.
    # (SGD: AdamW divides near-zero gradients by their own size, which amplifies float reordering.)
    x, y = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    cfg = EnsembleConfig(steps=2, batch_size=8, optimizer="sgd")
    runs = []
    for use_vmap in (True, False):
        models = _tiny_resnets(3)
        losses = train_ensemble(models, [(x, y)] * 3, cfg, [0.1, 0.05, 0.02], [5e-2, 0.0, 1e-2], [0, 1, 2],
                                [0.0, 1.0, 0.5], use_vmap=use_vmap)
        runs.append((losses, [m.state_dict() for m in models]))
    (lv, sv), (ll, sl) = runs
    assert torch.allclose(torch.tensor(lv), torch.tensor(ll), atol=1e-4)
    for a, b in zip(sv, sl):
        for k in a:  # float reordering only (measured <= 1e-6 here); a wrong update or BN stat is >= 1e-2
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3, rtol=1e-3), k
    assert sv[0]["bn1.running_mean"].abs().max() > 1e-3  # BatchNorm statistics did update under vmap
    fresh = _tiny_resnets(1)[0].state_dict()
    assert not torch.allclose(sv[0]["conv1.weight"], fresh["conv1.weight"])  # it did train


def test_weight_cosines_and_bn_reestimate():
    m = _tiny_resnets(1)[0]
    init = {k: v.clone() for k, v in m.state_dict().items()}
    cos = weight_cosines(m, init)
    assert [r["name"] for r in layer_records(m)] == list(cos) and all(abs(c - 1) < 1e-9 for c in cos.values())
    with torch.no_grad():
        m.fc.weight.mul_(-2)
    assert weight_cosines(m, init)["fc"] == pytest.approx(-1.0)
    x = torch.randn(64, 1, 32, 32) * 3 + 1
    reestimate_batchnorm(m, x, batch_size=64)
    assert m.bn1.running_mean.abs().max() > 0.01 and m.bn1.momentum == 0.1 and m.training


def test_one_run_records_accuracy_and_cosine_to_init(one_run):
    out, index = one_run
    assert sorted(p.name for p in out.parent.iterdir()) == ["zoo"]  # staging folder removed
    specs = tiny_structured_specs()
    assert index["models"] == [s.model_id for s in specs] and "shard" not in index
    for spec, rec in zip(specs, index["records"]):
        meta = json.loads((out / f"{spec.model_id}.json").read_text())
        cos = [layer["cos_init"] for layer in meta["layers"]]
        assert all(-1 <= c <= 1 for c in cos) and min(cos) < 1
        assert rec["cos_init_median"] == meta["cos_init_median"] == pytest.approx(statistics.median(cos), abs=1e-5)
        assert 0 <= rec["test_accuracy"] <= 1 and rec["split"] == spec.split and rec["optimizer"] == spec.optimizer
        state = load_file(out / f"{spec.model_id}.safetensors")
        model = zoo.create_zoo_model(spec.arch, spec.model_kwargs)
        model.load_state_dict(state, strict=True)


def test_shards_merge_into_the_one_run(one_run, tmp_path, one_thread):
    out, index = one_run
    specs = tiny_structured_specs()
    parts = [shard_specs(specs, k, 2) for k in range(2)]
    assert sorted(s.model_id for p in parts for s in p) == sorted(s.model_id for s in specs) and all(parts)
    main = _script().main
    for k in range(2):
        assert main(["--preset", "tiny_structured", "--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}"),
                     "--no-progress"]) == 0
        assert json.loads((tmp_path / f"s{k}" / "zoo.json").read_text())["shard"] == {"index": k, "count": 2}
    # merge takes the shards in any order
    assert main(["--merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "zoo.json").read_text())
    assert _files(tmp_path / "m") == _files(out)  # model files byte for byte
    assert merged["models"] == index["models"] and merged["fingerprint"] == index["fingerprint"]
    assert _untimed(merged["records"]) == _untimed(index["records"])
    assert merged["total_params"] == index["total_params"]


def test_merge_refuses_incomplete_or_foreign_shards(tmp_path, capsys, one_thread):
    specs = tiny_structured_specs()
    build_zoo_resumable(tmp_path / "s0", specs, (0, 2), progress=False)
    with pytest.raises(ZooError, match="exactly once"):
        merge_zoo_shards(tmp_path / "m", [tmp_path / "s0"])
    with pytest.raises(ZooError, match="exactly once"):
        merge_zoo_shards(tmp_path / "m", [tmp_path / "s0", tmp_path / "s0"])
    other = [dataclasses.replace(s, lr=s.lr * 2) for s in specs]
    build_zoo_resumable(tmp_path / "o1", other, (1, 2), progress=False)
    with pytest.raises(ZooError, match="different builds"):
        merge_zoo_shards(tmp_path / "m", [tmp_path / "s0", tmp_path / "o1"])
    main = _script().main
    for argv, msg in ((["--merge", str(tmp_path / "nope")], "not a zoo"),
                      (["--preset", "tiny_structured", "--shard", "2/2"], "0 <= K < N"),
                      (["--preset", "tiny_structured", "--shard", "a"], "K/N"),
                      (["--merge", str(tmp_path / "s0"), "--shard", "0/2"], "takes no")):
        assert run_cli(lambda: main(argv + ["--out", str(tmp_path / "m"), "--no-progress"])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not (tmp_path / "m").exists()


def test_a_stopped_build_resumes_where_it_stopped(one_run, tmp_path, monkeypatch, one_thread):
    out, index = one_run
    specs = tiny_structured_specs()
    real = zoo._train_structured
    trained = []

    def stop_at_third(spec, out_dir, device):
        if len(trained) == 2:
            raise KeyboardInterrupt  # as if the job were killed
        trained.append(spec.model_id)
        return real(spec, out_dir, device)

    monkeypatch.setattr(zoo, "_train_structured", stop_at_third)
    target = tmp_path / "zoo"
    with pytest.raises(KeyboardInterrupt):
        build_zoo_resumable(target, specs, progress=False, name="tiny_structured")
    assert not target.exists()
    staged = sorted(p.name for p in staging_dir(target).iterdir())
    assert f"{trained[0]}.safetensors" in staged and f"{trained[1]}.cost.json" in staged
    # a half-written model of the interrupted run: its cost mark is missing, so it trains again
    (staging_dir(target) / f"{specs[2].model_id}.json").write_text("{")
    trained.clear()
    monkeypatch.setattr(zoo, "_train_structured", lambda s, o, d: trained.append(s.model_id) or real(s, o, d))
    again = build_zoo_resumable(target, specs, progress=False, name="tiny_structured")
    assert trained == [s.model_id for s in specs[2:]] and again["build"]["resumed_specs"] == 2
    assert _files(target) == _files(out) and _untimed(again["records"]) == _untimed(index["records"])
    assert not staging_dir(target).exists()


def test_staging_of_another_build_is_refused(tmp_path):
    specs = tiny_structured_specs()
    st = staging_dir(tmp_path / "zoo")
    st.mkdir()
    (st / "mine.txt").write_text("x")
    with pytest.raises(ZooError, match="move it away"):
        build_zoo_resumable(tmp_path / "zoo", specs, progress=False)
    (st / "mine.txt").unlink()
    (st / zoo.BUILD_FILE).write_text(json.dumps({"format": "weightgen-zoo-build", "fingerprint": "x",
                                                  "shard": [0, 1], "preset": "other"}))
    with pytest.raises(ZooError, match="another build"):
        build_zoo_resumable(tmp_path / "zoo", specs, progress=False)
    with pytest.raises(ZooError, match="optimizer"):
        build_zoo_resumable(tmp_path / "z2", [dataclasses.replace(specs[0], optimizer="lbfgs")], progress=False)


def test_structured_preset_spans_families_tasks_and_splits():
    specs = structured_zoo_specs()
    zoo._check_specs(specs)
    fams = {s.family for s in specs}
    assert {"resnet", "vit"} <= fams and len(fams) >= 3
    assert {s.task for s in specs} == set(zoo.STRUCTURED_TASKS)
    assert {s.optimizer for s in specs} == {"sgd", "adamw"} and len({s.weight_decay for s in specs}) > 2
    assert len({s.lr for s in specs}) > 2 and {s.aug > 0 for s in specs} == {True, False}
    held = [s for s in specs if s.split == "heldout"]
    assert held and {s.family for s in held} == fams
    # a depthwise CNN is among the families
    dw = False
    for s in {(s.arch, json.dumps(s.model_kwargs, sort_keys=True)) for s in specs}:
        with torch.device("meta"):
            m = zoo.create_zoo_model(s[0], json.loads(s[1]))
        dw |= any(r["groups"] > 1 and r["shape"][1] == 1 for r in layer_records(m))
    assert dw
    # shards cover every spec once
    parts = [shard_specs(specs, k, 3) for k in range(3)]
    assert sorted(s.model_id for p in parts for s in p) == sorted(s.model_id for s in specs)
