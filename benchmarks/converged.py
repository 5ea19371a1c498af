"""Converged students (issue 20): every method trained until its one-step quality stops improving, on data a CPU
trains in a working session, against its teacher and each other.

For each data set the runner makes, through the library's Python API (`diffdistill.train_teacher`,
`diffdistill.distill`, each recorded as the equivalent `diffdistill` command, by which a finished job is reused)
and its commands without one (`diffdistill dataset convert`, `features train`, `ref-stats`), the teacher, then every
method's student at its `converged` budget with the quality measured during training (FID against kimg for image
data: `--metrics fid`; sliced W2 of snapshots for the ring), and reports:

- a table per data set: method, NFE, the last snapshot's and the best snapshot's quality, the kimg of the best,
  training kimg and wall time, teacher evaluations and student updates;
- one figure per data set: quality against student kimg, every method, with the teacher's 35-NFE and 4-NFE lines;
- a sample grid (or scatter plot) of every student beside the teacher's;
- the goals of the issue, met or not.

Jobs (a teacher, a student, the teacher's rows) run in `--jobs` worker processes (default 2: the project's 2-core
machine, one torch thread each), the longest chain first (the data and teachers, then the students from the largest
data set's; the ring's short jobs fill the end). Every finished job leaves a JSON record under --work and is reused
on the next run of the same command (unless --rerun): a killed benchmark continues with the next unfinished job; a
teacher resumes from its newest checkpoint; an unfinished student starts over (its teacher-evaluation count is only
exact for an uninterrupted run).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffdistill import methods
from diffdistill.errors import DiffdistillError
from diffdistill.methods.pd import even_round_kimg
from diffdistill.methods.recipes import settings_argv

from .common import Context, command_of, fmt, goal, same_ident, table, train_teacher_run

METHODS = methods.names()          # the registry (diffdistill.methods.REGISTRY)
GAN_LIKE = ("gdd", "dmd2")          # model selection by the best FID snapshot, as their papers do
TEACHER_NFE = [1, 2, 4, 8, 18, 35]
RESULTS_DIR = "converged"           # figures and grids, under benchmarks/results/
FINAL_SEED = 1_000_000              # first seed of the reported values' samples


@dataclass(frozen=True)
class StudentPlan:
    """A method's converged budget on one data set (the short-run recipe at this kimg and batch, plus settings)."""

    kimg: float
    batch: int
    options: dict = field(default_factory=dict)     # the method's settings beyond the recipe's, by name


@dataclass(frozen=True)
class DataPlan:
    name: str
    title: str
    data: str                        # the data spec (after preparation)
    kind: str                        # 'ring' | 'image'
    teacher: dict = field(default_factory=dict)   # image data: `train_teacher`'s settings and loop (preset,
                                                  # total_kimg, snapshot_kimg)
    features: str | None = None      # feature network spec (image data)
    prepare: tuple = ()              # CLI commands (argv tuples, {work}/{shared} filled in) that make the data
                                     # and the feature network, each skipped once its last argument exists
    n_eval: int = 2000               # samples per quality measurement during training (the curves, the choice
                                     # of the best snapshot): seeds 0..n_eval-1
    n_final: int = 10000             # samples of every reported value, seeds FINAL_SEED.. (disjoint from the
                                     # curves': the best snapshot is not scored on the samples that chose it)
    eval_kimg: float = 10.0          # quality curve resolution (student kimg)
    kd_pairs: int = 20000
    students: dict = field(default_factory=dict)
    teacher_goal: float = 1.0        # image data: the best one-step student within this x the teacher's 35-NFE FID


def _students(kimg: float, batch: int, pd_start: int) -> dict:
    """The same budget for every method (quick runs, the second data set)."""
    out = {m: StudentPlan(kimg, batch) for m in METHODS}
    out["pd"] = StudentPlan(kimg, batch, dict(start_steps=pd_start, end_steps=1))
    return out


def _converged(kind: str) -> dict:
    """The library's converged recipes (`diffdistill distill METHOD --recipe converged`)."""
    from diffdistill.methods.recipes import CONVERGED

    def plan(budget: dict) -> StudentPlan:
        own = {k: v for k, v in budget.items() if k not in ("total_kimg", "batch")}
        return StudentPlan(budget["total_kimg"], budget["batch"], own)

    return {m: plan(CONVERGED[kind][m]) for m in METHODS}


