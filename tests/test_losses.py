"""The one EDM loss (diffusion/losses.py), used by teacher training and the fake scores of DI, SiD and DMD2:
the O12 oracle with the denoiser's own sigma_data, its reductions, its draw of EDM's levels and its dtype rule."""

import math

import pytest
import torch

from diffdistill.diffusion import param
from diffdistill.diffusion.losses import edm_loss
from diffdistill.teachers.analytic import Gaussian


def test_o12_with_the_denoisers_own_sigma_data_is_one_per_element():
    """Data N(0, s^2 I) and its exact denoiser, sd = s (the Gaussian's sigma_data, the default): the expected
    weighted loss is 1 per element at every level, here for s = 0.3 over EDM's lognormal levels."""
    torch.manual_seed(0)
    d, n = 4, 40_000
    gauss = Gaussian(torch.zeros(d), 0.3)
    assert gauss.sigma_data == pytest.approx(0.3)
    x = 0.3 * torch.randn(n, d, dtype=torch.float64)
    per = edm_loss(gauss, x, reduction="none")
    assert per.shape == (n,)
    se = float(per.std()) / math.sqrt(n)
    assert abs(float(per.mean()) - d) < 4 * se


def test_reductions_and_the_draw_of_edms_levels():
    """sigma=None draws ln sigma ~ N(p_mean, p_std^2) first, then the noise; 'mean' is the mean of 'none'."""
    gauss = Gaussian(torch.zeros(3), 0.5)
    x = torch.randn(8, 3)
    torch.manual_seed(1)
    per = edm_loss(gauss, x, sigma_data=0.5, reduction="none", p_mean=0.4, p_std=0.7)
    torch.manual_seed(1)
    sigma = (torch.randn(8) * 0.7 + 0.4).exp()
    s = sigma[:, None]
    y = x + s * torch.randn_like(x)
    manual = (param.edm_loss_weight(s, 0.5) * (gauss(y, sigma) - x) ** 2).sum(1)
    torch.testing.assert_close(per, manual, rtol=1e-6, atol=0)
    torch.manual_seed(1)
    assert torch.equal(edm_loss(gauss, x, sigma_data=0.5, p_mean=0.4, p_std=0.7), per.mean())
    with pytest.raises(ValueError, match="reduction"):
        edm_loss(gauss, x, sigma, reduction="sum")


def test_the_error_is_formed_in_at_least_float32():
    """A bf16 network output on bf16 samples: the error D - x is widened to float32 before it is squared."""
    class Half(torch.nn.Module):
        sigma_data = 0.5

        def forward(self, x, sigma, cond=None):
            return (0.9 * x).to(torch.bfloat16)

    x = torch.randn(4, 16).to(torch.bfloat16)
    sigma = torch.full((4,), 0.7)
    torch.manual_seed(2)
    loss = edm_loss(Half(), x, sigma, reduction="none")
    torch.manual_seed(2)
    s = param.append_dims(sigma, x)
    denoised = (0.9 * (x + s * torch.randn_like(x))).to(torch.bfloat16)
    want = (param.edm_loss_weight(s, 0.5).float() * (denoised.float() - x.float()) ** 2).sum(1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
