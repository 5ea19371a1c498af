"""Quality against NFE (issue 9, part 2): the teacher at 1-35 NFE and every method's student (1 step, and 2 and 4
where the method allows), with the training compute each took.

Students are made through the library's Python API (`diffdistill.distill(method, teacher, data, loop=...,
**settings)`, with dicts of settings), and each is recorded as the equivalent command (`diffdistill distill METHOD
...`), by which a finished run is recognised and reused. To count the teacher's evaluations and read the loop's
result, the runner passes `distill` a callback: it puts a forward hook on the loaded teacher (counting only calls of
that very module, not of copies made from it) and records the built method and the loop's result.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from diffdistill import methods
from diffdistill.diffusion.schedules import karras_sigmas
from diffdistill.errors import DiffdistillError
from diffdistill.io import atomic_write_json, load_snapshot
from diffdistill.methods.recipes import short_run_settings
from diffdistill.samplers import sample_batches
from diffdistill.teachers import is_analytic_spec

from .common import Context, command_of, distill_run, fmt, goal, same_ident, table, train_teacher_run

METHODS = methods.names()          # the registry (diffdistill.methods.REGISTRY)
TEACHER_NFE = [1, 2, 4, 8, 18, 35]


def teacher_recipe(nfe: int) -> dict:
    """Euler (= deterministic DDIM) with `nfe` steps; 35 NFE is EDM's Heun with 18 steps."""
    return dict(sampler="heun", steps=18) if nfe == 35 else dict(sampler="euler", steps=nfe)


class TeacherCounter:
    """Counts images passed through one teacher module (forward hook; copies of it are not counted)."""

    def __init__(self):
        self.calls = 0
        self.images = 0
        self.handles = []

    def attach(self, teacher: torch.nn.Module) -> None:
        def hook(module, args, output):
            if module is teacher:
                self.calls += 1
                self.images += int(output.shape[0])
        self.handles.append(teacher.register_forward_hook(hook))


class Instrument:
    """The callback of `diffdistill.distill(..., callback=...)`: counts the teacher's images and records the method
    and the loop's result."""

    def __init__(self, counter: TeacherCounter):
        self.counter, self.seen = counter, {}

    def __call__(self, event: str, obj) -> None:
        if event == "teacher":
            self.counter.attach(obj)
        else:
            self.seen[event] = obj

    def close(self) -> None:
        for h in self.counter.handles:
            h.remove()


def student_updates(method, steps: int) -> int:
    """Optimiser steps of the exported network's group (generator/student), given the loop's step count."""
    groups = method.groups()
    name = next((k for k in method.ema_targets() if k in groups), next(iter(groups)))
    every = groups[name].every
    return math.ceil(steps / every)


RUN_RECORD = "bench-run.json"   # in a student's run directory: what made it and what it cost


def teacher_id(teacher: str) -> str:
    """The teacher as a benchmark cache key: an analytic spec, or the sha256 of a snapshot's weights."""
    from diffdistill.metrics.features import sha256_file

    if is_analytic_spec(teacher):
        return teacher
    path = Path(teacher)
    path = path / "model" if (path / "model" / "model.json").is_file() else path
    weights = sorted(path.glob("*.safetensors"))
    return ",".join(sha256_file(w) for w in weights) or str(path)


