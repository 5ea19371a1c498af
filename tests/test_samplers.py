"""Oracles O2, O7-O11, O13, O21 (samplers with analytic denoisers) and sampler contracts."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffdistill.diffusion import param, schedules
from diffdistill.errors import DiffdistillError
from diffdistill.samplers import (
    default_sigmas,
    make_noise,
    nfe,
    sample,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_onestep,
)
from diffdistill.teachers.analytic import Gaussian, GaussianMixture, ring8

f64 = torch.float64
ONE = torch.ones(1, 1, dtype=f64)  # unit "noise" -> starts the ODE at x = sigma_max (O9 starts at x = 80)


def test_o2_karras_grid():
    expected = [80, 57.5860, 40.7856, 28.3746, 19.3525, 12.9101, 8.40094, 5.31519, 3.25682, 1.92334, 1.08817,
                0.585348, 0.296442, 0.139516, 0.0599473, 0.0229345, 0.00752802, 0.002, 0]
    s = schedules.karras_sigmas(18)
    assert torch.allclose(s, torch.tensor(expected, dtype=f64), rtol=1e-5)
    assert nfe("heun", s) == 35


O9 = {2: (0.30510550, 40.150), 4: (0.56254706, 2.47358203), 8: (0.63154112, 0.99438007),
      18: (0.72144507, 0.82564604), 64: (0.77614200, 0.79993960), 256: (0.79259099, 0.79822007)}


@pytest.mark.parametrize("n", sorted(O9))
def test_o9_gaussian_edm_grid(n):
    g = Gaussian([0.3], 0.5)
    s = schedules.karras_sigmas(n)
    euler, heun = O9[n]
    assert sample_euler(g, ONE, s).item() == pytest.approx(euler, abs=1e-7)
    assert sample_heun(g, ONE, s).item() == pytest.approx(heun, rel=1e-4 if n == 2 else 1e-7)


def exact_gaussian_ode(x, mu, var, sa, sb):
    return mu + math.sqrt((var + sb**2) / (var + sa**2)) * (x - mu)


def test_convergence_orders():
    """Euler (= DDIM) error ~ 1/N, Heun ~ 1/N^2 against the exact ODE solution 0.79811527."""
    g = Gaussian([0.3], 0.5)
    exact = exact_gaussian_ode(80.0, 0.3, 0.25, 80.0, 0.0)
    assert exact == pytest.approx(0.79811527, abs=1e-8)
    ns = np.array([64, 128, 256, 512])
    err_e = [abs(sample_euler(g, ONE, schedules.karras_sigmas(n)).item() - exact) for n in ns]
    err_h = [abs(sample_heun(g, ONE, schedules.karras_sigmas(n)).item() - exact) for n in ns]
    slope_e = np.polyfit(np.log(ns), np.log(err_e), 1)[0]
    slope_h = np.polyfit(np.log(ns), np.log(err_h), 1)[0]
    assert -1.15 < slope_e < -0.85, slope_e
    assert -2.2 < slope_h < -1.8, slope_h


def test_o9_single_step_ratio():
    g = Gaussian([0.0], 0.5)
    x = sample_euler(g, ONE, torch.tensor([2.0, 0.5, 0.0], dtype=f64))  # noise 1 -> x = 2 at sigma 2
    # Two Euler steps: 2 -> 0.5 has ratio (s^2 + a b)/(s^2 + a^2), then 0.5 -> 0 gives D.
    ratio = (0.25 + 2 * 0.5) / (0.25 + 4)
    assert ratio == pytest.approx(0.2941176, abs=1e-7)
    assert x.item() == pytest.approx(2 * ratio * 0.25 / (0.25 + 0.25), abs=1e-12)


def test_o7_ddim_vp_form_equals_edm_euler():
    """A DDIM step in VP (alpha, sigma) form equals the EDM Euler step on xbar = z/alpha, times alpha_s."""
    g = Gaussian([0.3], 0.5)
    lam_t, lam_s = torch.tensor(-1.3, dtype=f64), torch.tensor(0.9, dtype=f64)
    a_t, s_t = param.alpha_sigma_from_logsnr(lam_t)
    a_s, s_s = param.alpha_sigma_from_logsnr(lam_s)
    z_t = torch.tensor([[0.7]], dtype=f64)
    sig_t, sig_s = s_t / a_t, s_s / a_s
    x_hat = g(z_t / a_t, sig_t)
    z_s = a_s * x_hat + s_s * param.eps_from_x(z_t, x_hat, a_t, s_t)
    xbar_s = sample_euler(g, z_t / a_t / sig_t, torch.stack([sig_t, sig_s, torch.tensor(0.0, dtype=f64)])[:2]
                          .tolist() + [0.0]) if False else None
    # One Euler step in EDM space, written out through the sampler (grid sig_t -> sig_s, then stop).
    steps = []
    sample_euler(g, z_t / a_t / sig_t, torch.stack([sig_t, sig_s, torch.zeros((), dtype=f64)]),
                 callback=lambda i, x, d: steps.append(x.clone()))
    xbar_s = steps[0]
    assert torch.allclose(a_s * xbar_s, z_s, atol=1e-15, rtol=0)


def test_o8_dirac_data_is_exact():
    dirac = GaussianMixture([[0.42, -1.0]], [1e-9], [1.0])
    noise = torch.randn(16, 2, dtype=f64)
    for sigmas in (torch.tensor([80.0, 0.0]), schedules.karras_sigmas(3), schedules.karras_sigmas(7)):
        for fn in (sample_euler, sample_onestep, sample_dpmpp_2m):
            out = fn(dirac, noise, sigmas)
            assert torch.allclose(out, torch.tensor([0.42, -1.0], dtype=f64).expand(16, 2), atol=1e-9)


def test_onestep_is_one_call_in_the_denoisers_dtype():
    """sample_onestep is exactly D(s0 z; s0), computed in the denoiser's dtype (no float64 state, no casts)."""
    from diffdistill.diffusion.denoiser import Precond, PrecondConfig
    from diffdistill.networks.mlp import MLP

    torch.manual_seed(0)
    den = Precond(MLP(dim=2, hidden=16, num_layers=2), (2,), 0, PrecondConfig(kind="edm")).eval()
    z = torch.randn(5, 2)
    with torch.no_grad():
        expected = den(z * 2.5, 2.5)
    out = sample_onestep(den, z, torch.tensor([2.5, 0.0], dtype=f64))
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert sample_onestep(den.double(), z.double(), [2.5, 0.0]).dtype == f64
    with pytest.raises(ValueError, match="end in 0"):
        sample_onestep(den, z, [2.5, 1.0])


