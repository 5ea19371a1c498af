"""`diffdistill distill METHOD`: distil a teacher with one method on the one loop; `diffdistill kd-pairs`.

The common options (teacher, data, run directory, length, batch, device, resume) live here; each method module
adds its own options (`add_arguments`) and builds its `Method` (`build`).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..methods import names as method_names
from .common import (
    add_loop_arguments,
    check_loop_arguments,
    loop_settings,
    training_evaluation,
    training_evaluator,
)

METHODS = method_names()

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


def with_recipe(args, teacher):
    """`args` re-parsed with the recipe's options placed before the user's own (so the user's win)."""
    from ..api import recipe_settings

    settings = recipe_settings(_spec(args.method_module), args.recipe, teacher, args.kimg, args.batch)
    options = recipe_argv(args.method_module, settings)
    argv = list(getattr(args, "argv", None) or [])
    if "distill" not in argv:
        raise UsageError("--recipe needs the command line it was given with (call diffdistill.cli.main.main)")
    i = argv.index("distill") + 2          # after `distill METHOD`
    from .main import build_parser

    new = build_parser().parse_args(argv[:i] + [str(o) for o in options] + argv[i:])
    new.argv = argv
    return new


def method_recipes(name: str) -> dict[str, str]:
    """The recipes of a method, name -> where its values come from: its papers' (`MethodSpec.recipes`), `short`
    and `converged`."""
    from ..api import recipe_sources

    return recipe_sources(_spec(name))


def recipe_argv(name: str, options: dict) -> list[str]:
    """A recipe's settings as `distill NAME` options: each config field by its flag, the loop's length, batch and
    EMA as --kimg, --batch and --ema."""
    from ..api import DATA_RECIPE_KEYS, LOOP_RECIPE_KEYS
    from ..methods.options import flag_of
    from ..methods.recipes import settings_argv

    config = _spec(name).config
    for key in options:
        if key not in LOOP_RECIPE_KEYS and key not in DATA_RECIPE_KEYS and flag_of(config, key) is None:
            raise UsageError(f"recipe of {name}: {key!r} is not a setting of {name} or of the loop")
    return settings_argv(options)


def _spec(name: str):
    from ..methods import get

    return get(name)


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distil a teacher into a 1-4 step student",
                              description="Distil a teacher into a fast student with one of the methods below.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="method", metavar="METHOD", required=True, parser_class=type(p))
    from ..api import DEFAULT_BATCH, DEFAULT_KIMG
    from ..methods.options import add_config_arguments

    for name in method_names():       # the registry as it is now (methods.register adds to it)
        spec = _spec(name)
        ema_help = spec.ema_help or "EMA half-life of the student in kimg (default: the paper's, 500 kimg with EDM's "\
            "ramp-up)"
        mp = sub.add_parser(name, help=spec.help, description=spec.help + ".", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mp.add_argument("--teacher", required=True, metavar="SPEC",
                        help="a run or snapshot of this project, a diffusers model folder, a converted EDM "
                             "teacher, toy:ring8 or gmm:PATH.json")
        mp.add_argument("--data", default=None, metavar="SPEC",
                        help="real data" + (" (required)" if spec.needs_data else " (not needed)"))
        mp.add_argument("--xflip", action="store_true", help="augment real images with horizontal flips")
        add_loop_arguments(mp, kimg=DEFAULT_KIMG, batch=DEFAULT_BATCH, default_note="", ema_help=ema_help)
        recipes = method_recipes(name)
        g = mp.add_argument_group("recipes and students")
        g.add_argument("--recipe", choices=sorted(recipes) or None, default=None,
                       help="a named set of options, placed before yours (yours win): "
                            + "; ".join(f"{k}: {source}" for k, source in sorted(recipes.items())))
        add_config_arguments(mp, spec.config, spec.title or name)
        mp.set_defaults(func=run, method_module=name)

    from ..methods import kd
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


def prepare(args, teacher=None, callback=None):
    """Everything `distill METHOD` does before training: (args after the recipe, method, loop config, data,
    evaluate hook). `teacher`: an already loaded teacher instead of loading `args.teacher`. callback: as
    `diffdistill.distill`'s, called with ('teacher', teacher) and ('method', method)."""
    from ..api import build_method, distill_loop, own_evaluation, run_meta
    from ..data import open_dataset
    from ..methods.options import config_from_namespace
    from ..teachers import load_teacher

    check_loop_arguments(args)
    spec = _spec(args.method_module)
    if spec.needs_data and args.data is None:
        raise UsageError(f"{args.method_module} needs real data: pass --data SPEC (a folder, .zip, .npz, digits, "
                         "toy:ring8, ...)")
    if teacher is None:
        teacher = load_teacher(args.teacher, device=_device(args))
    if callback is not None:
        callback("teacher", teacher)
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
    own, own_best = (own_evaluation if spec.best_metric else None), spec.best_metric
    evaluator = training_evaluator(args, tuple(teacher.shape), has_own=own is not None)  # before any building
    # The loop: --kimg, --batch and the options given; the defaults that scale with the run (20 stats lines,
    # 4 checkpoints, RUN/samples-final.png unless --grid-kimg 0) are distill_loop's, as in the Python API.
    settings = loop_settings(args)
    settings["final_grid"] = args.grid_kimg != 0
    cfg = distill_loop(**settings, meta=run_meta(args.method_module, args.teacher, args.data, args.recipe))
    # the same path as diffdistill.distill: settings resolved for this teacher and run, seeded, built
    method, _ = build_method(spec, config_from_namespace(spec.config, args), teacher, data, cfg)
    if callback is not None:
        callback("method", method)
    # --metrics, and a method's own model selection (KD: held-out loss), through the loop's evaluate hook
    evaluate = training_evaluation(args, cfg, evaluator, own=own, own_best=own_best)
    return args, method, cfg, data, evaluate


def run(args, callback=None) -> int:
    """`diffdistill distill METHOD`; callback: as `diffdistill.distill`'s (also called with ('result', result))."""
    from ..methods import run_method

    args, method, cfg, data, evaluate = prepare(args, callback=callback)
    result = run_method(_spec(args.method_module), method, cfg, data, evaluate=evaluate)
    if callback is not None:
        callback("result", result)
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
    from ..methods import kd

    return kd.run_pairs(args, teacher)
