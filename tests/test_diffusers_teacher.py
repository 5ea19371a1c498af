"""diffusers teachers: the discrete-timestep adapter against diffusers' own schedulers (reference parity).

A tiny random UNet2DModel is saved with `save_pretrained` next to a scheduler config; diffdistill's samplers on
the matching EDM sigma grid must reproduce diffusers' DDIM and DDPM loops (algorithms.md §1.5: DDIM in VP form
is an Euler step on x = z/alpha followed by multiplication by alpha).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffdistill.diffusion.schedules import ddpm_alphas_cumprod, sigmas_from_alphas_cumprod
from diffdistill.errors import DiffdistillError
from diffdistill.io import build_denoiser
from diffdistill.samplers import sample_ddpm, sample_euler
from diffdistill.teachers import (
    DiffusersDenoiser,
    ddim_timesteps,
    discrete_sigmas_for,
    load_diffusers,
    load_teacher,
    snapshot_from_diffusers,
)
from diffdistill.teachers.discrete import DiscreteVPDenoiser, sigma_to_timestep

diffusers = pytest.importorskip("diffusers")
SHAPE = (3, 8, 8)


def tiny_unet(num_class_embeds=None, out_channels=3, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds).eval()


def model_dir(path, unet, scheduler, layout="pipeline", safe=True):
    """Write a diffusers model directory: pipeline layout (unet/, scheduler/) or a bare model folder."""
    unet_dir = path / "unet" if layout == "pipeline" else path
    unet.save_pretrained(unet_dir, safe_serialization=safe)
    scheduler.save_pretrained(path / "scheduler" if layout == "pipeline" else path)
    return path


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def ddim(**kw):
    return diffusers.DDIMScheduler(clip_sample=False, **kw)


def vp_noise_to_edm(z_T, sigma_T):
    """diffusers starts from z_T = N(0, I) at abar_T; in EDM x_T = z_T / alpha_T = z_T sqrt(1 + sigma_T^2).
    The samplers start from sigmas[0] * noise, so the unit noise they need is z_T sqrt(1 + sigma_T^2) / sigma_T."""
    return z_T.double() * math.sqrt(1 + sigma_T**2) / sigma_T


# --------------------------------------------------------------------------------------------------
# Schedule, timesteps and the sigma <-> timestep rules


def test_table_matches_diffusers_and_oracle_o4():
    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        sched = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=1e-4 if kind == "linear" else 8.5e-4,
                                        beta_end=0.02 if kind == "linear" else 0.012)
        ours = ddpm_alphas_cumprod(1000, sched.config.beta_start, sched.config.beta_end, kind)
        torch.testing.assert_close(ours.float(), sched.alphas_cumprod, rtol=2e-5, atol=1e-7)
    den = DiscreteVPDenoiser(torch.nn.Identity(), (1,), ddpm_alphas_cumprod())
    s = den.discrete_sigmas
    assert s.dtype == torch.float64 and bool((s[1:] > s[:-1]).all())
    # O4: abar_0 = 0.9999, abar_999 = 4.035830e-5 -> EDM sigmas 0.0100005 and 157.407
    assert s[0].item() == pytest.approx(0.0100005, rel=1e-5)
    assert s[-1].item() == pytest.approx(157.407, rel=1e-5)
    assert den.sigma_min == s[0].item() and den.sigma_max == s[-1].item()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_match_diffusers(spacing):
    for n in (1, 3, 7, 10, 50, 1000):
        for offset in (0, 1):
            for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
                sched = cls(timestep_spacing=spacing, steps_offset=offset)
                sched.set_timesteps(n)
                assert ddim_timesteps(n, spacing, 1000, offset) == sched.timesteps.tolist()
    with pytest.raises(DiffdistillError):
        ddim_timesteps(5, "uniform")


def test_sigma_to_timestep_rules():
    log_sigmas = sigmas_from_alphas_cumprod(ddpm_alphas_cumprod()).log()
    table = log_sigmas.exp()
    idx = torch.tensor([0, 1, 17, 500, 998, 999])
    for rule in ("nearest", "interp"):
        torch.testing.assert_close(sigma_to_timestep(table[idx], log_sigmas, rule), idx.double())
    # halfway in log-sigma between t and t+1: interp gives t + 0.5, nearest one of the two neighbours
    mid = ((log_sigmas[idx[:-1]] + log_sigmas[idx[:-1] + 1]) / 2).exp()
    torch.testing.assert_close(sigma_to_timestep(mid, log_sigmas, "interp"), idx[:-1].double() + 0.5)
    near = sigma_to_timestep(mid * 1.0001, log_sigmas, "nearest")
    assert torch.equal(near, idx[:-1].double() + 1)
    # beyond the table (and sigma = 0): clamped to the ends
    ends = torch.tensor([0.0, 1e-4, 1e3], dtype=torch.float64)
    for rule in ("nearest", "interp"):
        assert sigma_to_timestep(ends, log_sigmas, rule).tolist() == [0.0, 0.0, 999.0]


def test_discrete_sigmas_for():
    den = DiscreteVPDenoiser(torch.nn.Identity(), (1,), ddpm_alphas_cumprod())
    table = den.discrete_sigmas
    grid = discrete_sigmas_for(den, [999, 499, 0])
    assert grid.tolist() == [table[999].item(), table[499].item(), table[0].item(), 0.0]
    # DDIM set_alpha_to_one=False: the last step lands on abar_0 (sigma_0), unless the last timestep is 0
    assert discrete_sigmas_for(den, [901, 1], set_alpha_to_one=False).tolist() == [
        table[901].item(), table[1].item(), table[0].item(), 0.0]
    assert discrete_sigmas_for(den, [900, 0], set_alpha_to_one=False).tolist() == [
        table[900].item(), table[0].item(), 0.0]
    for bad in ([0, 10], [1000], [-1], []):
        with pytest.raises(DiffdistillError):
            discrete_sigmas_for(den, bad)
    with pytest.raises(DiffdistillError, match="discrete"):
        discrete_sigmas_for(load_teacher("toy:ring8"), [10, 0])


class ExactStdNormalEps(torch.nn.Module):
    """The exact eps-predictor for N(0, 1) data: z_t ~ N(0, 1) at every t and E[eps | z_t] = sqrt(1 - abar_t) z_t."""

    def __init__(self, abar):
        super().__init__()
        self.abar = abar

    def forward(self, z, t, cond):
        assert torch.equal(t, t.round()), "the nearest rule feeds integer timesteps"
        return (1 - self.abar[t.long()]).sqrt().to(z)[:, None] * z


def test_oracle_o11_ddim_on_standard_normal():
    """O11: DDPM-linear DDIM on N(0,1): all 1000 steps z_0/z_T = 0.998124; the Denoising-Student quadratic
    100-step schedule from index 800 (duplicates are identity steps): 0.985765."""
    abar = ddpm_alphas_cumprod()
    den = DiscreteVPDenoiser(ExactStdNormalEps(abar), (1,), abar)
    z_T = torch.ones(1, 1, dtype=torch.float64)
    quadratic = sorted({int(v) for v in (torch.linspace(0, math.sqrt(800), 100, dtype=torch.float64) ** 2)},
                       reverse=True)
    assert quadratic[0] == 800 and len(quadratic) == 96
    for timesteps, expected in ((list(range(999, -1, -1)), 0.998124), (quadratic, 0.985765)):
        sigmas = discrete_sigmas_for(den, timesteps)
        out = sample_euler(den, vp_noise_to_edm(z_T, sigmas[0].item()), sigmas)
        assert out.item() == pytest.approx(expected, abs=2e-6)


# --------------------------------------------------------------------------------------------------
# One denoiser call against diffusers' own x0 prediction


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_denoiser_matches_scheduler_x0(tmp_path, unet, prediction):
    den = load_teacher(model_dir(tmp_path, unet, ddim(prediction_type=prediction)))
    assert isinstance(den, DiffusersDenoiser) and not den.training
    assert all(not p.requires_grad for p in den.parameters())
    sched = ddim(prediction_type=prediction)
    sched.set_timesteps(10)
    z = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    for t in (999, 500, 0):
        with torch.no_grad():
            ref = sched.step(unet(z, t).sample, t, z).pred_original_sample
        abar = sched.alphas_cumprod[t].double()
        sigma = ((1 - abar) / abar).sqrt()
        x = z.double() / abar.sqrt()                      # EDM input x = z / alpha_t
        torch.testing.assert_close(den(x, sigma).float(), ref, atol=1e-4, rtol=1e-4)


def test_interp_rule_feeds_fractional_timestep(tmp_path, unet):
    den = load_diffusers(model_dir(tmp_path, unet, ddim()), timestep_rule="interp")
    table = den.discrete_sigmas
    sigma = (table[300].log() * 0.25 + table[301].log() * 0.75).exp()    # t = 300.75 by the interp rule
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    alpha = 1 / math.sqrt(1 + sigma.item() ** 2)
    with torch.no_grad():
        eps = unet((alpha * x).float(), torch.tensor([300.75, 300.75])).sample
        out = den(x, sigma.float())
    torch.testing.assert_close(out, x - sigma.float() * eps, atol=1e-5, rtol=1e-5)
    near = load_diffusers(tmp_path, timestep_rule="nearest")
    with torch.no_grad():
        eps301 = unet((alpha * x).float(), torch.tensor([301.0, 301.0])).sample
        torch.testing.assert_close(near(x, sigma.float()), x - sigma.float() * eps301, atol=1e-5, rtol=1e-5)


def test_class_labels(tmp_path):
    unet = tiny_unet(num_class_embeds=5, seed=3)
    den = load_diffusers(model_dir(tmp_path, unet, ddim()))
    assert den.label_dim == 5
    z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 4, 2])
    t = 250
    abar = den.alphas_cumprod[t]
    sigma, x = ((1 - abar) / abar).sqrt(), z / abar.sqrt().float()
    with torch.no_grad():
        eps = unet(z, t, class_labels=labels).sample
        ref = (z - (1 - abar).sqrt().float() * eps) / abar.sqrt().float()
        torch.testing.assert_close(den(x, sigma.float(), labels), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(den(x, sigma.float(), torch.nn.functional.one_hot(labels, 5).float()), ref,
                                   atol=1e-4, rtol=1e-4)
        with pytest.raises(DiffdistillError, match="null_class"):
            den(x, sigma.float(), torch.zeros(3, 5))
    # with a null class (index 4): 4 labels, zero rows go to index 4, label 3 stays 3
    den4 = load_diffusers(tmp_path, null_class=4)
    assert den4.label_dim == 4
    with torch.no_grad():
        out = den4(x, sigma.float(), torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1.0], [1.0, 0, 0, 0]]))
        ref4 = unet(z, t, class_labels=torch.tensor([4, 3, 0])).sample
    torch.testing.assert_close(out, (z - (1 - abar).sqrt().float() * ref4) / abar.sqrt().float(),
                               atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Whole sampling loops: diffusers' DDIM / DDPM against sample_euler / sample_ddpm


def diffusers_loop(unet, sched, z, n, generator=None, skip=0):
    """diffusers' own loop; `skip` drops the first timesteps (img2img-style start at a lower level)."""
    if isinstance(n, list):
        sched.set_timesteps(timesteps=n)
    else:
        sched.set_timesteps(n)
    with torch.no_grad():
        for t in sched.timesteps[skip:]:
            z = sched.step(unet(z, t).sample, t, z, generator=generator).prev_sample
    return z


