"""Your own model (issue 19 item 11): docs/own_model.md's example runs, and a denoiser that could not be saved
(or loaded again) is refused up front with one line naming what to add."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from diffdistill import io
from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.errors import DiffdistillError
from diffdistill.networks.mlp import mlp_preset

DOC = Path(__file__).resolve().parents[1] / "docs" / "own_model.md"


class NoConfig(nn.Module):
    def forward(self, x_in, c_noise, class_labels=None):
        return x_in


class UnknownName(NoConfig):
    def config(self):
        return dict(name="mynet", width=3)


class NotJSON(NoConfig):
    def config(self):
        return dict(name="mlp", dim=torch.tensor(2))


def one_line_error(denoiser) -> str:
    with pytest.raises(DiffdistillError) as e:
        io.check_saveable(denoiser)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_backbone_without_config_is_refused_naming_what_to_add():
    den = Precond(NoConfig(), (2,), 0)
    with pytest.raises(TypeError):        # what save_snapshot would hit after the first round
        den.config()
    msg = one_line_error(den)
    assert "backbone NoConfig has no config()" in msg and "def config(self): return dict(name=" in msg
    assert "docs/own_model.md" in msg


def test_configs_that_cannot_be_loaded_again_are_refused():
    assert "unknown network 'mynet'" in one_line_error(Precond(UnknownName(), (2,), 0))
    assert "not JSON" in one_line_error(Precond(NotJSON(), (2,), 0))


def test_saveable_denoisers_pass_and_return_their_config():
    den = Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig(kind="cosine", prediction="v"))
    assert io.check_saveable(den) == den.config()
    from diffdistill.networks.unet import UNet
    unet = Precond(UNet(8, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()),
                   (3, 8, 8), 0)
    assert io.check_saveable(unet)["network"]["name"] == "unet"


def test_the_docs_example_runs(tmp_path):
    """The Python block of docs/own_model.md, as written: a custom backbone distilled by PD, saved and loaded."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    code = next(b for b in blocks if "register_builder" in b)
    torch.manual_seed(0)
    env = dict(RUN=tmp_path / "run")
    exec(compile(code, str(DOC), "exec"), env)
    assert env["meta"]["method"] == "pd" and len(env["recipe"]["sigmas"]) == 3       # the 2-step student
    assert type(env["student"]).__name__ == "MyPrecond" and env["x"].shape == (16, 2)
    assert torch.isfinite(env["x"]).all()
    # the loop's check passes for the example, and fails for the same backbone without the custom type
    io.check_saveable(env["teacher"])
    assert "backbone TinyNet has no config()" in one_line_error(Precond(env["TinyNet"](), (2,), 0))


def test_a_hub_id_says_download_first(tmp_path, monkeypatch):
    from diffdistill.teachers import load_teacher

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffdistillError) as e:
        load_teacher("google/ddpm-cifar10-32")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("google/ddpm-cifar10-32: no such local path")
    assert "huggingface-cli download google/ddpm-cifar10-32 --local-dir ./ddpm-cifar10-32" in msg
    # a missing path that is no Hub id keeps the old message
    with pytest.raises(DiffdistillError, match="teacher not found"):
        load_teacher(tmp_path / "a" / "b")


def test_the_loop_refuses_an_unsaveable_student_before_training(tmp_path):
    """train() checks the student it will export before the first step: no checkpoint, no stats are written."""
    from diffdistill.data import open_dataset
    from diffdistill.methods.pd import PDConfig, ProgressiveDistillation
    from diffdistill.teachers.analytic import ring8
    from diffdistill.train.loop import TrainConfig, train

    teacher = ring8()
    student = Precond(nn.Sequential(nn.Linear(2, 2)), (2,), 0)      # a backbone with no config()
    student.backbone.forward = lambda x_in, c_noise, class_labels=None: x_in
    method = ProgressiveDistillation(teacher, PDConfig(start_steps=4, round_kimg=1), student=student)
    run = tmp_path / "run"
    with pytest.raises(DiffdistillError, match="cannot save Precond: backbone .* has no config"):
        train(method, TrainConfig(out=str(run), max_steps=2, batch=8, progress=False, tensorboard=False,
                                  device="cpu"), data=open_dataset("toy:ring8?size=64"))
    assert not (run / "checkpoints").exists() and not (run / "stats.jsonl").exists()
