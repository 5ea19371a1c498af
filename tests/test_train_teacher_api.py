"""`diffdistill.train_teacher(...)` and `train-teacher`'s settings as one typed config (TrainTeacherConfig): the
CLI and the API resolve the same preset defaults and train bit-identical weights for the same seed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import diffdistill as dd
from diffdistill import api, io
from diffdistill.errors import UsageError
from diffdistill.methods.options import cli_fields
from diffdistill.methods.teacher import TrainTeacherConfig
from diffdistill.presets import PRESETS
from tests.cli_util import run_cli

torch.set_num_threads(1)


def _weights(run) -> dict[str, torch.Tensor]:
    denoiser = io.load_snapshot(run / "model", device="cpu")[0]
    return {k: v.clone() for k, v in denoiser.state_dict().items()}


def _meta(run) -> dict:
    return json.loads((run / "config.json").read_text())["meta"]


CASES = {
    # the toy preset's MLP on the ring, EDM loss, every default the preset's
    "toy": (["--data", "toy:ring8", "--preset", "toy", "--kimg", "0.064", "--batch", "16", "--grid-kimg", "0"],
            dict(data="toy:ring8", preset="toy", loop=dict(total_kimg=0.064, batch=16, grid_kimg=0))),
    # digits (class labels), the vp loss and every kind of option: the preset chosen from the data's shape,
    # network lists given as '1,2' on the command line and as a tuple in Python
    "digits-vp": (["--data", "digits", "--kimg", "0.032", "--batch", "16", "--seed", "3", "--loss", "vp",
                   "--pred", "x", "--schedule", "linear", "--weighting", "v_mse", "--lr", "3e-3", "--warmup",
                   "0.016", "--label-dropout", "0.25", "--sample-steps", "8", "--channels", "8", "--channel-mult",
                   "1,2", "--blocks", "1", "--attn", "none", "--dropout", "0.1"],
                  dict(data="digits", loop=dict(total_kimg=0.032, batch=16, seed=3), loss="vp", pred="x",
                       schedule="linear", weighting="v_mse", lr=3e-3, warmup=0.016, label_dropout=0.25,
                       sample_steps=8, channels=8, channel_mult=(1, 2), blocks=1, attn=[], dropout=0.1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_and_api_train_bit_identical_teachers(case, tmp_path, capsys):
    argv, kwargs = CASES[case]
    cli_run, api_run = tmp_path / "cli", tmp_path / "api"
    code, out, err = run_cli(capsys, "train-teacher", *argv, "--out", cli_run, "--no-progress", "--device", "cpu")
    assert code == 0, err
    kwargs = dict(kwargs, loop=dict(kwargs["loop"], progress=False, device="cpu"))
    events = []
    result = dd.train_teacher(kwargs.pop("data"), api_run, callback=lambda e, o: events.append(e), **kwargs)
    assert events == ["method", "result"] and not result.interrupted
    assert result.run == api_run and result.model == api_run / "model" and result.nimg >= 1000 * kwargs[
        "loop"]["total_kimg"]
    a, b = _weights(cli_run), _weights(api_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same resolved settings in config.json, and the run's own description of them
    assert _meta(cli_run) == _meta(api_run)
    meta = _meta(api_run)
    assert meta["preset"] == result.config.preset and meta["lr"] == result.config.lr
    recipe = io.load_snapshot(cli_run / "model")[1]
    assert result.teacher().sampling == recipe == io.load_snapshot(api_run / "model")[1]


def test_the_api_weights_depend_on_the_seed(tmp_path):
    """A guard for the test above: two seeds give different weights (identical weights are not a given)."""
    loop = dict(total_kimg=0.032, batch=16, progress=False, device="cpu")
    first = dd.train_teacher("toy:ring8", tmp_path / "a", preset="toy", loop=loop)
    second = dd.train_teacher("toy:ring8", tmp_path / "b", preset="toy", loop=dict(loop, seed=1))
    a, b = _weights(first.run), _weights(second.run)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_preset_dependent_defaults_resolve_in_one_place():
    toy = TrainTeacherConfig().resolve(shape=(2,))
    assert (toy.preset, toy.lr, toy.warmup, toy.sigma_data, toy.pred) == ("toy", 5e-3, 0.0, 0.7, "eps")
    digits = TrainTeacherConfig(loss="vp").resolve(shape=(1, 8, 8))
    assert (digits.preset, digits.lr, digits.sigma_data, digits.pred) == ("digits", 2e-3, 0.5, "v")
    mnist = TrainTeacherConfig(lr=1e-4, sigma_data=0.3).resolve(shape=(1, 28, 28))
    assert (mnist.preset, mnist.lr, mnist.warmup, mnist.sigma_data) == ("mnist", 1e-4, 50.0, 0.3)
    assert TrainTeacherConfig().resolve(shape=(3, 32, 32)).preset == "cifar10"
    assert TrainTeacherConfig(preset="cifar10-small").resolve(shape=(3, 32, 32)).warmup == 10.0
    assert mnist.resolve() == mnist                                       # idempotent
    loss = TrainTeacherConfig(loss="vp", pred="x", preset="mnist", warmup=2.0).loss_config()
    assert (loss.prediction, loss.optim.lr, loss.optim.warmup_kimg) == ("x", PRESETS["mnist"].lr, 2.0)
    assert TrainTeacherConfig(channel_mult="1,2,2", attn=(16,)).resolve(shape=(2,)).channel_mult == [1, 2, 2]


def test_the_command_line_options_are_the_config_fields(capsys):
    code, out, _ = run_cli(capsys, "train-teacher", "--help")
    assert code == 0
    for f in cli_fields(TrainTeacherConfig):
        assert f"--{f.name.replace('_', '-')}" in out
    names = {f.name for f in dataclasses.fields(TrainTeacherConfig)}
    assert {"preset", "lr", "warmup", "loss", "pred", "channels", "channel_mult", "attn", "uncond"} <= names


@pytest.mark.parametrize("settings,fragment", [
    (dict(gen_lr=1e-3), "unknown setting(s) gen_lr"),
    (dict(pred="v"), "--pred applies to --loss vp"),
    (dict(lr=0.0), "--lr must be positive"),
    (dict(warmup=-1.0), "--warmup must be 0"),
    (dict(preset="huge"), "unknown preset 'huge'"),
    (dict(attn=[0]), "--attn"),
    (dict(channel_mult="1,x"), "--channel-mult"),
    (dict(loop=dict(kimg=1)), "unknown loop setting(s) kimg"),
    (dict(out="elsewhere", loop=dd.TrainConfig(out="here")), "differs from loop.out"),
])
def test_bad_settings_are_one_line_usage_errors(settings, fragment, tmp_path):
    settings = dict(settings)
    out = settings.pop("out", tmp_path / "run")
    with pytest.raises(UsageError) as e:
        api.train_teacher("toy:ring8", out, **settings)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "model").exists()