@pytest.mark.parametrize("prediction,spacing,offset,skip", [
    ("epsilon", "leading", 1, 0), ("v_prediction", "leading", 0, 0), ("epsilon", "trailing", 0, 0),
    ("v_prediction", "trailing", 0, 0), ("epsilon", "leading", 1, 4)])
def test_ddim_parity(tmp_path, unet, prediction, spacing, offset, skip):
    n = 8
    kw = dict(prediction_type=prediction, timestep_spacing=spacing, steps_offset=offset)
    den = load_teacher(model_dir(tmp_path, unet, ddim(**kw)))
    z_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    # skip=4 starts at t=376 (sigma ~ 1.5), where z_T = alpha x_T differs from x_T by far more than the tolerance
    ref = diffusers_loop(unet, ddim(**kw), z_T, n, skip=skip)
    timesteps = ddim_timesteps(n, spacing, 1000, offset)[skip:]
    sigmas = discrete_sigmas_for(den, timesteps)
    out = sample_euler(den, vp_noise_to_edm(z_T, sigmas[0].item()), sigmas)
    assert out.dtype == torch.float64 and ref.abs().max() > 0.1
    torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-4)   # alpha = 1 at the end: x = z
    # the scheduler's own grid is the same one
    if not skip:
        torch.testing.assert_close(den.default_sigmas(n), sigmas)