def plans(ctx: Context) -> list[DataPlan]:
    q = ctx.quick
    # The ring's reported values use 50,000 samples: at 10,000 the sliced W2 of the teacher's 35-NFE samples
    # varied from 0.0227 to 0.0287 with the seeds (two exact sets: 0.0229), at 50,000 from 0.0200 to 0.0212.
    ring = DataPlan("ring", "toy:ring8 (exact teacher): sliced W2 to the exact distribution",
                    "toy:ring8", "ring", n_eval=2000 if q else 10000, n_final=2000 if q else 50000,
                    eval_kimg=10 if q else 200, kd_pairs=5000 if q else 50000,
                    students=_students(50, 256, 8) if q else _converged("ring"))
    digits = DataPlan("digits", "digits (sklearn 8x8, class-conditional): FID of digits-classifier features",
                      "digits", "image",
                      teacher=dict(preset="digits", total_kimg=20 if q else 500, snapshot_kimg=10 if q else 100),
                      features="digits",
                      n_eval=500 if q else 2000, n_final=1000 if q else 10000, eval_kimg=1 if q else 10,
                      kd_pairs=2000 if q else 10000,
                      students=_students(4, 64, 8) if q else _converged("image"))
    # MNIST at 16x16 with the digits network (0.2M parameters): at 28x28 the `mnist` preset trains at 25-60 img/s
    # on this CPU (200 kimg in 2 hours); at 16x16 the 2-level digits UNet runs ~4x faster, so that the teacher
    # trains in under an hour and each student in about half an hour, with 60,000 real images to match. Its
    # students use the same converged recipe as digits' (at 60 kimg every curve was still falling).
    clf = "{work}/mnist16-classifier.safetensors"
    mnist = DataPlan("mnist16", "MNIST at 16x16 (training split, 60,000 images, LANCZOS-resized): FID of "
                     "diffdistill's own MNIST-16 classifier features (not Inception)",
                     "{work}/mnist16.zip", "image",
                     teacher=dict(preset="digits", total_kimg=10 if q else 400, snapshot_kimg=5 if q else 100),
                     features=clf, n_eval=500 if q else 2000, n_final=1000 if q else 10000,
                     eval_kimg=1 if q else 6,
                     kd_pairs=1000 if q else 10000,
                     prepare=(("dataset", "convert", "{shared}/mnist.npz", "--resolution", "16x16",
                               "--no-progress", "{work}/mnist16.zip"),
                              ("features", "train", "--data", "{work}/mnist16.zip", "--epochs", "1" if q else "3",
                               "--max-n", "2000" if q else "20000", "--out", clf)),
                     students=_students(2, 64, 8) if q else _converged("image"), teacher_goal=1.2)
    return [ring, digits, mnist]


def resolved(ctx: Context, plan: DataPlan) -> DataPlan:
    """The plan with {work} and {shared} filled in."""
    from dataclasses import replace

    def fill(text):
        return text.format(work=ctx.work, shared=ctx.shared_data) if isinstance(text, str) else text

    return replace(plan, data=fill(plan.data), features=fill(plan.features),
                   prepare=tuple(tuple(fill(a) for a in argv) for argv in plan.prepare))


# --------------------------------------------------------------------------------------------------
# Jobs: each runs in a worker process and returns a JSON-able dict (cached under --work)


def _worker_init(threads: int, parent: int | None = None) -> None:
    """A worker's set-up: its torch threads, and a watch that ends it once `parent` (the benchmark's process) is
    gone. A killed benchmark must not leave a worker training on: a restarted one would train the same job into the
    same run directory beside it."""
    import torch

    torch.set_num_threads(threads)
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="exit-with-parent").start()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Poll the parent's pid; when this process has another parent (the benchmark died and the worker was
    re-parented), end at once: the job's run keeps its last checkpoint, and the next benchmark redoes the job."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _cached(path: Path, ident: dict, reuse: bool):
    if reuse and path.is_file():
        old = json.loads(path.read_text())
        if isinstance(old.get("ident"), dict) and same_ident(old["ident"], ident):
            return old
    return None


def _save(path: Path, record: dict) -> dict:
    from diffdistill.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return record


def job_prepare(ctx: Context, plan: DataPlan) -> dict:
    """The data set and feature network of an image plan (each command skipped once its output exists), then
    the reference statistics of the data in those features."""
    for argv in plan.prepare:
        if not Path(argv[-1]).exists():
            ctx.log(f"converged {plan.name}: diffdistill {' '.join(argv)}")
            _cli(list(argv))
    ref = ctx.work / f"{plan.name}-ref.npz"
    if not ref.is_file():
        _cli(["ref-stats", plan.data, "--features", plan.features, "--out", str(ref), "--no-progress"])
    info = {}
    if plan.features.endswith(".safetensors"):
        info = json.loads(Path(plan.features).with_suffix(".json").read_text()).get("meta", {})
    return dict(ref=str(ref), classifier=info)


def job_teacher(ctx: Context, plan: DataPlan) -> dict:
    """Train (or resume, or reuse) the teacher of an image data set. Without an FID curve: the report shows the
    teacher's final quality (its rows, 10,000 samples at each NFE), and a curve at 35 NFE cost an estimated ~10
    minutes of a core in a from-scratch run (2,000 samples x 35 NFE per point)."""
    from .quality import _run_compute

    run_dir = ctx.work / f"{plan.name}-teacher"
    # resume: a rerun continues the run even where only paths in its config differ (e.g. another checkout)
    options = dict(resume=True)
    command = command_of(["train-teacher", "--data", plan.data, *settings_argv(plan.teacher), "--out", str(run_dir),
                          "--no-progress", "--seed", "0"], options)
    ident = dict(command=command)
    record = _cached(run_dir / "bench-job.json", ident, ctx.reuse)
    if record is not None:
        return record
    if not ctx.reuse:
        shutil.rmtree(run_dir, ignore_errors=True)
    ctx.log(f"converged {plan.name}: {command}")
    # a rerun of the same command resumes from the newest checkpoint
    if train_teacher_run(plan.data, run_dir, {**plan.teacher, **options}, command=command).interrupted:
        raise DiffdistillError(f"{command}: stopped before the end")
    compute = _run_compute(run_dir)
    return _save(run_dir / "bench-job.json", dict(ident=ident, run=str(run_dir), **compute))


