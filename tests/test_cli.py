"""The command line: every command driven once at a tiny size (in-process), `--help` with examples, and the
errors a person can act on (one line, no traceback; exit 2 for usage, 1 for failures).

Samples written by `diffdistill sample` are checked against the library's own sampler run independently
(`samplers.sample` with the same seeds), so the CLI's seed handling, batching and file formats are what is
tested."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill.cli.main import build_parser, main
from diffdistill.cli.sample import few_step_sigmas, parse_seeds, sampling_plan
from diffdistill.diffusion.denoiser import Precond
from diffdistill.errors import DiffdistillError, UsageError
from diffdistill.io import save_snapshot
from diffdistill.networks.unet import unet_preset
from diffdistill.samplers import default_sigmas, sample
from diffdistill.teachers.analytic import ring8


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `diffdistill ARGV` run in this process."""
    try:
        code = main(list(argv))
    except SystemExit as e:          # argparse: --help (0) and usage errors (2)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def digits_snapshot(tmp_path_factory):
    """A tiny class-conditional 1x8x8 UNet denoiser (random weights) with a 2-step Heun recipe."""
    torch.manual_seed(0)
    den = Precond(unet_preset("tiny", 8, 1, label_dim=10), (1, 8, 8), 10).eval()
    path = tmp_path_factory.mktemp("snap") / "model"
    save_snapshot(path, den, {"sampler": "heun", "steps": 2}, {"note": "test"})
    return path, den


# --------------------------------------------------------------------------------------------------
# --help


def _walk(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))


# Commands written before the rule "--help with examples" (not owned by the CLI's author; see the report).
WITHOUT_EXAMPLES = {("features",), ("bench",)}


def test_help_of_every_command_has_examples(capsys):
    seen = []
    for path, parser in _walk(build_parser()):
        text = parser.format_help()
        assert text.startswith("usage: diffdistill"), path
        if path not in WITHOUT_EXAMPLES:
            assert "examples:" in text, f"`diffdistill {' '.join(path)} --help` shows no examples"
        seen.append(path)
    assert {("demo",), ("sample", "figures"), ("sample", "tofolder"), ("sample", "npz"), ("distill", "gdd")} \
        <= set(seen)
    code, out, _ = run_cli(capsys, "sample", "figures", "--help")
    assert code == 0 and "--n-images" in out and "examples:" in out


# --------------------------------------------------------------------------------------------------
# Seeds and sampling plans


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("1,5,7") == [1, 5, 7]
    assert parse_seeds("0-2, 9") == [0, 1, 2, 9]
    for bad in ("a-b", "5-1", "1,1", "-3", "", "1,,2", "1.5"):
        with pytest.raises(UsageError, match="--seeds"):
            parse_seeds(bad)


def test_sampling_plans():
    teacher = ring8()
    # a teacher without a recipe: 18 Heun steps on the Karras grid, 35 NFE (EDM)
    plan = sampling_plan(teacher, {})
    assert plan["sampler"] == "heun" and plan["nfe"] == 35
    assert plan["sigmas"] == [float(s) for s in default_sigmas(teacher, 18, "heun")]
    # a recipe is kept as is; --steps changes an ODE sampler's grid
    assert sampling_plan(teacher, {"sampler": "onestep", "sigmas": [80.0, 0.0]})["sigmas"] == [80.0, 0.0]
    assert sampling_plan(teacher, {"sampler": "heun", "steps": 18}, steps=4)["nfe"] == 7
    euler = sampling_plan(teacher, {"sampler": "heun", "steps": 18}, steps=4, sampler="euler")
    assert euler["nfe"] == 4 and euler["sigmas"] == [float(s) for s in default_sigmas(teacher, 4, "euler")]
    # a one-step student asked for more steps: multistep over levels that never reach sigma_min
    two = sampling_plan(teacher, {"sampler": "onestep", "sigmas": [80.0, 0.0]}, steps=2)
    assert two["sampler"] == "multistep" and two["sigmas"] == few_step_sigmas(teacher, 2)
    assert len(two["sigmas"]) == 3 and two["sigmas"][0] == 80.0 and two["sigmas"][1] > 0.1
    # ... but a student trained at several levels (DMD2) uses a prefix of its own levels
    dmd2 = {"sampler": "multistep", "sigmas": [80.0, 10.0, 1.0, 0.2, 0.0]}
    assert sampling_plan(teacher, dmd2, steps=2)["sigmas"] == [80.0, 10.0, 0.0]
    with pytest.raises(UsageError, match="onestep"):
        sampling_plan(teacher, {}, steps=2, sampler="onestep")
    with pytest.raises(UsageError, match="sampler"):
        sampling_plan(teacher, {}, sampler="rk45")


