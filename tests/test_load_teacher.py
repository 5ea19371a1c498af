"""load_teacher: every spec kind, eval mode without gradients, clear errors, and no unpickling of code."""

from __future__ import annotations

import builtins
import json
import re
import sys

import pytest
import torch

from diffdistill.errors import DiffdistillError
from diffdistill.io import save_snapshot
from diffdistill.teachers import GaussianMixture, load_teacher
from diffdistill.teachers.diffusers import DiffusersDenoiser


def _frozen(den):
    return not den.training and all(not p.requires_grad for p in den.parameters())


def _tiny_diffusers_dir(path, layout="pipeline", safe=True):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4)
    unet_dir = path / "unet" if layout == "pipeline" else path
    unet.save_pretrained(unet_dir, safe_serialization=safe)
    diffusers.DDPMScheduler().save_pretrained(path / "scheduler" if layout == "pipeline" else path)
    return path, unet


def test_analytic_specs(tmp_path):
    den = load_teacher("toy:ring8")
    assert isinstance(den, GaussianMixture) and den.shape == (2,) and _frozen(den)
    spec = tmp_path / "two.json"
    spec.write_text(json.dumps({"means": [[0.0], [2.0]], "stds": [0.5, 0.5], "weights": [1, 3]}))
    den = load_teacher(f"gmm:{spec}")
    assert den.shape == (1,) and den.weights.tolist() == [0.25, 0.75]
    with pytest.raises(DiffdistillError, match="unknown toy"):
        load_teacher("toy:moons")


def test_snapshot_run_dir_and_model_json(tmp_path):
    ring = load_teacher("toy:ring8")
    save_snapshot(tmp_path / "run" / "model", ring, {"sampler": "heun", "steps": 18})
    x = torch.randn(4, 2, dtype=torch.float64)
    for spec in (tmp_path / "run", tmp_path / "run" / "model", tmp_path / "run" / "model" / "model.json",
                 str(tmp_path / "run")):
        den = load_teacher(spec)
        assert isinstance(den, GaussianMixture) and _frozen(den)
        assert torch.equal(den(x, 0.5), ring(x, 0.5))


@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_diffusers_directory(tmp_path, layout):
    path, unet = _tiny_diffusers_dir(tmp_path, layout)
    den = load_teacher(path)
    assert isinstance(den, DiffusersDenoiser) and den.shape == (1, 8, 8) and _frozen(den)
    assert den.config()["path"] == str(path.resolve())
    # weights really are the saved ones: eps at t=999 equals the UNet's output there
    z = torch.randn(2, 1, 8, 8)
    sigma = den.discrete_sigmas[-1]
    with torch.no_grad():
        eps = unet(z, 999).sample
        x0 = den(z * (1 + sigma**2).sqrt().float(), sigma.float())
    torch.testing.assert_close(x0, z * (1 + sigma**2).sqrt().float() - sigma.float() * eps, rtol=1e-4, atol=1e-3)


def test_unknown_specs(tmp_path):
    with pytest.raises(DiffdistillError, match="teacher not found .*diffusers model directory"):
        load_teacher(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffdistillError, match=r"empty: not a teacher; looked for .*snapshot.*run directory"):
        load_teacher(tmp_path / "empty")
    (tmp_path / "net.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(DiffdistillError, match="converted to a snapshot first"):
        load_teacher(tmp_path / "net.pkl")
    # a config.json that is not a UNet2DModel is not taken for a diffusers model
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "other" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(DiffdistillError, match="not a teacher"):
        load_teacher(tmp_path / "other")


class _Payload:
    """Unpickling this would create a file: proof that a .bin was unpickled unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_bin_with_code_is_refused(tmp_path):
    path, _ = _tiny_diffusers_dir(tmp_path / "m", safe=False)
    weights = path / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "evil": _Payload(marker)}, weights)
    with pytest.raises(DiffdistillError, match="diffusion_pytorch_model.bin: not a readable weights-only"):
        load_teacher(path)
    assert not marker.exists()


def test_missing_diffusers_names_pip(tmp_path, monkeypatch):
    path, _ = _tiny_diffusers_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)     # `import diffusers` now raises ImportError
    with pytest.raises(DiffdistillError, match="pip install diffusers"):
        load_teacher(path)


def test_one_snapshot_resolution_for_teachers_sample_and_eval(tmp_path):
    """io.find_snapshot is what load_teacher, `sample` and `eval` resolve a spec with: a snapshot (or its
    model.json) itself; a run's RUN/latest when it was interrupted (sample, eval), RUN/model for a teacher; nothing
    for analytic specs, data and missing paths."""
    from diffdistill.cli.eval import _snapshot_dir
    from diffdistill.cli.sample import load_model
    from diffdistill.io import find_snapshot

    ring, other = load_teacher("toy:ring8"), GaussianMixture([[3.0, -1.0]], [0.7], [1.0])
    run = tmp_path / "run"
    save_snapshot(run / "model", ring, {"sampler": "heun", "steps": 18})
    save_snapshot(run / "latest", other, {"sampler": "euler", "steps": 4}, meta={"step": 7, "kimg": 0.5})
    assert find_snapshot(run) == run / "latest" and find_snapshot(str(run)) == run / "latest"
    assert find_snapshot(run, unfinished=False) == run / "model"
    assert find_snapshot(run / "latest" / "model.json") == run / "latest"
    assert find_snapshot(run / "model") == run / "model"
    (tmp_path / "images").mkdir()
    for none in ("toy:ring8", tmp_path / "missing", tmp_path / "images", run / "model" / "model.safetensors"):
        assert find_snapshot(none) is None

    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(load_teacher(run)(x, 0.5), ring(x, 0.5))          # a teacher: the finished RUN/model
    notes = []
    den, recipe, meta = load_model(str(run), note=notes.append)            # sampling: the newer RUN/latest, said
    assert torch.equal(den(x, 0.5), other(x, 0.5)) and recipe == {"sampler": "euler", "steps": 4}
    assert notes == [f"{run}: the run did not finish; sampling {run / 'latest'} (step 7, 0.5 kimg)"]
    notes.clear()
    load_model(str(run / "latest" / "model.json"), note=notes.append)     # a snapshot named directly: no note
    assert notes == []
    assert _snapshot_dir(str(run)) == run / "latest" and _snapshot_dir(str(run / "model")) == run / "model"

    # an interrupted run without RUN/model: a teacher is refused in one line that names RUN/latest
    (run / "model" / "model.json").unlink()
    with pytest.raises(DiffdistillError, match=rf"^{re.escape(str(run))}: the run did not finish .*give "
                                               rf"{re.escape(str(run / 'latest'))} as the teacher$"):
        load_teacher(run)
    assert torch.equal(load_teacher(run / "latest")(x, 0.5), other(x, 0.5))
