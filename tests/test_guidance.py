"""Classifier-free guidance wrapper: against the score-space definition (Ho & Salimans 2022, Eq. 6) on an exact
class-conditional Gaussian teacher, plus batching, special scales and config/snapshot round trips."""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill.diffusion.denoiser import Denoiser
from diffdistill.errors import DiffdistillError
from diffdistill.io import build_denoiser, load_snapshot, register_builder, save_snapshot
from diffdistill.teachers import CFGDenoiser, GaussianMixture, load_teacher

MEANS = [[-1.0, 0.5], [1.5, 0.0], [0.0, -2.0]]
STD = 0.4


class ClassGaussians(Denoiser):
    """Exact denoiser of x | c ~ N(mu_c, s^2 I), c uniform; all-zero labels: the exact mixture denoiser."""

    def __init__(self, means=MEANS, std=STD):
        means = torch.as_tensor(means, dtype=torch.float64)
        super().__init__(means.shape[1:], label_dim=means.shape[0])
        self.mix = GaussianMixture(means, [std] * len(means))
        self.register_buffer("means", means)
        self.std = std
        self.calls = []

    def denoise(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        s2, sig2 = self.std**2, sigma.double()[:, None] ** 2
        mu = cond.double() @ self.means                       # the class mean (rows with a label)
        d_cond = mu + s2 / (s2 + sig2) * (x.double() - mu)    # Gaussian posterior mean (algorithms.md §7 B)
        d_uncond = self.mix(x.double(), sigma.double())
        return torch.where(cond.sum(1, keepdim=True) > 0, d_cond, d_uncond).to(x.dtype)

    def log_prob(self, x, sigma, label):
        var = self.std**2 + sigma**2
        return -0.5 * ((x - self.means[label]) ** 2).sum(1) / var - x.shape[1] / 2 * math.log(2 * math.pi * var)

    def config(self):
        return dict(type="test_class_gaussians", means=self.means.tolist(), std=self.std)


register_builder("test_class_gaussians")(lambda cfg: ClassGaussians(cfg["means"], cfg["std"]))


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * 2, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0, 7.5])
@pytest.mark.parametrize("sigma", [0.1, 1.0, 5.0])
def test_cfg_is_guided_score(scale, sigma):
    """D_cfg = x + sigma^2 [(1 - w) grad log p_sigma(x) + w grad log p_sigma(x | c)] (Tweedie on the guided score)."""
    inner = ClassGaussians()
    x, labels = _data()
    x = x.requires_grad_(True)
    log_u = inner.mix.log_prob(x, sigma).sum()
    log_c = inner.log_prob(x, sigma, labels).sum()
    grad_u, = torch.autograd.grad(log_u, x)
    grad_c, = torch.autograd.grad(log_c, x)
    expected = x.detach() + sigma**2 * ((1 - scale) * grad_u + scale * grad_c)
    out = CFGDenoiser(inner, scale)(x.detach(), sigma, labels)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_batched_once_and_special_scales():
    inner = ClassGaussians()
    x, labels = _data(5)
    cond = inner(x, 0.7, labels)
    uncond = inner(x, 0.7, None)
    inner.calls.clear()
    out = CFGDenoiser(inner, 3.0)(x, 0.7, labels)
    assert inner.calls == [10]                              # one call on [x; x]
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), rtol=1e-12, atol=1e-12)
    assert (out - cond).abs().max() > 1e-2                  # guidance changes the result
    inner.calls.clear()
    assert torch.equal(CFGDenoiser(inner, 1.0)(x, 0.7, labels), cond)     # w = 1: the conditional denoiser
    assert inner.calls == [5]
    torch.testing.assert_close(CFGDenoiser(inner, 0.0)(x, 0.7, labels), uncond, rtol=1e-12, atol=1e-12)
    # an unconditional row in the batch stays unconditional at any scale
    mixed = torch.nn.functional.one_hot(labels, 3).double()
    mixed[0] = 0
    out = CFGDenoiser(inner, 4.0)(x, 0.7, mixed)
    torch.testing.assert_close(out[0], uncond[0], rtol=1e-12, atol=1e-12)
    # per-sample sigmas are kept with their rows
    sig = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    per_row = torch.cat([CFGDenoiser(inner, 2.0)(x[i:i + 1], sig[i], labels[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(CFGDenoiser(inner, 2.0)(x, sig, labels), per_row, rtol=1e-12, atol=1e-12)


def test_attributes_and_errors():
    inner = ClassGaussians()
    cfg = CFGDenoiser(inner, 2.0)
    assert (cfg.shape, cfg.label_dim, cfg.sigma_min, cfg.sigma_max) == (inner.shape, 3, inner.sigma_min,
                                                                       inner.sigma_max)
    with pytest.raises(DiffdistillError, match="class-conditional"):
        CFGDenoiser(load_teacher("toy:ring8"), 2.0)
    with pytest.raises(DiffdistillError, match="needs 'denoiser' and 'scale'"):
        build_denoiser(dict(type="cfg", scale=2.0))


def test_config_round_trip(tmp_path):
    den = CFGDenoiser(ClassGaussians(), 2.5)
    cfg = den.config()
    assert cfg["type"] == "cfg" and cfg["scale"] == 2.5 and cfg["denoiser"]["type"] == "test_class_gaussians"
    again = build_denoiser(cfg)
    x, labels = _data()
    assert isinstance(again, CFGDenoiser) and again.scale == 2.5
    torch.testing.assert_close(again(x, 0.3, labels), den(x, 0.3, labels), rtol=0, atol=0)


def test_snapshot_round_trip_with_weights(tmp_path):
    """A guided diffusers UNet (weights under 'denoiser.model.*') survives save_snapshot / load_snapshot."""
    diffusers = pytest.importorskip("diffusers")
    from diffdistill.teachers import load_diffusers

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4, num_class_embeds=4)
        unet.save_pretrained(tmp_path / "m" / "unet")
        diffusers.DDIMScheduler().save_pretrained(tmp_path / "m" / "scheduler")
        den = CFGDenoiser(load_diffusers(tmp_path / "m", null_class=3), 3.0)
        assert den.label_dim == 3 and den.discrete_sigmas is den.denoiser.discrete_sigmas
        save_snapshot(tmp_path / "snap", den, {"sampler": "euler", "steps": 4})
        again, sampling, _ = load_snapshot(tmp_path / "snap")
        x = torch.randn(2, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(again(x, 1.5, torch.tensor([0, 2])), den(x, 1.5, torch.tensor([0, 2])))
        assert sampling["steps"] == 4
    finally:
        torch.set_num_threads(n_threads)
