"""Teacher training: EDM and VP losses against closed-form oracles (algorithms.md §7 O12, §3.3 identities),
conditioning, export recipes, the `train-teacher` command, and a toy teacher that keeps all eight ring modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffdistill import io, presets
from diffdistill.diffusion import param
from diffdistill.diffusion.losses import edm_loss
from diffdistill.methods.base import Batch
from diffdistill.methods.teacher import (
    TeacherConfig,
    TeacherTraining,
    teacher_precond,
    vp_loss,
    vp_training_sigma,
)
from diffdistill.samplers import sample
from diffdistill.teachers.analytic import Gaussian, ring8

torch.set_num_threads(1)


def cosine_sigma_np(t, lmin=-20.0, lmax=20.0):
    """sigma = exp(-lambda/2) with lambda(t) = -2 log tan(a t + b) (§3.1), written here independently."""
    b = np.arctan(np.exp(-lmax / 2))
    a = np.arctan(np.exp(-lmin / 2)) - b
    return np.tan(a * t + b)


def test_edm_loss_of_the_exact_denoiser_is_one_per_element():
    # O12: data N(0, sd^2 I), sd = 0.5, exact denoiser: E[lambda (D - x)^2] = 1 per element at every sigma.
    torch.manual_seed(0)
    dim, n = 16, 4000
    gauss = Gaussian(torch.zeros(dim), 0.5)
    x = torch.randn(n, dim) * 0.5
    for sigma in (0.01, 0.3, 5.0, 80.0):
        per_elem = edm_loss(gauss, x, torch.full((n,), sigma), sigma_data=0.5, reduction="none") / dim
        assert float(per_elem.mean()) == pytest.approx(1.0, abs=0.03), sigma


def test_edm_loss_lognormal_expectation_for_other_data_std():
    # O12: for s = 0.3 the expectation over EDM's lognormal sigma is 0.6789 per element.
    torch.manual_seed(1)
    dim, n = 8, 20000
    x = torch.randn(n, dim) * 0.3
    per_elem = edm_loss(Gaussian(torch.zeros(dim), 0.3), x, sigma_data=0.5, reduction="none") / dim
    assert float(per_elem.mean()) == pytest.approx(0.6789, abs=0.015)


@pytest.mark.parametrize("weighting,weight", [
    ("constant", lambda sg: 1.0),
    ("snr_trunc", lambda sg: np.maximum(1.0, sg**-2)),
    ("snr", lambda sg: sg**-2),
    ("v_mse", lambda sg: 1 + sg**-2),
])
def test_vp_loss_of_the_exact_denoiser_matches_quadrature(weighting, weight):
    # Exact denoiser of N(0, s^2): x-MSE at level sigma is s^2 sigma^2 / (s^2 + sigma^2) per element, and the
    # cosine schedule draws t ~ U(0, 1). Expected loss = integral over t of weight * x-MSE.
    s, dim, n = 0.5, 8, 20000
    t = (np.arange(200_000) + 0.5) / 200_000
    sg = cosine_sigma_np(t)
    expected = float(np.mean(weight(sg) * s**2 * sg**2 / (s**2 + sg**2)))
    torch.manual_seed(2)
    cfg = TeacherConfig(loss="vp", prediction="x", weighting=weighting)
    x = torch.randn(n, dim) * s
    sigma = vp_training_sigma(n, cfg)
    got = float(vp_loss(Gaussian(torch.zeros(dim), s), x, None, cfg, sigma=sigma).mean())
    assert got == pytest.approx(expected, rel=0.03)


def test_vp_weighting_equals_pds_max_of_x_and_eps_mse():
    # snr_trunc is max(x_mse, eps_mse) with eps_hat = (z - alpha x_hat)/sigma_t (dpm.py), for any prediction.
    n, dim = 64, 5
    x = torch.randn(n, dim) * 0.5
    sigma = torch.logspace(-2, 1.5, n)

    def wobbly(x_noisy, sig, cond=None):  # any denoiser will do
        return 0.6 * x_noisy + 0.1 * torch.sin(3 * x_noisy)

    wobbly.shape = (dim,)
    torch.manual_seed(3)
    got = vp_loss(wobbly, x, None, TeacherConfig(loss="vp", weighting="snr_trunc"), sigma=sigma)
    torch.manual_seed(3)
    eps = torch.randn_like(x)
    s = sigma[:, None]
    alpha, sigma_t = param.vp_from_edm(s)
    z = alpha * x + sigma_t * eps
    x_hat = wobbly(z / alpha, sigma)
    eps_hat = param.eps_from_x(z, x_hat, alpha, sigma_t)
    reference = torch.maximum(((x_hat - x) ** 2).mean(1), ((eps_hat - eps) ** 2).mean(1))
    torch.testing.assert_close(got, reference, rtol=2e-4, atol=1e-6)


def test_preconditioning_and_recipes():
    edm = teacher_precond(TeacherConfig())
    assert edm.kind == "edm"
    cos = teacher_precond(TeacherConfig(loss="vp", prediction="v"))
    assert (cos.kind, cos.prediction) == ("cosine", "v")
    assert cos.sigma_max == pytest.approx(math.exp(10)) and cos.sigma_min == pytest.approx(math.exp(-10))
    lin = teacher_precond(TeacherConfig(loss="vp", schedule="linear"))
    assert lin.sigma_max == pytest.approx(152.16697, rel=1e-6)  # sigma_VP(1), O3
    net = presets.build_network("toy", (2,))
    assert TeacherTraining.from_network(net, (2,)).sampling_recipe() == {"sampler": "heun", "steps": 18}
    rec = TeacherTraining.from_network(net, (2,), config=TeacherConfig(loss="vp", prediction="x",
                                                                       sample_steps=4)).sampling_recipe()
    assert rec["sampler"] == "euler"
    np.testing.assert_allclose(rec["sigmas"], list(cosine_sigma_np(np.array([1, .75, .5, .25]))) + [0.0],
                               rtol=1e-9)
    with pytest.raises(Exception, match="pred"):
        TeacherTraining.from_network(net, (2,), config=TeacherConfig(loss="edm", prediction="v"))


def test_class_labels_condition_the_network():
    net = presets.build_network("toy", (2,), label_dim=3)
    for dropout, expect_grad in ((0.0, True), (1.0, False)):
        method = TeacherTraining.from_network(net, (2,), 3, TeacherConfig(label_dropout=dropout))
        method.zero_grad()
        batch = Batch(size=8, device=torch.device("cpu"), x=torch.randn(8, 2), cond=torch.arange(8) % 3)
        with torch.no_grad():  # the zero-initialised output layer would hide the label path
            net.out.weight.normal_()
        method.denoiser_loss(batch)["loss"].backward()
        grad = net.map_label.weight.grad
        assert (grad is not None and float(grad.abs().sum()) > 0) == expect_grad


def _mode_check(model_dir, n=4000):
    gmm = ring8()
    den, recipe, _ = io.load_snapshot(model_dir)
    x = sample(den, n, batch=n, **recipe)
    modes = gmm.mode_of(x)
    fractions = torch.bincount(modes, minlength=8).double() / n
    near = ((x.double() - gmm.means[modes]).norm(dim=1) < 0.3).double().mean()  # 3 std of a mode
    return fractions, float(near)


class RingPoints:
    """toy:ring8 samples in a tensor (the data module's interface, with cheap indexing)."""

    def __init__(self, n=50_000):
        self.x, self.shape, self.label_dim = ring8().sample(n, torch.Generator().manual_seed(0)), (2,), 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], -1


