"""The converged-students benchmark's plumbing (issue 20): the job scheduler, the goals, the figure and one real
(tiny) student job. The benchmark itself runs for hours; these check only that it computes what it reports."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import converged  # noqa: E402
from benchmarks.common import Context  # noqa: E402
from diffdistill.demo.report import svg_line_chart  # noqa: E402


def _ok(ctx, value):
    return value


def _fail(ctx):
    raise RuntimeError("boom\nsecond line")


def test_scheduler_orders_by_dependencies_and_isolates_failures(tmp_path):
    ctx = Context(jobs=1, work=tmp_path, log=lambda m: None)
    jobs = {"teacher": (_ok, ("T",)),
            "student": (_ok, (lambda r: r["teacher"] + "-student",)),    # reads its dependency's result
            "broken": (_fail, ()),
            "after-broken": (_ok, (1,)),
            "independent": (_ok, (2,))}
    deps = {"student": ["teacher"], "after-broken": ["broken"]}
    out = converged._run_jobs(ctx, jobs, deps)
    assert out["results"] == {"teacher": "T", "student": "T-student", "independent": 2}
    assert out["errors"]["broken"] == "failed: RuntimeError: boom"
    assert out["errors"]["after-broken"] == "skipped: broken failed"


def _timed(ctx, name, seconds):
    import time

    with open(ctx.work / "events.txt", "a") as f:
        f.write(f"{time.time()} start {name}\n")
    time.sleep(seconds)
    with open(ctx.work / "events.txt", "a") as f:
        f.write(f"{time.time()} end {name}\n")
    return name


def test_scheduler_starts_the_first_ready_job_in_priority_order_when_a_worker_frees(tmp_path):
    # Two workers. The student becomes ready when its (quick) teacher ends, while three slow jobs behind it in
    # the order wait: it must start before the last of them (a scheduler that queued every ready job at once
    # would start it last), and never more jobs than workers run at once. Read from the jobs' own start and end
    # times, so that a loaded machine, where a worker starts late, cannot change the verdict.
    ctx = Context(jobs=2, work=tmp_path, log=lambda m: None)
    jobs = {"teacher": (_timed, ("teacher", 0.1)), "student": (_timed, ("student", 0.1)),
            **{f"short{i}": (_timed, (f"short{i}", 2.0)) for i in (1, 2, 3)}}
    out = converged._run_jobs(ctx, jobs, {"student": ["teacher"]})
    assert not out["errors"] and set(out["results"]) == set(jobs)
    events = sorted((float(t), kind, name) for t, kind, name in
                    (line.split() for line in (tmp_path / "events.txt").read_text().splitlines()))
    at = {(kind, name): t for t, kind, name in events}
    running, most = 0, 0
    for _, kind, _ in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    assert most == 2
    assert at["end", "teacher"] <= at["start", "student"] < at["start", "short3"]


_ORPHAN = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
sys.path.insert(0, sys.argv[1])
from benchmarks import converged
with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=converged._worker_init,
                         initargs=(1, os.getpid())) as pool:
    pool.submit(time.sleep, 0).result()          # the worker is up, its watch started
    pool.submit(time.sleep, 120)                 # a long job
    print(*pool._processes, flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_killed_benchmark_leaves_no_worker_training(tmp_path):
    """SIGKILL the scheduler's process in the middle of a job: its worker ends within seconds instead of training
    on into a run directory that a restarted benchmark would train into too."""
    import signal
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, root], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(proc.stdout.readline().split()[0])
        assert _alive(worker)
        time.sleep(1.5)
        assert _alive(worker)                    # a live parent: the worker keeps working
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived the killed benchmark"
    finally:
        proc.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_jobs_by_priority():
    jobs = {f"{d}/{j}": None for d in ("ring", "digits", "mnist16")
            for j in (["teacher-rows", "kd", "gdd"] + (["prepare", "teacher"] if d != "ring" else []))}
    assert list(converged._by_priority(jobs, ["ring", "digits", "mnist16"])) == [
        "mnist16/prepare", "mnist16/teacher", "digits/prepare", "digits/teacher",
        "mnist16/kd", "mnist16/gdd", "mnist16/teacher-rows", "digits/kd", "digits/gdd", "digits/teacher-rows",
        "ring/kd", "ring/gdd", "ring/teacher-rows"]


def test_goals_of_an_image_data_set():
    plan = converged.DataPlan("digits", "t", "digits", "image", students=converged._students(10, 64, 8))
    t_nfe = {4: 20.0, 35: 3.0}
    one_step = dict(kd=5.0, pd=6.0, gdd=2.5, di=4.0, sid=4.5, dmd2=7.0, cd=25.0)
    # FIDs of the parts (the same seeds for every model): sid - kd per part 0.1, -1.9, 0.1, an error of the
    # difference of 0.67, so 4.5 vs 5 is within twice it; di - kd -0.9, -1.1, -1.0, an error of 0.06: outside
    parts = dict(kd=[5.0, 6.0, 4.0], sid=[5.1, 4.1, 4.1], di=[4.1, 4.9, 3.0])
    records = [dict(dataset="digits", method=m, headline="best" if m == "gdd" else "last", kimg=100.0,
                    best=dict(kimg=50.0), teacher_images=0, student_images=100_000, spread=parts.get(m),
                    error=converged._error(parts.get(m))) for m in one_step]
    goals = {g["goal"].split(": ", 1)[1]: g for g in converged._goals(plan, t_nfe, one_step, records,
                                                                        dict(kimg=1000.0))}
    assert goals["best one-step student at or below the teacher's 35-NFE FID"]["met"] is True
    below4 = goals["every one-step student below the teacher's 4-NFE FID"]
    assert below4["met"] is False and below4["why"] == "not below: cd"
    ranking = goals["GDD, SiD, DMD2 and DI one-step each below KD's and PD's"]
    assert ranking["met"] is False and ranking["why"].startswith("not below: dmd2;")    # 7 >= min(kd 5, pd 6)
    assert ranking["why"].endswith("within twice the estimated error of the difference from kd: sid")
    assert "sid 4.5 ± 0.33" in ranking["value"] and "gdd 2.5," in ranking["value"]
    # the error of an FID from its parts' FIDs: their standard deviation / sqrt(parts)
    assert abs(converged._error([1.0, 2.0, 3.0]) - 1 / 3 ** 0.5) < 1e-12 and converged._error(None) is None
    # ... and of a difference: the parts' differences [0.1, -1.9, 0.1] have standard deviation 2 / sqrt(3)
    assert abs(converged._paired_error(parts["sid"], parts["kd"]) - 2 / 3 ** 0.5 / 3 ** 0.5) < 1e-12
    # GDD's reported snapshot is its best, at 50 of 100 kimg: half of its 100k student images = 5% of 1 Mimg
    compute = goals["distillation compute of the best student at most 25% of the teacher's training images"]
    assert compute["met"] is True and "gdd: 50 kimg" in compute["value"] and "(5%)" in compute["value"]
    # the second data set's goal: within 1.2x of the teacher (gdd 2.5 vs 1.2 x 2.2 = 2.64 met, vs 1.2 x 2.0 not)
    second = converged.DataPlan("mnist16", "t", "m.zip", "image", students=plan.students, teacher_goal=1.2)
    name = "best one-step student within 1.2x of the teacher's 35-NFE FID"
    for t35, met in ((2.2, True), (2.0, False)):
        goals = {g["goal"].split(": ", 1)[1]: g for g in converged._goals(second, {4: 20.0, 35: t35}, one_step,
                                                                            [dict(r, dataset="mnist16")
                                                                             for r in records], dict(kimg=1000.0))}
        assert goals[name]["met"] is met and f"(x{2.5 / t35:.2f})" in goals[name]["value"]


def test_goals_of_the_ring():
    plan = converged.DataPlan("ring", "t", "toy:ring8", "ring", students=converged._students(10, 64, 8))
    one_step = {m: 0.04 for m in plan.students}
    goals = converged._goals(plan, {35: 0.03}, one_step, [], None)
    assert [g["met"] for g in goals] == [True]
    one_step["cd"] = 0.05                                   # > 1.5 x 0.03
    assert converged._goals(plan, {35: 0.03}, one_step, [], None)[0]["why"].startswith("not within: cd")


def test_line_chart_draws_curves_reference_lines_and_linear_ticks():
    svg = svg_line_chart({"gdd": [(10, 8.0), (20, 4.0), (30, 3.0)], "kd": [(30, 5.0)]}, xlabel="kimg",
                         ylabel="FID", hlines={"teacher 35 NFE": 2.0, "missing": None})
    assert svg.count("<polyline") == 1 and svg.count('stroke-dasharray="6 4"') == 2     # line + its legend
    assert "teacher 35 NFE" in svg and "missing" not in svg
    assert ">0<" in svg and ">30<" in svg                        # a linear x axis from 0 to 30
    assert "no results to plot" in svg_line_chart({}, xlabel="x", ylabel="y")


def test_one_ring_student_job(tmp_path):
    """A real (tiny) DI student on the ring: the run, its snapshot curve, the best snapshot chosen by the curve and
    scored on other samples, the picture."""
    from benchmarks.quality import ToyScorer, _load

    ctx = Context(jobs=1, work=tmp_path / "work", results=tmp_path / "results" / "r", log=lambda m: None)
    plan = converged.DataPlan("ring", "t", "toy:ring8", "ring", n_eval=500, n_final=700, eval_kimg=2,
                              students={"di": converged.StudentPlan(4, 256)})
    r = converged.job_student(ctx, plan, "di", "toy:ring8")
    assert [k for k, _ in r["curve"]] == [2.048, 4.096]              # a snapshot every 2 kimg (8 steps of 256)
    run = tmp_path / "work" / "ring-di"

    def score(snapshot, n, seed):
        den, recipe, _ = _load(str(snapshot))
        return ToyScorer(n, seed=seed)(den, recipe, "cpu")["distance"]
    snaps = sorted(run.glob("snapshot-kimg*"))
    # the curve: n_eval samples from seed 0; the reported values: n_final samples from FINAL_SEED
    assert [v for _, v in r["curve"]] == [score(s, 500, 0) for s in snaps]
    assert r["last"]["value"] == score(run / "model", 700, converged.FINAL_SEED) != r["curve"][-1][1]
    pick = min(range(2), key=lambda i: r["curve"][i][1])
    assert r["best"]["kimg"] == r["curve"][pick][0] and r["best"]["snapshot"] == str(snaps[pick])
    assert r["best"]["value"] == score(snaps[pick], 700, converged.FINAL_SEED) and r["headline"] == "last"
    assert (tmp_path / r["picture"]).is_file() and r["student_updates"] == 16
    # a second call reuses the finished job (same command, same teacher)
    stamp = (tmp_path / "work" / "ring-di" / "bench-student.json").stat().st_mtime_ns
    assert converged.job_student(ctx, plan, "di", "toy:ring8") == json.loads(
        (tmp_path / "work" / "ring-di" / "bench-student.json").read_text())
    assert (tmp_path / "work" / "ring-di" / "bench-student.json").stat().st_mtime_ns == stamp


def test_student_options_measure_quality_during_training_and_pd_once_per_round(tmp_path):
    """Image students: FID every eval_kimg; PD: at the end of each of its rounds (64 -> 1 steps over 120 kimg: every
    20 kimg); the ring: snapshots every eval_kimg, scored after training."""
    ctx = Context(work=tmp_path)
    image = converged.DataPlan("digits", "t", "digits", "image", features="digits", n_eval=300, eval_kimg=10,
                               students=converged._converged("image"))
    pd_opts = converged.student_options(ctx, image, "pd")
    assert (pd_opts["start_steps"], pd_opts["end_steps"], pd_opts["eval_kimg"]) == (64, 1, 20.0)
    for method in ("kd", "gdd", "sid"):
        opts = converged.student_options(ctx, image, method)
        assert (opts["metrics"], opts["eval_kimg"], opts["eval_n"]) == ("fid", 10, 300)
        assert opts["ref"] == str(tmp_path / "digits-ref.npz")
    ring = converged.DataPlan("ring", "t", "toy:ring8", "ring", eval_kimg=200, students=converged._converged("ring"))
    opts = converged.student_options(ctx, ring, "pd")
    assert opts["snapshot_kimg"] == 200 and "metrics" not in opts and "eval_kimg" not in opts


def test_a_subset_run_keeps_the_other_data_sets_of_the_record(tmp_path):
    old = dict(tables=[dict(title="old ring", dataset="ring"), dict(title="old digits", dataset="digits")],
               goals=[dict(goal="ring goal", dataset="ring"), dict(goal="old digits goal", dataset="digits")],
               results=dict(runs=[dict(dataset="ring", method="kd"), dict(dataset="digits", method="kd")]))
    (tmp_path / "converged.json").write_text(json.dumps(old))
    new = dict(tables=[dict(title="new digits", dataset="digits")], goals=[dict(goal="new digits goal",
                                                                               dataset="digits")],
               results=dict(runs=[dict(dataset="digits", method="gdd")], errors={}))
    ctx = Context(results=tmp_path, real_data=("digits",))
    out = converged._with_unselected(ctx, ["digits"], new)
    assert [t["title"] for t in out["tables"]] == ["old ring", "new digits"]
    assert [g["goal"] for g in out["goals"]] == ["ring goal", "new digits goal"]
    assert out["results"]["runs"] == [dict(dataset="ring", method="kd"), dict(dataset="digits", method="gdd")]
    assert converged._with_unselected(Context(results=tmp_path), ["digits"], new) == new   # a full run: as is


def test_the_api_runs_are_the_runs_of_their_recorded_commands(tmp_path):
    """A teacher and a student made through the Python API with the benchmark's dicts (evaluation during training
    included: the teacher's FID; KD's own model selection beside FID) are the runs their recorded commands make:
    the same config.json, the same weights, the same evaluations."""
    import shlex

    import torch
    from safetensors.torch import load_file

    from benchmarks.common import command_of, distill_run, train_teacher_run
    from benchmarks.quality import method_options
    from diffdistill.cli.main import main as cli_main
    from diffdistill.methods.recipes import short_run_settings

    ref = tmp_path / "ref.npz"
    assert cli_main(["ref-stats", "digits", "--features", "digits", "--n", "200", "--out", str(ref),
                     "--no-progress"]) == 0
    evaluation = dict(metrics="fid", ref=str(ref), features="digits", eval_kimg=0.032, eval_n=8)
    runs = {}
    for way in ("api", "cli"):
        root = tmp_path / way
        teacher = root / "teacher"
        options = dict(preset="digits", total_kimg=0.032, batch=16, snapshot_kimg=0.016, grid_kimg=0, resume=True,
                       **evaluation)
        command = command_of(["train-teacher", "--data", "digits", "--out", str(teacher), "--no-progress",
                              "--seed", "0"], options)
        runs[way] = [teacher]
        if way == "api":
            assert not train_teacher_run("digits", teacher, options, command=command).interrupted
        else:
            assert cli_main(shlex.split(command)[1:]) == 0
        for method in ("kd",):
            out = root / method
            options = {**method_options(method, "digits", 16), **short_run_settings(method, "image", 0.032, 16),
                       **evaluation}
            command = command_of(["distill", method, "--teacher", str(teacher), "--out", str(out), "--kimg", "0.032",
                                  "--batch", "16", "--no-progress", "--seed", "0"], options)
            runs[way].append(out)
            if way == "api":
                result = distill_run(method, str(teacher), None, out, dict(options, total_kimg=0.032, batch=16),
                                     command=command)
                assert not result.interrupted and result.best is not None
            else:
                assert cli_main(shlex.split(command)[1:]) == 0
    for api, cli in zip(runs["api"], runs["cli"]):
        def read(path, root):
            return path.read_text().replace(str(root), "ROOT")

        assert json.loads(read(api / "config.json", tmp_path / "api")) == \
            json.loads(read(cli / "config.json", tmp_path / "cli")), api.name
        assert read(api / "command.txt", tmp_path / "api") == read(cli / "command.txt", tmp_path / "cli")
        evals = {p: [(r["kimg"], {k: v for k, v in r.items() if k.startswith("eval/")})
                     for r in map(json.loads, (p / "stats.jsonl").read_text().splitlines())
                     if any(k.startswith("eval/fid") for k in r)] for p in (api, cli)}
        assert evals[api] == evals[cli] and evals[api], api.name
        for snap in ("model", "best"):
            files = sorted(f.name for f in (api / snap).glob("*.safetensors"))
            assert files and files == sorted(f.name for f in (cli / snap).glob("*.safetensors")), (api.name, snap)
            for name in files:
                a, c = (load_file(p / snap / name) for p in (api, cli))
                assert a.keys() == c.keys() and all(torch.equal(v, c[k]) for k, v in a.items()), (api.name, name)


def test_image_scorer_seeds_and_parts():
    """The reported values' scorer: samples from its first seed, and the FIDs of its disjoint parts, each the FID
    of a scorer of that part's seeds alone."""
    import torch

    from benchmarks.quality import ImageScorer
    from diffdistill.diffusion.denoiser import Precond
    from diffdistill.networks.unet import unet_preset

    torch.manual_seed(0)
    den = Precond(unet_preset("tiny", 8, 1, label_dim=10), (1, 8, 8), 10).eval()
    recipe = dict(sampler="euler", steps=2)
    whole = ImageScorer("digits", "digits", 300, "cpu", n_ref=400, seed=50, splits=3)(den, recipe, "cpu")
    parts = [ImageScorer("digits", "digits", 100, "cpu", n_ref=400, seed=50 + 100 * i)(den, recipe, "cpu")
             for i in range(3)]
    assert len(whole["spread"]) == 3 and len({round(v, 6) for v in whole["spread"]}) == 3
    for got, part in zip(whole["spread"], parts):
        assert abs(got - part["distance"]) <= 1e-6 * part["distance"]
    assert "spread" not in parts[0] and whole["distance"] not in whole["spread"]


