"""Issue 19 item 12: `diffdistill export diffusers RUN OUT` writes a student of a diffusers teacher as a folder that
diffusers' own `DiffusionPipeline.from_pretrained` loads and samples, equal to `diffdistill sample` from the same
noise (per-seed generators draw exactly `samplers.make_noise`'s unit noise).

The teachers are tiny random UNet2DModels saved with `save_pretrained`; the students are a real `distill di` run
(two steps on the CPU) and snapshots written as the loop exports them (RUN/model). The pipeline's final samples are
read before its [0, 1] post-processing (its step callback) and compared raw, and its own `.images` against
`diffdistill sample`'s mapped the same way.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffdistill.cli.main import main
from diffdistill.io import save_snapshot
from diffdistill.methods.common import copy_denoiser
from diffdistill.samplers import make_noise, sample
from diffdistill.teachers import load_teacher

diffusers = pytest.importorskip("diffusers")


def tiny_unet(num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds).eval()


def teacher_dir(path, prediction="epsilon", num_class_embeds=None):
    tiny_unet(num_class_embeds).save_pretrained(path / "unet")
    diffusers.DDPMScheduler(prediction_type=prediction).save_pretrained(path / "scheduler")
    return path


def student_run(tmp_path, teacher, recipe, method="pd", wrap=None, seed=1):
    """A run directory whose RUN/model is a trained-looking copy of the teacher (weights moved off the teacher's),
    written as the loop exports a student."""
    torch.manual_seed(seed)
    student = copy_denoiser(load_teacher(teacher), dropout=0.0).eval()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student = wrap(student) if wrap is not None else student
    run = tmp_path / f"run-{method}"
    save_snapshot(run / "model", student, recipe, {"method": method})
    return run


def cli_samples(tmp_path, run, seeds="0-3", *extra):
    """`diffdistill sample npz` of a run: raw float32 samples [N, C, H, W]."""
    out = tmp_path / "x.npz"
    assert main(["sample", "npz", str(out), str(run), "--seeds", seeds, "--no-progress", "--force", *extra]) == 0
    return torch.from_numpy(np.load(out)["x"])


def pipeline_run(out, n, class_labels=None, **call):
    """(raw final samples, the pipeline's own [0, 1] images) of the exported folder, loaded by diffusers itself,
    seeds 0..n-1 as per-sample generators."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "ConsistencyModelPipeline"
    pipe.set_progress_bar_config(disable=True)
    final = []
    with torch.no_grad():
        images = pipe(batch_size=n, generator=[torch.Generator().manual_seed(s) for s in range(n)],
                      class_labels=class_labels, output_type="pt", callback=lambda i, t, x: final.append(x),
                      **call).images
    return final[-1], images


def exported_call(out):
    info = json.loads((out / "diffdistill_export.json").read_text())
    return info, {k: v for k, v in info["call"].items()}


def as_pipeline_output(x):
    return (x.float() / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def eps_teacher(tmp_path_factory):
    return teacher_dir(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def di_run(eps_teacher, tmp_path_factory):
    """A real `distill di` run of the diffusers teacher (2 steps): a one-step student at init sigma 1.0."""
    run = tmp_path_factory.mktemp("di") / "run"
    assert main(["distill", "di", "--teacher", str(eps_teacher), "--out", str(run), "--kimg", "0.008", "--batch",
                 "4", "--no-progress", "--grid-kimg", "0"]) == 0
    return run


def test_one_step_di_student_samples_as_diffdistill_sample(tmp_path, di_run):
    """DI's generator x = D(1.0 u; 1.0): an EulerDiscreteScheduler ('trailing', table cut at the student's timestep
    and set to its level) in the pipeline gives `diffdistill sample`'s samples from the same seeds."""
    out = tmp_path / "exported"
    assert main(["export", "diffusers", str(di_run), str(out)]) == 0
    info, call = exported_call(out)
    assert call == {"num_inference_steps": 1} and info["student"]["sigmas"] == [1.0, 0.0]
    ref = cli_samples(tmp_path, di_run)
    raw, images = pipeline_run(out, 4, **call)
    assert float((raw - ref).abs().max()) <= 1e-5 and info["check"]["max_abs_diff"] <= 1e-5
    torch.testing.assert_close(images, as_pipeline_output(ref), atol=1e-5, rtol=0)
    assert 0.2 < float(((images > 0) & (images < 1)).double().mean())       # not just clamped pixels
    # the scheduler diffusers read back: sigma 1.0 at timestep t (the nearest to 1.0), and nothing above it
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(out / "scheduler")
    t = info["timesteps"][0]
    assert sched.config.timestep_spacing == "trailing" and sched.config.num_train_timesteps == t + 1
    assert float(sched.init_noise_sigma) == pytest.approx(1.0, rel=1e-6)
    # the level override matters: the teacher's own table at the same timestep is off
    teacher_table = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    pipe = diffusers.ConsistencyModelPipeline(unet=diffusers.UNet2DModel.from_pretrained(out / "unet"),
                                              scheduler=teacher_table)
    pipe.set_progress_bar_config(disable=True)
    final = []
    with torch.no_grad():
        pipe(batch_size=4, generator=[torch.Generator().manual_seed(s) for s in range(4)], timesteps=[t],
             num_inference_steps=None, output_type="pt", callback=lambda i, s, x: final.append(x))
    assert float((final[-1] - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("steps,options", [(4, {}), (4, {"clip_denoised": True}),
                                           (2, {"dynamic_threshold": 0.9, "threshold_max": 2.0}), (1, {})])
def test_ddim_student_samples_as_diffdistill_sample(tmp_path, steps, options):
    """A progressive-distillation student of a v-prediction diffusers teacher (DDIM on its Karras grid, x-hat
    clipped or thresholded): first-order DPM-Solver++ with the student's timesteps, from the VP prior."""
    from diffdistill.methods.pd import pd_sigmas

    teacher = teacher_dir(tmp_path / "teacher", prediction="v_prediction")
    den = load_teacher(teacher)
    recipe = {"sampler": "euler", "sigmas": pd_sigmas(steps, "karras", den.sigma_min, den.sigma_max).tolist(),
              **options}
    run = student_run(tmp_path, teacher, recipe)
    out = tmp_path / "exported"
    assert main(["export", "diffusers", str(run), str(out), "--check", "3"]) == 0
    info, call = exported_call(out)
    assert info["scheduler"] == "DPMSolverMultistepScheduler" and len(info["timesteps"]) == steps
    assert info["timesteps"][0] == 999
    if steps == 1:
        assert call == {"num_inference_steps": 1}
    else:
        assert call == {"num_inference_steps": None, "timesteps": info["timesteps"]}
    ref = cli_samples(tmp_path, run)
    raw, images = pipeline_run(out, 4, **call)
    assert float((raw - ref).abs().max()) <= 1e-5
    torch.testing.assert_close(images, as_pipeline_output(ref), atol=1e-5, rtol=0)
    if options:          # the x-hat treatment matters here: without it diffusers' samples are elsewhere
        plain = sample(load_teacher(run), list(range(4)), sampler="euler", sigmas=recipe["sigmas"])
        assert float((plain - ref).abs().max()) > 1e-2


def test_class_conditional_student_at_sigma_max(tmp_path):
    """A one-step student at the teacher's top level (t = 999, sigma_0 = 157.4: GDD/DMD2's default),
    class-conditional: the pipeline's class_labels are the UNet's class indices.

    Here diffusers' Euler step returns x + (x - x0)/sigma_0 (0 - sigma_0) in float32 with x = sigma_0 u ~ 600, so
    x0 comes back with float32 rounding of that size (measured 4.5e-5; ulp(600) = 6.1e-5), while diffdistill
    returns x0 itself (1e-6 from a float64 run): the pipeline is held to two float32 roundings of sigma_0 max |u|,
    against both."""
    teacher = teacher_dir(tmp_path / "teacher", prediction="v_prediction", num_class_embeds=3)
    den = load_teacher(teacher)
    run = student_run(tmp_path, teacher, {"sampler": "onestep", "sigmas": [den.sigma_max, 0.0]}, method="gdd")
    out = tmp_path / "exported"
    assert main(["export", "diffusers", str(run), str(out)]) == 0
    info, call = exported_call(out)
    assert info["timesteps"] == [999] and "class_labels" in info
    assert diffusers.EulerDiscreteScheduler.from_pretrained(out / "scheduler").config.num_train_timesteps == 1000
    labels = [2, 0, 1, 1]
    student = load_teacher(run)
    ref = sample(student, list(range(4)), cond=torch.tensor(labels))
    exact = sample(student.double(), list(range(4)), cond=torch.tensor(labels))
    assert float((ref - exact).abs().max()) <= 1e-5
    raw, _ = pipeline_run(out, 4, class_labels=labels, **call)
    rounding = 2 * torch.finfo(torch.float32).eps * den.sigma_max * float(make_noise(range(4), (3, 8, 8)).abs().max())
    assert float((raw - ref).abs().max()) <= rounding and float((raw - exact).abs().max()) <= rounding
    other, _ = pipeline_run(out, 4, class_labels=[0, 1, 2, 0], **call)
    assert float((other - ref).abs().max()) > 1e-3


def _one_line_error(capsys, argv, code, *fragments):
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_refusals_write_nothing(tmp_path, capsys, eps_teacher):
    """Students without an exact diffusers counterpart are refused in one line saying why, and nothing is left."""
    from diffdistill.diffusion.denoiser import BoundaryDenoiser, Precond
    from diffdistill.methods.kd import PaperStudent
    from diffdistill.networks.unet import unet_preset

    den = load_teacher(eps_teacher)
    onestep = {"sampler": "onestep", "sigmas": [den.sigma_max, 0.0]}
    own = tmp_path / "own"
    save_snapshot(own / "model", Precond(unet_preset("tiny", 8, 1), (1, 8, 8)).eval(), onestep)
    cases = [
        (own, ("no exact diffusers UNet2DModel equivalent", "supports students of diffusers teachers")),
        (student_run(tmp_path, eps_teacher, onestep, "kd", lambda s: PaperStudent(s, den.sigma_max)),
         ("KD's paper student",)),
        (student_run(tmp_path, eps_teacher, onestep, "cd", BoundaryDenoiser), ("consistency student",)),
        (student_run(tmp_path, eps_teacher, {"sampler": "multistep", "sigmas": [80.0, 1.0, 0.0]}, "cd2"),
         ("'multistep'", "not exported")),
        (student_run(tmp_path, eps_teacher, {"sampler": "euler", "sigmas": [80.0, 1.0, 0.0], "clip_denoised": True,
                                             "clip_keeps_eps": True}, "ddim"), ("DDIMPipeline",)),
    ]
    for run, fragments in cases:
        out = tmp_path / "out"
        _one_line_error(capsys, ["export", "diffusers", str(run), str(out)], 1, *fragments)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]      # no temporary folder left


def test_existing_out_needs_force(tmp_path, capsys, di_run):
    out = tmp_path / "exported"
    assert main(["export", "diffusers", str(di_run), str(out), "--check", "0"]) == 0
    assert "check" not in json.loads((out / "diffdistill_export.json").read_text())
    _one_line_error(capsys, ["export", "diffusers", str(di_run), str(out)], 2, "already exists", "--force")
    (out / "stale.txt").write_text("from an earlier export")
    assert main(["export", "diffusers", str(di_run), str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _one_line_error(capsys, ["export", "diffusers", str(di_run), str(mine), "--force"], 1, "not a diffusers pipeline")
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "mine"]      # no temporary folder left


def test_help_examples_run(tmp_path, capsys, di_run):
    """The command lines of `export diffusers --help` run (RUN replaced by a real run, OUT by a fresh path)."""
    with pytest.raises(SystemExit) as e:
        main(["export", "diffusers", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines = [line.split("#")[0].split() for line in text.split("examples:", 1)[1].splitlines()
             if line.strip().startswith("diffdistill export")]
    assert len(lines) == 2
    for i, words in enumerate(lines):
        argv = words[1:]
        argv[2], argv[3] = str(di_run), str(tmp_path / f"out{i}")
        assert main(argv) == 0
    assert math.isfinite(json.loads((tmp_path / "out1" / "diffdistill_export.json").read_text())["check"]
                         ["max_abs_diff"])