def distill(ctx: Context, method: str, teacher: str, run_dir: Path, kimg: float, batch: int,
            options: dict) -> dict:
    """Distil `teacher` with `method` for `kimg` at `batch` from scratch (`diffdistill.distill`), or reuse a
    finished run of the very same command and teacher weights under --work (unless --rerun); returns its compute
    and the snapshot paths. options: by name and in command-line order, the data spec (`data`), the method's
    settings, loop settings and evaluation during training (`common.LOOP_KEYS`, `common.EVAL_KEYS`); the record's
    command is `diffdistill distill METHOD --teacher ... OPTIONS`."""
    device = ctx.device if ctx.device != "cpu" else None
    command = command_of(["distill", method, "--teacher", teacher, "--out", str(run_dir), "--kimg", f"{kimg:g}",
                          "--batch", str(batch), "--no-progress", "--seed", "0"],
                         {**options, **({"device": device} if device else {})})
    ident = dict(command=command, teacher_id=teacher_id(teacher))
    record = run_dir / RUN_RECORD
    if ctx.reuse and record.is_file() and (run_dir / "model" / "model.json").is_file():
        old = json.loads(record.read_text())
        if same_ident({k: old.get(k) for k in ident}, ident):
            ctx.log(f"quality: reusing {run_dir} (same command and teacher; --rerun trains it again)")
            return old
    for path in (run_dir, run_dir.with_name(run_dir.name + "-pairs")):
        shutil.rmtree(path, ignore_errors=True)
    counter = TeacherCounter()
    t0 = time.perf_counter()
    instrument = Instrument(counter)
    settings = {k: v for k, v in options.items() if k != "data"}
    try:
        result = distill_run(method, teacher, options.get("data"), run_dir,
                             dict(settings, total_kimg=kimg, batch=batch), device=device, command=command,
                             callback=instrument)
    finally:
        instrument.close()
    seen = instrument.seen
    wall = time.perf_counter() - t0
    if result.interrupted or "result" not in seen:
        raise DiffdistillError(f"{command}: stopped at step {result.step} before the end")
    steps = int(seen["result"]["step"])
    snaps = {"model": run_dir / "model"}
    snaps.update({p.name: p for p in sorted(run_dir.glob("round-*steps")) if (p / "model.json").is_file()})
    out = dict(ident, wall_s=wall, steps=steps, student_updates=student_updates(seen["method"], steps),
               teacher_images=counter.images, kimg=seen["result"]["nimg"] / 1000,
               snapshots={k: str(v) for k, v in snaps.items()})
    atomic_write_json(record, out)
    return out


def multistep_levels(den, n: int) -> list[float]:
    """The n noise levels of an n-step student: the first n of an (n+1)-point Karras grid of the teacher's
    range (80 .. sigma_min), so that the last level is small but not the boundary."""
    return karras_sigmas(n + 1, den.sigma_min, den.sigma_max)[:n].tolist()


def student_recipes(method: str, run: dict, den, sampling: dict) -> list[tuple[int, str, dict | None]]:
    """(steps, label, recipe) for 1, 2 and 4 steps of a student: a sampling recipe of this run's student, a
    {'snapshot'} of it, a {'train': extra options} for a student of its own (DMD2's multi-step generators), or
    None = the method has no such student."""
    out = [(1, sampling.get("sampler", "?"), sampling)]
    if method == "pd":
        for n in (2, 4):
            snap = run["snapshots"].get(f"round-{n:02d}steps")
            out.append((n, f"round-{n:02d}steps", None if snap is None else dict(snapshot=snap)))
    elif method == "cd":
        # Multistep consistency sampling (Song et al. 2023, Alg. 1) of the same model: n network evaluations,
        # re-noising in between.
        for n in (2, 4):
            out.append((n, "multistep", dict(sampler="multistep", sigmas=multistep_levels(den, n) + [0.0])))
    elif method == "dmd2":
        # DMD2's multi-step generator is trained at its levels (backward simulation): a run of its own.
        for n in (2, 4):
            levels = multistep_levels(den, n)
            out.append((n, f"own run, --gen-sigmas ({n} levels)",
                        dict(train=dict(gen_sigmas=[float(f"{v:.6g}") for v in levels]))))
    else:
        out += [(n, "one-step method", None) for n in (2, 4)]
    return out


def samples_of(den, recipe: dict, n: int, device: str, clamp: bool, seed: int = 0) -> torch.Tensor:
    """n samples of seeds seed..seed+n-1."""
    return torch.cat([x.cpu() for x in sample_batches(den, range(seed, seed + n), recipe, device=device, batch=1024,
                                                      clamp=clamp)])


# --------------------------------------------------------------------------------------------------
# Scorers: toy ring (exact metrics) and images (FID of classifier features)


class ToyScorer:
    unit = "sliced W2"
    floor_label = ("exact samples (noise floor)", "two independent exact sets")

    def __init__(self, n: int, seed: int = 0):
        """n samples of seeds seed..seed+n-1."""
        from diffdistill.teachers import load_analytic

        self.gmm, self.n, self.seed = load_analytic("toy:ring8"), n, seed

    def __call__(self, den, recipe, device) -> dict:
        from diffdistill.metrics.toy import toy_metrics

        m = toy_metrics(self.gmm, samples_of(den, recipe, self.n, device, clamp=False, seed=self.seed))
        return dict(distance=m["sliced_w2"], floor=m["sliced_w2_noise_floor"],
                    detail=f"{m['modes_covered']}/{m['num_modes']} modes, share err {m['mode_share_max_error']:.3f}, "
                           f"{100 * m['within_3std']:.0f}% within 3 std")