# --------------------------------------------------------------------------------------------------
# sample figures / tofolder / npz


def test_sample_figures_grid(capsys, tmp_path, digits_snapshot):
    path, den = digits_snapshot
    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(capsys, "sample", "figures", str(out), str(path.parent), "--n-images", "49",
                                "--batch", "5", "--no-progress")
    assert code == 0, err
    assert "49 samples, heun 2 steps (3 NFE)" in stdout
    img = np.asarray(Image.open(out))
    assert img.shape == (7 * 64, 7 * 64)                  # 7x7 tiles of 8x8 pixels, upscaled 8x
    # oracle: the library's sampler with the recipe, one batch, labels seed % 10
    x = sample(den, 49, steps=2, sampler="heun", cond=torch.arange(49) % 10, batch=49)
    ref = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    tiles = img[::8, ::8]                                    # undo the nearest-neighbour upscaling
    for k in (0, 8, 48):
        r, c = divmod(k, 7)
        assert np.array_equal(tiles[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], ref[k, 0].numpy()), k


def test_sample_tofolder_and_npz_match_the_sampler(capsys, tmp_path, digits_snapshot):
    path, den = digits_snapshot
    folder = tmp_path / "pngs"
    code, _, err = run_cli(capsys, "sample", "tofolder", str(folder), str(path), "--seeds", "3,5,12",
                           "--steps", "3", "--sampler", "euler", "--class", "7", "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["000003.png", "000005.png", "000012.png", "dataset.json"]
    sig = default_sigmas(den, 3, "euler")
    x = sample(den, [3, 5, 12], sampler="euler", sigmas=sig, cond=7)
    expected = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)          # EDM's conversion
    assert np.array_equal(np.asarray(Image.open(folder / "000005.png")), expected[1, 0].numpy())

    npz = tmp_path / "x.npz"
    code, _, err = run_cli(capsys, "sample", "npz", str(npz), str(path), "--seeds", "3,5,12", "--steps", "3",
                           "--sampler", "euler", "--class", "7", "--batch", "1", "--no-progress")
    assert code == 0, err
    with np.load(npz) as f:
        assert f["seeds"].tolist() == [3, 5, 12] and f["labels"].tolist() == [7, 7, 7]
        torch.testing.assert_close(torch.from_numpy(f["x"]), x, rtol=0, atol=1e-6)


def test_sample_toy_points(capsys, tmp_path):
    npz = tmp_path / "ring.npz"
    code, _, err = run_cli(capsys, "sample", "npz", str(npz), "toy:ring8", "--n", "64", "--seed", "10",
                           "--steps", "4", "--no-progress")
    assert code == 0, err
    with np.load(npz) as f:
        assert f["seeds"].tolist() == list(range(10, 74)) and (f["labels"] == -1).all()
        expected = sample(ring8(), list(range(10, 74)), steps=4, sampler="heun")
        torch.testing.assert_close(torch.from_numpy(f["x"]), expected, rtol=0, atol=1e-6)
    png = tmp_path / "ring.png"
    code, _, err = run_cli(capsys, "sample", "figures", str(png), "toy:ring8", "--n", "300", "--steps", "4",
                           "--no-progress")
    assert code == 0, err
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (512, 512, 3) and (img != 255).any()          # a scatter plot with points drawn


# --------------------------------------------------------------------------------------------------
# Errors a person can act on


