"""Oracles O1, O3-O6, O12 of algorithms.md §7 A: parameterisations and schedules."""

import math

import pytest
import torch

from diffdistill.diffusion import param, schedules
from diffdistill.diffusion.denoiser import Precond, PrecondConfig

f64 = torch.float64


def t(v):
    return torch.tensor(v, dtype=f64)


def test_o1_edm_preconditioning():
    c_skip, c_out, c_in, _ = param.edm_scalings(t(0.0))
    assert (c_skip.item(), c_out.item(), c_in.item()) == (1.0, 0.0, 2.0)
    c = param.edm_scalings(t(0.5))
    assert torch.allclose(torch.stack(c), t([0.5, 0.3535534, 1.4142136, -0.1732868]), atol=1e-7)
    c = param.edm_scalings(t(80.0))
    assert torch.allclose(torch.stack(c), t([3.906097e-5, 0.4999902, 0.01249976, 1.0955067]), rtol=1e-6)
    sigma = torch.logspace(-3, 2, 50, dtype=f64)
    _, c_out, _, _ = param.edm_scalings(sigma)
    assert torch.allclose(param.edm_loss_weight(sigma) * c_out**2, torch.ones_like(sigma))


def test_o1_unit_variance_of_input_and_target():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(400_000, generator=g, dtype=f64) * 0.5  # data std = sigma_data
    for sigma in (0.05, 0.5, 5.0):
        n = torch.randn(y.shape, generator=g, dtype=f64) * sigma
        c_skip, c_out, c_in, _ = param.edm_scalings(t(sigma))
        assert abs((c_in * (y + n)).var().item() - 1) < 0.01
        assert abs(((y - c_skip * (y + n)) / c_out).var().item() - 1) < 0.01


def test_o1_boundary_scalings():
    c_skip, c_out, _, _ = param.boundary_scalings(t(0.002), 0.5, 0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out, _, _ = param.boundary_scalings(t(80.0))
    assert abs(c_skip.item() - 3.9e-5) < 1e-6 and abs(c_out.item() - 0.49998) < 1e-5


def test_o3_vp():
    assert schedules.vp_sigma(t(1.0)).item() == pytest.approx(152.16697, rel=1e-7)
    assert schedules.vp_sigma(t(1e-5)).item() == pytest.approx(0.0010005, rel=1e-4)
    assert schedules.vp_sigma(t(1e-3)).item() == pytest.approx(0.0104860, rel=1e-5)
    ts = torch.linspace(1e-5, 1, 100, dtype=f64)
    assert torch.allclose(schedules.vp_sigma_inv(schedules.vp_sigma(ts)), ts, atol=1e-12)


def test_o4_ddpm_linear():
    abar = schedules.ddpm_alphas_cumprod(1000)
    assert abar[0].item() == pytest.approx(0.9999, abs=1e-12)
    assert abar[999].item() == pytest.approx(4.035830e-5, rel=1e-6)
    assert abar[999].sqrt().item() == pytest.approx(0.00635282, rel=1e-6)
    s = schedules.sigmas_from_alphas_cumprod(abar)
    assert s[0].item() == pytest.approx(0.0100005, rel=1e-6) and s[999].item() == pytest.approx(157.407, rel=1e-5)


def test_o5_cosine_logsnr():
    lam = schedules.cosine_logsnr(t([0.0, 0.5, 1.0]))
    assert torch.allclose(lam, t([20.0, 0.0, -20.0]), atol=1e-9)
    alpha1, _ = param.alpha_sigma_from_logsnr(lam[2])
    _, sigma0 = param.alpha_sigma_from_logsnr(lam[0])
    assert alpha1.item() == pytest.approx(4.539993e-5, rel=1e-6) == sigma0.item()
    ts = torch.linspace(0.01, 0.99, 33, dtype=f64)
    alpha, _ = param.alpha_sigma_from_logsnr(schedules.cosine_logsnr(ts, -math.inf, math.inf))
    assert torch.allclose(alpha, torch.cos(math.pi * ts / 2), atol=1e-12)
    # The network's 'inv_cos' time input recovers t (§3.1).
    sig = param.edm_from_logsnr(schedules.cosine_logsnr(ts, -math.inf, math.inf))
    assert torch.allclose(param.cosine_time_from_edm(sig), ts, atol=1e-12)


def test_o6_conversions():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 1000, generator=g, dtype=f64)
    alpha, sigma = param.alpha_sigma_from_logsnr(t(0.7))
    z = alpha * x + sigma * eps
    assert torch.allclose(param.x_from_eps(z, param.eps_from_x(z, x, alpha, sigma), alpha, sigma), x, atol=1e-14)
    v = param.v_from_x_eps(x, eps, alpha, sigma)
    assert torch.allclose(param.x_from_v(z, v, alpha, sigma), x, atol=1e-14)
    assert torch.allclose(param.eps_from_v(z, v, alpha, sigma), eps, atol=1e-14)
    assert torch.allclose(param.x_from_both(z, x, eps, alpha, sigma), x, atol=1e-14)
    # Error identities at fixed z: eps_mse/x_mse = SNR, v_mse/x_mse = 1 + SNR.
    x_hat = x + 0.1 * torch.randn(1000, generator=g, dtype=f64)
    eps_hat, v_hat = param.eps_from_x(z, x_hat, alpha, sigma), None
    v_hat = param.v_from_x_eps(x_hat, eps_hat, alpha, sigma)
    snr = (alpha**2 / sigma**2).item()
    assert snr == pytest.approx(2.01375, rel=1e-5)
    x_mse = ((x - x_hat) ** 2).mean()
    assert ((eps - eps_hat) ** 2).mean() / x_mse == pytest.approx(snr, rel=1e-10)
    assert ((v - v_hat) ** 2).mean() / x_mse == pytest.approx(1 + snr, rel=1e-10)
    # VP <-> EDM.
    s = torch.logspace(-2, 2, 9, dtype=f64)
    a, st = param.vp_from_edm(s)
    assert torch.allclose(a**2 + st**2, torch.ones_like(s)) and torch.allclose(param.edm_from_vp(a, st), s)
    assert torch.allclose(param.edm_from_logsnr(param.logsnr_from_edm(s)), s)
    # EDM weight in x-space = 1/sigma^2 + 1/sd^2 ("karras" weighting).
    assert torch.allclose(param.edm_loss_weight(s), 1 / s**2 + 1 / 0.25)