def test_ddim_parity_set_alpha_to_one_false(tmp_path, unet):
    n, kw = 5, dict(set_alpha_to_one=False, steps_offset=1)
    den = load_teacher(model_dir(tmp_path, unet, ddim(**kw)))
    z_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    ref = diffusers_loop(unet, ddim(**kw), z_T, n)            # ends at abar_0, not at abar = 1
    sigmas = discrete_sigmas_for(den, ddim_timesteps(n, "leading", 1000, 1), set_alpha_to_one=False)
    states = []
    sample_euler(den, vp_noise_to_edm(z_T, sigmas[0].item()), sigmas, callback=lambda i, x, d: states.append(x))
    sigma_0 = sigmas[-2]
    assert sigma_0 == den.discrete_sigmas[0]
    x_at_sigma0 = states[-2]
    torch.testing.assert_close((x_at_sigma0 / (1 + sigma_0**2).sqrt()).float(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction,spacing", [("epsilon", "leading"), ("v_prediction", "trailing"),
                                                ("epsilon", "custom")])
def test_ddpm_ancestral_parity(tmp_path, unet, prediction, spacing):
    n = 10
    kw = dict(prediction_type=prediction, timestep_spacing="leading" if spacing == "custom" else spacing,
              clip_sample=False)
    den = load_teacher(model_dir(tmp_path, unet, diffusers.DDPMScheduler(**kw)))
    z_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(6))
    # custom timesteps start low (t=420, sigma ~ 2), so the start-noise scaling is checked too
    timesteps = [420, 333, 210, 97, 30, 2] if spacing == "custom" else ddim_timesteps(n, spacing)
    # the same per-step noise stream: one float32 draw of the sample's shape per step that ends above sigma = 0
    ref = diffusers_loop(unet, diffusers.DDPMScheduler(**kw), z_T, timesteps if spacing == "custom" else n,
                         torch.Generator().manual_seed(7))
    sigmas = discrete_sigmas_for(den, timesteps)
    out = sample_ddpm(den, vp_noise_to_edm(z_T, sigmas[0].item()), sigmas, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-4)
    # the noise matters: another stream gives another image
    other = sample_ddpm(den, vp_noise_to_edm(z_T, sigmas[0].item()), sigmas,
                        generator=torch.Generator().manual_seed(8))
    assert (other.float() - ref).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# Persistence: configs, snapshots, .bin weights


