"""Smoke test of the benchmark runner's plumbing (no timing assertions): alternation order, records, the
report, the CLI wrapper, and the instrumented `distill` run (the Python API) that the quality benchmark uses."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ sits beside the package at the repository root (not installed): make it importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import __main__ as runner  # noqa: E402
from benchmarks.common import Context, alternate, goal, table, write_record  # noqa: E402
from benchmarks.quality import TeacherCounter, distill, student_updates  # noqa: E402
from benchmarks.report import load_records, render  # noqa: E402
from diffdistill.cli.main import main as cli_main  # noqa: E402


def test_alternate_flips_the_order_every_round():
    calls = []
    r = alternate(lambda: calls.append("a"), lambda: calls.append("b"), rounds=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert r["rounds"] == 4 and r["ratio"] > 0 and r["a_median_s"] >= 0


def test_record_and_report(tmp_path):
    ctx = Context(results=tmp_path, command="python -m benchmarks --test")
    payload = dict(tables=[table("A table", ["x", "y|z"], [[1, "two"]], "a note")],
                   goals=[goal("a goal", False, "0.5", "because")], results={})
    path = write_record(ctx, "speed", 0.0, [1.0, 2.0, 3.0], payload)
    rec = json.loads(path.read_text())
    for key in ("command", "machine", "load_average_start", "load_average_end", "date"):
        assert key in rec
    assert rec["machine"]["torch"] == torch.__version__ and rec["machine"]["threads"] == 1
    text = render(load_records(tmp_path))
    assert "python -m benchmarks --test" in text and "**A table**" in text and "y\\|z" in text
    assert "| speed | a goal | **no** | 0.5 | because |" in text
    assert "## 2. Quality against NFE" in text and "not run yet" in text and "1 torch thread(s)" in text
    assert "Machine: " in text and "(speed)" not in text
    # Records from another machine: each machine is named with the benchmarks it ran.
    other = copy.deepcopy(rec)
    other["machine"]["cpu"] = "Another CPU"
    (tmp_path / "memory.json").write_text(json.dumps(other))
    text = render(load_records(tmp_path))
    assert "Machines: " in text and "Another CPU" in text and "(speed);" in text and "(memory)." in text


def test_runner_gpu_rows_without_gpu_and_usage_errors(tmp_path):
    report = tmp_path / "B.md"
    args = ["--only", "gpu", "--results", str(tmp_path), "--report", str(report), "--work", str(tmp_path / "w")]
    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU rows")
    assert runner.main(args) == 0
    rec = json.loads((tmp_path / "gpu.json").read_text())
    assert all("not run: no GPU" in row[3] for row in rec["tables"][0]["rows"])
    assert "not run: no GPU" in report.read_text()
    assert runner.main(["--only", "nonsense", "--results", str(tmp_path), "--report", "-"]) == 2
    assert runner.main(["--device", "cuda", "--results", str(tmp_path), "--report", "-"]) == 1


def test_cli_wrapper_registered(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_teacher_counter_ignores_copies():
    net = torch.nn.Linear(2, 2)
    counter = TeacherCounter()
    counter.attach(net)
    twin = copy.deepcopy(net)           # methods initialise students from copies of the teacher
    net(torch.zeros(3, 2))
    twin(torch.zeros(5, 2))
    assert (counter.calls, counter.images) == (1, 3)


def test_distill_through_the_api_is_measured(tmp_path):
    ctx = Context(work=tmp_path)
    run = distill(ctx, "kd", "toy:ring8", tmp_path / "kd", kimg=0.256, batch=64,
                  options=dict(n_pairs=256, heldout=0, shard_size=256))
    # recorded (and recognised on a rerun) as the command a user would type, as when it ran through the CLI
    assert run["command"] == (f"diffdistill distill kd --teacher toy:ring8 --out {tmp_path / 'kd'} --kimg 0.256 "
                              "--batch 64 --no-progress --seed 0 --n-pairs 256 --heldout 0 --shard-size 256")
    assert (tmp_path / "kd" / "command.txt").read_text().strip() == run["command"]
    assert run["steps"] == 4 and run["student_updates"] == 4 and run["kimg"] == pytest.approx(0.256)
    # the pairs: 256 teacher samples by EDM's Heun with 18 steps = 35 evaluations each, plus the few of the
    # pairs module's determinism check (students, copies of nothing here, are not counted)
    assert 256 * 35 <= run["teacher_images"] <= 256 * 35 + 16
    assert (tmp_path / "kd" / "model" / "model.json").is_file()


def test_student_updates_counts_the_exported_group():
    class M:
        def groups(self):
            from diffdistill.methods.base import Group
            return {"fake": Group([], every=1), "generator": Group([], every=5)}

        def ema_targets(self):
            return {"generator": None}

    assert student_updates(M(), 12) == 3


def test_real_data_quality_pipeline(tmp_path):
    """The MNIST/CIFAR-10 section end to end on a tiny labelled npz: teacher, own classifier, teacher rows,
    students (DMD2's 2- and 4-step generators are runs of their own), cost columns, the goal; a missing file
    is a 'not run' row."""
    import numpy as np

    from benchmarks.quality_real import Budget, RealData, dataset_table

    rng = np.random.default_rng(0)
    shared = tmp_path / "shared"
    shared.mkdir()
    np.savez(shared / "tiny.npz", x_train=(rng.random((300, 8, 8)) * 255).astype(np.uint8),
             y_train=np.arange(300) % 10)
    data = RealData("tiny", "tiny.npz", "tiny test images", "digits", {})
    budget = Budget(teacher_kimg=0.128, classifier_epochs=1, classifier_max_n=200, student_kimg=0.064,
                    student_batch=16, kd_pairs=64, n=128, n_ref=200)
    ctx = Context(work=tmp_path / "work", shared_data=shared)
    runs, goals = [], []
    t = dataset_table(ctx, data, runs, goals, methods=["kd", "dmd2"], budget=budget)
    rows = t["rows"]
    assert [r[2] for r in rows if r[0] == "teacher"] == [1, 2, 4, 8, 18, 35]
    floor = next(r for r in rows if r[0] == "real images (noise floor)")
    assert "128 real images, not in the 172 of the reference" == floor[4] and float(floor[3]) >= 0
    assert [(r[0], r[2]) for r in rows if r[0] not in ("teacher", floor[0])] == [
        ("kd", 1), ("kd", 2), ("kd", 4), ("dmd2", 1), ("dmd2", 2), ("dmd2", 4)]
    scored = [r for r in rows if r[3] != "–"]
    assert len(scored) == 6 + 1 + 1 + 3 and all(float(r[3].replace(",", "")) >= 0 for r in scored)
    two, four = (next(r for r in rows if r[0] == "dmd2" and r[2] == n) for n in (2, 4))
    assert two[1].startswith("own run") and four[1].startswith("own run")
    commands = [r["command"] for r in runs if r.get("method") == "dmd2" and r.get("sampling_steps") == 4]
    assert len(commands) == 1 and commands[0].count("--gen-sigmas") == 1
    assert (tmp_path / "work" / "tiny-teacher-0.128kimg" / "model" / "model.json").is_file()
    assert "held-out accuracy" in t["note"] and "not Inception" in t["title"]
    assert len(goals) == 1 and "tiny" in goals[0]["goal"]
    missing = dataset_table(ctx, RealData("gone", "gone.npz", "absent", "digits", {}), [], [], budget=budget)
    assert "not run" in missing["rows"][0][1]
    # Rerun: every student is reused (same command, same teacher weights) with the compute measured the first time.
    again: list = []
    t2 = dataset_table(ctx, data, again, [], methods=["kd", "dmd2"], budget=budget)
    students = [r for r in runs if "method" in r and "error" not in r]
    assert [r["wall_s"] for r in again if "method" in r] == [r["wall_s"] for r in students]
    assert [r[5:] for r in t2["rows"] if r[0] == "dmd2"] == [r[5:] for r in rows if r[0] == "dmd2"]


def test_real_data_selection_keeps_the_other_data_sets_table(tmp_path):
    """--real-data runs some data sets and keeps the others' tables, goals and runs from the existing record
    (its command and date said in the note); unknown names are refused."""
    from benchmarks import quality_real
    from benchmarks.quality import COLUMNS
    from diffdistill.errors import DiffdistillError

    mnist, cifar = quality_real.DATASETS
    old = dict(title=f"{mnist.title}: FID", columns=COLUMNS, rows=[["teacher", "heun 18", 35] + [""] * 5],
               note="old note.")
    payload = dict(tables=[old, dict(title=cifar.title, columns=["data set", "status"], rows=[["cifar10", "x"]])],
                   goals=[goal("mnist: best one-step", False, "kd 41.9"), goal("cifar10: best", True, "1")],
                   results=dict(runs=[dict(dataset="mnist", model="teacher"), dict(dataset="cifar10")]))
    ctx = Context(results=tmp_path / "results", shared_data=tmp_path / "absent", real_data=("cifar10",),
                  command="python -m benchmarks --only quality_real")
    write_record(ctx, "quality_real", 0.0, [0.0], payload)
    out = quality_real.run(ctx)
    kept, fresh = out["tables"]
    assert kept["rows"] == old["rows"] and kept["note"].startswith("old note. Made by `python -m benchmarks")
    assert "not run" in fresh["rows"][0][1]           # cifar10 ran: its file is absent here
    assert [g["value"] for g in out["goals"]] == ["kd 41.9"]
    assert out["results"]["runs"] == [dict(dataset="mnist", model="teacher")]
    ctx.real_data = ("mnist",)
    (tmp_path / "results" / "quality_real.json").unlink()
    assert "not selected" in quality_real.run(ctx)["tables"][1]["rows"][0][1]
    ctx.real_data = ("svhn",)
    with pytest.raises(DiffdistillError, match="svhn"):
        quality_real.run(ctx)


def test_bench_never_imports_a_benchmarks_folder_found_above_the_working_directory(tmp_path, monkeypatch):
    """`diffdistill bench` (registered at every CLI start) imports only its own checkout's benchmarks/, never one in
    the working directory's parents, which used to be put on sys.path and imported."""
    from diffdistill.cli import bench
    from diffdistill.errors import DiffdistillError

    planted = tmp_path / "checkout"
    (planted / "benchmarks").mkdir(parents=True)
    (planted / "diffdistill").mkdir()
    marker = tmp_path / "imported"
    (planted / "benchmarks" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (planted / "benchmarks" / "__main__.py").write_text("")
    work = planted / "runs" / "today"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(bench, "_checkout_root", lambda: tmp_path / "an-installed-package")
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if not (Path(p or ".").resolve() / "benchmarks" / "__main__.py").is_file()])
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(DiffdistillError, match="not part of the installed package"):
        bench._benchmarks()
    assert not marker.exists()
