"""`diffdistill distill METHOD`: distil a teacher with one method on the one loop; `diffdistill kd-pairs`.

The common options (teacher, data, run directory, length, batch, device, resume) live here; each method module
adds its own options (`add_arguments`) and builds its `Method` (`build`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UsageError
from ..methods.base import Recipe
from .common import (
    add_loop_arguments,
    check_loop_arguments,
    loop_settings,
    seed_everything,
    training_evaluation,
    training_evaluator,
)

METHODS = ["kd", "pd", "di", "gdd", "cd", "dmd2", "sid"]

EXAMPLES = """\
examples:
  # one-step students of the analytic 8-Gaussian ring teacher, on a laptop CPU in about a minute each (--recipe
  # short: the settings for runs of a few hundred steps; the methods' defaults are their papers', for long runs)
  diffdistill distill di  --teacher toy:ring8 --out runs/di-ring  --kimg 200 --batch 256 --recipe short
  diffdistill distill kd  --teacher toy:ring8 --out runs/kd-ring  --kimg 200 --batch 256 --recipe short
  diffdistill distill gdd --teacher toy:ring8 --data toy:ring8 --out runs/gdd-ring --kimg 200 --batch 256 \\
      --recipe short

  # a digits teacher trained with `diffdistill train-teacher --data digits --out runs/digits`
  diffdistill distill pd --teacher runs/digits --data digits --out runs/pd-digits --start-steps 16 --end-steps 1
  # ... with FID during training (stats.jsonl's eval/fid-2k/digits_classifier; RUN/best = the lowest)
  diffdistill ref-stats digits --features digits --out digits-ref.npz
  diffdistill distill gdd --teacher runs/digits --data digits --out runs/gdd-digits --recipe short \\
      --metrics fid --ref digits-ref.npz --features digits --eval-kimg 5 --eval-n 2000

  # an EDM teacher converted with `diffdistill convert edm edm-cifar10-32x32-uncond-vp.pkl teachers/cifar`,
  # on 8 GPUs (rerunning the same command resumes from the newest checkpoint)
  torchrun --nproc_per_node=8 -m diffdistill distill di --teacher teachers/cifar --out runs/di-cifar \\
      --recipe cifar10

The run directory gets config.json, command.txt, stats.jsonl, checkpoints/, samples-final.png (with --grid-kimg K
also samples-kimg<kimg>.png) and, at the end, model/ (the EMA student with its sampling recipe: `diffdistill sample
figures OUT.png RUN`); Ctrl-C leaves latest/, the same export of the unfinished run, which `sample RUN` reads.
"""


KD_PAIRS_EXAMPLES = """\
examples:
  # the pairs of a digits teacher, then a student trained on them (`distill kd` uses the directory as it is:
  # no pair options needed; a smaller --n-pairs uses its first pairs, a larger one extends it)
  diffdistill kd-pairs --teacher runs/digits --pairs runs/digits-pairs --n-pairs 100000 --heldout 10000
  diffdistill distill kd --teacher runs/digits --pairs runs/digits-pairs --out runs/kd-digits

  # the paper's 1.024M CIFAR-10 pairs on 8 GPUs (rerunning the same command continues where it stopped)
  torchrun --nproc_per_node=8 -m diffdistill kd-pairs --teacher ./ddpm-cifar10-32 --pairs pairs-cifar \\
      --n-pairs 1024000
