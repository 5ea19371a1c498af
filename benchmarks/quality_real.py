"""Quality against NFE on real images (issue 9, part 2): MNIST and the CIFAR-10 test split from ../shared/data,
scored with diffdistill's own classifier features (not Inception: these are not comparable with published FIDs).

For each data set the runner makes (or reuses, under --work) three things: the teacher (`diffdistill.train_teacher`,
or an existing run given by --mnist-teacher / --cifar10-teacher), the feature network (the command `diffdistill
features train` on the same labelled data, which has no Python API yet) and the reference features (up to
`n_ref` images of a seeded random split, disjoint from the real images of the noise-floor row); then the
teacher rows at 1-35 NFE and every method's students, as in `benchmarks.quality`.
Budgets depend on the device: a CPU gets a laptop-sized run (hours in all), a GPU a longer one; --quick is a
smoke run of minutes that says nothing about quality. `--real-data mnist` (or `cifar10`) runs one data set and
keeps the other's table from the existing record, so that each can be rerun on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffdistill.cli.main import main as cli_main
from diffdistill.errors import DiffdistillError

from .common import Context, command_of, fmt, not_run, table, train_teacher_run
from .quality import COLUMNS, COST_NOTE, METHODS, ImageScorer, _run_compute, dataset_rows


@dataclass(frozen=True)
class Budget:
    """How much of everything one data set gets."""

    teacher_kimg: float          # teacher training length (when the runner trains it)
    classifier_epochs: int       # feature-network training
    classifier_max_n: int        # ... on at most this many labelled images
    student_kimg: float          # per student (PD: over all its rounds)
    student_batch: int
    kd_pairs: int                # KD's (noise, teacher sample) pairs
    n: int                       # generated samples per row
    n_ref: int                   # reference images (at most; a seeded random split, disjoint from n real ones)


@dataclass(frozen=True)
class RealData:
    """One data set of ../shared/data and how the runner trains its teacher."""

    name: str
    file: str                    # in --shared-data
    title: str                   # what the table says the data is
    preset: str                  # train-teacher --preset
    budgets: dict                # 'quick' | 'cpu' | 'cuda' -> Budget
    xflip: bool = False          # augment with horizontal flips (natural images, not digits)


DATASETS = [
    RealData("mnist", "mnist.npz", "MNIST (28x28 grey; training split, 60,000 images)", "mnist", {
        "quick": Budget(2, 1, 2000, 0.5, 32, 256, 200, 1000),
        "cpu": Budget(200, 3, 20000, 4, 64, 4000, 1000, 10000),
        "cuda": Budget(2000, 10, 60000, 200, 128, 100000, 10000, 60000)}),
    RealData("cifar10", "cifar10_test_jpeg.npz",
             "CIFAR-10 test split (32x32 RGB, 10,000 images, JPEG quality 75)", "cifar10-small", {
                 "quick": Budget(2, 1, 2000, 0.5, 32, 256, 200, 1000),
                 "cpu": Budget(120, 5, 10000, 2, 64, 2000, 500, 10000),
                 "cuda": Budget(5000, 30, 10000, 200, 128, 100000, 10000, 10000)}, xflip=True),
]


def budget_for(ctx: Context, data: RealData) -> Budget:
    return data.budgets["quick" if ctx.quick else "cuda" if ctx.cuda else "cpu"]


def _cli(argv: list[str], ctx: Context, what: str) -> None:
    ctx.log(f"quality_real: {what}: diffdistill {' '.join(argv)}")
    if cli_main(argv) != 0:
        raise DiffdistillError(f"diffdistill {' '.join(argv)} failed")


def teacher_for(ctx: Context, data: RealData, path: Path, budget: Budget) -> tuple[str, dict]:
    """The given teacher (--<name>-teacher), else `diffdistill.train_teacher(preset=...)` under --work (reused once
    finished)."""
    given = ctx.teachers.get(data.name)
    if given:
        return given, _run_compute(Path(given))
    run_dir = ctx.work / f"{data.name}-teacher-{budget.teacher_kimg:g}kimg"
    if not (run_dir / "model" / "model.json").is_file():
        device = ctx.device if ctx.device != "cpu" else None
        command = command_of(["train-teacher", "--data", str(path), "--preset", data.preset, "--out", str(run_dir)],
                             dict(total_kimg=budget.teacher_kimg, progress=False,
                                  **({"xflip": True} if data.xflip else {}), **({"device": device} if device else {})))
        ctx.log(f"quality_real: {data.name} teacher: {command}")
        result = train_teacher_run(str(path), run_dir, dict(preset=data.preset, total_kimg=budget.teacher_kimg),
                                   device=device, command=command, xflip=data.xflip)
        if result.interrupted:
            raise DiffdistillError(f"{command}: stopped before the end")
    return str(run_dir), _run_compute(run_dir)


def classifier_for(ctx: Context, data: RealData, path: Path, budget: Budget) -> tuple[str, dict]:
    """diffdistill's own classifier of the data set (features + logits), trained once under --work."""
    out = ctx.work / f"{data.name}-classifier-{budget.classifier_epochs}ep-{budget.classifier_max_n}.safetensors"
    if not out.is_file():
        _cli(["features", "train", "--data", str(path), "--out", str(out), "--epochs",
              str(budget.classifier_epochs), "--max-n", str(budget.classifier_max_n)]
             + (["--xflip"] if data.xflip else []), ctx, f"{data.name} feature network")
    meta = json.loads(out.with_suffix(".json").read_text()).get("meta", {})
    return str(out), meta


