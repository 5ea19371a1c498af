"""`load_teacher(spec)`: one entry point for every teacher a user can bring."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DiffdistillError
from ..io import LATEST_DIR, MODEL_DIR, SNAPSHOT_JSON, find_snapshot, load_snapshot
from .analytic import is_analytic_spec, load_analytic

LOOKED_FOR = (
    "an analytic spec (toy:ring8, gmm:PATH.json)",
    f"a diffdistill snapshot directory ({SNAPSHOT_JSON} + model.safetensors; converted EDM teachers are snapshots)",
    f"a run directory ({MODEL_DIR}/{SNAPSHOT_JSON})",
    "a diffusers model directory (unet/config.json + scheduler/scheduler_config.json, or config.json with "
    "_class_name UNet2DModel + scheduler_config.json)",
)


DIFFUSERS_STEPS = 50   # DDIMPipeline's default num_inference_steps
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")   # owner/name, as the Hub spells them


def load_teacher(spec, device="cpu"):
    """The teacher named by `spec` as a Denoiser on `device`, in eval mode with requires_grad False.

    spec: `toy:ring8` | `gmm:PATH.json` | a snapshot directory (or its model.json) | a run directory (its `model/`
    snapshot) | a local diffusers model directory.
    """
    if is_analytic_spec(spec):
        den = load_analytic(spec)
    else:
        den = _load_path(Path(spec), device)
    return den.to(device).eval().requires_grad_(False)


def _load_path(path: Path, device):
    snapshot = find_snapshot(path, unfinished=False)
    if snapshot is not None:
        return load_snapshot(snapshot, device)[0]
    if path.is_dir():
        if find_snapshot(path) is not None:     # only RUN/latest: an interrupted run
            raise DiffdistillError(f"{path}: the run did not finish (it has {LATEST_DIR}/, its interrupted export, "
                                   f"but no {MODEL_DIR}/); rerun its command to finish it, or give "
                                   f"{path / LATEST_DIR} as the teacher")
        from .diffusers import find_diffusers_model, load_diffusers
        if find_diffusers_model(path) is not None:
            teacher = load_diffusers(path, device)
            teacher.sampling = teacher.ddim_recipe(DIFFUSERS_STEPS)   # sampled as its DDIMPipeline by default
            return teacher
    if not path.exists():
        spec = str(path)
        if HUB_ID.fullmatch(spec):
            name = spec.split("/")[1]
            raise DiffdistillError(f"{spec}: no such local path; diffdistill loads local folders only, so a Hugging "
                                   f"Face Hub model must be downloaded first, e.g. `huggingface-cli download {spec} "
                                   f"--local-dir ./{name}`, then give ./{name} as the teacher")
        raise DiffdistillError(f"{path}: teacher not found (expected {'; '.join(LOOKED_FOR)})")
    hint = ""
    if path.suffix == ".pkl":
        hint = " (an EDM pickle must be converted to a snapshot first: diffdistill convert)"
    raise DiffdistillError(f"{path}: not a teacher{hint}; looked for {'; '.join(LOOKED_FOR)}")
