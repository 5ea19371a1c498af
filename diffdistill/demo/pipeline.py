"""The demo's stages: teachers, one distillation per method, evaluations, and the report.

Each training stage is a call of the Python API (`diffdistill.train_teacher(...)`, `diffdistill.distill(...)`)
with dicts of settings; the report shows it as the equivalent command a user would type (`Stage.command`: the
same run, the same config.json). A stage that finished leaves `demo-stage.json` in its run directory and is
reused when the demo is rerun with the same settings; an interrupted one resumes from its newest checkpoint (the
loop's own resumption). A failing stage becomes a row with its error in the report; the demo goes on.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import methods as _methods
from ..errors import DiffdistillError, UsageError
from ..io import atomic_write_json
from ..methods.recipes import LOOP_FLAGS, settings_argv, short_run_settings

METHODS = tuple(_methods.names())     # the registry (diffdistill.methods.REGISTRY)
MARKER = "demo-stage.json"
TRACKS = ("ring", "digits")
RING_EXTENT = 1.6          # ring scatter plots all show [-1.6, 1.6]^2 (the modes lie on the unit circle)


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo run (budgets measured on a 2-core CPU)."""

    name: str
    tracks: tuple[str, ...]             # data sets: 'ring' (toy:ring8, analytic teacher) and/or 'digits'
    n_eval: int                         # samples per evaluation: seeds 0..n_eval-1, the same for every model
    teacher_steps: tuple[int, ...]      # teacher sampling steps, each with Heun and with Euler
    student_steps: tuple[int, ...]      # step counts of multi-step students (CD; PD: one per round)
    ring_steps: int                     # optimiser steps of each ring distillation
    ring_batch: int                     # batch of the ring distillations
    toy_teacher_kimg: float             # a trained `toy` preset teacher beside the exact one (0 = none)
    digits_teacher_kimg: float          # training length of the digits teacher
    digits_batch: int                   # batch of the digits teacher and its students
    digits_kimg: float                  # training length of each digits distillation
    pd_start_steps: int                 # PD: DDIM steps of the first teacher (halved each round down to 1)
    kd_pairs: int                       # KD: training pairs (plus one eighth held out)
    max_steps: int | None = None        # a hard cap on the optimiser steps of every stage (tests)
    grid_n: int = 100                   # images per sample grid (2-D points: every evaluation sample)
    budget: str = ""                    # expected wall time, for the report


PROFILES: dict[str, Profile] = {
    # Tests: the ring only, two optimiser steps per stage; seconds.
    "tiny": Profile("tiny", ("ring",), n_eval=64, teacher_steps=(1, 2), student_steps=(1, 2), ring_steps=2,
                    ring_batch=16, toy_teacher_kimg=0.0, digits_teacher_kimg=0.064, digits_batch=16,
                    digits_kimg=0.032, pd_start_steps=4, kd_pairs=64, max_steps=2, grid_n=16,
                    budget="seconds (a test of the pipeline; the numbers mean nothing)"),
    # `--quick`: short runs of both data sets; the numbers show the pipeline, not the methods.
    "quick": Profile("quick", TRACKS, n_eval=300, teacher_steps=(1, 2, 4, 8, 18), student_steps=(1, 2, 4),
                     ring_steps=200, ring_batch=256, toy_teacher_kimg=0.0, digits_teacher_kimg=6.4,
                     digits_batch=64, digits_kimg=1.28, pd_start_steps=8, kd_pairs=1024,
                     budget="about 2-3 minutes on 2 CPU cores"),
    # The default: a digits teacher of 38.4 kimg (600 steps; the `digits` preset: 150 kimg), students of
    # 3.84 kimg (60 steps) each: enough to see each method move away from its initialisation, not to converge.
    "default": Profile("default", TRACKS, n_eval=1000, teacher_steps=(1, 2, 4, 8, 18),
                       student_steps=(1, 2, 4), ring_steps=600, ring_batch=256, toy_teacher_kimg=100.0,
                       digits_teacher_kimg=38.4, digits_batch=64, digits_kimg=3.84, pd_start_steps=8,
                       kd_pairs=2048, budget="6-10 minutes on 2 CPU cores"),
}