def test_toy_teacher_keeps_all_eight_modes(tmp_path):
    from diffdistill.methods.base import OptimConfig
    from diffdistill.train.loop import train

    preset = presets.get_preset("toy")
    cfg = TeacherConfig(sigma_data=preset.sigma_data, optim=OptimConfig(lr=preset.lr))
    method = TeacherTraining.from_network(presets.build_network(preset, (2,)), (2,), 0, cfg)
    run = tmp_path / "toy"
    train(method, presets.train_config(preset, str(run), tensorboard=False, progress=False), RingPoints())
    fractions, near = _mode_check(run / "model")
    # All eight modes, each with its weight 1/8 (binomial std 0.005 at 4000 samples); samples concentrated on
    # the modes (exact denoiser: 98% within 3 std; this teacher ~90%).
    assert float((fractions - 0.125).abs().max()) < 0.03, fractions
    assert near > 0.8
    assert (run / "samples-final.png").is_file() and (run / "stats.jsonl").is_file()


def test_cli_rules(tmp_path, capsys):
    from diffdistill.cli.main import main

    run = str(tmp_path / "run")
    args = ["train-teacher", "--data", "toy:ring8?size=512", "--out", run, "--preset", "toy", "--kimg", "0.25",
            "--batch", "64", "--loss", "vp", "--pred", "v", "--no-progress"]
    assert main(args) == 0
    den, recipe, _ = io.load_snapshot(tmp_path / "run" / "model")
    assert den.precond.kind == "cosine" and den.precond.prediction == "v" and recipe["sampler"] == "euler"
    assert main(args) == 0  # same command: resumes (nothing left)
    assert "resuming" in capsys.readouterr().out
    assert main([*args, "--lr", "1e-4"]) == 1
    assert "holds a different run" in capsys.readouterr().err
    assert main(["train-teacher", "--data", "toy:ring8", "--out", run, "--kimg", "-1"]) == 2
    assert main(["train-teacher", "--data", "toy:ring8", "--out", str(tmp_path / "d"), "--preset", "digits",
                 "--kimg", "1"]) == 1
    assert "square images" in capsys.readouterr().err