def test_snapshot_and_config_round_trip(tmp_path, unet):
    src = model_dir(tmp_path / "model", unet, ddim(prediction_type="v_prediction", timestep_spacing="trailing"))
    den = load_teacher(src)
    cfg = den.config()
    assert cfg["type"] == "diffusers" and cfg["path"] == str(src.resolve())
    assert cfg["scheduler"]["prediction_type"] == "v_prediction"
    json.dumps(cfg)
    snap = snapshot_from_diffusers(src, tmp_path / "snap", steps=4)
    meta = json.loads((snap / "model.json").read_text())
    assert meta["sampling"]["sampler"] == "euler"
    assert meta["sampling"]["sigmas"] == den.default_sigmas(4).tolist()
    again = load_teacher(snap)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9)) * 3
    with torch.no_grad():
        assert torch.equal(again(x, 2.5), den(x, 2.5))
    # a config that only names the directory loads it with its weights
    by_path = build_denoiser(dict(type="diffusers", path=str(src)))
    with torch.no_grad():
        assert torch.equal(by_path(x, 2.5), den(x, 2.5))
    # the embedded config alone rebuilds the architecture (random weights)
    fresh = build_denoiser(cfg)
    assert fresh.config()["unet"] == cfg["unet"] and fresh.shape == den.shape