class ImageScorer:
    """FID of `n` samples against reference features of the data. With `held_out`, a seeded random split of the
    data gives the reference (up to `n_ref` images) and, disjoint from it, `n` real images whose FID is the
    noise floor of n-sample FIDs; without, the reference is every image (n_ref None) or the first n_ref.
    Samples use seeds seed..seed+n-1; with `splits` > 1 the result also holds `spread`, the FIDs of `splits`
    disjoint equal parts of those samples (how much an FID of n / splits samples varies with its seeds)."""

    unit = "FID (classifier features)"

    def __init__(self, feature_spec: str, data_spec: str, n: int, device: str, n_ref: int | None = None,
                 held_out: bool = False, ref_file: str | None = None, seed: int = 0, splits: int = 1):
        from torch.utils.data import Subset

        from diffdistill.metrics.features import compute_features, dataset_batches, load_feature_net
        from diffdistill.metrics.fid import fid_from_features
        from diffdistill.metrics.protocol import open_images, reference_from_data, reference_from_features

        self.net = load_feature_net(feature_spec, device=device)
        self.n, self.floor, self.seed, self.splits = n, None, seed, splits
        if splits < 1 or n // splits < 2:
            raise DiffdistillError(f"{n} samples cannot make {splits} parts of at least 2")
        if ref_file is not None:      # a `diffdistill ref-stats` file of the data in these features
            from diffdistill.metrics.protocol import reference_from_file

            self.ref = reference_from_file(ref_file)
            return
        if not held_out:
            self.ref = reference_from_data(data_spec, self.net, n=n_ref)
            return
        ds = open_images(data_spec)
        if len(ds) < 2 * n:
            raise DiffdistillError(f"{data_spec}: {len(ds)} images are too few for {n} held out and a reference")
        order = np.random.default_rng(0).permutation(len(ds))
        held, ref = order[:n], order[n:][:n_ref]

        def features(indices):
            subset = Subset(ds, indices.tolist())
            return compute_features(self.net, dataset_batches(subset), source=data_spec, gather=False)[0]

        ref_features = features(ref)
        self.ref = reference_from_features(ref_features, data_spec)
        self.floor = fid_from_features(features(held), ref_features)
        self.floor_label = ("real images (noise floor)", f"{n:,} real images, not in the {len(ref):,} of the "
                                                         "reference")

    def __call__(self, den, recipe, device) -> dict:
        from diffdistill.metrics.features import compute_features

        seeds = range(self.seed, self.seed + self.n)
        batches = sample_batches(den, seeds, recipe, device=device, batch=512, clamp=True)
        feats, logits = compute_features(self.net, batches, gather=False)
        detail = ""
        if logits is not None and den.label_dim:
            labels = np.asarray(seeds) % den.label_dim
            detail = f"class accuracy {100 * float((logits.argmax(1) == labels).mean()):.0f}%"
        from diffdistill.metrics.fid import feature_stats, fid_from_stats

        ref = (self.ref.mu, self.ref.sigma) if self.ref.features is None else feature_stats(self.ref.features)
        out = dict(distance=fid_from_stats(feature_stats(feats), ref), floor=self.floor, detail=detail)
        if self.splits > 1:
            part = self.n // self.splits
            out["spread"] = [fid_from_stats(feature_stats(feats[i * part:(i + 1) * part]), ref)
                             for i in range(self.splits)]
        return out


# --------------------------------------------------------------------------------------------------
# One data set: teacher rows, then every method's student rows


