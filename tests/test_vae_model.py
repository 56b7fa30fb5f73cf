import json
import math

import pytest
import torch

from weightgen.vae.model import VAEConfig, WeightVAE, kl_weight
from weightgen.vae.store import VAE_FORMAT_VERSION, fit_scale_model, load_vae, predict_scale, save_vae
from weightgen.vae.tokenize import COND_DIM, TOKEN_SIZE



def _small(**kw):
    return VAEConfig(**{"hidden": 64, "layers": 2, "latent_dim": 8, **kw})


def _structured_tokens(n=512, seed=0):
    """Tokens on a 4-D manifold whose mean depends on the condition: easy to compress."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, TOKEN_SIZE, generator=g)
    cond = torch.rand(n, COND_DIM, generator=g)
    z = torch.randn(n, 4, generator=g)
    x = z @ basis / 2 + cond[:, :1] * torch.linspace(-1, 1, TOKEN_SIZE)
    mask = torch.ones(n, TOKEN_SIZE, dtype=torch.bool)
    mask[::3, 50:] = False  # some padded tokens
    return x * mask, mask, cond


def test_shapes_and_determinism():
    torch.manual_seed(0)
    vae = WeightVAE(_small())
    x, mask, cond = _structured_tokens(10)
    mu, logvar = vae.encode(x, cond)
    assert mu.shape == logvar.shape == (10, 8)
    assert vae.decode(mu, cond).shape == (10, TOKEN_SIZE)
    x_hat, mu2, _ = vae(x, cond, generator=torch.Generator().manual_seed(1))
    assert x_hat.shape == (10, TOKEN_SIZE) and torch.equal(mu, mu2)
    s1 = vae.sample(cond, generator=torch.Generator().manual_seed(3))
    s2 = vae.sample(cond, generator=torch.Generator().manual_seed(3))
    s3 = vae.sample(cond, generator=torch.Generator().manual_seed(4))
    assert s1.shape == (10, TOKEN_SIZE) and torch.equal(s1, s2) and not torch.equal(s1, s3)
    cold = vae.sample(cond, generator=torch.Generator().manual_seed(3), temperature=0.0)
    assert torch.allclose(cold, vae.decode(torch.zeros(10, 8), cond))
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), WeightVAE(_small()).state_dict().values()))


def test_default_model_is_small():
    n = sum(p.numel() for p in WeightVAE(VAEConfig()).parameters())
    assert n * 4 < 20 * 2**20


def test_kl_warmup():
    c = VAEConfig(beta=0.01, warmup_steps=100)
    assert kl_weight(c, 0) == 0 and math.isclose(kl_weight(c, 50), 0.005) and kl_weight(c, 1000) == 0.01
    assert kl_weight(VAEConfig(beta=0.01, warmup_steps=0), 0) == 0.01


def test_loss_masks_padding():
    torch.manual_seed(0)
    vae = WeightVAE(_small())
    x, mask, cond = _structured_tokens(16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = vae.loss(x, mask, cond, beta=0.0, generator=g())
    b = vae.loss(x + 100.0 * (~mask), mask, cond, beta=0.0, generator=g())  # garbage under the mask
    assert set(a) >= {"loss", "recon", "kl"}
    assert torch.isclose(a["recon"], ((a["x_hat"] - x)[mask] ** 2).mean())
    assert b["recon"].isfinite() and a["kl"] >= 0


def test_training_reduces_loss():
    torch.manual_seed(0)
    vae = WeightVAE(_small())
    x, mask, cond = _structured_tokens()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(100):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        out = vae.loss(x[idx], mask[idx], cond[idx], beta=1e-3 * min(1.0, step / 50), generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["recon"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


# ---- store ------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = WeightVAE(_small()).eval()
    out = save_vae(vae, tmp_path / "vae", extra={"zoo": "fake", "scale_model": {"coef": [1.0]}})
    assert sorted(p.name for p in out.iterdir()) == [".weightgen.json", "vae.json", "vae.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir cleaned up
    loaded, meta = load_vae(out)
    assert not loaded.training
    assert meta["format_version"] == VAE_FORMAT_VERSION and meta["zoo"] == "fake"
    assert meta["config"]["hidden"] == 64 and "torch_version" in meta
    x, _, cond = _structured_tokens(7)
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(x, cond)[0], cond), loaded.decode(loaded.encode(x, cond)[0], cond))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(vae.sample(cond, generator=g()), loaded.sample(cond, generator=g()))

    with pytest.raises(ValueError, match="already exists"):  # a WeightgenError
        save_vae(vae, out)
    torch.manual_seed(1)
    other = WeightVAE(_small(latent_dim=4))
    save_vae(other, out, overwrite=True)
    assert load_vae(out)[0].config.latent_dim == 4


def test_load_errors(tmp_path):
    vae = WeightVAE(_small())
    with pytest.raises(ValueError, match="not found"):
        load_vae(tmp_path / "nope")
    d = save_vae(vae, tmp_path / "v")
    meta = json.loads((d / "vae.json").read_text())

    bad = save_vae(vae, tmp_path / "trunc")
    data = (bad / "vae.safetensors").read_bytes()
    (bad / "vae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_vae(bad)

    (d / "vae.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version"):
        load_vae(d)

    (d / "vae.json").write_text(json.dumps({**meta, "config": {**meta["config"], "hidden": 32}}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_vae(d)

    (d / "vae.safetensors").unlink()
    with pytest.raises(ValueError, match="missing vae.safetensors"):
        load_vae(d)


def test_scale_model():
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(200):
        kind = ["linear", "conv", "dwconv"][i % 3]
        fan_out = int(torch.randint(8, 512, (1,), generator=g))
        k = 3 if kind != "linear" else 1
        cin = 1 if kind == "dwconv" else int(torch.randint(8, 512, (1,), generator=g))
        shape = (fan_out, cin) if kind == "linear" else (fan_out, cin, k, k)
        depth = float(torch.rand(1, generator=g))
        fan_in = math.prod(shape[1:])
        rms = fan_in**-0.5 * math.exp(0.3 * depth + (0.2 if kind == "dwconv" else 0.0))
        rms *= math.exp(0.02 * float(torch.randn(1, generator=g)))
        records.append((kind, shape, depth, rms))
    model = fit_scale_model(records)
    assert json.loads(json.dumps(model)) == model
    assert model["residual_std"] < 0.05
    for kind, shape, depth, rms in records[:20]:
        assert abs(math.log(predict_scale(model, kind, shape, depth) / rms)) < 0.1
    # extrapolates sensibly to an unseen shape
    want = (4096 * 9) ** -0.5 * math.exp(0.15)
    assert abs(math.log(predict_scale(model, "conv", (256, 4096, 3, 3), 0.5) / want)) < 0.2
    with pytest.raises(ValueError, match="at least one record with a positive, finite rms"):
        fit_scale_model([("linear", (4, 4), 0.0, 0.0)])
