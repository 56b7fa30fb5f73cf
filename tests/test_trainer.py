"""train_task's speed options (precision, channels_last) and the checks on TrainConfig."""
from __future__ import annotations

import pytest
import timm
import torch

from weightgen.adapt.trainer import TrainConfig, predict, shard_loader, train_task
from weightgen.data import get_task, to_model_input
from weightgen.io import WeightgenError


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits", 0, max_train=256, max_eval=96, image_size=16)
    return {s: (to_model_input(task.split(s)[0], 1, 16), task.split(s)[1]) for s in ("train", "val", "test")}


def model(seed: int = 0, arch: str = "test_resnet"):
    torch.manual_seed(seed)
    kwargs = {"img_size": 16, "patch_size": 4} if arch == "test_vit" else {}
    return timm.create_model(arch, in_chans=1, num_classes=10, **kwargs)


def test_16_mixed_on_the_cpu_is_refused_with_the_flag_to_use():
    with pytest.raises(WeightgenError) as err:
        TrainConfig(precision="16-mixed", accelerator="cpu").validate()
    assert "bf16-mixed" in err.value.cli and "--precision 16-mixed" in err.value.cli


@pytest.mark.parametrize("config, flag", [({"precision": "fp8"}, "--precision fp8"),
                                          ({"strategy": "ddp_spawn"}, "--strategy ddp_spawn"),
                                          ({"devices": 3, "batch_size": 64}, "--batch-size 64")])
def test_bad_options_are_refused_naming_the_flag(config, flag):
    with pytest.raises(WeightgenError) as err:
        TrainConfig(**config).validate()
    assert flag in err.value.cli


@pytest.mark.parametrize("options", [{"precision": "bf16-mixed"}, {"channels_last": True}])
def test_bf16_mixed_and_channels_last_train_on_the_cpu_and_leave_a_plain_float32_model(digits, options):
    m = model()
    before = predict(m, digits["val"][0])
    # oneDNN off: on some CPUs (this AMD EPYC, torch 2.14) its bf16 conv backward gives NaN gradients
    # now and then, in a plain PyTorch loop too; PyTorch's own CPU kernels do not
    with torch.backends.mkldnn.flags(enabled=False):
        summary = train_task(m, digits["train"], digits["val"],
                             TrainConfig(epochs=4, batch_size=32, lr=1e-2, **options))
    assert summary["steps"] == 32 and summary["rank"] == 0
    # trained: the best validation accuracy is well above chance (0.1; measured 0.5), and the model moved
    assert summary["val_acc"] > 0.3 and not torch.equal(predict(m, digits["val"][0]), before)
    # the weights stay float32 (autocast computes in bf16, stores nothing in it) and contiguous,
    # which safetensors needs to write a task file
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in m.parameters())


def test_channels_last_changes_only_the_memory_format(digits):
    """Same seed, same data: channels_last gives the accuracy of the default format (within float noise)."""
    accs = []
    for channels_last in (False, True):
        m = model()
        train_task(m, digits["train"], digits["val"], TrainConfig(epochs=2, batch_size=32, lr=1e-2,
                                                                  channels_last=channels_last), seed=3)
        accs.append((predict(m, digits["test"][0]).argmax(1) == digits["test"][1]).float().mean().item())
    assert abs(accs[0] - accs[1]) <= 0.05, accs


def test_shard_loader_splits_the_global_batch_and_covers_the_split_once():
    data = torch.utils.data.TensorDataset(torch.arange(10).float(), torch.arange(10))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    seen = []
    for rank in range(2):
        shard = shard_loader(loader, 2, rank, train=True, seed=5)
        batches = [y for _, y in shard]
        assert [len(b) for b in batches] == [2, 2, 1]  # 4 per step over 2 devices; 5 samples each
        seen += torch.cat(batches).tolist()
    assert sorted(seen) == list(range(10))
    val = [torch.cat([y for _, y in shard_loader(loader, 3, r, train=False)]).tolist() for r in range(3)]
    assert val == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]  # padded in order: the mask drops the repeats