@dataclass
class DemoConfig:
    """What `diffdistill demo` runs."""

    out: str = "demo-report"            # report directory (index.html, report.md, results.json, runs/)
    profile: str = "default"            # a key of PROFILES
    methods: tuple[str, ...] = METHODS  # which distillation methods
    tracks: tuple[str, ...] | None = None  # data sets (default: the profile's)
    device: str | None = None           # cpu | cuda (default: cuda when available)
    progress: bool = True               # progress bars
    force: bool = False                 # retrain every stage (deletes this profile's run directories)
    threads: int = 1                    # CPU intra-op threads: these tiny models run fastest on one, and a
    #                                     shared machine far slower on more (the tests' conftest measured it)


@dataclass
class Stage:
    """One training run of the demo, as the Python API takes it: `diffdistill.train_teacher(data, loop=loop,
    **settings)` for a teacher, `diffdistill.distill(method, teacher, data, loop=distill_loop(**loop),
    **settings)` for a student. `argv` is the same run as the `diffdistill` command a user would type."""

    key: str                            # e.g. 'digits-kd'
    track: str                          # 'ring' | 'digits'
    method: str                         # 'teacher' or a method name
    teacher: str | None                 # the teacher spec of a distillation (None for a teacher)
    data: str | None                    # the data spec (None: the method needs none)
    loop: dict                          # TrainConfig fields: out, total_kimg, batch, seed, ...
    settings: dict                      # the method's settings by field name (a teacher: TrainTeacherConfig's)
    run_dir: Path
    result: dict = field(default_factory=dict)

    @property
    def config_class(self):
        """The dataclass `settings` are fields of."""
        if self.method == "teacher":
            from ..methods.teacher import TrainTeacherConfig

            return TrainTeacherConfig
        return _methods.get(self.method).config

    @property
    def argv(self) -> list[str]:
        """The `diffdistill` command line of this run (without the program name): each setting by its option,
        the loop's by theirs (`--kimg`, `--batch`, `--ema`, ...)."""
        from ..methods.options import flag_of

        for key in self.settings:
            if flag_of(self.config_class, key) is None:
                raise UsageError(f"demo stage {self.key}: {key!r} is not an option of the {self.method} command")
        unknown = sorted(set(self.loop) - set(LOOP_OPTIONS))
        if unknown or self.loop.get("progress", False):
            raise UsageError(f"demo stage {self.key}: loop settings {unknown or ['progress=True']} have no option")
        head = ["train-teacher"] if self.method == "teacher" else ["distill", self.method, "--teacher", self.teacher]
        data = ["--data", self.data] if self.data is not None else []
        return [*head, *data, *settings_argv(self.loop), *settings_argv(self.settings)]

    @property
    def command(self) -> str:
        import shlex

        return shlex.join(["diffdistill", *self.argv])


# The TrainConfig fields a stage's loop may set: those that `settings_argv` writes as the loop options of
# `train-teacher` and `distill` (progress only as False: --no-progress).
LOOP_OPTIONS = ("out", "total_kimg", "batch", "ema_halflife_kimg", "seed", "max_steps", "device", "progress")


# --------------------------------------------------------------------------------------------------
# The stages: what each run is given


def _loop(run_dir: Path, kimg: float, batch: int, profile: Profile, cfg: DemoConfig) -> dict:
    loop = dict(out=str(run_dir), total_kimg=float(kimg), batch=int(batch), seed=0)
    if profile.max_steps is not None:
        loop["max_steps"] = profile.max_steps
    if cfg.device:
        loop["device"] = cfg.device
    if not cfg.progress:
        loop["progress"] = False
    return loop