def job_teacher_rows(ctx: Context, plan: DataPlan, teacher: str) -> dict:
    """The teacher's quality at 1-35 NFE, its noise floor, and its sample grid."""
    from .quality import _load, teacher_id, teacher_recipe

    path = ctx.work / f"{plan.name}-teacher-rows.json"
    ident = dict(teacher=teacher_id(teacher), nfe=TEACHER_NFE, **_final_ident(plan))
    record = _cached(path, ident, ctx.reuse)
    if record is not None:
        return record
    scorer = _scorer(ctx, plan)
    den, _, _ = _load(teacher)
    rows = []
    for nfe in TEACHER_NFE:
        s = scorer(den, teacher_recipe(nfe), ctx.device)
        rows.append(dict(nfe=nfe, sampler=teacher_recipe(nfe), value=s["distance"], detail=s["detail"],
                         spread=s.get("spread")))
        ctx.log(f"converged {plan.name}: teacher {nfe} NFE: {s['distance']:.4g} ({s['detail']})")
    picture = _picture(ctx, plan, den, teacher_recipe(35), "teacher")
    return _save(path, dict(ident=ident, rows=rows, floor=s["floor"], picture=picture))


def job_student(ctx: Context, plan: DataPlan, method: str, teacher: str) -> dict:
    """One method's converged student: its run, its quality curve, the last and the best snapshot."""
    from .quality import _load, distill, student_recipes

    sp = plan.students[method]
    run_dir = ctx.work / f"{plan.name}-{method}"
    options = student_options(ctx, plan, method)
    path = run_dir / "bench-student.json"
    run = distill(ctx, method, teacher, run_dir, sp.kimg, sp.batch, options)
    ident = dict(command=run["command"], teacher_id=run["teacher_id"], **_final_ident(plan))
    record = _cached(path, ident, ctx.reuse)
    if record is not None:
        return record
    scorer = _scorer(ctx, plan)
    model, recipe, _ = _load(run["snapshots"]["model"])
    last = scorer(model, recipe, ctx.device)
    best = dict(value=None, kimg=None, detail="", snapshot=None)
    pick = None                    # the best snapshot (path, kimg), chosen by the curve (seeds 0..n_eval-1)
    if plan.kind == "ring":        # the curve: every snapshot scored here, as the image runs' during training
        curve, snaps = [], {}
        curve_scorer = _scorer(ctx, plan, final=False)
        for snap in sorted(run_dir.glob("snapshot-kimg*")):
            den, rec, meta = _load(str(snap))
            curve.append((float(meta["kimg"]), curve_scorer(den, rec, ctx.device)["distance"]))
            snaps[curve[-1]] = (str(snap), float(meta["kimg"]))
        if curve and method != "pd":
            pick = snaps[min(curve, key=lambda p: p[1])]
    else:
        curve = _eval_curve(run_dir)
        if (run_dir / "best" / "model.json").is_file() and method != "pd":
            pick = (str(run_dir / "best"), _load(str(run_dir / "best"))[2].get("kimg"))
    if pick is not None:           # ... and scored on the reported values' own samples
        den, rec, _ = _load(pick[0])
        s = scorer(den, rec, ctx.device)
        best = dict(value=s["distance"], kimg=pick[1], detail=s["detail"], snapshot=pick[0],
                    spread=s.get("spread"))
    headline = "best" if method in GAN_LIKE and best["value"] is not None else "last"
    chosen = (model, recipe) if headline == "last" else _load(best["snapshot"])[:2]
    # the same student at 2 and 4 steps where the method has them (PD's rounds, CD's multistep sampling)
    more = []
    for steps, label, rec in student_recipes(method, run, model, recipe)[1:]:
        if rec is None or "train" in rec:
            continue
        net = model
        if "snapshot" in rec:
            net, rec, _ = _load(rec["snapshot"])
        more.append(dict(steps=steps, label=label, value=scorer(net, rec, ctx.device)["distance"]))
    picture = _picture(ctx, plan, *chosen, method)
    ctx.log(f"converged {plan.name}: {method}: last {last['distance']:.4g}, best {best['value']}")
    return _save(path, dict(ident=ident, method=method, plan=asdict(sp),
                            last=dict(value=last["distance"], detail=last["detail"], spread=last.get("spread")),
                            best=best, headline=headline, curve=curve, picture=picture, more=more,
                            **{k: v for k, v in run.items() if k not in ("snapshots",)}))


def student_options(ctx: Context, plan: DataPlan, method: str) -> dict:
    """A converged student's `distill` options, by name in command-line order: the method's short-run settings at
    the plan's budget under the plan's own, and the quality measured during training."""
    from diffdistill.methods.recipes import short_run_settings

    from .quality import method_options

    sp = plan.students[method]
    options = {**method_options(method, plan.data, plan.kd_pairs, pd_steps=None), **sp.options,
               **short_run_settings(method, plan.kind, sp.kimg, sp.batch)}
    options.update(sp.options)          # the plan's own settings win (the converged GDD's on images), in place
    if options.get("gan_weight"):       # DMD2's GAN term (its converged recipe on images) trains on real data
        options.setdefault("data", plan.data)
    if plan.kind == "ring":
        options.update(snapshot_kimg=plan.eval_kimg, grid_kimg=0)
    else:
        ref = ctx.work / f"{plan.name}-ref.npz"
        options.update(metrics="fid", ref=str(ref), features=plan.features, eval_kimg=plan.eval_kimg,
                       eval_n=plan.n_eval)
        if method == "pd":      # once per round, at its end: an early round's student samples in 8-32 steps, and
            # its curve every eval_kimg cost an estimated ~9 minutes of a core on MNIST-16 (~3 once per round)
            options["eval_kimg"] = options.get("round_kimg") or even_round_kimg(
                sp.kimg, options["start_steps"], options["end_steps"])
    return options


