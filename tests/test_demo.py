"""`diffdistill demo` at its tiny test size: the report has a row for the teacher and every method, a failing
method becomes a row with its error, finished stages are reused on a rerun, and the page is self-contained; each
stage (a call of the Python API) is the same run as the command the report shows for it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from diffdistill.cli.main import main
from diffdistill.demo import METHODS
from diffdistill.demo.report import svg_plot
from diffdistill.errors import DiffdistillError


def _table_models(report: str) -> list[str]:
    """First-column cells of the markdown tables (without the header rows)."""
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| model")
            and not line.startswith("| stage")]
    return [row.split("|")[1].strip() for row in rows]


def _check_page(out: Path) -> str:
    page = (out / "index.html").read_text()
    assert "<svg" in page and "</html>" in page
    assert not re.search(r"(src|href)=['\"](https?:)?//", page), "the page must not load anything remote"
    for src in re.findall(r"<img src='([^']+)'", page):
        assert (out / src).is_file(), src
    return page


def test_tiny_demo_report_failure_row_and_reuse(tmp_path, monkeypatch, capsys):
    import dataclasses

    from diffdistill.methods import sid

    def broken(cfg, teacher, data, loop):
        raise DiffdistillError("sid: simulated failure for the test")

    monkeypatch.setattr(sid, "SPEC", dataclasses.replace(sid.SPEC, create=broken))
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 0
    assert "1 stage(s) failed (ring-sid)" in capsys.readouterr().err

    report = (out / "report.md").read_text()
    models = _table_models(report)
    assert "teacher (exact)" in models
    for method in METHODS:
        assert method in models, f"no row for {method}"
    sid_rows = [line for line in report.splitlines() if line.startswith("| sid |")]
    assert len(sid_rows) == 1
    assert "failed: training failed: sid: simulated failure for the test" in sid_rows[0]
    page = _check_page(out)
    assert "simulated failure for the test" in page

    results = json.loads((out / "results.json").read_text())
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert {r["method"] for r in ok} == {"teacher", *METHODS} - {"sid"}
    for r in ok:
        assert r["nfe"] >= 1 and r["sample_seconds"] >= 0 and 0 <= r["within_3std"] <= 1
        assert (out / r["image"]).is_file()
    # one Heun step is one Euler step (the same algorithm): identical samples, identical numbers
    by = {(r["model"], r["sampler"], r["steps"]): r for r in ok}
    heun1, euler1 = by[("teacher (exact)", "heun", 1)], by[("teacher (exact)", "euler", 1)]
    assert heun1["nfe"] == euler1["nfe"] == 1 and heun1["sliced_w2"] == euler1["sliced_w2"]
    # multi-step students: CD at 1 and 2 steps, PD one row per round (tiny: 4 -> 2 -> 1)
    assert sorted(r["steps"] for r in ok if r["method"] == "cd") == [1, 2]
    assert sorted(r["steps"] for r in ok if r["method"] == "pd") == [1, 2]

    # rerun: every finished stage is reused, the failed one is retried (and now works)
    monkeypatch.undo()
    assert main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    stages = {s["key"]: s for s in again["stages"]}
    assert all(s["ok"] for s in stages.values())
    assert [k for k, s in stages.items() if not s["reused"]] == ["ring-sid"]
    assert all(r["status"] == "ok" for r in again["rows"])
    first = {(r["model"], r["sampler"], r["steps"]): r.get("sliced_w2") for r in ok}
    second = {(r["model"], r["sampler"], r["steps"]): r.get("sliced_w2") for r in again["rows"]}
    assert all(second[k] == v for k, v in first.items())        # reused stages give the same numbers


def test_plot_without_results():
    results = {"rows": [dict(track="ring", status="failed", model="kd", method="kd")]}
    assert "no results to plot" in svg_plot(results, "ring")


def test_demo_refuses_a_file_as_out(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["demo", "--tiny", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "exists and is not a directory" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--tracks", "--methods"])
def test_demo_bad_lists(tmp_path, capsys, flag):
    assert main(["demo", "--tiny", "--out", str(tmp_path / "d"), flag, "nope"]) == 2
    assert flag in capsys.readouterr().err


def test_tiny_digits_track_fid_matches_the_library(tmp_path):
    """The digits track (a teacher trained for 2 steps, KD and CD students): the report's FID of a row is the
    FID the metrics library gives for the same seeds, labels (seed mod 10) and recipe."""
    import torch

    from diffdistill.data import open_dataset
    from diffdistill.io import load_snapshot
    from diffdistill.metrics import compute_features, feature_stats, fid_from_stats, load_feature_net
    from diffdistill.metrics.features import dataset_batches
    from diffdistill.samplers import sample

    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--tracks", "digits", "--methods", "kd,cd", "--out", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {r["method"] for r in rows} == {"teacher", "kd", "cd"}
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    models = _table_models((out / "report.md").read_text())
    assert {"teacher", "kd", "cd"} <= set(models)
    _check_page(out)

    row = next(r for r in rows if r["method"] == "kd")
    den, recipe, _ = load_snapshot(Path(row["spec"]) / "model")
    n = results["profile"]["n_eval"]
    x = sample(den, n, sampler=recipe["sampler"], sigmas=recipe["sigmas"], cond=torch.arange(n) % 10)
    net = load_feature_net("digits")
    gen, _ = compute_features(net, [x.clamp(-1, 1)])
    ref, _ = compute_features(net, dataset_batches(open_dataset("digits"), 512))
    assert row["fid"] == pytest.approx(fid_from_stats(feature_stats(gen), feature_stats(ref)), rel=1e-6)
    perm, half = np.random.default_rng(0).permutation(len(ref)), len(ref) // 2
    assert results["floors"]["digits_fid_split_half"] == pytest.approx(
        fid_from_stats(feature_stats(ref[perm[:half]]), feature_stats(ref[perm[half:]])), rel=1e-9)


def test_stage_settings_ignore_runtime_options():
    from diffdistill.demo.pipeline import stage_settings

    argv = ["distill", "kd", "--out", "r", "--device", "cpu", "--no-progress", "--batch", "8"]
    assert stage_settings(argv) == ["distill", "kd", "--out", "r", "--batch", "8"]


@pytest.mark.parametrize("kind", ["ring", "image"])
def test_short_run_options_parse_for_every_method(kind):
    """The settings shared by the demo and the benchmarks are options of each method's command line."""
    from diffdistill.cli.distill import METHODS
    from diffdistill.cli.main import build_parser
    from diffdistill.errors import UsageError
    from diffdistill.methods.recipes import short_run_options, short_run_settings

    for method in METHODS:
        settings = short_run_settings(method, kind, kimg=12.8, batch=64)
        args = build_parser().parse_args(["distill", method, "--teacher", "t", "--out", "o",
                                          *short_run_options(method, kind, kimg=12.8, batch=64)])
        assert args.method_module == method
        for key, value in settings.items():    # every setting parses back to its value
            parsed = args.ema if key == "ema_halflife_kimg" else getattr(args, key)
            assert parsed == (list(value) if isinstance(value, tuple) else value), (method, key)
    with pytest.raises(UsageError, match="teacher kind"):
        short_run_options("kd", "video", 1.0, 8)