def test_sample_errors(capsys, tmp_path, digits_snapshot):
    path, _ = digits_snapshot
    out = tmp_path / "o.png"
    missing = tmp_path / "no-such-run"
    code, _, err = run_cli(capsys, "sample", "figures", str(out), str(missing))
    assert code == 1
    assert_one_line_error(err, str(missing), "not found")
    code, _, err = run_cli(capsys, "sample", "figures", str(out), "toy:ring9")
    assert code == 1
    assert_one_line_error(err, "toy:ring9", "toy:ring8")

    out.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "sample", "figures", str(out), "toy:ring8", "--n", "8")
    assert code == 1 and out.read_bytes() == b"keep me"
    assert_one_line_error(err, str(out), "--force")
    code, _, err = run_cli(capsys, "sample", "figures", str(out), "toy:ring8", "--n", "8", "--force",
                           "--no-progress")
    assert code == 0 and out.read_bytes()[:4] == b"\x89PNG"

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "000002.png").write_bytes(b"x")
    code, _, err = run_cli(capsys, "sample", "tofolder", str(folder), str(path), "--seeds", "0-3")
    assert code == 1 and (folder / "000002.png").read_bytes() == b"x" and not (folder / "000000.png").exists()
    assert_one_line_error(err, "000002.png", "--force")

    usage = [
        (["sample", "figures", str(tmp_path / "a.png"), "toy:ring8", "--seeds", "1-x"], "--seeds"),
        (["sample", "figures", str(tmp_path / "a.png"), "toy:ring8", "--seeds", "9-2"], "backwards"),
        (["sample", "figures", str(tmp_path / "a.png"), "toy:ring8", "--seeds", "0-3", "--n", "5"], "--n"),
        (["sample", "figures", str(tmp_path / "a.png"), "toy:ring8", "--class", "3"], "unconditional"),
        (["sample", "figures", str(tmp_path / "a.png"), str(path), "--class", "10"], "0..9"),
        (["sample", "figures", str(tmp_path / "a.png"), "toy:ring8", "--steps", "0"], "--steps"),
        (["sample", "npz", str(tmp_path / "a.txt"), "toy:ring8"], ".npz"),
        (["sample", "figures", str(tmp_path / "a.png"), "toy:ring8", "--n", "0"], "--n"),
        (["sample", "figures", str(tmp_path / "a.png"), "toy:ring8", "--seeds"], "expected one argument"),
    ]
    for argv, fragment in usage:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert_one_line_error(err, fragment)
    assert not (tmp_path / "a.png").exists()

    code, _, err = run_cli(capsys, "sample", "tofolder", str(tmp_path / "pts"), "toy:ring8")
    assert code == 1
    assert_one_line_error(err, "not images", "sample npz")
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "sample", "figures", str(tmp_path / "c.png"), "toy:ring8", "--device",
                               "cuda")
        assert code == 1
        assert_one_line_error(err, "CUDA is not available")
    with pytest.raises(DiffdistillError, match="toy:ring9"):      # --debug: the exception itself
        main(["--debug", "sample", "figures", str(tmp_path / "b.png"), "toy:ring9"])


def test_distill_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "distill", "gdd", "--teacher", "toy:ring8", "--out", str(tmp_path / "g"))
    assert code == 2
    assert_one_line_error(err, "--data")
    missing = tmp_path / "teachers" / "nothing"
    code, _, err = run_cli(capsys, "distill", "di", "--teacher", str(missing), "--out", str(tmp_path / "d"))
    assert code == 1
    assert_one_line_error(err, str(missing))
    code, _, err = run_cli(capsys, "distill", "di", "--teacher", "toy:ring9", "--out", str(tmp_path / "d"))
    assert code == 1
    assert_one_line_error(err, "toy:ring9")
    code, _, err = run_cli(capsys, "distill", "kd", "--teacher", "toy:ring8")          # --out is required
    assert code == 2
    assert_one_line_error(err, "--out")
    code, _, err = run_cli(capsys, "demo", "--methods", "kd,xx", "--out", str(tmp_path / "demo"))
    assert code == 2
    assert_one_line_error(err, "--methods")
    code, _, err = run_cli(capsys, "convert", "edm", str(tmp_path / "missing.pkl"), str(tmp_path / "conv"))
    assert code == 1
    assert_one_line_error(err, "missing.pkl")


# --------------------------------------------------------------------------------------------------
# Each command once, tiny