@pytest.mark.parametrize("n,expected,trunc", [(1, 0.0, False), (2, 0.5, False), (4, 0.728553, False),
                                               (1000, 0.998767, False), (2, 0.500023, True), (4, 0.728567, True)])
def test_o10_cosine_ddim_on_unit_gaussian(n, expected, trunc):
    lo, hi = (-20.0, 20.0) if trunc else (-math.inf, math.inf)
    sig = schedules.cosine_sigmas(n, lo, hi)
    g = Gaussian([0.0], 1.0, sigma_max=float(sig[0]))
    # VP start z_1 ~ N(0, 1) is xbar = z_1/alpha_1 = z_1 sqrt(1+sigma^2): pass the unit noise scaled accordingly.
    z1 = torch.ones(1, 1, dtype=f64)
    x = sample_euler(g, z1 * (1 + sig[0] ** 2).sqrt() / sig[0], sig)
    assert x.item() == pytest.approx(expected, abs=2e-6)


def _ddpm_ddim_ratio(seq):
    abar = schedules.ddpm_alphas_cumprod(1000)
    sig = schedules.sigmas_from_alphas_cumprod(abar)
    idx = sorted(set(seq), reverse=True)  # equal consecutive indices are identity steps
    grid = torch.cat([sig[idx], torch.zeros(1, dtype=f64)])
    g = Gaussian([0.0], 1.0, sigma_max=float(grid[0]))
    z_T = torch.ones(1, 1, dtype=f64)
    return sample_euler(g, z_T * (1 + grid[0] ** 2).sqrt() / grid[0], grid).item()


def test_o11_ddpm_linear_ddim():
    assert _ddpm_ddim_ratio(list(range(1000))) == pytest.approx(0.998124, abs=1e-6)
    quad = [int(v) for v in np.linspace(0, np.sqrt(800), 100) ** 2]  # the Denoising Student schedule
    assert len(set(quad)) == 96
    assert _ddpm_ddim_ratio(quad) == pytest.approx(0.985765, abs=1e-6)