"""


def dropout_value(text: str) -> float | str:
    """--student-dropout: a probability in [0, 1) or 'teacher'."""
    if text == "teacher":
        return text
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1) or 'teacher', got {text!r}") from None
    if not 0.0 <= p < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1) or 'teacher', got {text!r}")
    return p


def with_recipe(args, teacher):
    """`args` re-parsed with the recipe's options placed before the user's own (so the user's win)."""
    recipe = method_recipes(args.method_module)[args.recipe]
    options = recipe.options(args, teacher) if callable(recipe.options) else recipe.options
    argv = list(getattr(args, "argv", None) or [])
    if "distill" not in argv:
        raise UsageError("--recipe needs the command line it was given with (call diffdistill.cli.main.main)")
    i = argv.index("distill") + 2          # after `distill METHOD`
    from .main import build_parser

    new = build_parser().parse_args(argv[:i] + [str(o) for o in options] + argv[i:])
    new.argv = argv
    return new


def _short_options(args, teacher) -> list[str]:
    from ..demo.settings import short_run_options
    from ..methods.common import is_weightless

    kind = "ring" if is_weightless(teacher) else "image"
    return short_run_options(args.method_module, kind, args.kimg, args.batch)


SHORT = Recipe(source="diffdistill's short-run settings for runs of 10^2-10^3 steps on small teachers "
                      "(diffdistill.demo.settings; the demo and benchmarks use them)", options=_short_options)


def _converged_options(args, teacher) -> list[str]:
    from ..demo.settings import converged_options
    from ..methods.common import is_weightless

    return converged_options(args.method_module, "ring" if is_weightless(teacher) else "image")


CONVERGED = Recipe(source="the budget (--kimg, --batch) and settings at which the method's one-step student stopped "
                          "improving on the ring or sklearn digits (BENCHMARKS.md section 4); your --kimg/--batch "
                          "win, the short-run settings stay those of the recipe's budget",
                   options=_converged_options)


def method_recipes(name: str) -> dict[str, Recipe]:
    """The recipes of a method: its papers' (`RECIPES` of its module), `short` and `converged`."""
    return {**getattr(_method_module(name), "RECIPES", {}), "short": SHORT, "converged": CONVERGED}


def _method_module(name: str):
    return importlib.import_module(f"diffdistill.methods.{name}")


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distil a teacher into a 1-4 step student",
                              description="Distil a teacher into a fast student with one of the methods below.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="method", metavar="METHOD", required=True, parser_class=type(p))
    for name in METHODS:
        module = _method_module(name)
        mp = sub.add_parser(name, help=module.HELP, description=module.HELP + ".", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mp.add_argument("--teacher", required=True, metavar="SPEC",
                        help="a run or snapshot of this project, a diffusers model folder, a converted EDM "
                             "teacher, toy:ring8 or gmm:PATH.json")
        mp.add_argument("--data", default=None, metavar="SPEC",
                        help="real data" + (" (required)" if module.NEEDS_DATA else " (not needed)"))
        mp.add_argument("--xflip", action="store_true", help="augment real images with horizontal flips")
        add_loop_arguments(mp, kimg=100.0, batch=128, default_note="",
                           ema_help=getattr(module, "EMA_HELP", "EMA half-life of the student in kimg (default: "
                                            "the paper's, 500 kimg with EDM's ramp-up)"))
        recipes = method_recipes(name)
        g = mp.add_argument_group("recipes and students")
        g.add_argument("--recipe", choices=sorted(recipes) or None, default=None,
                       help="a named set of options, placed before yours (yours win): "
                            + "; ".join(f"{k}: {r.source}" for k, r in sorted(recipes.items())))
        g.add_argument("--student-dropout", type=dropout_value, default=None, metavar="P|teacher",
                       help="dropout probability of the trained networks copied from the teacher, or 'teacher' "
                            "to keep the teacher's (default: the method's official setting; "
                            f"{getattr(module, 'DROPOUT_HELP', 'see the README')})")
        module.add_arguments(mp)
        mp.set_defaults(func=run, method_module=name)

    kd = _method_module("kd")
    pp = subparsers.add_parser("kd-pairs", help="generate (noise, teacher sample) pairs for knowledge distillation",
                               description="Generate the (x_T, teacher(x_T)) pairs of the Denoising Student as "
                                           "resumable shards.",
                               epilog=KD_PAIRS_EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    pp.add_argument("--teacher", required=True, metavar="SPEC", help="the teacher (see `distill --help`)")
    pp.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    pp.add_argument("--seed", type=int, default=0, help="random seed")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    kd.add_pairs_arguments(pp)
    pp.set_defaults(func=run_pairs)


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def prepare(args, teacher=None):
    """Everything `distill METHOD` does before training: (args after the recipe, method, loop config, data,
    evaluate hook). `teacher`: an already loaded teacher instead of loading `args.teacher`."""
    from ..data import open_dataset
    from ..teachers import is_analytic_spec, load_teacher
    from ..train.loop import TrainConfig

    check_loop_arguments(args)
    module = _method_module(args.method_module)
    if module.NEEDS_DATA and args.data is None:
        raise UsageError(f"{args.method_module} needs real data: pass --data SPEC (a folder, .zip, .npz, digits, "
                         "toy:ring8, ...)")
    if teacher is None:
        teacher = load_teacher(args.teacher, device=_device(args))
    if args.recipe is not None:
        args = with_recipe(args, teacher)
        check_loop_arguments(args)
    data = None
    if args.data is not None:
        data = open_dataset(args.data, xflip=args.xflip)
        from ..data.labels import check_labels
        check_labels(data, teacher, args.data, args.teacher)
        if tuple(data.shape) != tuple(teacher.shape):
            raise UsageError(f"--data {args.data} has samples of shape {tuple(data.shape)}, the teacher "
                             f"{args.teacher} makes {tuple(teacher.shape)}")
    own = getattr(module, "evaluate", None)
    evaluator = training_evaluator(args, tuple(teacher.shape), has_own=own is not None)  # before any building
    seed_everything(args.seed)   # fresh students, heads, discriminators, fake scores: the same for the same command
    method = module.build(args, teacher, data)
    data_spec = args.data or (args.teacher if is_analytic_spec(args.teacher) else None)
    settings = loop_settings(args)
    # Defaults that scale with the run: 20 stats lines, 4 checkpoints; a grid of the student's samples at the end,
    # RUN/samples-final.png (cheap: a 1-4 step student; --grid-kimg K adds one every K kimg, 0 turns grids off).
    settings.setdefault("tick_kimg", max(args.kimg / 20, 1e-3))
    settings.setdefault("checkpoint_kimg", max(args.kimg / 4, 1e-3))
    settings["final_grid"] = args.grid_kimg != 0
    cfg = TrainConfig(**settings, meta=dict(method=args.method_module, teacher=args.teacher, data=data_spec,
                                            recipe=args.recipe))
    # --metrics, and a method's own model selection (KD: held-out loss), through the loop's evaluate hook
    evaluate = training_evaluation(args, cfg, evaluator, own=own, own_best=getattr(module, "BEST_METRIC", None))
    return args, method, cfg, data, evaluate


def run(args) -> int:
    from ..train.loop import train

    args, method, cfg, data, evaluate = prepare(args)
    result = train(method, cfg, data, evaluate=evaluate)
    return report_result(result)


def report_result(result: dict) -> int:
    """The last line of a training command (rank 0 only: under torchrun the other ranks say nothing) and its exit
    status: 0 when the run finished, 130 when it was interrupted."""
    main = result.get("rank", 0) == 0
    if result.get("interrupted"):
        if main:
            latest = f"; {result['latest']} holds its sampler-ready EMA model" if result.get("latest") else ""
            print(f"stopped at step {result['step']} ({result['nimg'] / 1000:g} kimg){latest}; rerun the same "
                  "command to continue", file=sys.stderr)
        return 130
    if main:
        print(f"done: {result['model']}")
    return 0


def run_pairs(args) -> int:
    from ..teachers import load_teacher

    teacher = load_teacher(args.teacher, device=_device(args))
    return _method_module("kd").run_pairs(args, teacher)
