"""The library's own recipes, beside each method's published ones (`MethodSpec.recipes`): `short` and
`converged`, as dicts of settings (config fields, plus the loop's total_kimg, batch and ema_halflife_kimg).

The methods' defaults are their papers' (CIFAR-10 or ImageNet runs of 10^4-10^5 steps at large batches). Runs
of a few hundred steps on a CPU need larger learning rates and shorter warm-ups and EMA half-lives: `short` holds
those settings, used by the methods' own tests, `diffdistill demo` and the benchmarks. Two kinds of teacher:

- `ring`: the exact analytic ring (`toy:ring8`): it has no network to copy, so students are fresh MLPs;
- `image`: a small trained image teacher (digits, MNIST, a laptop-size CIFAR-10 one): students start as copies.

Only the optimisation settings live here; data, KD's pairs and PD's step counts are the caller's.
`converged` adds the budget at which the one-step student stopped improving in the converged benchmark.
"""

from __future__ import annotations

from ..errors import UsageError

KINDS = ("ring", "image")
# The library's recipes, offered for every method beside its papers' (`--recipe NAME`), with where they come from.
LIBRARY = {
    "short": "diffdistill's short-run settings for runs of 10^2-10^3 steps on small teachers "
             "(diffdistill.methods.recipes; the demo and benchmarks use them)",
    "converged": "the budget (--kimg, --batch) and settings at which the method's one-step student stopped "
                 "improving on the ring, sklearn digits or MNIST-16 (BENCHMARKS.md section 4); your --kimg/--batch "
                 "win, the short-run settings stay those of the recipe's budget; DMD2's on image teachers trains "
                 "its GAN term on --data",
}
LOOP_FLAGS = {"total_kimg": "--kimg", "batch": "--batch", "ema_halflife_kimg": "--ema", "ema_rampup": "--ema-rampup"}