def test_o13_mixture_denoiser_and_tweedie():
    m = GaussianMixture([[-1.0], [1.5]], [0.05**0.5, 0.2**0.5], [0.3, 0.7])
    for x, s, expected in ((0.2, 0.5, 0.51330442), (1.0, 2.0, 0.94834553), (-0.7, 0.1, -0.74999596)):
        xt = torch.tensor([[x]], dtype=f64, requires_grad=True)
        d = m(xt, s)
        assert d.item() == pytest.approx(expected, abs=1e-8)
        (grad,) = torch.autograd.grad(m.log_prob(xt, s).sum(), xt)
        assert (xt + s**2 * grad).item() == pytest.approx(d.item(), abs=1e-10)


def test_o21_heun_256_matches_ode_reference_on_mixture():
    m = GaussianMixture([[-1.0], [1.5]], [0.05**0.5, 0.2**0.5], [0.3, 0.7])
    starts = [-0.9, 0.1, 0.6, 1.7]

    def rhs(sig, x):
        d = m(torch.tensor([[x[0]]], dtype=f64), sig).item()
        return [(x[0] - d) / sig]

    ref = [solve_ivp(rhs, (80.0, 0.002), [80.0 * s], rtol=1e-10, atol=1e-12).y[0, -1] for s in starts]
    # Finish 0.002 -> 0 exactly like the sampler's last Euler step.
    ref = [m(torch.tensor([[r]], dtype=f64), 0.002).item() for r in ref]
    out = sample_heun(m, torch.tensor(starts, dtype=f64)[:, None], schedules.karras_sigmas(256))
    assert np.abs(out[:, 0].numpy() - np.array(ref)).max() < 1e-3


def test_ring8_heun_keeps_mixture_weights():
    """Heun with the exact toy:ring8 denoiser at 256 steps: each mode's share within a binomial 99.9% interval."""
    r = ring8()
    n = 10_000
    x = sample(r, n, steps=256, sampler="heun", batch=n)
    counts = torch.bincount(r.mode_of(x), minlength=8).double()
    half_width = 3.3 * math.sqrt(n * (1 / 8) * (7 / 8))
    assert ((counts - n / 8).abs() < half_width).all(), counts
    # Per-mode spread ~ std 0.1.
    k = r.mode_of(x)
    resid = x.double() - r.means[k]
    assert resid.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("sampler", ["heun", "euler", "ddpm", "dpmpp_2m", "onestep", "multistep"])
def test_batch_size_independence(sampler):
    r = ring8()
    seeds = [3, 14, 15, 92, 65, 35]
    a = sample(r, seeds, steps=6, sampler=sampler, batch=6)
    b = torch.cat([sample(r, seeds[:1], steps=6, sampler=sampler, batch=1),
                   sample(r, seeds[1:], steps=6, sampler=sampler, batch=2)])
    assert torch.equal(a, b)
    c = sample(r, [14], steps=6, sampler=sampler)
    assert torch.equal(c[0], a[1])