def _method_plumbing(method: str, track: str, profile: Profile) -> tuple[str | None, dict]:
    """What a method needs besides its optimisation settings (`short_run_settings`): (its real data, KD's pairs
    and PD's step counts)."""
    data = "toy:ring8" if track == "ring" else "digits"
    n_pairs = profile.kd_pairs if track == "digits" or profile.max_steps else 20_000
    settings = {
        "kd": dict(n_pairs=n_pairs, heldout=max(n_pairs // 8, 8), shard_size=n_pairs,
                   gen_batch=2048 if track == "ring" else 512),
        "pd": dict(start_steps=profile.pd_start_steps, end_steps=1),
    }.get(method, {})
    return (data if method in ("pd", "gdd", "cd") else None), settings


def build_stages(cfg: DemoConfig, profile: Profile, root: Path) -> list[Stage]:
    """Every training run of the demo, teachers first."""
    stages: list[Stage] = []
    tracks = cfg.tracks or profile.tracks
    for track in tracks:
        if track == "ring":
            teacher_spec = "toy:ring8"
            if profile.toy_teacher_kimg > 0:
                run = root / "ring-teacher"
                stages.append(Stage("ring-teacher", track, "teacher", None, "toy:ring8",
                                    _loop(run, profile.toy_teacher_kimg, 512, profile, cfg), dict(preset="toy"), run))
            kimg, batch = profile.ring_steps * profile.ring_batch / 1000, profile.ring_batch
        elif track == "digits":
            run = root / "digits-teacher"
            stages.append(Stage("digits-teacher", track, "teacher", None, "digits",
                                _loop(run, profile.digits_teacher_kimg, profile.digits_batch, profile, cfg),
                                dict(preset="digits"), run))
            teacher_spec = str(run)
            kimg, batch = profile.digits_kimg, profile.digits_batch
        else:
            raise UsageError(f"unknown demo data set {track!r} (known: {', '.join(TRACKS)})")
        for method in cfg.methods:
            run = root / f"{track}-{method}"
            data, settings = _method_plumbing(method, track, profile)
            recipe = short_run_settings(method, "ring" if track == "ring" else "image", kimg, batch)
            loop = _loop(run, kimg, batch, profile, cfg)
            loop.update({k: recipe.pop(k) for k in list(recipe) if k in LOOP_FLAGS})   # the recipe's EMA
            stages.append(Stage(f"{track}-{method}", track, method, teacher_spec, data, loop,
                                {**settings, **recipe}, run))
    return stages


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, DiffdistillError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _threads(count: int | None):
    """Run with `count` CPU intra-op threads (None: unchanged)."""
    old = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Options that change how a stage runs, not what it computes (and the values they take after them).
RUNTIME_OPTIONS = {"--no-progress": 0, "--device": 1}


def stage_settings(argv: list[str]) -> list[str]:
    """The command line without RUNTIME_OPTIONS: what decides whether a finished stage can be reused."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in RUNTIME_OPTIONS:
            skip = RUNTIME_OPTIONS[arg]
        else:
            out.append(arg)
    return out


def _read_marker(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return old if isinstance(old, dict) else {}


def train_stage(stage: Stage):
    """Train one stage through the Python API; returns its `DistillResult` / `TeacherResult`. The loop records
    `stage.command` as the run's command, and a distillation's config.json the description `distill METHOD`
    gives it (method, teacher and data specs), so that the shown command continues the same run."""
    from .. import api

    loop = dict(stage.loop, command=stage.command)
    if stage.method == "teacher":
        return api.train_teacher(stage.data, loop=loop, **stage.settings)
    loop = api.distill_loop(**loop)          # (config.json's description: `api.run_meta`, as the command's)
    return api.distill(stage.method, stage.teacher, stage.data, loop=loop, **stage.settings)


def run_stage(stage: Stage, threads: int | None = None) -> dict:
    """Run one stage, or reuse its finished run; returns {ok, seconds, reused, error, finished}.

    `seconds` adds up every session of the run (an interrupted stage resumes from its newest checkpoint)."""
    marker = stage.run_dir / MARKER
    old = _read_marker(marker)
    same = old.get("settings") == stage_settings(stage.argv)
    if same and old.get("finished") and (stage.run_dir / "model" / "model.json").is_file():
        return dict(ok=True, seconds=float(old.get("seconds", 0.0)), reused=True, error=None,
                    finished=old["finished"])
    spent = float(old.get("seconds", 0.0)) if same else 0.0

    def record(finished: str | None) -> None:
        if (stage.run_dir / "config.json").is_file():   # never make a run dir the loop would not recognise
            atomic_write_json(marker, dict(settings=stage_settings(stage.argv),
                                           seconds=spent + time.perf_counter() - start, finished=finished,
                                           command=stage.command))

    start = time.perf_counter()
    error = None
    try:
        with _threads(threads):
            result = train_stage(stage)
        if result.interrupted:       # Ctrl-C/SIGTERM: the loop saved a checkpoint; stop the demo too
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        record(None)
        raise
    except Exception as e:           # any failure of one method becomes a row of the report
        error = _one_line(e)
    seconds = spent + time.perf_counter() - start
    finished = time.strftime("%Y-%m-%dT%H:%M:%S") if error is None else None
    record(finished)
    return dict(ok=error is None, seconds=seconds, reused=False, error=error, finished=finished)


# --------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Job:
    """One evaluation: a model sampled with one setting."""

    track: str
    model: str                          # row label: 'teacher', 'teacher (exact)', a method name
    method: str                         # 'teacher' or a method name
    spec: str                           # what `load_model` opens
    steps: int | None = None            # None = the model's recipe
    sampler: str | None = None
    train_seconds: float | None = None  # the stage that made the model (None: analytic)
    stamp: str = ""                     # when that stage finished (invalidates cached evaluations)
    error: str | None = None            # the stage failed: no evaluation, the row reports this


def build_jobs(stages: list[Stage], profile: Profile, tracks) -> list[Job]:
    jobs: list[Job] = []
    by_key = {s.key: s for s in stages}

    def add_teacher(track: str, label: str, spec: str, stage: Stage | None):
        for sampler in ("heun", "euler"):
            for n in profile.teacher_steps:
                jobs.append(_job(track, label, "teacher", spec, n, sampler, stage))

    for track in tracks:
        if track == "ring":
            add_teacher("ring", "teacher (exact)", "toy:ring8", None)
            if "ring-teacher" in by_key:
                add_teacher("ring", "teacher (toy preset)", str(by_key["ring-teacher"].run_dir),
                            by_key["ring-teacher"])
        else:
            add_teacher("digits", "teacher", str(by_key["digits-teacher"].run_dir), by_key["digits-teacher"])
        for stage in stages:
            if stage.track != track or stage.method == "teacher":
                continue
            if stage.method == "pd":   # one student per halving round: RUN/round-NNsteps, RUN/model (1 step)
                n = profile.pd_start_steps // 2
                while n > 1:
                    snapshot = str(stage.run_dir / f"round-{n:02d}steps")
                    jobs.append(_job(track, "pd", "pd", snapshot, None, None, stage))
                    n //= 2
                jobs.append(_job(track, "pd", "pd", str(stage.run_dir / "model"), None, None, stage))
            elif stage.method == "cd":
                for n in profile.student_steps:
                    jobs.append(_job(track, "cd", "cd", str(stage.run_dir), n, None, stage))
            else:
                jobs.append(_job(track, stage.method, stage.method, str(stage.run_dir), None, None, stage))
    return jobs


def _job(track, label, method, spec, steps, sampler, stage: Stage | None) -> Job:
    job = Job(track, label, method, spec, steps, sampler)
    if stage is not None:
        job.train_seconds = stage.result.get("seconds")
        job.stamp = stage.result.get("finished") or ""
        if not stage.result.get("ok", False):
            job.error = stage.result.get("error") or "not run"
    return job


class Evaluator:
    """Samples models and measures them: exact toy metrics on the ring, digits-classifier FID on digits."""

    def __init__(self, out: Path, profile: Profile, device: str, threads: int | None = None):
        self.out, self.profile, self.device, self.threads = out, profile, device, threads
        self.seeds = list(range(profile.n_eval))
        self._digits = None
        self._ring = None
        self.floors: dict = {}

    def ring(self):
        if self._ring is None:
            from ..teachers.analytic import load_analytic

            gmm = load_analytic("toy:ring8")
            self._ring = (gmm, gmm.sample(len(self.seeds), generator=torch.Generator().manual_seed(12345)))
        return self._ring

    def digits(self):
        """(feature net, statistics of the whole digits data set); the floor: FID between two random halves
        (a seeded permutation: the file is ordered, so its first and second halves differ)."""
        if self._digits is None:
            from ..data import open_dataset
            from ..metrics import compute_features, feature_stats, fid_from_stats, load_feature_net
            from ..metrics.features import dataset_batches

            net = load_feature_net("digits", device=self.device)
            data = open_dataset("digits")
            feats, _ = compute_features(net, dataset_batches(data, 512), source="digits")
            perm = np.random.default_rng(0).permutation(len(feats))
            half = len(feats) // 2
            self.floors["digits_fid_split_half"] = fid_from_stats(feature_stats(feats[perm[:half]]),
                                                                  feature_stats(feats[perm[half:]]))
            self.floors["digits_n"] = len(feats)
            self._digits = (net, feature_stats(feats))
        return self._digits

    def evaluate(self, job: Job) -> dict:
        from ..sampling import generate, labels_for, load_model, sampling_plan, save_figure

        row = dict(track=job.track, model=job.model, method=job.method, spec=job.spec,
                   train_seconds=job.train_seconds)
        denoiser, recipe, _ = load_model(job.spec, self.device)
        plan = sampling_plan(denoiser, recipe, job.steps, job.sampler)
        row.update(sampler=plan["sampler"], steps=len(plan["sigmas"]) - 1, nfe=plan["nfe"],
                   sigmas=[round(s, 6) for s in plan["sigmas"]], n=len(self.seeds))
        cond = labels_for(denoiser, self.seeds, None, job.spec)
        with _threads(self.threads):
            start = time.perf_counter()
            x = generate(denoiser, plan, self.seeds, cond, self.device, batch=500)
            row["sample_seconds"] = time.perf_counter() - start
            row["ms_per_sample"] = 1000 * row["sample_seconds"] / len(self.seeds)
            name = f"{job.track}-{_slug(job.model)}-{plan['sampler']}{row['steps']}.png"
            image = self.out / "images" / name
            if job.track == "ring":
                from ..metrics import toy_metrics

                gmm, reference = self.ring()
                m = toy_metrics(gmm, x)
                row.update({k: m[k] for k in ("modes_covered", "num_modes", "within_3std", "within_3std_true",
                                              "sliced_w2", "sliced_w2_noise_floor", "mode_share_max_error",
                                              "nll", "nll_true")})
                self.floors["ring_sliced_w2_noise_floor"] = m["sliced_w2_noise_floor"]
                self.floors["ring_within_3std_true"] = m["within_3std_true"]
                save_figure(x, image, reference=reference, extent=RING_EXTENT)
            else:
                from ..metrics import compute_features, feature_stats, fid_from_stats

                net, ref = self.digits()
                if not bool(torch.isfinite(x).all()):
                    raise DiffdistillError(f"{int((~torch.isfinite(x.flatten(1))).any(1).sum())} of {len(x)} "
                                           "samples are NaN or inf")
                feats, _ = compute_features(net, [x.clamp(-1, 1)], source=job.spec)
                row["fid"] = fid_from_stats(feature_stats(feats), ref)
                save_figure(x[: self.profile.grid_n].clamp(-1, 1), image,
                            ncol=10 if cond is not None else None)
        row["image"] = image.relative_to(self.out).as_posix()
        return row


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cache_key(job: Job, profile: Profile) -> str:
    return "|".join(str(v) for v in (job.track, job.model, job.spec, job.steps, job.sampler, profile.n_eval,
                                     profile.grid_n, job.stamp))


def run_evaluations(jobs: list[Job], evaluator: Evaluator, cache_path: Path, progress: bool) -> list[dict]:
    cache = {}
    if cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="eval", desc="evaluating", dynamic_ncols=True)
    for job in jobs:
        key = _cache_key(job, evaluator.profile)
        base = dict(track=job.track, model=job.model, method=job.method, spec=job.spec,
                    train_seconds=job.train_seconds, steps=job.steps, sampler=job.sampler)
        if job.error is not None:
            row = dict(base, status="failed", error=f"training failed: {job.error}")
        elif key in cache and (evaluator.out / cache[key].get("image", "-")).is_file():
            row = dict(cache[key], train_seconds=job.train_seconds)
        else:
            try:
                row = dict(evaluator.evaluate(job), status="ok", error=None)
                cache[key] = row
                atomic_write_json(cache_path, cache)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                row = dict(base, status="failed", error=f"evaluation failed: {_one_line(e)}")
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if evaluator._digits is not None or any(r["track"] == "digits" and r["status"] == "ok" for r in rows):
        with contextlib.suppress(Exception):
            evaluator.digits()         # the floor, also when every row came from the cache
    if any(r["track"] == "ring" for r in rows):
        from ..metrics.toy import sliced_wasserstein, within_nstd_true

        gmm, reference = evaluator.ring()
        other = gmm.sample(len(evaluator.seeds), generator=torch.Generator().manual_seed(54321))
        evaluator.floors.setdefault("ring_sliced_w2_noise_floor", sliced_wasserstein(other, reference))
        evaluator.floors.setdefault("ring_within_3std_true", within_nstd_true(2))
    return rows


# --------------------------------------------------------------------------------------------------


def _device(name: str | None) -> str:
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffdistillError(f"--device {name}: CUDA is not available on this machine")
    return name


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) the whole demo; returns the results written to DIR/results.json."""
    from .report import write_report

    if cfg.profile not in PROFILES:
        raise UsageError(f"unknown demo profile {cfg.profile!r} (known: {', '.join(PROFILES)})")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    profile = PROFILES[cfg.profile]
    tracks = tuple(cfg.tracks or profile.tracks)
    device = _device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DiffdistillError(f"{out}: exists and is not a directory")
    root = out / "runs" / profile.name
    if cfg.force and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stages = build_stages(cfg, profile, root)

    teacher_failed: dict[str, str] = {}
    for i, stage in enumerate(stages, 1):
        print(f"[demo {i}/{len(stages)}] {stage.command}", file=sys.stderr, flush=True)
        if stage.track in teacher_failed and stage.method != "teacher":
            error = f"the {stage.track} teacher failed: {teacher_failed[stage.track]}"
            stage.result = dict(ok=False, seconds=0.0, reused=False, error=error, finished=None)
        else:
            stage.result = run_stage(stage, cfg.threads if device == "cpu" else None)
        r = stage.result
        state = "reused" if r.get("reused") else ("done" if r["ok"] else f"FAILED: {r['error']}")
        print(f"[demo {i}/{len(stages)}] {stage.key}: {state} ({r['seconds']:.1f} s)", file=sys.stderr,
              flush=True)
        if stage.method == "teacher" and not r["ok"]:
            teacher_failed[stage.track] = r["error"]

    evaluator = Evaluator(out, profile, device, cfg.threads if device == "cpu" else None)
    jobs = build_jobs(stages, profile, tracks)
    rows = run_evaluations(jobs, evaluator, root / "evals.json", cfg.progress)
    results = dict(
        profile=asdict(profile), methods=list(cfg.methods), tracks=list(tracks), device=device,
        torch=torch.__version__, threads=cfg.threads if device == "cpu" else torch.get_num_threads(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        seconds=time.time() - started,
        stages=[dict(key=s.key, track=s.track, method=s.method, command=s.command,
                     run_dir=str(s.run_dir), **s.result) for s in stages],
        floors=evaluator.floors, rows=rows,
    )
    write_report(out, results)
    return results