def test_train_distill_pairs_eval_on_the_ring(capsys, tmp_path):
    teacher_run = tmp_path / "toy"
    code, out, err = run_cli(capsys, "train-teacher", "--data", "toy:ring8", "--preset", "toy", "--out",
                             str(teacher_run), "--max-steps", "2", "--batch", "16", "--no-progress")
    assert code == 0, err
    assert (teacher_run / "model" / "model.json").is_file()

    student_run = tmp_path / "di"
    code, out, err = run_cli(capsys, "distill", "di", "--teacher", str(teacher_run), "--out",
                             str(student_run), "--max-steps", "2", "--batch", "16", "--kimg", "0.032",
                             "--no-progress")
    assert code == 0, err
    recipe = json.loads((student_run / "model" / "model.json").read_text())["sampling"]
    assert recipe["sampler"] == "onestep"

    pairs = tmp_path / "pairs"
    code, out, err = run_cli(capsys, "kd-pairs", "--teacher", "toy:ring8", "--pairs", str(pairs), "--n-pairs",
                             "32", "--heldout", "8", "--shard-size", "32", "--pairs-steps", "2")
    assert code == 0, err
    assert (pairs / "pairs.json").is_file()

    result = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "eval", str(student_run), "--ref-data", "toy:ring8", "--n", "64",
                             "--out", str(result))
    assert code == 0, err
    assert result.is_file()

    npz = tmp_path / "s.npz"                      # a student run samples by its own recipe (one step)
    code, out, err = run_cli(capsys, "sample", "npz", str(npz), str(student_run), "--n", "16",
                             "--no-progress")
    assert code == 0 and "onestep 1 steps (1 NFE)" in out, err


def test_data_and_feature_commands(capsys, tmp_path):
    code, out, err = run_cli(capsys, "dataset", "info", "digits")
    assert code == 0 and "1797" in out + err, out + err
    code, out, err = run_cli(capsys, "ref-stats", "digits", "--out", str(tmp_path / "ref.npz"), "--n", "64",
                             "--device", "cpu")
    assert code == 0, err
    with np.load(tmp_path / "ref.npz") as f:
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64)
    from diffdistill.metrics.features import DIGITS_CLASSIFIER

    code, out, err = run_cli(capsys, "features", "info", str(DIGITS_CLASSIFIER))
    assert code == 0, err


def test_eval_reads_sample_npz_output_and_labels_its_numbers(capsys, tmp_path, digits_snapshot):
    """What `sample npz` writes (raw float samples, some outside [-1, 1]) evaluates as it is: clamped and quantised
    as `eval RUN` does, so it gives the numbers of the same images saved as uint8, and of the run itself."""
    from diffdistill.metrics.features import to_uint8

    path, _ = digits_snapshot
    npz = tmp_path / "s.npz"
    code, out, err = run_cli(capsys, "sample", "npz", str(npz), str(path), "--n", "24", "--no-progress")
    assert code == 0, err
    with np.load(npz) as f:
        x = f["x"]
    assert np.abs(x).max() > 1                              # raw samples: refused by the data reader before
    np.savez(tmp_path / "u8.npz", x=to_uint8(torch.from_numpy(x).clamp(-1, 1)).permute(0, 2, 3, 1).numpy())
    common = ("--ref-data", "digits", "--ref-n", "200", "--metrics", "fid,is", "--is-splits", "3")
    values = []
    for target in (npz, tmp_path / "u8.npz", path):
        result = tmp_path / f"{len(values)}.json"
        code, out, err = run_cli(capsys, "eval", str(target), "--n", "24", "--out", str(result), *common)
        assert code == 0, err
        assert "fid-24 [digits classifier, not Inception]" in out and "is-24 [digits classifier, not " \
               "Inception; 3 splits]" in out
        assert "features (digits_classifier)" in err          # progress bars by default
        values.append({r["metric"]: r for r in json.loads(result.read_text())["records"]})
    from_npz, from_u8, from_run = values
    assert from_npz["fid"]["value"] == from_u8["fid"]["value"] and from_npz["is"]["value"] == from_u8["is"]["value"]
    assert from_npz["fid"]["value"] == pytest.approx(from_run["fid"]["value"], rel=1e-6)
    rec = from_npz["fid"]
    assert rec["seeds"] == "0-23" and rec["layout"] == "sample-npz" and "clamped to [-1, 1]" in rec["conversion"]
    assert rec["label"] == "fid-24 [digits classifier, not Inception]"
    assert from_npz["is"]["split_convention"] == "3 splits" and from_npz["is"]["splits"] == 3

    # ADM's split convention, recorded; --no-progress hides the bars
    code, out, err = run_cli(capsys, "eval", str(npz), "--n", "24", "--ref-data", "digits", "--metrics", "is",
                             "--is-split-size", "10", "--out", str(tmp_path / "adm.json"), "--no-progress")
    assert code == 0 and "features (" not in err, err
    rec = json.loads((tmp_path / "adm.json").read_text())["records"][0]
    assert rec["splits"] == 3 and rec["split_size"] == 10 and rec["label"].endswith("; 10 per split]")