def test_ddpm_ancestral_marginals_and_dpmpp_accuracy():
    g = Gaussian([0.3], 0.5)
    # first order: needs many steps; one noise stream for the whole batch (per-seed streams cost 150 s here)
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample_ddpm(g, noise, schedules.karras_sigmas(1000), generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(0.3, abs=0.02) and x.std().item() == pytest.approx(0.5, rel=0.02)
    exact = exact_gaussian_ode(80.0, 0.3, 0.25, 80.0, 0.0)
    errs = [abs(sample_dpmpp_2m(g, ONE, schedules.karras_sigmas(n)).item() - exact) for n in (16, 32, 64)]
    assert errs[0] / errs[1] > 3.5 and errs[1] / errs[2] > 3.5 and errs[2] < 2.5e-3  # second order


def test_multistep_consistency_with_exact_consistency_function():
    """With the exact consistency function of Gaussian data, multistep sampling keeps the data distribution."""
    mu, var, eps = 0.3, 0.25, 0.002

    class F(GaussianMixture):
        def denoise(self, x, sigma, cond):
            s = param.append_dims(sigma, x)
            return mu + ((var + eps**2) / (var + s**2)).sqrt() * (x - mu)

    f = F([[mu]], [var**0.5], [1.0])
    x = sample(f, 20_000, sampler="multistep", sigmas=[80.0, 2.0, 0.5, 0.0], batch=20_000)
    assert x.mean().item() == pytest.approx(mu, abs=0.01) and x.var().item() == pytest.approx(var, rel=0.03)


def test_make_noise_per_seed_and_default_sigmas():
    a = make_noise([5, 6], (3,))
    assert torch.equal(a[1], make_noise([6], (3,))[0])
    r = ring8()
    assert default_sigmas(r, 1, "onestep").tolist() == [80.0, 0.0]
    assert len(default_sigmas(r, 18)) == 19


def test_bad_sigma_grids():
    g = Gaussian([0.0], 1.0)
    noise = torch.randn(2, 1)
    with pytest.raises(ValueError, match="end in 0"):
        sample_euler(g, noise, torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="descending"):
        sample_euler(g, noise, torch.tensor([1.0, 2.0, 0.0]))
    for grid in ([2.0, 2.0, 0.0], [2.0, float("nan"), 0.0], [float("nan"), 1.0, 0.0]):   # ties and NaN too
        with pytest.raises(ValueError, match="descending"):
            sample_euler(g, noise, torch.tensor(grid))
    with pytest.raises(ValueError, match="end in 0"):
        sample_euler(g, noise, torch.tensor([2.0, float("nan")]))
    with pytest.raises(ValueError):
        sample_heun(g, noise, torch.tensor([0.0]))
    with pytest.raises(Exception, match="unknown sampler"):
        sample(g, 2, sampler="rk45")


def test_sample_starts_vp_discrete_teachers_from_their_prior():
    """A discrete-time (VP) teacher's ODE samplers start from z sqrt(1 + sigma_0^2), diffusers' z_T ~ N(0, I);
    EDM-style denoisers from sigma_0 z; one-step students from sigma_0 z (what they were trained on)."""
    from diffdistill.diffusion.schedules import ddpm_alphas_cumprod, sigmas_from_alphas_cumprod

    vp = Gaussian([0.3], 0.5)
    vp.discrete_sigmas = sigmas_from_alphas_cumprod(ddpm_alphas_cumprod())
    edm = Gaussian([0.3], 0.5)
    grid = [2.0, 0.5, 0.0]
    noise = make_noise([0, 1], (1,)).double()
    for sampler, fn in (("euler", sample_euler), ("heun", sample_heun), ("dpmpp_2m", sample_dpmpp_2m)):
        got = sample(vp, [0, 1], sampler=sampler, sigmas=grid)
        torch.testing.assert_close(got, fn(vp, noise * math.sqrt(5) / 2, grid).float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(sample(edm, [0, 1], sampler=sampler, sigmas=grid), fn(edm, noise, grid).float())
    one = sample(vp, [0, 1], sampler="onestep", sigmas=[2.0, 0.0])
    torch.testing.assert_close(one, vp(2.0 * noise.float(), 2.0))
    with pytest.raises(DiffdistillError, match="clip_denoised"):
        sample_euler(edm, noise, grid, clip_denoised=-1.0)


def test_sample_follows_a_loaded_snapshots_recipe_unless_told_otherwise(tmp_path):
    """`sample(student, n)` on a loaded one-step snapshot takes one step at its recipe's sigma, D(sigma z; sigma),
    not Heun with 18 steps; explicit arguments win; a denoiser without a recipe keeps Heun-18."""
    import diffdistill as dd
    from diffdistill.io import save_snapshot

    save_snapshot(tmp_path / "one", ring8(), {"sampler": "onestep", "sigmas": [2.5, 0.0]})
    student = dd.load_teacher(tmp_path / "one")
    z = make_noise(range(6), (2,))
    want = ring8()(2.5 * z.double(), 2.5).float()                 # the closed form of one step at sigma 2.5
    torch.testing.assert_close(sample(student, 6), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat(list(dd.iter_samples(student, 6, batch=4))), want, rtol=0, atol=1e-6)
    heun18 = sample(ring8(), 6)                                    # no recipe: Heun, 18 steps, as before
    assert torch.equal(heun18, sample(ring8(), 6, sampler="heun", steps=18))
    assert torch.equal(sample(student, 6, steps=18), heun18)        # any explicit argument wins
    assert torch.equal(sample(student, 6, sampler="heun"), heun18)
    assert dd.load_snapshot(tmp_path / "one")[0].sampling == {"sampler": "onestep", "sigmas": [2.5, 0.0]}
    # A recipe's options reach the sampler, and the caller's options win over them.
    save_snapshot(tmp_path / "churn", ring8(), {"sampler": "heun", "steps": 4, "s_churn": 5.0})
    churned = dd.load_teacher(tmp_path / "churn")
    assert torch.equal(sample(churned, 6), sample(ring8(), 6, sampler="heun", steps=4, s_churn=5.0))
    assert torch.equal(sample(churned, 6, s_churn=0.0), sample(ring8(), 6, sampler="heun", steps=4))
    assert not torch.equal(sample(churned, 6), sample(ring8(), 6, sampler="heun", steps=4))


def test_dynamic_thresholding_is_diffusers_threshold_sample():
    """x0_clipper(dynamic_threshold=p, threshold_max=m) is diffusers' `_threshold_sample` (Imagen): per sample
    s = clamp(quantile_p |x0|, 1, m), x0 -> clamp(x0, -s, s) / s; in the Euler/DDPM steps it replaces the clamp."""
    from diffdistill.samplers.ode import x0_clipper

    g = torch.Generator().manual_seed(0)
    d = torch.randn(4, 3, 5, 5, generator=g, dtype=f64) * torch.tensor([0.3, 1.5, 3.0, 10.0], dtype=f64)[:, None,
                                                                                                        None, None]
    for p, top in ((0.995, 1.0), (0.9, 2.0), (0.5, 4.0), (1.0, 1.5)):
        flat = d.reshape(4, -1)
        s = torch.quantile(flat.abs(), p, dim=1).clamp(1, top)[:, None]    # diffusers' formula, written out
        want = (torch.clamp(flat, -s, s) / s).reshape(d.shape)
        torch.testing.assert_close(x0_clipper(dynamic_threshold=p, threshold_max=top)(d), want, rtol=0, atol=1e-15)
    assert torch.equal(x0_clipper(0.5)(d), d.clamp(-0.5, 0.5)) and x0_clipper(False) is None
    for bad in (dict(dynamic_threshold=0.0), dict(dynamic_threshold=1.1), dict(dynamic_threshold=0.9,
                                                                               threshold_max=0.5)):
        with pytest.raises(DiffdistillError, match="dynamic thresholding"):
            x0_clipper(**bad)
    with pytest.raises(DiffdistillError, match="clip_denoised"):
        x0_clipper(math.inf)
    # One Euler step from sigma 2 to 0 returns the thresholded D of the analytic Gaussian; Euler to 0.5 keeps
    # eps from the thresholded x-hat unless clip_keeps_eps.
    gauss = Gaussian([0.3] * 8, 0.5)
    noise = torch.randn(3, 8, generator=g, dtype=f64) * 4
    clip = x0_clipper(dynamic_threshold=0.75, threshold_max=3.0)
    x0 = 2.0 * noise
    den = gauss(x0, 2.0)
    assert (den.abs() > 1).any()
    torch.testing.assert_close(sample_euler(gauss, noise, [2.0, 0.0], dynamic_threshold=0.75, threshold_max=3.0),
                               clip(den))
    for keeps, base in ((False, clip(den)), (True, den)):
        first = []
        sample_euler(gauss, noise, [2.0, 0.5, 0.0], dynamic_threshold=0.75, threshold_max=3.0, clip_keeps_eps=keeps,
                     callback=lambda i, x, d, first=first: first.append(x) if i == 0 else None)
        torch.testing.assert_close(first[0], clip(den) + 0.25 * (x0 - base))
    torch.testing.assert_close(sample_ddpm(gauss, noise, [2.0, 0.0], dynamic_threshold=0.75, threshold_max=3.0),
                               clip(den))


def test_single_steps_at_per_sample_levels_have_their_order_and_are_the_samplers_steps():
    """`heun_step` / `ddim_step` at per-sample levels [B] (as PD's target and CD's teacher step take them): against
    the exact ODE map of Gaussian data the local error of one step shrinks as h^3 (Heun) and h^2 (Euler) with the
    step h, DDIM is the Euler step, and each row is bit-for-bit the first step of `sample_heun` / `sample_euler`."""
    from diffdistill.samplers.ode import ddim_step, heun_step

    g = Gaussian([0.3], 0.5)
    sigma = torch.full((4,), 2.0, dtype=f64)
    sigma_next = sigma - torch.tensor([0.1, 0.05, 0.025, 0.0125], dtype=f64)
    x = torch.full((4, 1), 1.7, dtype=f64)
    exact = torch.tensor([[exact_gaussian_ode(1.7, 0.3, 0.25, 2.0, float(sn))] for sn in sigma_next], dtype=f64)
    heun, denoised = heun_step(g, x, sigma, sigma_next)
    euler, _ = heun_step(g, x, sigma, sigma_next, second_order=False)
    ddim = ddim_step(x, denoised, sigma, sigma_next)
    assert torch.equal(denoised, g(x, sigma))
    torch.testing.assert_close(ddim, euler, rtol=0, atol=1e-14)
    err_heun, err_euler = (heun - exact).abs().flatten(), (euler - exact).abs().flatten()
    assert all(7.5 < r < 9 for r in (err_heun[:-1] / err_heun[1:]).tolist()), err_heun
    assert all(3.8 < r < 4.2 for r in (err_euler[:-1] / err_euler[1:]).tolist()), err_euler
    for i in range(4):   # x / sigma * sigma = x exactly (sigma = 2), so each sampler starts from x[i]
        grid = torch.stack([sigma[i], sigma_next[i], torch.zeros((), dtype=f64)])
        first = []
        sample_heun(g, x[i:i + 1] / 2, grid, callback=lambda k, y, d, out=first: out.append(y.clone()))
        sample_euler(g, x[i:i + 1] / 2, grid, callback=lambda k, y, d, out=first: out.append(y.clone()))
        assert torch.equal(first[0], heun[i:i + 1]) and torch.equal(first[2], ddim[i:i + 1])
    # The clipped-DDIM form: the clipped x-hat D_c, stepped with the eps of the unclipped D (diffusers' default).
    clipped = denoised.clamp(-0.1, 0.1)
    r = (sigma_next / sigma)[:, None]
    torch.testing.assert_close(ddim_step(x, clipped, sigma, sigma_next, eps_denoised=denoised),
                               clipped + r * (x - denoised), rtol=0, atol=0)


def test_sample_batches_follows_the_recipe_labels_by_seed_and_clamps():
    """`sample_batches` (what eval and evaluation during training measure): a recipe's sampler and grid (the
    denoiser's own when the recipe is empty), class labels seed % label_dim, batches of `batch`, clamping only when
    asked. Data: one point per class, (1.5 c - 1.5) in every coordinate, which Euler and one step reach exactly."""
    from diffdistill.diffusion.denoiser import Denoiser
    from diffdistill.samplers import sample_batches, seed_labels

    class ClassDirac(Denoiser):
        calls = 0

        def denoise(self, x, sigma, cond):
            ClassDirac.calls += 1
            return (1.5 * cond.argmax(1).to(x.dtype) - 1.5)[:, None].expand_as(x)

    den = ClassDirac((2,), label_dim=3)
    seeds = [4, 5, 6, 7, 8]
    want = torch.tensor([1.5 * (s % 3) - 1.5 for s in seeds])[:, None].expand(5, 2)
    batches = list(sample_batches(den, seeds, {"sampler": "euler", "steps": 3}, batch=2))
    assert [len(b) for b in batches] == [2, 2, 1] and ClassDirac.calls == 3 * 3
    torch.testing.assert_close(torch.cat(batches), want, rtol=0, atol=1e-6)
    assert torch.equal(seed_labels(seeds, 3), torch.tensor([1, 2, 0, 1, 2]))
    assert seed_labels(seeds, 0) is None
    assert torch.equal(torch.cat(batches), sample(den, seeds, sampler="euler", steps=3, cond=seed_labels(seeds, 3)))
    clamped = torch.cat(list(sample_batches(den, seeds, {"sampler": "euler", "steps": 3}, clamp=True)))
    torch.testing.assert_close(clamped, want.clamp(-1, 1), rtol=0, atol=1e-6)
    # no recipe: the denoiser's own (one step, one call per batch)
    den.sampling = {"sampler": "onestep", "sigmas": [2.0, 0.0]}
    ClassDirac.calls = 0
    torch.testing.assert_close(torch.cat(list(sample_batches(den, seeds, {}, batch=5))), want, rtol=0, atol=1e-6)
    assert ClassDirac.calls == 1