# The converged recipes: per teacher kind and method, the budget at which the one-step student's quality stopped
# improving in the converged benchmark (`python -m benchmarks --only converged`, BENCHMARKS.md section 4: the
# ring, and sklearn digits with a 500-kimg teacher), and the settings beyond the short-run ones. PD starts from 64
# teacher steps: its students cannot beat the sampler they start from (8 Euler steps of the ring teacher are 3.4x
# the 35-NFE sliced W2).
# GDD on image teachers: twice the short-run learning rates (gen 2e-4, disc 4e-4) and 100 kimg with the 6-kimg EMA
# of the 120-kimg runs; tried on digits at 120 kimg: lr x1 best 2.17, x2 2.01, x4 2.24, x2 with R1 gamma 0.01 2.20,
# GDD-I (--freeze 1) 3.37; on MNIST-16, x2 is within 1.2x of the teacher from 60 kimg on, as x1 only from 90.
# DiffAugment in the discriminator (--diffaug), for digits' 1,797 images, is worse: 8.0 against 2.15 at 100 kimg.
# DMD2 on image teachers: the generator at sigma 2.5 (as DI's), Adam beta1 0 (as DI's and SiD's) instead of the
# official 0.9, and the GAN term (needs --data) at weight 0.5 with the classifier at 0.1 instead of the official
# 3e-3 and 1e-2: the distribution-matching surrogate is a mean over pixels, so the official weights, set for
# 64x64x3 images, leave the GAN term far weaker beside it on 8x8 or 16x16 images. Tried on digits (120 kimg, FID
# of 10,000 samples; the short-run settings, generator at sigma 80, beta1 0.9, no GAN: 4.21): beta1 0 with the
# generator at 2.5: 2.25; the same with the GAN at 0.5: best 1.75 (at 70 kimg), last 2.18; GAN weights 0.05 / 0.5
# at beta1 0.9 (best 2.61 for 0.5) and 2 at beta1 0 are worse, as are --gen-every 1, --lr 5e-5 and
# --dm-range 0.3 0.98; a 240-kimg run was no better up to 170 kimg, where it was stopped.
# SiD and DI on image teachers: an EMA half-life of 24 kimg (a fifth of the run) with EDM's ramp-up at 0.2 instead
# of 0.05, so that it reaches 24 kimg by the end (with 0.05 any --ema is at most 6 kimg at 120 kimg): their
# generators swing between evaluations late in the run (MNIST-16: SiD's curve 4.1-4.6 over the last 30 kimg, DI's
# 3.7-4.4). FID of 10,000 samples of the last snapshot, 6-kimg EMA -> 24: MNIST-16 SiD 3.88 -> 3.28, DI 3.46 ->
# 2.58 (KD 3.67); digits SiD 2.08 -> 2.09, DI 1.65 -> 1.47 (KD 1.34). On MNIST-16 at training seeds 1 and 2: SiD
# 3.24 / 2.89 -> 2.62 / 2.65, DI 3.73 / 3.57 -> 2.78 / 3.04 (KD 3.58 / 3.60).
_EMA_24 = dict(ema_halflife_kimg=24.0, ema_rampup=0.2)
_PD_STEPS = dict(start_steps=64, end_steps=1)
_GDD_IMAGE = dict(total_kimg=100, batch=64, gen_lr=2e-4, disc_lr=4e-4, ema_halflife_kimg=6.0)
_DMD2_IMAGE = dict(total_kimg=120, batch=64, gen_sigmas=[2.5], betas=(0.0, 0.999), gan_weight=0.5, cls_weight=0.1)
# DI on the ring: an eighth of the short-run learning rates (2.5e-4 for both networks). The sliced W2 of 50,000
# samples at 2,000 kimg: 2e-3 0.0326 (0.031-0.040 between snapshots), 5e-4 0.0313, 2.5e-4 0.0268 (0.022-0.027
# from 1,000 kimg on).
# SiD on the ring: --ema 200 instead of 50 (with EDM's ramp-up 0.05 the half-life is at most 5% of the images
# seen, so 100 kimg at the end of the run instead of 50): its generator swings between snapshots (0.031-0.058 every
# 200 kimg), the longer EMA ends at 0.0263 instead of 0.0467. Half or a quarter of its learning rates: 0.0321 and
# 0.0352.
# DMD2 on the ring: a quarter of the short-run learning rate (2.5e-4) for 4,000 kimg. At 1e-3 it swings between
# snapshots (0.036-0.051 on the curve in the second half of 2,000 kimg); at 2.5e-4 it improves steadily,
# 0.0315-0.0323 at 2,000 kimg (Adam beta1 0 or 0.9) and, at 4,000, 0.0274 and 0.0280 (training seeds 0 and 1;
# beta1 0: 0.0272).
# GDD on the ring: batch 1024 for 1,600 kimg, the discriminator's lr 8x the generator's (5e-4 and 4e-3) and R1
# gamma 0.01. Its GAN error is modes narrower than the data's (per-mode std 0.05-0.09 against 0.1; with gamma 6.4
# the discriminator is flat, logits ~0) and swings between snapshots. At batch 256 (400 kimg, lrs 1e-3, gamma 6.4:
# 0.0385): gamma 0.01 0.034-0.036; with the discriminator at 4-16x the generator's lr 0.027-0.033 at the best
# snapshots over training seeds 0-2, but 0.029-0.061 at the last; without R1 0.044-0.046. Batch 1024 steadies it: over
# training seeds 0-3 the best snapshot is 0.020-0.026 and the last 0.021, 0.021, 0.032, 0.034 (per-mode std
# 0.07-0.09). A fresh MLP with the KD students' input Fourier features (`mlp-toy`) does not help GDD or DMD2.
_DI_RING = dict(gen_lr=2.5e-4, fake_lr=2.5e-4)
_SID_RING = dict(ema_halflife_kimg=200.0)
_DMD2_RING = dict(total_kimg=4000, lr=2.5e-4)
_GDD_RING = dict(total_kimg=1600, batch=1024, gen_lr=5e-4, disc_lr=4e-3, r1_gamma=0.01)
CONVERGED: dict[str, dict[str, dict]] = {
    "ring": {m: {"total_kimg": 2000, "batch": 256, **(_PD_STEPS if m == "pd" else {}),
                 **{"di": _DI_RING, "sid": _SID_RING, "gdd": _GDD_RING, "dmd2": _DMD2_RING}.get(m, {})}
             for m in ("kd", "pd", "di", "gdd", "cd", "dmd2", "sid")},
    "image": {m: {"gdd": _GDD_IMAGE, "dmd2": _DMD2_IMAGE}.get(m) or dict(total_kimg=120, batch=64,
                                                                        **(_PD_STEPS if m == "pd" else {}),
                                                                        **(_EMA_24 if m in ("sid", "di") else {}))
              for m in ("kd", "pd", "di", "gdd", "cd", "dmd2", "sid")},
}


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise UsageError(f"unknown teacher kind {kind!r} (known: {', '.join(KINDS)})")
    return kind