def test_eval_help_shows_the_default_sample_count(capsys):
    code, out, _ = run_cli(capsys, "eval", "--help")
    assert code == 0 and "50000 with Inception" in out and "10000 with a classifier" in out
    assert "--no-progress" in out and "--is-split-size" in out


# --------------------------------------------------------------------------------------------------
# Runs a user can always sample; --version, --debug after the command, the subcommand's usage


def _stop_after_first_step(monkeypatch):
    """Ctrl-C during the first step of the next training run (the loop finishes that step, then stops)."""
    import os
    import signal

    from diffdistill.train import loop

    real = loop._Run.train_step

    def train_step(self, sums):
        real(self, sums)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop._Run, "train_step", train_step)


def _scatter_of(snapshot, n, path):
    from diffdistill.io import load_snapshot
    from diffdistill.train.stats import save_scatter

    den, recipe, _ = load_snapshot(snapshot)
    x = sample(den, n, steps=recipe.get("steps"), sampler=recipe["sampler"], sigmas=recipe.get("sigmas"))
    return np.asarray(Image.open(save_scatter(x, path)))


def test_distill_grids_and_sampling_an_interrupted_run(capsys, tmp_path, monkeypatch):
    run = tmp_path / "di"
    cmd = ["distill", "di", "--teacher", "toy:ring8", "--out", str(run), "--max-steps", "3", "--batch", "16",
           "--kimg", "0.048", "--no-progress"]
    _stop_after_first_step(monkeypatch)
    code, out, err = run_cli(capsys, *cmd)
    assert code == 130 and "done" not in out
    assert f"stopped at step 1 (0.016 kimg); {run / 'latest'} holds its sampler-ready EMA model" in err, err
    assert not list(run.glob("samples-*.png"))           # no grid when stopped: Ctrl-C stops quickly
    monkeypatch.undo()

    # `sample RUN` reads RUN/latest (said on stderr), the same samples as the snapshot itself
    code, out, err = run_cli(capsys, "sample", "npz", str(tmp_path / "a.npz"), str(run), "--n", "8", "--no-progress")
    assert code == 0 and f"sampling {run / 'latest'} (step 1, 0.016 kimg)" in err, err
    code, _, _ = run_cli(capsys, "sample", "npz", str(tmp_path / "b.npz"), str(run / "latest"), "--n", "8",
                         "--no-progress")
    assert code == 0
    assert np.array_equal(np.load(tmp_path / "a.npz")["x"], np.load(tmp_path / "b.npz")["x"])

    # a checkpoint is refused in one line that names the snapshot to sample
    (ckpt_json,) = (run / "checkpoints").glob("ckpt-*.json")
    for target in (run / "checkpoints", ckpt_json):
        code, _, err = run_cli(capsys, "sample", "figures", str(tmp_path / "c.png"), str(target))
        assert code == 1
        assert_one_line_error(err, str(target), "training checkpoint", f"sample {run / 'latest'}")
    import shutil
    shutil.rmtree(run / "latest")                            # a run killed hard: checkpoints only
    code, _, err = run_cli(capsys, "sample", "figures", str(tmp_path / "c.png"), str(run))
    assert code == 1
    assert_one_line_error(err, str(run), "no sampler-ready snapshot", "rerun the run's command")
    code, _, err = run_cli(capsys, "sample", "figures", str(tmp_path / "c.png"), str(ckpt_json))
    assert_one_line_error(err, "training checkpoint", f"{run} has none yet: rerun")

    # rerunning the command finishes the run: RUN/model, RUN/latest gone, and a grid of RUN/model's samples by
    # default (64 points from seeds 0..63, drawn by its recipe)
    code, out, err = run_cli(capsys, *cmd)
    assert code == 0 and out.splitlines()[-1] == f"done: {run / 'model'}", err
    assert not (run / "latest").exists()
    assert sorted(p.name for p in run.glob("samples-*.png")) == ["samples-final.png"]
    expected = _scatter_of(run / "model", 64, tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(run / "samples-final.png")), expected)
    code, out, err = run_cli(capsys, "sample", "npz", str(tmp_path / "m.npz"), str(run), "--n", "8",
                             "--no-progress")
    assert code == 0 and "did not finish" not in err

    # --grid-kimg K: a readable name every K kimg as well; --grid-kimg 0: no grids at all
    code, _, err = run_cli(capsys, *cmd[:5], str(tmp_path / "k"), *cmd[6:], "--grid-kimg", "0.032")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "k").glob("samples-*.png")) == ["samples-final.png",
                                                                             "samples-kimg000000.032.png"]
    code, _, err = run_cli(capsys, *cmd[:5], str(tmp_path / "none"), *cmd[6:], "--grid-kimg", "0")
    assert code == 0, err
    assert not list((tmp_path / "none").glob("samples-*.png"))