def dataset_table(ctx: Context, data: RealData, runs: list, goals: list, methods: list[str] = METHODS,
                  budget: Budget | None = None) -> dict:
    path = ctx.shared_data / data.file
    title = f"{data.title}: FID of diffdistill's own classifier features (not Inception)"
    if not path.is_file():
        return table(title, ["data set", "status"], [[data.name, not_run(f"{path} not found (--shared-data)")]])
    budget = budget or budget_for(ctx, data)
    teacher, compute = teacher_for(ctx, data, path, budget)
    features, clf = classifier_for(ctx, data, path, budget)
    scorer = ImageScorer(features, str(path), budget.n, ctx.device, n_ref=budget.n_ref, held_out=True)
    rows = dataset_rows(ctx, data.name, teacher, str(path), scorer, budget.student_kimg, budget.student_batch,
                        compute, budget.kd_pairs, runs, goals, methods)
    accuracy = clf.get("holdout_accuracy")
    note = (f"{budget.n:,} samples per row against up to {budget.n_ref:,} images of `{data.file}` (a seeded random "
            f"split; the noise-floor row scores {budget.n:,} other real images). Features: "
            f"the penultimate layer of a classifier trained here by `diffdistill features train` "
            f"({budget.classifier_epochs} epochs on {budget.classifier_max_n:,} images; held-out accuracy "
            f"{fmt(100 * accuracy) if accuracy is not None else '?'}%). Teacher: `{Path(teacher).name}` "
            f"(train-teacher --preset {data.preset}, {fmt(compute.get('kimg'))} kimg, "
            f"{fmt(compute.get('wall_s'))} s); its rows show its own training steps and wall time. Students: "
            f"--kimg {budget.student_kimg:g} --batch {budget.student_batch} with the short-run settings of "
            f"`diffdistill.methods.recipes`, KD on {budget.kd_pairs:,} pairs. "
            + COST_NOTE)
    return table(title, COLUMNS, rows, note)


def previous_results(ctx: Context, data: RealData) -> tuple[dict, list, list] | None:
    """The table, goals and runs of `data` in the existing quality_real record (None: none there)."""
    path = ctx.results / "quality_real.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    found = [t for t in record.get("tables", []) if t.get("title", "").startswith(data.title)]
    if not found or not found[0].get("rows") or found[0].get("columns") != COLUMNS:
        return None
    carried = dict(found[0])
    carried["note"] = (f"{carried.get('note', '')} Made by `{record.get('command')}`, {record.get('date')} "
                       f"(that run took {fmt(record.get('wall_s'))} s).").strip()
    goals = [g for g in record.get("goals", []) if g.get("goal", "").startswith(f"{data.name}:")]
    runs = [r for r in record.get("results", {}).get("runs", []) if r.get("dataset") == data.name]
    return carried, goals, runs


def run(ctx: Context) -> dict:
    known = [d.name for d in DATASETS]
    unknown = [n for n in ctx.real_data if n not in known]
    if unknown:
        raise DiffdistillError(f"--real-data: unknown data set(s) {', '.join(unknown)} (known: {', '.join(known)})")
    runs, goals, tables = [], [], []
    for data in DATASETS:
        if ctx.real_data and data.name not in ctx.real_data:
            # Not selected: keep what the existing record says of it (its own command and date in the note).
            previous = previous_results(ctx, data)
            if previous is None:
                tables.append(table(data.title, ["data set", "status"],
                                    [[data.name, not_run("not selected (--real-data)")]]))
            else:
                ctx.log(f"quality_real {data.name}: not selected; keeping its table from the existing record")
                tables.append(previous[0])
                goals += previous[1]
                runs += previous[2]
            continue
        try:
            tables.append(dataset_table(ctx, data, runs, goals))
        except Exception as e:  # one data set failing keeps the other's table
            msg = f"failed: {type(e).__name__}: {e}".split("\n")[0][:200]
            ctx.log(f"quality_real {data.name}: {msg}")
            tables.append(table(data.title, ["data set", "status"], [[data.name, msg]]))
    return dict(tables=tables, goals=goals, results=dict(runs=runs))
