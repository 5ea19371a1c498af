"""Evaluation during training from the command line (`--metrics fid --ref REF.npz --features NET --eval-kimg K`):
the metric curve lands in stats.jsonl under a name that says its protocol, RUN/best is the snapshot with the best
value (checked by measuring RUN/best again), KD's own held-out model selection keeps working beside it, and bad
settings fail with one line before anything is trained."""

from __future__ import annotations

import json

import pytest
import torch

from diffdistill.cli.main import main
from diffdistill.diffusion.denoiser import Precond
from diffdistill.io import load_snapshot, save_snapshot
from diffdistill.metrics.features import Classifier, ClassifierConfig, save_classifier
from diffdistill.networks.unet import unet_preset
from diffdistill.train.evaluate import make_train_evaluator
from tests.cli_util import one_error_line, run_cli

FID_KEY = "fid-64/digits_classifier"      # metric, samples per evaluation, feature network


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 1x8x8 UNet teacher (random weights) and digits references (with and without features)."""
    root = tmp_path_factory.mktemp("train_eval")
    torch.manual_seed(0)
    den = Precond(unet_preset("tiny", 8, 1, label_dim=10), (1, 8, 8), 10).eval()
    save_snapshot(root / "teacher", den, {"sampler": "heun", "steps": 2})
    assert main(["ref-stats", "digits", "--features", "digits", "--out", str(root / "ref.npz"), "--n", "256",
                 "--device", "cpu"]) == 0
    assert main(["ref-stats", "digits", "--features", "digits", "--out", str(root / "ref-feats.npz"), "--n", "256",
                 "--device", "cpu", "--save-features"]) == 0
    return root


def eval_records(run) -> list[dict]:
    lines = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    return [r for r in lines if any(k.startswith("eval/") for k in r)]


class Exported:
    """A method whose export is a saved snapshot (to measure RUN/best and RUN/model again)."""

    def __init__(self, path):
        self.denoiser, self.recipe, _ = load_snapshot(path)

    def export(self, ema=None):
        return self.denoiser, self.recipe


def test_distill_kd_fid_curve_and_best(files, tmp_path, capsys):
    run = tmp_path / "kd"
    code, _, err = run_cli(capsys, "distill", "kd", "--teacher", files / "teacher", "--out", run, "--batch", 16,
                           "--kimg", 0.128, "--device", "cpu", "--no-progress", "--n-pairs", 128, "--heldout", 32,
                           "--shard-size", 128, "--pairs-steps", 2, "--metrics", "fid", "--ref", files / "ref.npz",
                           "--features", "digits", "--eval-kimg", 0.016, "--eval-n", 64)
    assert code == 0, err
    records = eval_records(run)
    assert [r["step"] for r in records] == list(range(1, 9))          # every 16 images of 128
    curve = [r[f"eval/{FID_KEY}"] for r in records]
    assert all(c > 0 for c in curve) and len(set(curve)) > 1
    # KD's own evaluation is still there, beside the user's metric
    assert all(r["eval/best_heldout_loss"] <= r["eval/heldout_loss"] for r in records)

    # RUN/best: the snapshot of the lowest FID on the curve, and measuring it again gives that value
    i = min(range(len(curve)), key=curve.__getitem__)
    meta = json.loads((run / "best" / "model.json").read_text())["meta"]
    assert meta["step"] == records[i]["step"] and meta["metrics"][FID_KEY] == curve[i]
    assert meta["eval"]["n"] == 64 and meta["eval"]["seeds"] == "0-63"
    assert meta["eval"]["feature_net"]["name"] == "digits_classifier"
    assert meta["eval"]["keys"] == {"fid": FID_KEY} and meta["eval"]["ref"] == str(files / "ref.npz")
    assert meta["eval"]["labels"] == {FID_KEY: "fid-64 [digits classifier, not Inception]"}   # as `eval` prints
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["best_metric"] == FID_KEY and config["train"]["best_mode"] == "min"
    measure = make_train_evaluator("fid", "digits", files / "ref.npz", n=64, labelled=True)
    assert measure(Exported(run / "best"))[FID_KEY] == pytest.approx(curve[i], rel=1e-9)
    # RUN/model is still KD's export (its best-by-held-out EMA), which the last evaluation measured
    assert measure(Exported(run / "model"))[FID_KEY] == pytest.approx(curve[-1], rel=1e-9)


def test_train_teacher_fid_kid(files, tmp_path, capsys):
    run = tmp_path / "teacher"
    code, _, err = run_cli(capsys, "train-teacher", "--data", "digits", "--preset", "digits", "--out", run,
                           "--max-steps", 3, "--batch", 16, "--sample-steps", 2, "--device", "cpu", "--no-progress",
                           "--metrics", "fid,kid", "--ref", files / "ref-feats.npz", "--eval-kimg", 0.016,
                           "--eval-n", 32)
    assert code == 0, err
    records = eval_records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(set(r) == {"kimg", "step", "eval/fid-32/digits_classifier", "eval/kid-32/digits_classifier"}
               for r in records)
    curve = [r["eval/fid-32/digits_classifier"] for r in records]
    meta = json.loads((run / "best" / "model.json").read_text())["meta"]
    assert meta["metrics"]["fid-32/digits_classifier"] == min(curve)


def test_bad_evaluation_settings(files, tmp_path, capsys):
    teacher, ref = files / "teacher", files / "ref.npz"
    out = tmp_path / "run"
    base = ["distill", "kd", "--teacher", teacher, "--out", out, "--device", "cpu", "--no-progress"]
    usage = [(["--metrics", "fid"], "--ref"),
             (["--metrics", "fid", "--ref", tmp_path / "missing.npz"], "missing.npz"),
             (["--ref", ref], "--metrics"),
             (["--metrics", "fid", "--ref", ref, "--eval-kimg", 0], "--eval-kimg"),
             (["--metrics", "fid", "--ref", ref, "--eval-n", 1], "--eval-n"),
             (["--metrics", "fid,xx", "--ref", ref], "xx"),
             (["--metrics", "toy", "--ref", ref], "toy")]
    for extra, fragment in usage:
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2, (extra, err)
        one_error_line(err, fragment)
    # --eval-kimg alone: nothing to evaluate for a method without its own evaluation
    code, _, err = run_cli(capsys, "train-teacher", "--data", "toy:ring8", "--out", out, "--eval-kimg", 1)
    assert code == 2
    one_error_line(err, "--eval-kimg", "--metrics")

    # a reference made with another 64-d feature network, refused before training
    torch.manual_seed(1)
    other = save_classifier(Classifier(ClassifierConfig()).eval(), tmp_path / "other.safetensors")
    other_ref = tmp_path / "other-ref.npz"
    assert main(["ref-stats", "digits", "--features", str(other), "--out", str(other_ref), "--n", "64",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    failures = [(["--metrics", "fid", "--ref", other_ref, "--features", "digits"], (str(other_ref), "weights_sha256")),
                (["--metrics", "kid", "--ref", ref], (str(ref), "--save-features"))]
    for extra, fragments in failures:
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 1, (extra, err)
        one_error_line(err, *fragments)
    assert not out.exists()                   # nothing trained, nothing written