def test_bin_weights_and_bare_layout(tmp_path, unet):
    a = load_teacher(model_dir(tmp_path / "safe", unet, ddim(), layout="bare"))
    b = load_teacher(model_dir(tmp_path / "bin", unet, ddim(), layout="bare", safe=False))
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(a(x, 1.0), b(x, 1.0))


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written


def _snapshot_fails(src, out, match):
    with pytest.raises(DiffdistillError, match=match):
        snapshot_from_diffusers(src, out)
    assert not out.exists()


def test_bad_model_directories(tmp_path, unet):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    _snapshot_fails(empty, out, "not a diffusers model directory")

    src = model_dir(tmp_path / "sched", unet, ddim())
    cfg_path = src / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "EulerDiscreteScheduler"}))
    _snapshot_fails(src, out, "unsupported scheduler 'EulerDiscreteScheduler'")
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    _snapshot_fails(src, out, "unknown prediction type 'flow'")
    cfg_path.write_text(json.dumps({**cfg, "beta_schedule": "sigmoid"}))
    _snapshot_fails(src, out, "unknown beta schedule")
    cfg_path.write_text("{not json")
    _snapshot_fails(src, out, "scheduler_config.json: malformed scheduler config")

    src = model_dir(tmp_path / "trunc", unet, ddim())
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _snapshot_fails(src, out, "diffusion_pytorch_model.safetensors: not a readable safetensors")

    src = model_dir(tmp_path / "trunc_bin", unet, ddim(), safe=False)
    weights = src / "unet" / "diffusion_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    _snapshot_fails(src, out, "diffusion_pytorch_model.bin: not a readable weights-only")

    src = model_dir(tmp_path / "shapes", unet, ddim())
    ucfg_path = src / "unet" / "config.json"
    ucfg = json.loads(ucfg_path.read_text())
    ucfg_path.write_text(json.dumps({**ucfg, "block_out_channels": [8, 24]}))
    _snapshot_fails(src, out, "has shape .* the config needs")
    ucfg_path.write_text(json.dumps({**ucfg, "_class_name": "UNet2DConditionModel"}))
    _snapshot_fails(src, out, "only UNet2DModel")
    _snapshot_fails(model_dir(tmp_path / "six", tiny_unet(out_channels=6), ddim()), out, "out_channels=6")

    src = model_dir(tmp_path / "noweights", unet, ddim())
    (src / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _snapshot_fails(src, out, "no weights found")

    with pytest.raises(DiffdistillError, match="timestep rule"):
        load_diffusers(model_dir(tmp_path / "ok", unet, ddim()), timestep_rule="round")


def test_learned_variance_output_is_split(tmp_path):
    unet = tiny_unet(out_channels=6, seed=4)
    sched = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
    den = load_teacher(model_dir(tmp_path, unet, sched))
    z = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(10))
    sched.set_timesteps(10)
    with torch.no_grad():
        ref = sched.step(unet(z, 700).sample, 700, z).pred_original_sample
        abar = sched.alphas_cumprod[700].double()
        out = den(z.double() / abar.sqrt(), ((1 - abar) / abar).sqrt())
    torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-4)


def test_zero_terminal_snr_rejected(tmp_path, unet):
    src = model_dir(tmp_path, unet, ddim(rescale_betas_zero_snr=True))
    with pytest.raises(DiffdistillError, match="rescale_betas_zero_snr"):
        load_teacher(src)


# --------------------------------------------------------------------------------------------------
# `sample` and `diffdistill sample` against diffusers' own pipelines, from the same unit noise


def pipeline_images(unet, sched, seeds, n, **kw):
    """DDIMPipeline(eta=0) output in [0, 1] (NCHW); per-seed generators draw exactly `samplers.make_noise`."""
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(batch_size=len(seeds), generator=gens, num_inference_steps=n, eta=0.0, output_type="pt",
                    **kw).images


