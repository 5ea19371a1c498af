"""What every benchmark shares: the run context, timing (medians, alternating ratios), machine records."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffdistill.errors import DiffdistillError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Context:
    """Settings of one runner invocation, handed to every benchmark."""

    quick: bool = False                    # fewer repeats, smaller sizes, slow parts marked "not run"
    device: str = "cpu"                    # cpu | cuda | cuda:N
    threads: int = 1                       # torch intra-op threads (1: stable timings on a shared machine)
    jobs: int = 2                          # converged: worker processes (students trained side by side)
    work: Path = ROOT / "runs" / "bench"   # scratch: teachers, students, pairs (git-ignored)
    results: Path = RESULTS                # one JSON record per benchmark
    shared_data: Path = ROOT.parent / "shared" / "data"  # MNIST / CIFAR-10 files (optional)
    teachers: dict = field(default_factory=dict)  # data set -> an existing teacher run/snapshot (else trained)
    reuse: bool = True                     # reuse finished students of the same command and teacher under work
    command: str = ""                      # the command line, recorded in every record
    real_data: tuple = ()                  # quality_real: the data sets to run (empty: all)
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def cuda(self) -> bool:
        return self.torch_device.type == "cuda"


def check_device(device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffdistillError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise DiffdistillError(f"--device {device}: only cpu and cuda are supported")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(ctx: Context) -> dict:
    """The machine and software a record was measured on."""
    info = dict(cpu=cpu_model(), cores=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                device=ctx.device)
    if ctx.cuda:
        info["gpu"] = torch.cuda.get_device_name(ctx.torch_device)
    return info


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (the machine is shared: this says how noisy the timings are)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device="cpu", calls: int = 1) -> float:
    """Seconds per call of `calls` back-to-back calls (CUDA synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, device="cpu") -> dict:
    """Median (and min) seconds per call over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = [timeit(fn, device) for _ in range(max(repeats, 1))]
    return dict(median_s=statistics.median(times), min_s=min(times), repeats=len(times))


def alternate(fn_a: Callable[[], object], fn_b: Callable[[], object], rounds: int, warmup: int = 1,
              device="cpu", calls: int = 1) -> dict:
    """Time A and B alternately (A, B, B, A, A, B, ...: the order flips every round so that neither side
    always runs second), `calls` calls per timing, and return the medians of each and the median of the
    per-round ratios A / B. Blocks of calls (tens of ms) keep a loaded machine's bursts from deciding a
    single few-ms timing."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for r in range(max(rounds, 1)):
        if r % 2 == 0:
            ta.append(timeit(fn_a, device, calls))
            tb.append(timeit(fn_b, device, calls))
        else:
            tb.append(timeit(fn_b, device, calls))
            ta.append(timeit(fn_a, device, calls))
    ratios = [a / b for a, b in zip(ta, tb)]
    return dict(a_median_s=statistics.median(ta), b_median_s=statistics.median(tb),
                ratio=statistics.median(ratios), rounds=len(ratios))


def table(title: str, columns: list[str], rows: list[list], note: str = "") -> dict:
    """A table of a record: BENCHMARKS.md renders it as markdown (note in italics below the title)."""
    return dict(title=title, columns=columns, rows=rows, note=note)


def goal(text: str, met: bool | None, value: str, why: str = "") -> dict:
    """A goal of the issue: met True/False, or None when it was not measured in this run."""
    return dict(goal=text, met=met, value=value, why=why)


def not_run(reason: str) -> str:
    return f"not run: {reason}"


def write_record(ctx: Context, name: str, started: float, load_start: list[float], payload: dict) -> Path:
    """Write benchmarks/results/<name>.json: the machine, the command, the load, and the tables/goals."""
    record = dict(benchmark=name, command=ctx.command, quick=ctx.quick,
                  date=time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
                  wall_s=round(time.time() - started, 1), machine=machine(ctx),
                  load_average_start=load_start, load_average_end=load_average(), **payload)
    ctx.results.mkdir(parents=True, exist_ok=True)
    path = ctx.results / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if torch.is_tensor(value):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def fmt(value, digits: int = 3) -> str:
    """A number for a table: 3 significant digits, thousands separators for big ones."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) >= 10 ** digits):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def canonical_command(command: str) -> list:
    """A recorded command line with its numbers as numbers (`--lr 1e-4` and `--lr 0.0001` are one command), so
    that cached runs stay valid when the library writes the same options differently."""
    import shlex

    out: list = []
    for token in shlex.split(command):
        try:
            out.append(float(token))
        except ValueError:
            out.append(token)
    return out


def same_ident(old: dict, new: dict) -> bool:
    """Whether a cached record's identity `old` is `new` (commands compared by `canonical_command`)."""
    if set(old) != set(new):
        return False
    return all(canonical_command(old[k]) == canonical_command(v) if k == "command" and isinstance(v, str)
               and isinstance(old[k], str) else old[k] == v for k, v in new.items())


# --------------------------------------------------------------------------------------------------
# Training through the Python API (`diffdistill.distill`, `diffdistill.train_teacher`) with dicts of settings,
# recorded as the equivalent `diffdistill` command (cached runs are recognised by that command).