def test_paired_comparison_of_snapshots(tmp_path, capsys):
    """`python -m benchmarks.paired`: each model's FID and parts are the image scorer's on the shared seeds; a model
    compared with itself differs by exactly 0 with error 0; the difference of two models is that of their FIDs."""
    import json

    import torch

    from benchmarks import paired
    from benchmarks.quality import ImageScorer
    from diffdistill.diffusion.denoiser import Precond
    from diffdistill.io import save_snapshot
    from diffdistill.networks.unet import unet_preset

    recipe = dict(sampler="euler", steps=2)
    snaps = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        den = Precond(unet_preset("tiny", 8, 1, label_dim=10), (1, 8, 8), 10).eval()
        snaps.append(str(save_snapshot(tmp_path / f"m{seed}", den, recipe)))
    out = tmp_path / "paired.json"
    args = ["--data", "digits", "--features", "digits", "--n", "120", "--parts", "3", "--seed", "7"]
    assert paired.main(args + [snaps[0], snaps[1], snaps[0], "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    scorer = ImageScorer("digits", "digits", 120, "cpu", seed=7, splits=3)
    want = [scorer(*paired._load(s)[:2], "cpu") for s in snaps]
    for row, w in zip(rows, want + want[:1]):
        assert abs(row["fid"] - w["distance"]) <= 1e-9 * w["distance"] and row["parts"] == w["spread"]
    assert "diff" not in rows[0]
    assert abs(rows[1]["diff"] - (want[1]["distance"] - want[0]["distance"])) < 1e-9
    assert rows[1]["diff_error"] > 0 and rows[2]["diff"] == 0 and rows[2]["diff_error"] == 0
    assert "vs first" in capsys.readouterr().out
    assert paired.main(args[:6] + ["--parts", "1", snaps[0]]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