def as_pipeline_output(x):
    return (x.float() / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("schedule,spacing,prediction", [
    ("squaredcos_cap_v2", "leading", "epsilon"), ("squaredcos_cap_v2", "trailing", "v_prediction"),
    ("linear", "leading", "v_prediction"), ("linear", "trailing", "v_prediction")])
def test_sample_reproduces_ddim_pipeline(tmp_path, unet, schedule, spacing, prediction):
    """`samplers.sample` starts a VP teacher from z_T = u (x_T = u sqrt(1 + sigma_T^2)), as DDIMPipeline does:
    with 4 leading steps of the cosine schedule (t = 750, sigma_T = 2.4) starting from sigma_T u instead was
    8% off. A random eps-UNet's x0 at large sigma (linear: 17 at t = 750, 157 at t = 999) is mostly out of
    [-1, 1], where the pipeline clamps: those cases use v-prediction."""
    from diffdistill.samplers import initial_noise_scale, prior_scale, sample

    kw = dict(beta_schedule=schedule, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
              prediction_type=prediction)
    den = load_teacher(model_dir(tmp_path, unet, ddim(**kw)))
    seeds, n = [3, 11], 4
    ref = pipeline_images(unet, ddim(**kw), seeds, n)
    out = sample(den, seeds, steps=n, sampler="ddim")
    assert 0.2 < float(((ref > 0) & (ref < 1)).double().mean())        # mostly unclamped pixels
    torch.testing.assert_close(as_pipeline_output(out), ref, atol=1e-5, rtol=0)
    s0 = float(den.default_sigmas(n)[0])
    assert initial_noise_scale(den, s0) == pytest.approx(math.sqrt(1 + s0**2))
    assert prior_scale(load_teacher("toy:ring8"), 80.0) == 1.0            # EDM teachers: x_T = sigma_max u


def test_diffdistill_sample_cli_and_converted_snapshot_reproduce_ddim_pipeline(tmp_path, unet):
    """`diffdistill sample npz` on a diffusers folder (--sampler ddim) and on its converted snapshot (whose recipe
    keeps the scheduler's x0 clipping) give DDIMPipeline's images from the same seeds."""
    import numpy as np

    from diffdistill.cli.main import main

    kw = dict(beta_schedule="squaredcos_cap_v2", steps_offset=1)
    src = model_dir(tmp_path / "model", unet, ddim(**kw))
    seeds, n = [0, 1, 2], 4
    assert main(["sample", "npz", str(tmp_path / "a.npz"), str(src), "--seeds", "0-2", "--steps", str(n),
                 "--sampler", "ddim", "--device", "cpu", "--no-progress"]) == 0
    x = torch.from_numpy(np.load(tmp_path / "a.npz")["x"])
    torch.testing.assert_close(as_pipeline_output(x), pipeline_images(unet, ddim(**kw), seeds, n), atol=1e-5,
                               rtol=0)
    # clip_sample=True (diffusers' default): the snapshot's recipe clips x0 and keeps the unclipped eps.
    clipping = tmp_path / "clipping"
    model_dir(clipping, unet, diffusers.DDIMScheduler(clip_sample=True, **kw))
    snap = snapshot_from_diffusers(clipping, tmp_path / "snap", steps=n)
    recipe = json.loads((snap / "model.json").read_text())["sampling"]
    assert recipe["clip_denoised"] is True and recipe["clip_keeps_eps"] is True
    assert main(["sample", "npz", str(tmp_path / "b.npz"), str(snap), "--seeds", "0-2", "--device", "cpu",
                 "--no-progress"]) == 0
    x = torch.from_numpy(np.load(tmp_path / "b.npz")["x"])
    ref = pipeline_images(unet, diffusers.DDIMScheduler(clip_sample=True, **kw), seeds, n)
    torch.testing.assert_close(as_pipeline_output(x), ref, atol=1e-5, rtol=0)
    unclipped = pipeline_images(unet, ddim(**kw), seeds, n)
    assert (ref - unclipped).abs().max() > 1e-2                          # the clipping matters here
    # The raw folder with no --sampler samples as its DDIMPipeline does (clipping included); --sampler ddim keeps
    # the recipe's clipping too (DDIM is the recipe's Euler).
    for i, extra in enumerate(([], ["--sampler", "ddim"])):
        out = tmp_path / f"c{i}.npz"
        assert main(["sample", "npz", str(out), str(clipping), "--seeds", "0-2", "--steps", str(n), "--device",
                     "cpu", "--no-progress", *extra]) == 0
        x = torch.from_numpy(np.load(out)["x"])
        torch.testing.assert_close(as_pipeline_output(x), ref, atol=1e-5, rtol=0)
    # The library's `sample` follows the loaded folder's own recipe too: DDIMPipeline's 50 steps with its clipping;
    # a trainable copy of the teacher does not inherit it.
    from diffdistill.methods.common import copy_denoiser
    from diffdistill.samplers import sample

    teacher = load_teacher(clipping)
    ref50 = pipeline_images(unet, diffusers.DDIMScheduler(clip_sample=True, **kw), seeds, 50)
    # (50 float32 steps in diffusers against our float64 state: 1e-4, the speed benchmark's agreement goal)
    torch.testing.assert_close(as_pipeline_output(sample(teacher, seeds)), ref50, atol=1e-4, rtol=0)
    assert teacher.sampling["sampler"] == "euler" and not hasattr(copy_denoiser(teacher), "sampling")


def test_clip_denoised_is_ddim_with_the_clipped_model_output(tmp_path, unet):
    """clip_denoised=True recomputes eps from the clipped x0 (the official PD sampler's clip_x): diffusers' DDIM
    with use_clipped_model_output=True."""
    from diffdistill.samplers import sample

    kw = dict(clip_sample=True, steps_offset=1)
    den = load_teacher(model_dir(tmp_path, unet, diffusers.DDIMScheduler(**kw)))
    seeds, n = [5, 6], 5
    ref = pipeline_images(unet, diffusers.DDIMScheduler(**kw), seeds, n, use_clipped_model_output=True)
    out = sample(den, seeds, steps=n, sampler="euler", clip_denoised=True)
    torch.testing.assert_close(as_pipeline_output(out), ref, atol=1e-5, rtol=0)
    plain = sample(den, seeds, steps=n, sampler="euler")
    assert (as_pipeline_output(plain) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("variance,clip", [("fixed_large", False), ("fixed_small", True), ("fixed_large", True)])
def test_ddpm_variance_type_and_clip_sample(tmp_path, unet, variance, clip):
    """sample_ddpm draws the scheduler's variance_type noise (fixed_large: beta_t; before: always the posterior
    variance, 0.6% off) and clip_denoised is diffusers' clip_sample, against DDPMScheduler.step."""
    kw = dict(variance_type=variance, clip_sample=clip)
    den = load_teacher(model_dir(tmp_path, unet, diffusers.DDPMScheduler(**kw)))
    assert den.ddpm_variance == variance
    z_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(12))
    n = 10
    ref = diffusers_loop(unet, diffusers.DDPMScheduler(**kw), z_T, n, torch.Generator().manual_seed(13))
    sigmas = den.default_sigmas(n)
    out = sample_ddpm(den, vp_noise_to_edm(z_T, sigmas[0].item()), sigmas, generator=torch.Generator().manual_seed(13),
                      clip_denoised=clip)
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
    other = "fixed_small" if variance == "fixed_large" else "fixed_large"
    wrong = sample_ddpm(den, vp_noise_to_edm(z_T, sigmas[0].item()), sigmas,
                        generator=torch.Generator().manual_seed(13), clip_denoised=clip, variance=other)
    assert (wrong.float() - ref).abs().max() > 1e-3


def test_ddpm_refuses_learned_variances(tmp_path):
    unet = tiny_unet(out_channels=6, seed=4)
    den = load_teacher(model_dir(tmp_path, unet, diffusers.DDPMScheduler(variance_type="learned_range")))
    sigmas = den.default_sigmas(4)
    with pytest.raises(DiffdistillError, match="variance_type 'learned_range' is not supported"):
        sample_ddpm(den, torch.randn(1, *SHAPE), sigmas)
    # deterministic DDIM does not need the variance
    assert torch.isfinite(sample_euler(den, torch.randn(1, *SHAPE), sigmas)).all()


def test_kd_pairs_start_from_the_samplers_prior(tmp_path, unet):
    """The KD pairs' prior_scale is `samplers.prior_scale` (one mechanism): VP-discrete teachers start every ODE
    sampler from z sqrt(1 + sigma_0^2), the Karras-grid samplers too (they started from sigma_0 z); the DDIM
    recipes' value is bit-identical to before, and a directory made with the old heun start is finished with it."""
    from diffdistill.methods import kd_pairs as KP
    from diffdistill.samplers import prior_scale

    den = load_teacher(model_dir(tmp_path / "model", unet, ddim()))
    uniform = KP.teacher_recipe(den, KP.PairsConfig(sampler="ddim-uniform", steps=4))
    s0 = uniform["sigmas"][0]
    assert uniform["prior_scale"] == math.sqrt(1 + s0**2) / s0 == prior_scale(den, s0)
    heun = KP.teacher_recipe(den, KP.PairsConfig(sampler="heun", steps=2))
    s0 = heun["sigmas"][0]
    assert heun["prior_scale"] == prior_scale(den, s0) == pytest.approx(math.sqrt(1 + s0**2) / s0) != 1.0
    cfg = KP.PairsConfig(n_pairs=2, heldout=0, shard_size=1, sampler="heun", steps=2, target_dtype="float16", batch=1)
    root = tmp_path / "pairs"
    KP.generate_pairs(den, root, cfg, progress=False, log=lambda *_: None)
    m = json.loads((root / "pairs.json").read_text())
    m["recipe"]["prior_scale"] = 1.0                        # as the old code wrote it
    (root / "pairs.json").write_text(json.dumps(m))
    (root / "train-00001.safetensors").unlink()
    again = KP.generate_pairs(den, root, cfg, progress=False, log=lambda *_: None)
    assert again["recipe"]["prior_scale"] == 1.0 and (root / "train-00001.safetensors").is_file()
    m["recipe"]["sigmas"][0] += 1.0                         # any other difference is still refused
    (root / "pairs.json").write_text(json.dumps(m))
    with pytest.raises(DiffdistillError, match="other settings"):
        KP.generate_pairs(den, root, cfg, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("sched_kw", [dict(clip_sample=True, clip_sample_range=0.5),
                                      dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)])
def test_clip_sample_range_and_thresholding_reproduce_ddim_pipeline(tmp_path, unet, sched_kw):
    """A scheduler's clip_sample_range and dynamic thresholding (DDIMScheduler._threshold_sample) reach the
    teacher's recipe (before: not read), so `diffdistill sample` on the folder gives DDIMPipeline's images from
    the same seeds; `--clip V` wins over the recipe's treatment: diffusers' clip_sample with range V."""
    import numpy as np

    from diffdistill.cli.main import main

    kw = dict(beta_schedule="squaredcos_cap_v2", steps_offset=1)
    src = model_dir(tmp_path / "model", unet, diffusers.DDIMScheduler(**kw, **sched_kw))
    seeds, n = [0, 1, 2], 4

    def cli(*extra):
        out = tmp_path / "x.npz"
        assert main(["sample", "npz", str(out), str(src), "--seeds", "0-2", "--steps", str(n), "--device", "cpu",
                     "--no-progress", "--force", *extra]) == 0
        return as_pipeline_output(torch.from_numpy(np.load(out)["x"]))

    ref = pipeline_images(unet, diffusers.DDIMScheduler(**kw, **sched_kw), seeds, n)
    torch.testing.assert_close(cli(), ref, atol=1e-5, rtol=0)
    for other in (ddim(**kw), diffusers.DDIMScheduler(clip_sample=True, **kw)):   # the treatment matters here
        assert (pipeline_images(unet, other, seeds, n) - ref).abs().max() > 1e-2
    recipe = load_teacher(src).ddim_recipe(n)
    assert recipe["clip_keeps_eps"] is True and ("dynamic_threshold" in recipe) == ("thresholding" in sched_kw)
    ref = pipeline_images(unet, diffusers.DDIMScheduler(clip_sample=True, clip_sample_range=0.3, **kw), seeds, n)
    torch.testing.assert_close(cli("--clip", "0.3"), ref, atol=1e-5, rtol=0)


def test_bad_clip_and_threshold_settings_are_refused(tmp_path, unet):
    for bad, fragment in ((dict(clip_sample_range=-1.0), "clip_sample_range"),
                          (dict(thresholding=True, dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio")):
        src = model_dir(tmp_path / str(len(fragment)), unet, diffusers.DDIMScheduler(**bad))
        with pytest.raises(DiffdistillError, match=fragment):
            load_teacher(src)
