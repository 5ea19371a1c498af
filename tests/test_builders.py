"""Rebuilding a denoiser from its config needs no earlier import (issue 16): the built-in types are a table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from diffdistill import io

ROOT = Path(__file__).resolve().parents[1]


def test_every_builtin_type_is_rebuilt_in_a_fresh_interpreter(tmp_path):
    """Snapshots of each built-in type written here load in an interpreter that imported only diffdistill.io."""
    import torch

    from diffdistill.diffusion.denoiser import BoundaryDenoiser, Precond, PrecondConfig
    from diffdistill.networks.mlp import MLP
    from diffdistill.teachers.analytic import ring8

    torch.manual_seed(0)
    net = Precond(MLP(dim=2, hidden=16, num_layers=2), (2,), 0, PrecondConfig(kind="edm"))
    written = {"precond": net, "boundary": BoundaryDenoiser(net), "gmm": ring8()}
    for kind, den in written.items():
        assert den.config()["type"] == kind
        io.save_snapshot(tmp_path / kind, den, {"sampler": "onestep", "sigmas": [80.0, 0.0]})
    code = (f"import json, sys; from diffdistill import io; from pathlib import Path\n"
            f"out = {{}}\n"
            f"for kind in {sorted(written)!r}:\n"
            f"    den = io.load_snapshot(Path({str(tmp_path)!r}) / kind)[0]\n"
            f"    out[kind] = den.config()['type']\n"
            f"print(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {k: k for k in written}


def test_the_table_names_importable_builders():
    import importlib

    for kind, where in io.BUILTIN_BUILDERS.items():
        module, name = where.split(":")
        assert callable(getattr(importlib.import_module(module), name)), kind
