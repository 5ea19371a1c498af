"""Issue 19 item 5: normal CLI runs print no FutureWarning/DeprecationWarning noise.

Python shows every FutureWarning by default; a library's DeprecationWarning (stacklevel=2) is attributed to the
code that called the deprecated API, so one that diffdistill causes names a diffdistill module, and `python -W
error::DeprecationWarning` turns it into a crash. The runs below are tiny versions of the commands users run first
(train-teacher, distill on the ring and on a digits teacher, sample, eval, kd-pairs, dataset info; a run's grid is
drawn as `sample figures` draws it), in-process, with FutureWarning and DeprecationWarning attributed to diffdistill
turned into errors, and every FutureWarning from anywhere recorded (there must be none).

`export diffusers` runs with every DeprecationWarning an error: diffusers' schedulers call np.array(tensor), which
numpy >= 2 answers with a DeprecationWarning about torch's __array__, and `python -W error::DeprecationWarning -m
diffdistill export diffusers ...` failed with it; export.py now ignores only that message around those calls.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest

from diffdistill.cli.main import main

OURS = r"diffdistill(\.|$)"


@contextlib.contextmanager
def deprecations_of_ours_are_errors():
    """FutureWarning/DeprecationWarning attributed to a diffdistill module raise; every other warning is recorded
    (yielded list)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("error", category=category, module=OURS)
        yield seen


def test_the_filter_catches_ours_only():
    """The filter used below: a deprecation attributed to a diffdistill module raises, one attributed to torch is
    only recorded."""
    with deprecations_of_ours_are_errors() as seen:
        with pytest.raises(FutureWarning):
            warnings.warn_explicit("old", FutureWarning, "loop.py", 1, module="diffdistill.train.loop")
        with pytest.raises(DeprecationWarning):
            warnings.warn_explicit("old", DeprecationWarning, "__init__.py", 1, module="diffdistill")
        warnings.warn_explicit("old", DeprecationWarning, "module.py", 1, module="torch.nn.modules.module")
    assert [str(w.message) for w in seen] == ["old"]


def test_tiny_cli_runs_raise_no_deprecation_of_ours(tmp_path, capsys):
    runs = tmp_path / "runs"
    commands = [
        ["train-teacher", "--data", "digits", "--out", runs / "digits", "--kimg", "0.256", "--grid-kimg", "0"],
        ["distill", "gdd", "--teacher", "toy:ring8", "--data", "toy:ring8", "--out", runs / "gdd-ring", "--kimg",
         "0.512", "--batch", "256", "--recipe", "short"],
        ["distill", "di", "--teacher", runs / "digits", "--out", runs / "di-digits", "--kimg", "0.128"],
        ["sample", "figures", tmp_path / "grid.png", runs / "di-digits"],
        ["eval", runs / "di-digits", "--metrics", "fid,kid,is,pr", "--features", "digits", "--ref-data", "digits",
         "--n", "64"],
        ["kd-pairs", "--teacher", runs / "digits", "--pairs", runs / "pairs", "--n-pairs", "64", "--heldout", "16",
         "--pairs-steps", "2"],
        ["dataset", "info", "digits"],
    ]
    with deprecations_of_ours_are_errors() as seen:
        for argv in commands:
            extra = [] if argv[0] == "dataset" else ["--no-progress"]
            assert main([*argv, *extra]) == 0, argv
    assert (runs / "digits/model").is_dir() and (runs / "di-digits/model").is_dir()
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in seen if issubclass(w.category, FutureWarning)]
    assert future == []
    assert "Warning" not in capsys.readouterr().err


def test_export_diffusers_with_deprecations_as_errors(tmp_path):
    """`export diffusers` with every DeprecationWarning an error (as `python -W error::DeprecationWarning`):
    numpy 2's warning inside diffusers' schedulers is ignored where export.py makes and runs them, and nothing
    else warns."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    teacher = tmp_path / "ddpm"
    diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4).save_pretrained(teacher / "unet")
    diffusers.DDPMScheduler().save_pretrained(teacher / "scheduler")
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        assert main(["distill", "di", "--teacher", teacher, "--out", run, "--kimg", "0.008", "--batch", "4",
                     "--no-progress"]) == 0
        assert main(["export", "diffusers", run, tmp_path / "exported"]) == 0
    assert (tmp_path / "exported/unet").is_dir()
