"""The papers' recipes (`distill METHOD --recipe NAME`) built on a converted EDM CIFAR-10 teacher.

The teacher has the real layout of NVIDIA's EDM CIFAR-10 networks (DDPM++, 55.7M parameters, dropout 0.13,
augment_dim 9; random weights): what `diffdistill convert edm` makes of edm-cifar10-32x32-uncond-vp.pkl. Each
method's official recipe is built from the command line, and the settings the official code trains with are
checked on the built method: the dropout of every trained copy, the EMA, the user's options winning over the
recipe's.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from diffdistill import methods
from diffdistill.cli import distill as cli_distill
from diffdistill.cli.main import build_parser
from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.methods import common
from diffdistill.networks.unet import unet_preset
from tests.cli_util import method_from_args

torch.set_num_threads(1)

# method -> (paper recipe, dropout of the trained networks: 0 or the teacher's 0.13, the run's EMA: (half-life kimg,
# ramp-up), None for no EMA at all)
OFFICIAL = {
    "kd": ("cifar10", 0.0, (512 * math.log(0.5) / math.log(0.995) / 1000, None)),    # 0.995 per step, batch 512
    "pd": ("cifar10", 0.0, None),                                                    # the paper keeps no EMA
    "di": ("cifar10", 0.13, (500.0, 0.05)),                                          # EDM's --ema 0.5 Mimg
    "gdd": ("cifar10", 0.0, (500.0, 0.05)),
    "cd": ("cifar10", 0.0, (512 * math.log(0.5) / math.log(0.9999) / 1000, None)),   # 0.9999 per step, batch 512
    "dmd2": ("imagenet64", 0.0, (0.0, 0.05)),                                        # none: the trained generator
    "sid": ("cifar10", 0.13, (500.0, 0.05)),
}


@pytest.fixture(scope="module")
def edm_teacher():
    torch.manual_seed(0)
    net = unet_preset("cifar10", 32, 3, augment_dim=9)
    assert net._config["dropout"] == 0.13
    return Precond(net, (3, 32, 32), 0, PrecondConfig(kind="edm")).eval().requires_grad_(False)


class Images:
    """A stand-in for a CIFAR-10 data set (only its shape and labels are read when a method is built)."""

    shape, label_dim, name = (3, 32, 32), 0, "cifar10"

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.zeros(3, 32, 32), -1


def parse(method: str, *extra: str):
    argv = ["distill", method, "--teacher", "edm-teacher", "--out", "unused", *extra]
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args


def trained_networks(method) -> dict:
    names = ("student", "generator", "fake")
    return {n: getattr(method, n) for n in names if isinstance(getattr(method, n, None), torch.nn.Module)}


def required(name: str, tmp_path) -> list[str]:
    """Options a recipe cannot carry: local weights files (CD's LPIPS)."""
    if name == "cd":
        from tests.test_cd import random_lpips_weights

        return ["--lpips-weights", str(random_lpips_weights(tmp_path))]
    return []


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipe_on_an_edm_cifar10_teacher(name, edm_teacher, tmp_path):
    from diffdistill.cli.common import loop_settings
    from diffdistill.train.loop import TrainConfig, ema_settings

    recipe, dropout, ema = OFFICIAL[name]
    assert recipe in cli_distill.method_recipes(name), f"{name} has no --recipe {recipe}"
    args = cli_distill.with_recipe(parse(name, "--recipe", recipe, *required(name, tmp_path)), edm_teacher)
    module = importlib.import_module(methods.REGISTRY[name])
    if name == "kd":      # building KD generates its pairs: check the student it trains and the paper's EMA
        student = module.make_student(edm_teacher, "auto", dropout=args.student_dropout)
        nets = {"student": student}
        method = module.KnowledgeDistillation.__new__(module.KnowledgeDistillation)
        method.cfg = module.KDConfig(ema_decay=float(args.ema_decay))
    else:
        method = method_from_args(name, args, edm_teacher, Images())
        nets = trained_networks(method)
        assert bool(method.ema_targets()) == (ema is not None)
    if ema is not None:
        half, ramp = ema_settings(method, TrainConfig(**loop_settings(args)))
        assert half == pytest.approx(ema[0], rel=1e-9) and ramp == ema[1]
    assert nets
    for key, net in nets.items():
        assert common.dropout_of(net) == pytest.approx(dropout), (name, key)
        assert net._modules is not edm_teacher._modules
    assert common.dropout_of(edm_teacher) == pytest.approx(0.13)   # the teacher keeps its own


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_the_users_options_win_over_the_recipe(name, edm_teacher):
    recipe = OFFICIAL[name][0]
    args = cli_distill.with_recipe(parse(name, "--recipe", recipe, "--batch", "8", "--kimg", "0.5",
                                         "--student-dropout", "0.25"), edm_teacher)
    assert args.batch == 8 and args.kimg == 0.5 and args.student_dropout == 0.25 and args.recipe == recipe
    base = cli_distill.with_recipe(parse(name, "--recipe", recipe), edm_teacher)
    assert base.batch != 8 and base.kimg != 0.5      # the recipe does set them
    # the method's official dropout unless the user says (recipes do not set it)
    assert base.student_dropout == methods.get(name).config().student_dropout


def test_short_recipe_depends_on_the_teacher(edm_teacher):
    from diffdistill.teachers import load_teacher

    image = cli_distill.with_recipe(parse("di", "--recipe", "short", "--kimg", "12.8", "--batch", "64"),
                                    edm_teacher)
    ring = cli_distill.with_recipe(parse("di", "--recipe", "short", "--kimg", "12.8", "--batch", "64"),
                                   load_teacher("toy:ring8"))
    assert image.gen_lr == 1e-4 and ring.gen_lr == 2e-3


def test_student_dropout_option():
    with pytest.raises(SystemExit):
        parse("kd", "--student-dropout", "1.5")
    assert parse("kd", "--student-dropout", "teacher").student_dropout is None    # keep the teacher's
    assert parse("kd").student_dropout == 0.0                                       # KD's official 0
    assert parse("kd", "--student-dropout", "0.2").student_dropout == 0.2
    assert parse("di").student_dropout is None                                      # DI's official: the teacher's


def test_set_dropout_reaches_functional_and_module_dropout():
    net = unet_preset("tiny", 8, 3, dropout=0.3)
    layers = common.set_dropout(net, 0.0)
    assert layers > 0 and common.dropout_of(net) == 0.0 and net._config["dropout"] == 0.0
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    assert common.set_dropout(seq, 0.1) == 1 and seq[1].p == 0.1
    assert common.set_dropout(seq, None) == 0 and seq[1].p == 0.1
    assert math.isclose(common.dropout_of(seq), 0.1)


def test_converged_recipe_sets_the_budget_and_the_settings_at_it():
    from diffdistill.methods.recipes import CONVERGED, short_run_settings
    from diffdistill.teachers import load_teacher

    ring = load_teacher("toy:ring8")
    kimg, batch = CONVERGED["ring"]["pd"]["total_kimg"], CONVERGED["ring"]["pd"]["batch"]
    args = cli_distill.with_recipe(parse("pd", "--recipe", "converged", "--data", "toy:ring8"), ring)
    assert (args.kimg, args.batch, args.start_steps, args.end_steps) == (kimg, batch, 64, 1)
    expected = cli_distill.with_recipe(parse("pd", "--recipe", "short", "--kimg", f"{kimg:g}", "--batch",
                                             str(batch), "--data", "toy:ring8"), ring)
    assert args.lr == expected.lr == short_run_settings("pd", "ring", kimg, batch)["lr"]
    assert args.ema == expected.ema
    # the user's budget wins
    mine = cli_distill.with_recipe(parse("di", "--recipe", "converged", "--kimg", "3"), ring)
    assert mine.kimg == 3 and mine.batch == CONVERGED["ring"]["di"]["batch"]


def test_ema_rampup_option_and_the_converged_long_ema(edm_teacher):
    """--ema-rampup sets EDM's ramp-up ratio of the loop's EMA (or none); the converged SiD and DI on image
    teachers reach their 24-kimg half-life by the end of their 120-kimg runs (with 0.05 it would be 6 kimg)."""
    from diffdistill.cli.common import check_loop_arguments, loop_settings
    from diffdistill.errors import UsageError
    from diffdistill.train.ema import ema_beta
    from diffdistill.train.loop import TrainConfig, ema_settings

    method = methods.get("sid")
    for extra, expected in ((["--ema", "24", "--ema-rampup", "0.2"], (24.0, 0.2)),
                            (["--ema", "24", "--ema-rampup", "none"], (24.0, None)),
                            (["--ema", "24"], (24.0, 0.05))):
        args = parse("sid", *extra)
        check_loop_arguments(args)
        assert ema_settings(method, TrainConfig(**loop_settings(args))) == expected
    for bad in ("0", "1.5", "-0.1", "nan", "x"):
        with pytest.raises(SystemExit):
            parse("sid", "--ema", "24", "--ema-rampup", bad)
    with pytest.raises(UsageError, match="--ema-rampup needs --ema"):
        check_loop_arguments(parse("sid", "--ema-rampup", "0.2"))
    for name in ("sid", "di"):
        args = cli_distill.with_recipe(parse(name, "--recipe", "converged"), edm_teacher)
        half, ramp = ema_settings(method, TrainConfig(**loop_settings(args)))
        assert (args.kimg, args.batch, half, ramp) == (120, 64, 24.0, 0.2)
        # at the end of the run the half-life is 24 kimg: beta = 0.5 ** (64 / 24,000)
        assert ema_beta(64, 120_000, half, ramp) == pytest.approx(0.5 ** (64 / 24_000), rel=1e-12)
        assert ema_beta(64, 120_000, half, 0.05) == pytest.approx(0.5 ** (64 / 6_000), rel=1e-12)
    kd = cli_distill.with_recipe(parse("kd", "--recipe", "converged"), edm_teacher)
    assert kd.ema == 6 and kd.ema_rampup is None          # the other methods keep the 5% half-life