def test_cli_network_and_loop_options(tmp_path, capsys):
    """train-teacher's architecture overrides reach the saved network; its loop options are the shared ones."""
    import json
    import shlex

    from diffdistill.cli.main import main

    run = tmp_path / "digits"
    args = ["train-teacher", "--data", "digits", "--out", str(run), "--preset", "digits", "--channels", "8",
            "--channel-mult", "1,1", "--blocks", "1", "--attn", "none", "--dropout", "0.05", "--warmup", "0.5",
            "--kimg", "0.128", "--batch", "32", "--snapshot-kimg", "0.064", "--tick-kimg", "0.032",
            "--no-progress"]
    assert main(args) == 0
    net = io.load_snapshot(run / "model")[0].backbone.config()
    assert (net["model_channels"], net["channel_mult"], net["num_blocks"], net["attn_resolutions"],
            net["dropout"]) == (8, [1, 1], 1, [], 0.05)
    config = json.loads((run / "config.json").read_text())
    assert config["meta"]["warmup_kimg"] == 0.5 and config["meta"]["network"]["channels"] == 8
    assert config["train"]["snapshot_kimg"] == 0.064 and config["train"]["tick_kimg"] == 0.032
    assert len(list(run.glob("snapshot-*"))) == 2
    # the command that made the run is the one this caller gave, not the test runner's own argv
    assert (run / "command.txt").read_text().splitlines()[0] == shlex.join(["diffdistill", *args])
    assert len((run / "stats.jsonl").read_text().splitlines()) == 4
    # A different architecture is a different run; impossible ones are one-line errors.
    assert main([*args[:8], "16", *args[9:]]) == 1
    assert "holds a different run" in capsys.readouterr().err
    for bad, message in ((["--preset", "toy", "--data", "toy:ring8", "--attn", "8"], "does not apply to the MLP"),
                         (["--data", "digits", "--channels", "48"], "not a valid UNet")):
        assert main(["train-teacher", "--out", str(tmp_path / "bad"), "--kimg", "0.1", *bad]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as exit_info:
        main(["train-teacher", "--data", "digits", "--out", str(tmp_path / "x"), "--attn", "8,a"])
    assert exit_info.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:   # a zero multiplier is refused when parsed
        main(["train-teacher", "--data", "digits", "--out", str(tmp_path / "x"), "--channel-mult", "1,0"])
    assert exit_info.value.code == 2 and "positive integers" in capsys.readouterr().err
    assert main(["train-teacher", "--data", "digits", "--out", str(tmp_path / "x"), "--grid-kimg", "-1"]) == 2