def _cli(argv: list[str]) -> None:
    """A command without a Python API (`dataset convert`, `features train`, `ref-stats`)."""
    from diffdistill.cli.main import main as cli_main

    if cli_main(argv) != 0:
        raise DiffdistillError(f"diffdistill {' '.join(argv)} failed")


def _eval_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(kimg, FID) of every evaluation in a run's stats.jsonl."""
    out = []
    stats = Path(run_dir) / "stats.jsonl"
    if stats.is_file():
        for line in stats.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            for k, v in rec.items():
                if k.startswith("eval/fid"):
                    out.append((float(rec["kimg"]), float(v)))
    return out


def _final_ident(plan: DataPlan) -> dict:
    """What the reported values' measurement depends on beyond the model (part of a job record's identity)."""
    return dict(n=plan.n_final, seed=FINAL_SEED, curve_n=plan.n_eval)


def _scorer(ctx: Context, plan: DataPlan, final: bool = True):
    """The reported values' scorer (n_final samples from FINAL_SEED; images: with the FIDs of its n_eval-sample
    parts), or with final=False the curves' (n_eval samples from seed 0, as the in-training evaluation)."""
    from .quality import ImageScorer, ToyScorer

    n, seed = (plan.n_final, FINAL_SEED) if final else (plan.n_eval, 0)
    if plan.kind == "ring":
        return ToyScorer(n, seed=seed)
    # the reference statistics that the in-training evaluation uses (`diffdistill ref-stats`, job_prepare)
    return ImageScorer(plan.features, plan.data, n, ctx.device, ref_file=str(ctx.work / f"{plan.name}-ref.npz"),
                       seed=seed, splits=max(1, n // plan.n_eval) if final else 1)


def _picture(ctx: Context, plan: DataPlan, den, recipe: dict, label: str) -> str:
    """A 10x10 sample grid (images; classes by row) or a scatter plot (ring) under results/converged/."""
    import torch

    from diffdistill.samplers import sample_batches
    from diffdistill.train.stats import save_image_grid, save_scatter

    out = ctx.results / RESULTS_DIR / f"{plan.name}-{label}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    if plan.kind == "ring":
        from diffdistill.teachers import load_analytic

        x = torch.cat([b.cpu() for b in sample_batches(den, range(2000), recipe, batch=2000, clamp=False)])
        ref = load_analytic("toy:ring8").sample(2000, generator=torch.Generator().manual_seed(1))
        save_scatter(x, out, size=256, reference=ref)
    else:
        seeds = [10 * (i % 10) + i // 10 for i in range(100)]      # row r: class r (seed mod 10)
        x = torch.cat([b.cpu() for b in sample_batches(den, seeds, recipe, batch=100, clamp=True)])
        save_image_grid(x, out, ncol=10)
    return str(out.relative_to(ctx.results.parent.parent)) if out.is_relative_to(ctx.results.parent.parent) \
        else str(out)


# --------------------------------------------------------------------------------------------------
# The scheduler: jobs with dependencies on a pool of worker processes


def _run_jobs(ctx: Context, jobs: dict, deps: dict) -> dict:
    """Run `jobs` (name -> (fn, args)), each when its dependencies (name -> [names]) are done, on ctx.jobs
    worker processes (1: in this process); an argument may be a callable of the finished results (e.g. the
    teacher run a student needs). A job starts only when a worker is free, and then the first ready one in the
    order of `jobs` (so that order is the priority: `run` puts the long chain of teacher and students first and
    the short jobs last, where they fill the gaps). A failed job fails its dependants and is recorded; it never
    stops the others. Returns {'results': name -> result, 'errors': name -> message}."""
    results, errors, running = {}, {}, {}
    pending = dict(jobs)
    started = time.monotonic()

    def ready():
        for name in list(pending):
            need = deps.get(name, [])
            if any(d in errors for d in need):
                errors[name] = f"skipped: {', '.join(d for d in need if d in errors)} failed"
                del pending[name]
            elif all(d in results for d in need):
                fn, args = pending.pop(name)
                yield name, fn, tuple(a(results) if callable(a) else a for a in args)

    def finish(name, get):
        try:
            results[name] = get()
            ctx.log(f"converged: {name} done ({_clock(started)})")
        except Exception as e:  # noqa: BLE001 - recorded in the table
            errors[name] = f"failed: {type(e).__name__}: {e}".split("\n")[0][:200]
            ctx.log(f"converged: {name} {errors[name]} ({_clock(started)})")

    if ctx.jobs <= 1:
        while pending:
            batch = list(ready())
            if not batch:
                break
            for name, fn, args in batch:
                finish(name, functools.partial(fn, ctx, *args))
        for name in pending:
            errors[name] = "not run: unmet dependencies"
        return dict(results=results, errors=errors)
    mp = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=ctx.jobs, mp_context=mp, initializer=_worker_init,
                             initargs=(ctx.threads, os.getpid())) as pool:
        while pending or running:
            for name, fn, args in ready():
                running[pool.submit(fn, _picklable(ctx), *args)] = name
                if len(running) >= ctx.jobs:
                    break
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                finish(running.pop(fut), fut.result)
    for name in pending:
        errors[name] = "not run: unmet dependencies"
    return dict(results=results, errors=errors)


def _clock(started: float) -> str:
    """The time of day (UTC) and the minutes since `started` (time.monotonic), for the log of the jobs."""
    return f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, {(time.monotonic() - started) / 60:.1f} min in"


def _picklable(ctx: Context) -> Context:
    from dataclasses import replace

    return replace(ctx, log=_log)


def _log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The report


COLUMNS = ["model", "sampler", "NFE", "last", "best (at kimg)", "reported", "detail", "student kimg",
           "train wall s", "teacher evals (images)", "student updates (images)"]


def run(ctx: Context) -> dict:
    from .quality import teacher_recipe

    jobs, deps = {}, {}
    all_plans = [resolved(ctx, p) for p in plans(ctx) if not ctx.real_data or p.name in ctx.real_data]
    for plan in all_plans:
        if plan.kind == "ring":
            teacher_of = plan.data
            jobs[f"{plan.name}/teacher-rows"] = (job_teacher_rows, (plan, plan.data))
        else:
            jobs[f"{plan.name}/prepare"] = (job_prepare, (plan,))
            jobs[f"{plan.name}/teacher"] = (job_teacher, (plan,))
            deps[f"{plan.name}/teacher"] = [f"{plan.name}/prepare"]
            deps[f"{plan.name}/teacher-rows"] = [f"{plan.name}/teacher"]
            name = plan.name

            def teacher_of(results, name=name):
                return results[f"{name}/teacher"]["run"]
            jobs[f"{plan.name}/teacher-rows"] = (job_teacher_rows, (plan, teacher_of))
        for method in plan.students:
            jobs[f"{plan.name}/{method}"] = (job_student, (plan, method, teacher_of))
            if plan.kind != "ring":
                deps[f"{plan.name}/{method}"] = [f"{plan.name}/teacher"]
    out = _run_jobs(ctx, _by_priority(jobs, [p.name for p in all_plans]), deps)
    results, errors = out["results"], out["errors"]

    tables, goals, records = [], [], []
    for plan in all_plans:
        trow = results.get(f"{plan.name}/teacher-rows")
        teacher = results.get(f"{plan.name}/teacher")
        rows, curves, hlines = [], {}, {}
        unit = "sliced W2" if plan.kind == "ring" else "FID"
        t_nfe = {}
        if trow:
            for r in trow["rows"]:
                t_nfe[r["nfe"]] = r["value"]
                rec = teacher_recipe(r["nfe"])
                rows.append(["teacher", f"{rec['sampler']} {rec['steps']}", r["nfe"], fmt(r["value"]), "", "",
                             _detail(r["detail"], r.get("spread"), plan), fmt(teacher.get("kimg")) if teacher else "–",
                             fmt(teacher.get("wall_s")) if teacher else "–", "–", "–"])
            hlines = {"teacher 35 NFE": t_nfe.get(35), "teacher 4 NFE": t_nfe.get(4)}
            if trow.get("floor") is not None:
                rows.append(["noise floor", "–", "–", fmt(trow["floor"]), "", "", "two independent sample sets",
                             "", "", "", ""])
        else:
            rows.append(["teacher", "–", "–", errors.get(f"{plan.name}/teacher-rows", "not run"), "", "", "", "",
                         "", "", ""])
        one_step = {}
        for method in plan.students:
            r = results.get(f"{plan.name}/{method}")
            if r is None:
                rows.append([method, "–", "–", errors.get(f"{plan.name}/{method}", "not run"), "", "", "", "",
                             "", "", ""])
                continue
            value = r[r["headline"]]["value"]
            one_step[method] = value
            curves[method] = [tuple(p) for p in r["curve"]]
            sampler = "onestep" if method != "pd" else "euler 1 (last round)"
            best, shown = r["best"], r[r["headline"]]
            rows.append([method, sampler, 1, fmt(r["last"]["value"]),
                         "–" if best["value"] is None else f"{fmt(best['value'])} ({fmt(best['kimg'])})",
                         f"{fmt(value)}{_pm(shown.get('spread'))} ({r['headline']})",
                         _detail(shown.get("detail") or r["last"]["detail"], shown.get("spread"), plan),
                         fmt(r["kimg"]), fmt(r["wall_s"]), fmt(r["teacher_images"]),
                         fmt(r["student_updates"] * r["plan"]["batch"])])
            for m in r.get("more", []):
                rows.append([method, m["label"], m["steps"], fmt(m["value"]), "", fmt(m["value"]), "", "", "", "",
                             ""])
            records.append(dict(dataset=plan.name, method=method, value=value, headline=r["headline"],
                                spread=shown.get("spread"), error=_error(shown.get("spread")),
                                last=r["last"]["value"], best=best, kimg=r["kimg"],
                                wall_s=r["wall_s"],
                                teacher_images=r["teacher_images"], student_images=r["student_updates"] *
                                r["plan"]["batch"], command=r["command"]))
        figure = _figure(ctx, plan, curves, hlines, unit)
        pictures = ([("teacher (35 NFE)", trow["picture"])] if trow else []) + [
            (m, results[f"{plan.name}/{m}"]["picture"]) for m in plan.students if f"{plan.name}/{m}" in results]
        note = _note(plan, teacher)
        spent = sum(r["wall_s"] for r in records if r["dataset"] == plan.name) + (teacher or {}).get("wall_s", 0)
        note += (f" Training wall time of this data set's jobs (teacher and students, each on one core with another "
                 f"job beside it): {spent / 3600:.2f} h, as first run; a rerun reuses finished jobs.")
        tables.append(dict(table(plan.title, COLUMNS, rows, note), dataset=plan.name,
                           figures=[(f"{unit} against student kimg", figure)] + [
                               (f"{label} samples", path) for label, path in pictures]))
        goals += [dict(g, dataset=plan.name) for g in _goals(plan, t_nfe, one_step, records, teacher)]
    return _with_unselected(ctx, [p.name for p in all_plans],
                            dict(tables=tables, goals=goals, results=dict(runs=records, errors=errors)))


def _by_priority(jobs: dict, datasets: list[str]) -> dict:
    """`jobs` in the order the scheduler starts them: the data and teachers first (every student waits for its
    teacher), then the students with the teacher's rows, the data sets in reverse order of `plans` (which lists
    them from the cheapest), so that the longest jobs start first and the ring's short ones fill the end."""
    def key(name):
        dataset, job = name.split("/", 1)
        stage = 0 if job in ("prepare", "teacher") else 1
        return stage, -datasets.index(dataset), job == "teacher-rows", job == "teacher"
    return {name: jobs[name] for name in sorted(jobs, key=key)}


def _with_unselected(ctx: Context, selected: list[str], payload: dict) -> dict:
    """With --real-data naming some data sets, the others' tables, goals and runs stay those of the existing
    record (in the order of `plans`)."""
    path = ctx.results / "converged.json"
    if not ctx.real_data or not path.is_file():
        return payload
    old = json.loads(path.read_text())
    keep = [p.name for p in plans(ctx) if p.name not in selected]
    order = {p.name: i for i, p in enumerate(plans(ctx))}
    tables = [t for t in old.get("tables", []) if t.get("dataset") in keep] + payload["tables"]
    tables.sort(key=lambda t: order.get(t.get("dataset"), len(order)))
    goals = [g for g in old.get("goals", []) if g.get("dataset") in keep] + payload["goals"]
    goals.sort(key=lambda g: order.get(g.get("dataset"), len(order)))
    runs = [r for r in old.get("results", {}).get("runs", []) if r.get("dataset") in keep] + payload["results"]["runs"]
    return dict(tables=tables, goals=goals, results=dict(payload["results"], runs=runs))


def _figure(ctx: Context, plan: DataPlan, curves: dict, hlines: dict, unit: str) -> str:
    from diffdistill.demo.report import svg_line_chart
    from diffdistill.io import atomic_write

    svg = svg_line_chart(curves, xlabel="student training (kimg)",
                         ylabel=f"one-step {unit} (PD: its current round's steps)", hlines=hlines, width=720,
                         height=380)
    out = ctx.results / RESULTS_DIR / f"{plan.name}-curves.svg"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_text(svg))
    return str(out.relative_to(ctx.results.parent.parent)) if out.is_relative_to(ctx.results.parent.parent) \
        else str(out)


def _note(plan: DataPlan, teacher: dict | None) -> str:
    batches = [s.batch for s in plan.students.values()]
    usual = max(set(batches), key=batches.count)           # the batch most students use; the others name theirs
    budgets = ", ".join(f"{m} {fmt(s.kimg)} kimg" + (f" at batch {s.batch}" if s.batch != usual else "")
                        for m, s in plan.students.items())
    where = ("Teacher: the exact analytic denoiser (no training). " if plan.kind == "ring" else
             f"Teacher: `diffdistill train-teacher --data {plan.data} {' '.join(settings_argv(plan.teacher))}` "
             f"({fmt(teacher.get('kimg')) if teacher else '?'} kimg). ")
    quality = (f"Quality: sliced W2 to exact samples; the curve: {plan.n_eval:,} samples (seeds from 0) of the "
               f"snapshots every {fmt(plan.eval_kimg)} kimg" if plan.kind == "ring" else
               f"Quality: FID in the features of {_features_name(plan.features)} (not Inception) against the whole "
               f"data set; the curve: {plan.n_eval:,} samples (seeds from 0) measured during training every "
               f"{fmt(plan.eval_kimg)} kimg (`--metrics fid`; PD: at the end of each round)")
    quality += (f"; every value in the table: {plan.n_final:,} other samples (seeds from {FINAL_SEED:,}), so that "
                "the best snapshot is not scored on the samples that chose it"
                + ("" if plan.kind == "ring" else f"; 'parts': the FIDs of {plan.n_final // plan.n_eval} disjoint "
                   f"{plan.n_eval:,}-sample parts of them, how much a curve's point varies with its samples"))
    recipe = ("`diffdistill distill METHOD --recipe converged` (the short-run settings at the converged budgets, "
              "with the recipe's own settings where it has them, `methods/recipes.py` CONVERGED"
              if plan.students == _converged(plan.kind) else
              "`diffdistill distill METHOD --recipe short` at these budgets (this data set's own")
    return (where + f"Students: {recipe}: {budgets}; "
            f"batch {usual}). {quality}. 'last': the final EMA snapshot; 'best': "
            "the snapshot with the best value during training; 'reported': best for the GAN-like methods (GDD, "
            "DMD2, as their papers select), last for the others. Teacher evals = images through the teacher "
            "(KD: its pairs; GDD: none); student updates = optimiser steps of the exported network x batch.")


def _standard_error(values: list) -> float:
    """The standard error of the mean of equal parts' values: their standard deviation / sqrt(parts)."""
    return statistics.stdev(values) / math.sqrt(len(values))


def _error(spread: list | None) -> float | None:
    """The standard error of an FID of all the parts' samples, estimated from the parts' FIDs (an FID's fluctuation
    falls about as 1 / sqrt(samples))."""
    return _standard_error(spread) if spread and len(spread) >= 2 else None


def _paired_error(a: list | None, b: list | None) -> float | None:
    """The standard error of the difference of two FIDs measured on the same seeds, from their parts' FIDs (part i
    of both on the same seeds): that of the parts' differences, which counts what the shared seeds make the two
    models' errors share."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    return _standard_error([x - y for x, y in zip(a, b)])


def _pm(spread: list | None) -> str:
    error = _error(spread)
    return "" if error is None else f" ± {error:.2g}"


def _detail(detail: str, spread: list | None, plan: DataPlan) -> str:
    """A row's detail, with the range of the FIDs of its samples' n_eval-sample parts where measured."""
    if not spread:
        return detail
    part = f"{len(spread)} parts of {plan.n_final // len(spread):,}: {min(spread):.3g}-{max(spread):.3g}"
    return f"{detail}; {part}" if detail else part


def _features_name(spec: str) -> str:
    """A feature network spec as the report names it: 'the digits classifier', or the classifier file's name."""
    return f"the {spec} classifier" if "/" not in spec and "." not in spec else f"the classifier {Path(spec).name}"


# What holds back a goal not met, as measured (2026-12-02 and 03, CPU): shown beside the goal only while it is not
# met. "The 2 December record": teachers and students trained by the code of 2 December, which trained a different
# digits teacher from the same command; this record retrained everything from scratch on 3 December, and SiD and
# DI of digits and MNIST-16 again with their 24-kimg EMA.
_PREVIOUS_DIGITS = ("trials on the 2 December record: the teacher does not memorise (median distance of its samples to "
                    "the nearest training digit 2.04 vs 2.02 between real digits); GDD's settings, best FID of 2,000 "
                    "samples over 120 kimg: learning rates x1 2.17, x2 2.01, x4 2.24, R1 gamma 0.01 2.04 (x1) and "
                    "2.20 (x2), GDD-I (--freeze 1) 3.37, a 4x longer EMA 2.45, DiffAugment in the discriminator "
                    "(--diffaug) 8.0 at 100 kimg (against 2.15); not the budget: GDD at 300 kimg 1.29 against 1.35 "
                    "at 100 (-0.07 +- 0.19), SiD at 300 kimg 1.50 against 1.50 at 120 (-0.01 +- 0.13)")
WHY = {
    ("digits", "teacher"): "measured (FID of 10,000 samples): KD and every distribution-matching student lie at "
                           "1.25-2.09, between the teacher's Euler 18 (2.48) and Heun 35 (0.45); diversity: GDD's "
                           "recall is 0.85 against the teacher's 0.93-0.94 at a higher precision (0.93-0.94 against "
                           "0.90-0.91; k=3, 1,797 samples, two seed sets), SiD's 0.89, DI's 0.86-0.87; "
                           + _PREVIOUS_DIGITS + "; the same network and recipe reach their teacher on MNIST-16, "
                           "whose GAN sees 60,000 real images instead of 1,797",
    ("digits", "ranking"): "at 50,000 samples (`python -m benchmarks.paired`, 25 parts, seeds from 2,000,000; "
                           "results/converged/digits-paired.json) SiD and DMD2 are above KD by more than twice the "
                           "error of the difference (2.32 and 1.94 against 1.56: +0.77 +- 0.06 and +0.39 +- 0.06), "
                           "DI equals it (1.53: -0.03 +- 0.06), GDD is below it (1.31: -0.25 +- 0.07); they cover "
                           "less of the data (recall 0.85-0.91 against KD's 0.92); over three training seeds (the "
                           "record's 0, and 1 and 2 of the same commands; FID of 10,000 samples, "
                           "results/converged/digits-seeds.json and digits-seeds-ema.json) they are above KD at "
                           "every seed: KD 1.33-1.35, SiD 1.58-2.09, DI 1.47-2.05, DMD2 1.69-1.94 (GDD 1.25-1.55, "
                           "below KD at two seeds of three): the distribution-matching students move by 0.25-0.6 "
                           "with the training seed, KD by 0.02; SiD's and DI's 24-kimg EMA, which put them below KD "
                           "at every seed on MNIST-16, moved them by 0.0-0.3 here (DI 1.65 -> 1.47, SiD 2.08 -> "
                           "2.09 at seed 0; results/converged/digits-ema.json); with the 6-kimg EMA a linear LR decay "
                           "to 0 (`--lr-decay linear`) was worse (SiD 2.69, DI 1.93); in the 2 December record SiD "
                           "and DI equalled KD at 50,000 samples (-0.03 +- 0.06 and -0.03 +- 0.07), as did SiD at "
                           "twice its learning rates and with alpha 1.0 or 0.5 instead of 1.2; DMD2's converged "
                           "recipe (generator at sigma 2.5, Adam beta1 0, its GAN term at weight 0.5 for small "
                           "images) had moved it from 4.21 to 1.75 at 10,000 samples",
    ("mnist16", "ranking"): "with their 24-kimg EMA (the recipe since 3 December) SiD and DI were below KD at "
                            "training seeds 0, 1 and 2 (FID of 10,000 samples, "
                            "results/converged/mnist16-seeds-ema.json: SiD 3.28 / 2.62 / 2.65, DI 2.58 / 2.78 / "
                            "3.04 against KD's 3.67 / 3.58 / 3.60), SiD at seed 0 by 0.38 +- 0.18; with a 6-kimg "
                            "EMA SiD's last snapshot was above KD's at seed 0 (3.88) and DI's at seed 1 (3.73); "
                            "DMD2 before its converged recipe (FIDs of the curve's 2,000 samples): 5.79 at 96 kimg, "
                            "rising to 6.81 at 120, against KD's 5.11",
}


def _goals(plan: DataPlan, t_nfe: dict, one_step: dict, records: list, teacher: dict | None) -> list:
    out = []
    valid = {m: v for m, v in one_step.items() if v is not None and math.isfinite(v)}
    if not valid or 35 not in t_nfe:
        return [goal(f"{plan.name}: converged students", None, "not measured")]
    best_m = min(valid, key=valid.get)
    t35, t4 = t_nfe[35], t_nfe.get(4)
    if plan.kind == "ring":
        bad = [m for m, v in valid.items() if v > 1.5 * t35]
        out.append(goal(f"{plan.name}: every one-step student within 1.5x of the teacher's 35-NFE sliced W2",
                        not bad and len(valid) == len(plan.students),
                        f"worst {max(valid, key=valid.get)} {max(valid.values()):.4g} vs 1.5 x {t35:.4g}",
                        f"not within: {', '.join(bad)}; {WHY.get((plan.name, 'teacher'), '')}".rstrip("; ")
                        if bad else ""))
        return out
    bound = plan.teacher_goal * t35
    where = "at or below" if plan.teacher_goal == 1.0 else f"within {plan.teacher_goal:g}x of"
    out.append(goal(f"{plan.name}: best one-step student {where} the teacher's 35-NFE FID", valid[best_m] <= bound,
                    f"{best_m} {valid[best_m]:.4g} vs teacher {t35:.4g}"
                    + ("" if plan.teacher_goal == 1.0 else f" (x{valid[best_m] / t35:.2f})"),
                    "" if valid[best_m] <= bound else WHY.get((plan.name, "teacher"), "")))
    if t4 is not None:
        above = [m for m, v in valid.items() if v >= t4]
        out.append(goal(f"{plan.name}: every one-step student below the teacher's 4-NFE FID", not above,
                        f"worst {max(valid, key=valid.get)} {max(valid.values()):.4g} vs teacher 4 NFE {t4:.4g}",
                        f"not below: {', '.join(above)}" if above else ""))
    regress = [m for m in ("kd", "pd") if m in valid]
    if regress:
        first = min(regress, key=valid.get)
        mine = {r["method"]: r for r in records if r["dataset"] == plan.name}

        def text(m):
            error = mine.get(m, {}).get("error")
            return f"{m} {valid[m]:.3g}" + (f" ± {error:.2g}" if error else "")

        def close(m):    # nearer to the best regression student than twice the error of their difference
            error = _paired_error(mine.get(m, {}).get("spread"), mine.get(first, {}).get("spread"))
            return error is not None and abs(valid[m] - valid[first]) < 2 * error
        losers = [m for m in ("gdd", "sid", "dmd2", "di") if m in valid and valid[m] >= valid[first]]
        ties = [m for m in ("gdd", "sid", "dmd2", "di") if m in valid and close(m)]
        why = f"not below: {', '.join(losers)}; {WHY.get((plan.name, 'ranking'), '')}".rstrip("; ") if losers else ""
        if ties:
            why = (why + "; " if why else "") + (f"within twice the estimated error of the difference from "
                                                  f"{first}: {', '.join(ties)}")
        out.append(goal(f"{plan.name}: GDD, SiD, DMD2 and DI one-step each below KD's and PD's", not losers,
                        ", ".join(text(m) for m in ("gdd", "sid", "dmd2", "di", "kd", "pd") if m in valid), why))
    if teacher and teacher.get("kimg"):
        rec = next(r for r in records if r["dataset"] == plan.name and r["method"] == best_m)
        kimg_at = rec["best"]["kimg"] if rec["headline"] == "best" and rec["best"]["kimg"] else rec["kimg"]
        frac = kimg_at / rec["kimg"] if rec["kimg"] else 1.0
        cost = (rec["teacher_images"] + rec["student_images"]) * frac
        out.append(goal(f"{plan.name}: distillation compute of the best student at most 25% of the teacher's "
                        "training images", cost <= 0.25 * teacher["kimg"] * 1000,
                        f"{best_m}: {cost / 1000:,.0f} kimg (to its reported snapshot) vs teacher "
                        f"{teacher['kimg']:,.0f} kimg ({100 * cost / (teacher['kimg'] * 1000):.0f}%)",
                        "" if cost <= 0.25 * teacher["kimg"] * 1000 else WHY.get((plan.name, "compute"), "")))
    return out