def method_options(method: str, data: str, kd_pairs: int, pd_steps: tuple | None = (8, 1)) -> dict:
    """Per-method options: real data where the method needs it; the pair set of KD; PD's rounds (`pd_steps`
    = start and end steps; None: the caller's)."""
    options: dict = {}
    if method in ("pd", "gdd", "cd"):
        options["data"] = data
    if method == "kd":
        options.update(n_pairs=kd_pairs, heldout=kd_pairs // 10, shard_size=kd_pairs // 2)
    if method == "pd" and pd_steps is not None:
        options.update(start_steps=pd_steps[0], end_steps=pd_steps[1])
    return options


def dataset_rows(ctx: Context, name: str, teacher: str, data: str, scorer, kimg: float, batch: int,
                 teacher_compute: dict | None, kd_pairs: int, runs: list, goals: list,
                 methods: list[str] = METHODS) -> list[list]:
    rows = []
    den, _, _ = _load(teacher)
    teacher_cost = teacher_compute or {}
    full_nfe = None
    for nfe in TEACHER_NFE:
        recipe = teacher_recipe(nfe)
        s = scorer(den, recipe, ctx.device)
        if nfe == TEACHER_NFE[-1]:
            full_nfe = s["distance"]
        rows.append(["teacher", f"{recipe['sampler']} {recipe['steps']}", nfe, fmt(s["distance"]), s["detail"],
                     fmt(teacher_cost.get("teacher_images")), fmt(teacher_cost.get("steps")),
                     fmt(teacher_cost.get("wall_s"))])
        runs.append(dict(dataset=name, model="teacher", nfe=nfe, distance=s["distance"], floor=s["floor"]))
        ctx.log(f"quality {name}: teacher {nfe} NFE: {s['distance']:.4g} ({s['detail']})")
    if s["floor"] is not None:
        rows.append([scorer.floor_label[0], "–", "–", fmt(s["floor"]), scorer.floor_label[1],
                     "", "", ""])
    best = (math.inf, None)
    for method in methods:
        run_dir = ctx.work / ("quick" if ctx.quick else "full") / f"{name}-{method}"
        kind = "ring" if is_analytic_spec(teacher) else "image"
        options = {**method_options(method, data, kd_pairs), **short_run_settings(method, kind, kimg, batch)}
        try:
            run = distill(ctx, method, teacher, run_dir, kimg, batch, options)
        except Exception as e:  # one method failing must not lose the others' rows: record it in the table
            rows.append(_failed_row(ctx, name, method, e, runs))
            continue
        sden, sampling, _ = _load(run["snapshots"]["model"])
        for steps, label, recipe in student_recipes(method, run, sden, sampling):
            if recipe is None:
                rows.append([method, label, steps, "–", "", "", "", ""])
                continue
            net, cost = sden, run
            if "snapshot" in recipe:
                net, recipe, _ = _load(recipe["snapshot"])
            elif "train" in recipe:
                try:
                    cost = distill(ctx, method, teacher, run_dir.with_name(f"{run_dir.name}-{steps}step"), kimg,
                                   batch, {**options, **recipe["train"]})
                except Exception as e:
                    rows.append(_failed_row(ctx, name, f"{method} {steps}-step", e, runs))
                    continue
                net, recipe, _ = _load(cost["snapshots"]["model"])
                runs.append(dict(dataset=name, method=method, sampling_steps=steps,
                                 **{k: v for k, v in cost.items() if k != "snapshots"}))
            s = scorer(net, recipe, ctx.device)
            if steps == 1 and s["distance"] < best[0]:
                best = (s["distance"], method)
            rows.append([method, label, steps, fmt(s["distance"]), s["detail"], fmt(cost["teacher_images"]),
                         fmt(cost["student_updates"]), fmt(cost["wall_s"])])
            ctx.log(f"quality {name}: {method} {steps} step(s): {s['distance']:.4g} ({s['detail']})")
        runs.append(dict(dataset=name, method=method, **{k: v for k, v in run.items() if k != "snapshots"}))
    if best[1] is not None and full_nfe is not None:
        goals.append(goal(f"{name}: best one-step student at or below the teacher's {TEACHER_NFE[-1]}-NFE "
                          f"{scorer.unit}", best[0] <= full_nfe,
                          f"{best[1]} {best[0]:.4g} vs teacher {full_nfe:.4g}",
                          "" if best[0] <= full_nfe else f"short training ({kimg:g} kimg per student on a shared "
                          "CPU)"))
    return rows


def _failed_row(ctx: Context, name: str, what: str, error: Exception, runs: list) -> list:
    msg = f"failed: {type(error).__name__}: {error}".split("\n")[0][:160]
    ctx.log(f"quality {name}: {what} {msg}")
    runs.append(dict(dataset=name, method=what, error=msg))
    return [what, "–", "–", msg, "", "", "", ""]


def _load(path: str):
    from diffdistill.teachers import load_teacher

    if is_analytic_spec(path):
        return load_teacher(path), dict(sampler="heun", steps=18), {}
    path = Path(path)
    if (path / "model" / "model.json").is_file():
        path = path / "model"
    return load_snapshot(path)


def digits_teacher(ctx: Context) -> tuple[str, dict]:
    """The digits teacher: --digits-teacher, else `diffdistill.train_teacher(preset='digits')` (reused once
    finished)."""
    if ctx.teachers.get("digits"):
        path = Path(ctx.teachers["digits"])
        return str(path), _run_compute(path)
    kimg = 10 if ctx.quick else 100
    run_dir = ctx.work / f"digits-teacher-{kimg}kimg"
    if not (run_dir / "model" / "model.json").is_file():
        command = command_of(["train-teacher", "--data", "digits", "--preset", "digits", "--out", str(run_dir)],
                             dict(total_kimg=kimg, progress=False))
        ctx.log(f"quality digits: training the teacher: {command}")
        if train_teacher_run("digits", run_dir, dict(preset="digits", total_kimg=kimg), command=command).interrupted:
            raise DiffdistillError(f"{command}: stopped before the end")
    return str(run_dir), _run_compute(run_dir)


def _run_compute(run_dir: Path) -> dict:
    """Steps, kimg and wall time of a finished run, from its stats.jsonl (empty when there is none)."""
    stats = Path(run_dir) / "stats.jsonl"
    if not stats.is_file():
        return {}
    lines = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    if not lines:
        return {}
    last = lines[-1]
    # Runs made before the loop carried the training time over a resume restart `time` at 0 in each session:
    # add the sessions up (a no-op for newer runs, whose `time` only grows).
    wall, prev = 0.0, 0.0
    for rec in lines:
        t = rec.get("time")
        if t is not None:
            if t < prev:
                wall += prev
            prev = t
    return dict(steps=last.get("step"), kimg=last.get("kimg"), wall_s=wall + prev, teacher_images=None)


COST_NOTE = ("Teacher evals = images passed through the loaded teacher during distillation (KD: mostly the "
             "pairs; GDD never evaluates it; PD: first round only, later rounds distil from the previous "
             "student); student updates = optimiser steps of the exported network.")
COLUMNS = ["model", "sampler", "NFE", "distance", "detail", "teacher evals (images)", "student updates",
           "train wall s"]


def run(ctx: Context) -> dict:
    runs, goals, tables = [], [], []
    kimg_toy, batch_toy = (50, 256) if ctx.quick else (400, 256)
    n_toy = 2000 if ctx.quick else 10000
    toy = dataset_rows(ctx, "toy-ring8", "toy:ring8", "toy:ring8", ToyScorer(n_toy), kimg_toy, batch_toy, None,
                       10000 if ctx.quick else 50000, runs, goals)
    tables.append(table(f"toy:ring8 (exact metrics, {n_toy} samples): sliced W2 to the exact distribution",
                        COLUMNS, toy,
                        f"Teacher: the exact analytic denoiser (no training). Students: `diffdistill distill METHOD "
                        f"--teacher toy:ring8 --kimg {kimg_toy} --batch {batch_toy}` with the short-run settings of "
                        "`diffdistill.methods.recipes` (the papers' defaults are for runs of 10^4-10^5 steps). "
                        "Goal: the best one-step student at or below the teacher's 35-NFE distance. " + COST_NOTE))
    try:
        teacher, compute = digits_teacher(ctx)
        kimg_dig, batch_dig = (2, 64) if ctx.quick else (40, 64)
        n_dig = 500 if ctx.quick else 2000
        scorer = ImageScorer("digits", "digits", n_dig, ctx.device)
        digits = dataset_rows(ctx, "digits", teacher, "digits", scorer, kimg_dig, batch_dig, compute,
                              2000 if ctx.quick else 10000, runs, goals)
        note = (f"FID of the shipped digits classifier's features (`load_feature_net('digits')`; not Inception) "
                f"of {n_dig} samples against the 1,797 sklearn digits. Teacher: `diffdistill train-teacher --data "
                f"digits --preset digits` ({fmt(compute.get('kimg'))} kimg) at `{Path(teacher).name}`. "
                f"Students: --kimg {kimg_dig} --batch {batch_dig} with the short-run settings of "
                "`diffdistill.methods.recipes`. Teacher rows: its own training steps and "
                "wall time. " + COST_NOTE)
    except Exception as e:
        msg = f"failed: {type(e).__name__}: {e}".split("\n")[0][:200]
        digits, note = [["–"] * 3 + [msg] + [""] * 4], msg
        ctx.log(f"quality digits: {msg}")
    tables.append(table("digits (8x8): FID of digits-classifier features", COLUMNS, digits, note))
    return dict(tables=tables, goals=goals, results=dict(runs=runs))