def short_run_settings(method: str, kind: str, kimg: float, batch: int) -> dict:
    """The settings of a run of `kimg` thousand images at `batch`, for a teacher of kind `kind`."""
    steps = int(kimg * 1000 / batch)

    def part(x: float) -> float:                     # a fraction of the run, to 6 significant digits
        return float(f"{x:g}")

    def warmup(fraction: int, cap: int) -> int:      # fake-score warm-up: a fraction of the run, capped
        return min(cap, steps // fraction)

    if _kind(kind) == "ring":
        settings = {
            "kd": dict(student_preset="mlp-toy", loss="l2", warmup_kimg=part(kimg / 10), lr=2e-3),
            "pd": dict(student_preset="mlp-toy", lr=2e-3),
            "di": dict(gen_lr=2e-3, fake_lr=2e-3, fake_warmup_steps=warmup(4, 200), ema_halflife_kimg=part(kimg / 10)),
            "gdd": dict(gen_lr=1e-3, disc_lr=1e-3, r1_gamma=6.4, ema_halflife_kimg=part(kimg / 10)),
            "cd": dict(lr=1e-3, ema_halflife_kimg=part(kimg / 40)),
            "dmd2": dict(lr=1e-3, fake_warmup_steps=warmup(8, 100), ema_halflife_kimg=part(kimg / 40), warmup_kimg=0.0),
            "sid": dict(gen_lr=3e-4, fake_lr=1e-3, loss_scale=1.0, fake_warmup_steps=warmup(8, 100),
                        ema_halflife_kimg=part(kimg / 40)),
        }
    else:
        settings = {
            "kd": dict(loss="l2", warmup_kimg=part(kimg / 10), lr=5e-4),
            "pd": dict(lr=5e-4),
            "di": dict(gen_lr=1e-4, fake_lr=1e-4, init_sigma=2.5),
            "gdd": dict(gen_lr=1e-4, disc_lr=2e-4),
            "cd": dict(lr=2e-4),
            "dmd2": dict(lr=1e-4, gen_every=2, warmup_kimg=0.0),
            "sid": dict(gen_lr=5e-5, fake_lr=1e-4, loss_scale=1.0),
        }
    if method not in settings:
        raise UsageError(f"unknown method {method!r} (known: {', '.join(settings)})")
    out = dict(settings[method])
    # The papers' EMAs (half-lives of 10^2-10^4 steps, or 500 kimg with EDM's ramp-up) are made for long runs:
    # short runs keep a half-life of 5% of the run unless a method's settings say otherwise.
    out.setdefault("ema_halflife_kimg", part(0.05 * kimg))
    return out


def converged_settings(method: str, kind: str) -> dict:
    """The converged recipe: the short-run settings at its budget, under its own budget and settings."""
    own = dict(CONVERGED[_kind(kind)][method])
    out = {**own, **short_run_settings(method, kind, own["total_kimg"], own["batch"])}
    out.update(own)                                  # (the recipe's keys first, as the options are written)
    return out


def settings_argv(settings: dict) -> list[str]:
    """Settings as `distill METHOD` options: a config field `name` is `--name` with dashes (every method's flags
    are its field names), the loop's as --kimg, --batch and --ema. Floats are written in their shortest exact
    form (`repr`), so the options parse back to the same values."""
    argv: list[str] = []
    for key, value in settings.items():
        flag = LOOP_FLAGS.get(key) or "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):
            argv += [flag, *(_text(v) for v in value)]
        elif value is None:
            raise UsageError(f"setting {key} = None cannot be written as an option")
        else:
            argv += [flag, _text(value)]
    return argv


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) and float(f"{value:g}") == value else str(value)


def short_run_options(method: str, kind: str, kimg: float, batch: int) -> list[str]:
    """`short_run_settings` as command-line options."""
    return settings_argv(short_run_settings(method, kind, kimg, batch))


def converged_options(method: str, kind: str) -> list[str]:
    """`converged_settings` as command-line options."""
    return settings_argv(converged_settings(method, kind))