def _stages(tmp_path, profile: str, **kwargs):
    from diffdistill.demo.pipeline import PROFILES, DemoConfig, build_stages

    cfg = DemoConfig(out=str(tmp_path), profile=profile, tracks=("ring", "digits"), **kwargs)
    return build_stages(cfg, PROFILES[profile], tmp_path / "runs")


@pytest.mark.parametrize("profile", ["tiny", "default"])
def test_a_stage_command_parses_to_the_settings_the_demo_gives_the_api(tmp_path, profile):
    """The command the report shows for a stage, parsed by the real CLI parser, is the method config (or the
    teacher's settings) and the loop that the demo hands to `diffdistill.distill` / `train_teacher`."""
    from diffdistill.api import distill_loop
    from diffdistill.cli.common import loop_settings
    from diffdistill.cli.main import build_parser
    from diffdistill.methods import get
    from diffdistill.methods.options import config_from_namespace, make_config
    from diffdistill.methods.teacher import TrainTeacherConfig
    from diffdistill.presets import train_config

    stages = _stages(tmp_path, profile, device="cpu", progress=False)
    assert {s.method for s in stages} == {"teacher", *METHODS}
    assert ("ring-teacher" in {s.key for s in stages}) == (profile == "default")
    for stage in stages:
        args = build_parser().parse_args(stage.argv)
        args.argv = stage.argv
        assert shlex.split(stage.command)[1:] == stage.argv and args.data == stage.data
        cls = TrainTeacherConfig if stage.method == "teacher" else get(stage.method).config
        assert config_from_namespace(cls, args) == make_config(cls, stage.settings), stage.key
        parsed = loop_settings(args)
        assert parsed.pop("command") == stage.command
        assert {k: parsed[k] for k in stage.loop} == stage.loop, stage.key
        if stage.method == "teacher":
            preset = stage.settings["preset"]
            assert train_config(preset, **parsed) == train_config(preset, **stage.loop), stage.key
        else:
            assert args.teacher == stage.teacher and args.method_module == stage.method
            assert distill_loop(**parsed) == distill_loop(**stage.loop), stage.key
    # the settings are the library's short-run recipe and the demo's plumbing, the recipe's EMA in the loop
    kd = next(s for s in stages if s.key == "digits-kd")
    from diffdistill.methods.recipes import short_run_settings

    recipe = short_run_settings("kd", "image", kd.loop["total_kimg"], kd.loop["batch"])
    assert kd.loop["ema_halflife_kimg"] == recipe.pop("ema_halflife_kimg")
    assert kd.settings == dict(n_pairs=kd.settings["n_pairs"], heldout=kd.settings["heldout"],
                               shard_size=kd.settings["shard_size"], gen_batch=512, **recipe)


@pytest.mark.parametrize("key", ["ring-kd", "ring-pd", "digits-teacher"])
def test_a_stage_is_the_same_run_as_its_command(tmp_path, key):
    """A stage run through the Python API and its command run by `diffdistill` give the same config.json and the
    same weights (one stage of the tiny demo, two optimiser steps)."""
    import torch

    from diffdistill.demo.pipeline import run_stage
    from diffdistill.io import load_snapshot

    runs = {}
    for name in ("api", "cli"):
        stage = next(s for s in _stages(tmp_path / name, "tiny", device="cpu", progress=False) if s.key == key)
        if name == "api":
            result = run_stage(stage, threads=1)
            assert result["ok"] and not result["reused"], result
        else:
            assert main(stage.argv) == 0
        runs[name] = stage.run_dir
    config = {n: json.loads((r / "config.json").read_text().replace(str(tmp_path / n), "ROOT"))
              for n, r in runs.items()}
    assert config["api"] == config["cli"]
    assert config["api"]["meta"].get("data") == ("digits" if key == "digits-teacher" else "toy:ring8")
    assert (runs["api"] / "command.txt").read_text().strip() == \
        (runs["cli"] / "command.txt").read_text().strip().replace(str(tmp_path / "cli"), str(tmp_path / "api"))
    nets = {n: load_snapshot(r / "model")[0].state_dict() for n, r in runs.items()}
    assert nets["api"].keys() == nets["cli"].keys()
    assert all(torch.equal(v, nets["cli"][k]) for k, v in nets["api"].items())