def test_version_debug_after_the_command_and_the_subcommands_usage(capsys, tmp_path):
    from diffdistill import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"diffdistill {__version__}\n"
    with pytest.raises(DiffdistillError, match="toy:ring9"):      # --debug after the command name
        main(["sample", "figures", str(tmp_path / "b.png"), "toy:ring9", "--debug"])
    with pytest.raises(DiffdistillError, match="toy:ring9"):
        main(["distill", "di", "--debug", "--teacher", "toy:ring9", "--out", str(tmp_path / "d")])
    code, _, err = run_cli(capsys, "sample", "figures", str(tmp_path / "b.png"), "toy:ring9")
    assert code == 1 and "Traceback" not in err                  # without it: one line
    # an unknown option: one line naming it and the (sub)command it was given to (not its usage block)
    code, _, err = run_cli(capsys, "distill", "kd", "--teacher", "toy:ring8", "--out", str(tmp_path / "k"),
                           "--bogus", "3")
    assert code == 2 and err.startswith("diffdistill distill kd: error:") and len(err.splitlines()) == 1, err
    assert_one_line_error(err, "diffdistill distill kd: error: unrecognized arguments: --bogus 3")
    code, _, err = run_cli(capsys, "sample", "npz", "x.npz", "toy:ring8", "--nn", "3")
    assert code == 2 and err.startswith("diffdistill sample npz: error:") and len(err.splitlines()) == 1, err
    assert_one_line_error(err, "unrecognized arguments: --nn 3")
    code, _, err = run_cli(capsys, "--bogus", "sample", "npz", "x.npz", "toy:ring8")
    assert code == 2 and err.startswith("diffdistill: error:") and len(err.splitlines()) == 1, err
    args = build_parser().parse_args(["sample", "npz", "x.npz", "toy:ring8"])
    assert not any(k.startswith("_") for k in vars(args))        # nothing of the parser leaks into args