def test_o12_edm_loss_of_ideal_denoiser():
    """E[lambda(sigma) (D*(y+n) - y)^2] per element = 1 at every sigma for N(0, sd^2) data with sd = 0.5."""
    for s_data, expected in ((0.5, 1.0), (0.3, 0.6789)):
        g = torch.Generator().manual_seed(2)
        n = 400_000
        sigma = schedules.sample_lognormal_sigma(n, generator=g).double()
        y = torch.randn(n, generator=g, dtype=f64) * s_data
        x = y + sigma * torch.randn(n, generator=g, dtype=f64)
        denoised = s_data**2 / (s_data**2 + sigma**2) * x
        loss = (param.edm_loss_weight(sigma) * (denoised - y) ** 2).mean().item()
        assert loss == pytest.approx(expected, rel=0.02)
    # At a fixed sigma the expectation is exactly 1 for sd = 0.5: lambda * sd^2 sigma^2/(sd^2+sigma^2) = 1.
    for sig in (0.01, 1.0, 50.0):
        assert (param.edm_loss_weight(t(sig)) * 0.25 * sig**2 / (0.25 + sig**2)).item() == pytest.approx(1.0)


def test_lognormal_quantiles():
    s = schedules.sample_lognormal_sigma(200_000, generator=torch.Generator().manual_seed(0))
    q = torch.quantile(s, torch.tensor([0.01, 0.5, 0.99]))
    assert torch.allclose(q, torch.tensor([0.0185, 0.301, 4.91]), rtol=0.03)


class _Zero(torch.nn.Module):
    def forward(self, x, c_noise, labels):
        return torch.zeros_like(x)

    def config(self):
        return {"name": "zero"}