# Options a benchmark gives a run beside the method's (or the teacher's) settings: TrainConfig fields, and the
# evaluation during training (`--metrics fid --ref REF.npz --features NET --eval-kimg K --eval-n N`).
LOOP_KEYS = ("total_kimg", "batch", "ema_halflife_kimg", "ema_rampup", "snapshot_kimg", "grid_kimg", "tick_kimg",
             "checkpoint_kimg", "resume")
EVAL_KEYS = ("metrics", "ref", "features", "eval_kimg", "eval_n")


def command_of(head: list[str], options: dict) -> str:
    """'diffdistill HEAD OPTIONS': `options` (a dict in command-line order, keys the settings' names: the data
    spec, config fields, LOOP_KEYS, EVAL_KEYS) as the options of that command."""
    from diffdistill.methods.recipes import settings_argv

    return " ".join(["diffdistill", *head, *settings_argv(options)])


def _split(options: dict) -> tuple[dict, dict, dict]:
    """(settings, loop, evaluation) of a dict of options (the data spec, if any, is the caller's)."""
    settings = {k: v for k, v in options.items() if k not in LOOP_KEYS and k not in EVAL_KEYS}
    loop = {k: v for k, v in options.items() if k in LOOP_KEYS}
    evaluation = {k: v for k, v in options.items() if k in EVAL_KEYS}
    if evaluation and not {"metrics", "ref", "features", "eval_n"} <= set(evaluation):
        raise DiffdistillError(f"evaluation during training needs metrics, ref, features and eval_n (got "
                               f"{', '.join(evaluation)})")
    return settings, loop, evaluation


def with_metrics(evaluation: dict, shape, total_kimg: float | None = None, own_best: str | None = None):
    """(TrainConfig fields, evaluate hook) of `evaluation` (metrics measured during training on samples of
    `shape`), as `distill` and `train-teacher --metrics ...` set them up: every eval_kimg (default: 10 times in
    `total_kimg`), RUN/best by the first metric (else by the method's own `own_best`), the protocol in the meta of
    config.json; a method with its own model selection (KD) evaluates itself first."""
    from diffdistill.api import own_evaluation
    from diffdistill.train.evaluate import evaluation_plan, make_train_evaluator

    evaluator = make_train_evaluator(evaluation["metrics"], evaluation["features"], evaluation["ref"],
                                     n=evaluation["eval_n"], resize="tf1", shape=shape, labelled=True)
    fields, evaluate = evaluation_plan(evaluator, own_evaluation if own_best else None, own_best,
                                       evaluation.get("eval_kimg"), total_kimg)
    fields["meta"] = dict(eval=fields.pop("meta_eval"))
    return fields, evaluate


def distill_run(method: str, teacher: str, data: str | None, out, options: dict, *, device: str | None = None,
                command: str = "", callback=None):
    """`diffdistill.distill(method, teacher, data, ...)` with `options` (the method's settings, LOOP_KEYS and
    EVAL_KEYS by name): the run that `diffdistill distill METHOD --teacher TEACHER --data DATA --out OUT --seed 0
    --no-progress OPTIONS` makes (the same config.json, the same weights); returns its `DistillResult`."""
    from dataclasses import replace

    import diffdistill as dd
    from diffdistill import api, methods

    settings, loop, evaluation = _split(options)
    cfg = api.distill_loop(str(out), **loop, seed=0, device=device, progress=False, command=command,
                           meta=api.run_meta(method, teacher, data),
                           final_grid=loop.get("grid_kimg") != 0)
    evaluate = None
    if evaluation:        # the evaluator is made for the teacher's samples, so the teacher is loaded first
        teacher = dd.load_teacher(teacher, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        fields, evaluate = with_metrics(evaluation, tuple(teacher.shape), cfg.total_kimg,
                                        methods.get(method).best_metric)
        cfg = replace(cfg, **dict(fields, meta=dict(cfg.meta, **fields["meta"])))
    return dd.distill(method, teacher, data, loop=cfg, evaluate=evaluate, callback=callback, **settings)


def train_teacher_run(data: str, out, options: dict, *, device: str | None = None, command: str = "",
                      xflip: bool = False):
    """`diffdistill.train_teacher(data, ...)` with `options` (TrainTeacherConfig's fields, LOOP_KEYS and
    EVAL_KEYS by name): the run of `diffdistill train-teacher --data DATA --out OUT --seed 0 --no-progress
    OPTIONS`; returns its `TeacherResult`."""
    import diffdistill as dd

    settings, loop, evaluation = _split(options)
    loop = dict(loop, out=str(out), seed=0, progress=False, command=command)
    if device is not None:
        loop["device"] = device
    evaluate = None
    if evaluation:        # the evaluator is made for the data's shape
        fields, evaluate = with_metrics(evaluation, tuple(dd.open_dataset(data).shape), loop.get("total_kimg"))
        loop.update(fields)
    return dd.train_teacher(data, loop=loop, evaluate=evaluate, xflip=xflip, **settings)