def _distill_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as tdist
    try:
        code = main(["distill", "di", "--teacher", "toy:ring8", "--out", out, "--max-steps", "2", "--batch", "16",
                     "--kimg", "0.032", "--no-progress", "--device", "cpu"])
        assert code == 0
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_two_ranks_print_one_done_line(capfd, tmp_path):
    """As under `torchrun --nproc_per_node=2`: two gloo processes, one "done: RUN/model" line (rank 1 printed
    "done: None")."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_distill_rank, args=(2, port, str(tmp_path / "run")), nprocs=2, join=True,
                       start_method="fork")
    out = capfd.readouterr().out
    assert [line for line in out.splitlines() if "done" in line] == [f"done: {tmp_path / 'run' / 'model'}"]


# --------------------------------------------------------------------------------------------------
# issue 19: several classes at once, labelled sample folders, --clip


def test_sample_class_lists_and_labelled_folders(capsys, tmp_path, digits_snapshot):
    """`--class 3,5` cycles through the classes (npz, tofolder) or gives one grid row per class (figures);
    `tofolder` writes a conditional model's labels as EDM's dataset.json, so the folder reads back as a labelled
    data set (and a second call adds to it); bad class lists are usage errors."""
    from diffdistill.data import open_dataset

    path, den = digits_snapshot
    opts = ("--steps", "2", "--sampler", "euler", "--no-progress")
    npz = tmp_path / "x.npz"
    code, _, err = run_cli(capsys, "sample", "npz", str(npz), str(path), "--seeds", "0-4", "--class", "3,5", *opts)
    assert code == 0, err
    with np.load(npz) as f:
        assert f["labels"].tolist() == [3, 5, 3, 5, 3]
        x = sample(den, 5, steps=2, sampler="euler", cond=torch.tensor([3, 5, 3, 5, 3]))
        torch.testing.assert_close(torch.from_numpy(f["x"]), x, rtol=0, atol=1e-6)

    png = tmp_path / "rows.png"                                    # 2 rows of 3: classes 3 then 5
    code, _, err = run_cli(capsys, "sample", "figures", str(png), str(path), "--n", "6", "--class", "3,5", *opts)
    assert code == 0, err
    tiles = np.asarray(Image.open(png))[::8, ::8]
    assert tiles.shape == (2 * 8, 3 * 8)
    x = sample(den, 6, steps=2, sampler="euler", cond=torch.tensor([3, 3, 3, 5, 5, 5]))
    ref = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for k in range(6):
        r, c = divmod(k, 3)
        assert np.array_equal(tiles[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], ref[k, 0].numpy()), k

    folder = tmp_path / "pngs"
    code, _, err = run_cli(capsys, "sample", "tofolder", str(folder), str(path), "--seeds", "0-3", "--class", "3,5",
                           *opts)
    assert code == 0, err
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta == {"labels": [["000000.png", 3], ["000001.png", 5], ["000002.png", 3], ["000003.png", 5]]}
    code, _, err = run_cli(capsys, "sample", "tofolder", str(folder), str(path), "--seeds", "10-11", *opts)
    assert code == 0, err                                          # default labels: seed % 10
    ds = open_dataset(folder)
    assert len(ds) == 6 and ds.labels.tolist() == [3, 5, 3, 5, 0, 1]
    x = sample(den, [0, 1], steps=2, sampler="euler", cond=torch.tensor([3, 5]))
    expected = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    assert np.array_equal(np.asarray(Image.open(folder / "000001.png")), expected[1, 0].numpy())

    for bad, fragment in (("3,x", "--class"), ("3,3", "twice"), ("-1", "non-negative"), ("3,10", "0..9"),
                          ("", "--class")):
        code, _, err = run_cli(capsys, "sample", "npz", str(tmp_path / "bad.npz"), str(path), "--n", "2",
                               "--class", bad, *opts)
        assert code == 2, (bad, err)
        assert_one_line_error(err, fragment)
    assert not (tmp_path / "bad.npz").exists()
    (folder / "dataset.json").write_text('{"labels": 3}')
    code, _, err = run_cli(capsys, "sample", "tofolder", str(folder), str(path), "--seeds", "20", *opts)
    assert code == 1 and not (folder / "000020.png").exists()
    assert_one_line_error(err, "dataset.json", "malformed")


def test_sample_clip_flag(capsys, tmp_path, digits_snapshot):
    """`--clip V` clips x-hat to [-V, V] at each step (PD's clipped DDIM sampling): the samples equal the sampler
    with clip_denoised=V (eps recomputed from the clipped x-hat, the official PD sampler's); `--clip 0` turns a
    recipe's clipping off; the flag wins over the recipe; samplers that do not clip refuse it in one line."""
    path, den = digits_snapshot
    sig = default_sigmas(den, 3, "euler")
    cond = torch.arange(4) % 10

    def cli(model, *extra):
        out = tmp_path / "c.npz"
        code, _, err = run_cli(capsys, "sample", "npz", str(out), str(model), "--n", "4", "--force", "--no-progress",
                               *extra)
        assert code == 0, err
        with np.load(out) as f:
            return torch.from_numpy(f["x"])

    clipped = sample(den, 4, sampler="euler", sigmas=sig, cond=cond, clip_denoised=0.05)
    plain = sample(den, 4, sampler="euler", sigmas=sig, cond=cond)
    assert (clipped - plain).abs().max() > 1e-2 and clipped.abs().max() <= 0.05 + 1e-6
    torch.testing.assert_close(cli(path, "--steps", "3", "--sampler", "ddim", "--clip", "0.05"), clipped,
                               rtol=0, atol=1e-6)
    snap = tmp_path / "clipping"                                   # a recipe that clips to 1 (PD's export)
    save_snapshot(snap, den, {"sampler": "euler", "sigmas": sig.tolist(), "clip_denoised": True})
    torch.testing.assert_close(cli(snap, "--clip", "0.05"), clipped, rtol=0, atol=1e-6)
    torch.testing.assert_close(cli(snap, "--clip", "0"), plain, rtol=0, atol=1e-6)
    assert sampling_plan(den, {"sampler": "euler", "steps": 2, "clip_denoised": True, "clip_keeps_eps": True},
                         clip=0.5)["options"] == {"clip_denoised": 0.5, "clip_keeps_eps": True}
    for extra, fragment in ((["--clip", "0.5"], "heun sampler does not clip"), (["--clip", "-1"], "--clip"),
                            (["--clip", "nan"], "--clip"), (["--clip", "x"], "--clip")):
        code, _, err = run_cli(capsys, "sample", "npz", str(tmp_path / "bad.npz"), str(path), "--n", "2", *extra)
        assert code == 2, (extra, err)
        assert_one_line_error(err, fragment)


@pytest.fixture
def keep_threads(monkeypatch):
    """Restore torch's thread count and OMP_NUM_THREADS after a test that runs commands with `--threads`."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_threads_reach_torch_before_the_command_runs(capsys, monkeypatch, keep_threads):
    import os

    import diffdistill.cli.eval as eval_cli
    import diffdistill.cli.train as train_cli

    seen = []

    def record(args):
        seen.append((args.command, torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")))
        return 0

    monkeypatch.setattr(train_cli, "run", record)      # registered by build_parser, inside main
    monkeypatch.setattr(eval_cli, "run_eval", record)
    assert run_cli(capsys, "train-teacher", "--data", "digits", "--out", "x", "--threads", "2")[0] == 0
    monkeypatch.delenv("OMP_NUM_THREADS")          # set by the run above, for the processes a command starts
    assert run_cli(capsys, "train-teacher", "--data", "digits", "--out", "x")[0] == 0             # the default: 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")                                                     # or the user's
    assert run_cli(capsys, "eval", "some-run")[0] == 0
    assert seen == [("train-teacher", 2, "2"), ("train-teacher", 1, "1"), ("eval", 2, "2")]
    code, out, _ = run_cli(capsys, "train-teacher", "--help")
    assert code == 0 and "--threads N" in out and "else 1" in " ".join(out.split())
    for bad in ("0", "-1", "two"):
        code, _, err = run_cli(capsys, "train-teacher", "--data", "digits", "--out", "x", "--threads", bad)
        assert code == 2, err
        assert_one_line_error(err, "--threads")
    code, _, err = run_cli(capsys, "dataset", "info", "digits", "--threads", "1")   # only commands that compute
    assert code == 2 and "unrecognized arguments: --threads 1" in err


def test_train_teacher_names_its_network_before_training(capsys, monkeypatch):
    from diffdistill.cli.train import describe_network
    from diffdistill.presets import build_network
    from diffdistill.train import loop

    printed = []
    monkeypatch.setattr(loop, "train", lambda *a, **k: printed.append(capsys.readouterr().out) or {"model": "M"})
    code, out, _ = run_cli(capsys, "train-teacher", "--data", "digits", "--preset", "digits", "--out", "x",
                           "--device", "cpu")
    net = build_network("digits", (1, 8, 8), label_dim=10)
    count = sum(p.numel() for p in net.parameters())
    assert code == 0 and out == "done: M\n" and round(count / 1e6, 1) == 0.3
    assert printed == ["preset digits: UNet, 16 channels x 1,2 (2 levels), 2 blocks per level; 0.3M parameters\n"]
    describe_network("cifar10", net, (3, 32, 32), "cpu")       # the warning depends on the preset and the device
    out, err = capsys.readouterr()
    assert out.startswith("preset cifar10: UNet") and "--preset cifar10-small" in err and "3x32x32" in err
    describe_network("cifar10", net, (3, 32, 32), "cuda")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["0", "8,0", ",", "-2"])
def test_train_teacher_refuses_non_positive_architecture_lists(value, capsys):
    """--attn 0 used to train and write a snapshot that could not be read back; 'none' turns attention off."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train-teacher", "--data", "digits", "--out", "x", "--attn", value])
    assert e.value.code == 2 and "positive integers" in capsys.readouterr().err
    assert build_parser().parse_args(["train-teacher", "--data", "digits", "--out", "x", "--attn", "none"]).attn == []