@pytest.mark.parametrize("kind", ["edm", "boundary", "ve", "vp"])
def test_precond_zero_backbone_returns_c_skip_x(kind):
    den = Precond(_Zero(), (3,), config=PrecondConfig(kind=kind))
    x = torch.randn(4, 3)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    out = den(x, sigma)
    scal = {"edm": param.edm_scalings, "boundary": param.boundary_scalings, "ve": param.ve_scalings,
            "vp": param.vp_scalings}[kind]
    assert torch.allclose(out, scal(sigma[:, None])[0] * x)


def test_precond_cosine_predictions_agree():
    """A cosine-kind backbone that predicts the exact eps, v or x gives the same x0 (alpha_1 = 0 is harmless
    for x and v)."""
    x0 = torch.randn(5, 4, dtype=f64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 10.0, 2e4], dtype=f64)
    xs = x0 + sigma[:, None] * torch.randn(5, 4, dtype=f64)
    alpha, s_t = param.vp_from_edm(sigma[:, None])
    z = alpha * xs
    eps = param.eps_from_x(z, x0, alpha, s_t)

    class Oracle(torch.nn.Module):
        def __init__(self, pred):
            super().__init__()
            self.pred = pred

        def forward(self, z_in, t_in, labels):
            assert torch.allclose(z_in, z)
            if self.pred == "both":
                return torch.cat([x0, eps], dim=1)
            return {"x": x0, "eps": eps, "v": param.v_from_x_eps(x0, eps, alpha, s_t)}[self.pred]

    for pred in ("x", "v", "eps", "both"):
        den = Precond(Oracle(pred), (4,), config=PrecondConfig(kind="cosine", prediction=pred))
        tol = 1e-3 if pred == "eps" else 1e-10  # eps -> x divides by alpha ~ 5e-5 at the top level
        assert torch.allclose(den(xs, sigma), x0, atol=tol)


def test_denoiser_rejects_wrong_shapes():
    den = Precond(_Zero(), (3,))
    with pytest.raises(ValueError, match="shape"):
        den(torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        den(torch.randn(2, 3), torch.ones(3))


def test_snr_weightings_turn_the_x_mse_into_the_eps_and_v_mse():
    """At a fixed z_t = alpha x + sigma_t eps: ||eps - eps_hat||^2 = SNR ||x - x_hat||^2 and ||v - v_hat||^2 =
    (1 + SNR) ||x - x_hat||^2 (Salimans & Ho 2022, §4), with SNR = 1/sigma^2 at EDM level sigma. So on the x-MSE
    'snr' gives the eps-MSE, 'snr+1' (= 'v_mse') the v-MSE, 'snr_trunc' max(x-MSE, eps-MSE), 'constant' the x-MSE."""
    from diffdistill.errors import DiffdistillError

    g = torch.Generator().manual_seed(0)
    sigma = torch.logspace(-2, 2, 9, dtype=f64)
    alpha, sigma_t = (v[:, None] for v in param.vp_from_edm(sigma))
    x, eps = torch.randn(9, 5, generator=g, dtype=f64), torch.randn(9, 5, generator=g, dtype=f64)
    z = alpha * x + sigma_t * eps
    x_hat = x + 0.1 * torch.randn(9, 5, generator=g, dtype=f64)
    eps_hat = param.eps_from_x(z, x_hat, alpha, sigma_t)
    v, v_hat = param.v_from_x_eps(x, eps, alpha, sigma_t), param.v_from_x_eps(x_hat, eps_hat, alpha, sigma_t)
    x_mse, eps_mse, v_mse = (((a - b) ** 2).mean(1) for a, b in ((x, x_hat), (eps, eps_hat), (v, v_hat)))
    expected = {"snr": eps_mse, "snr+1": v_mse, "v_mse": v_mse, "snr_trunc": torch.maximum(x_mse, eps_mse),
                "constant": x_mse}
    for weighting, want in expected.items():
        torch.testing.assert_close(param.snr_weight(sigma, weighting) * x_mse, want, rtol=1e-9, atol=0)
    assert param.snr_weight(sigma.float()).dtype == f64              # float64 whatever the levels' dtype
    torch.testing.assert_close(param.snr_weight(t([0.1, 1.0, 3.0])), t([100.0, 1.0, 1.0]))   # default snr_trunc
    with pytest.raises(DiffdistillError, match="unknown weighting 'p2'"):
        param.snr_weight(sigma, "p2")
