"""Class labels of the data against the teacher's classes are checked up front (diffdistill.data.labels)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from diffdistill.cli.main import main
from diffdistill.data.labels import check_labels
from diffdistill.diffusion.denoiser import Precond
from diffdistill.errors import UsageError
from diffdistill.io import save_snapshot
from diffdistill.networks.unet import unet_preset


def test_a_four_class_teacher_given_ten_class_data_is_one_line(capsys, tmp_path):
    teacher = tmp_path / "t4"
    save_snapshot(teacher, Precond(unet_preset("tiny", 8, 1, label_dim=4), (1, 8, 8), 4).eval(),
                  {"sampler": "heun", "steps": 2})
    run = tmp_path / "run"
    code = main(["distill", "gdd", "--teacher", str(teacher), "--data", "digits", "--out", str(run),
                 "--max-steps", "1", "--batch", "8", "--kimg", "0.008", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--data digits has class labels 0..9 (10 classes), the teacher {teacher} knows 4 (0..3)" in err
    assert not run.exists()                                   # refused before anything is written


def test_what_passes():
    data = types.SimpleNamespace(labels=np.array([0, 3, 9]), label_dim=10)
    for label_dim in (0, 10, 12):                             # unconditional teachers ignore labels
        check_labels(data, types.SimpleNamespace(label_dim=label_dim), "d", "t")
    check_labels(types.SimpleNamespace(labels=None, label_dim=0), types.SimpleNamespace(label_dim=4), "d", "t")
    with pytest.raises(UsageError, match="labels 0..9 .* the student s knows 9"):
        check_labels(data, types.SimpleNamespace(label_dim=9), "d", "s", what="student")
