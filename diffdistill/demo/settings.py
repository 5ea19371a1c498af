"""Each method's settings for short runs on small teachers, shared by `diffdistill demo` and the benchmarks.

The methods' defaults are their papers' (CIFAR-10 or ImageNet runs of 10^4-10^5 steps at large batches). Runs
of a few hundred steps on a CPU need larger learning rates and shorter warm-ups and EMA half-lives: these are
the settings that the methods' own tests and the demo use. Two kinds of teacher:

- `ring`: the exact analytic ring (`toy:ring8`): it has no network to copy, so students are fresh MLPs;
- `image`: a small trained image teacher (digits, MNIST, a laptop-size CIFAR-10 one): students start as copies.

Only the optimisation settings live here; data, KD's pairs and PD's step counts are the caller's.
"""

from __future__ import annotations

KINDS = ("ring", "image")

# The converged recipes: per teacher kind and method, the budget (kimg, batch) at which the one-step student's
# quality stopped improving in the converged benchmark (`python -m benchmarks --only converged`, BENCHMARKS.md
# section 4: the ring, and sklearn digits with a 500-kimg teacher), and the options beyond the short-run ones.
# PD starts from 64 teacher steps: its students cannot beat the sampler they start from (8 Euler steps of the
# ring teacher are 3.4x the 35-NFE sliced W2). GDD on the ring is best at 400 kimg (0.041) and no better at 2000
# (its best snapshot 0.044, at 400 kimg, with the longer run's slower EMA).
PD_STEPS = ("--start-steps", "64", "--end-steps", "1")
CONVERGED: dict[str, dict[str, tuple[float, int, tuple[str, ...]]]] = {
    "ring": {"kd": (2000, 256, ()), "pd": (2000, 256, PD_STEPS), "di": (2000, 256, ()), "gdd": (400, 256, ()),
             "cd": (2000, 256, ()), "dmd2": (2000, 256, ()), "sid": (2000, 256, ())},
    "image": {"kd": (120, 64, ()), "pd": (120, 64, PD_STEPS), "di": (120, 64, ()), "gdd": (120, 64, ()),
              "cd": (120, 64, ()), "dmd2": (120, 64, ()), "sid": (120, 64, ())},
}


def converged_options(method: str, teacher: str) -> list[str]:
    """`diffdistill distill METHOD` options of the converged recipe: its budget, its own options and the
    short-run settings at that budget."""
    if teacher not in KINDS:
        raise ValueError(f"unknown teacher kind {teacher!r} (known: {', '.join(KINDS)})")
    kimg, batch, extra = CONVERGED[teacher][method]
    return ["--kimg", f"{kimg:g}", "--batch", str(batch), *extra, *short_run_options(method, teacher, kimg, batch)]


def short_run_options(method: str, teacher: str, kimg: float, batch: int) -> list[str]:
    """`diffdistill distill METHOD` options for a run of `kimg` thousand images at `batch`, for a teacher of
    kind `teacher` ('ring' or 'image')."""
    if teacher not in KINDS:
        raise ValueError(f"unknown teacher kind {teacher!r} (known: {', '.join(KINDS)})")
    steps = int(kimg * 1000 / batch)

    def warmup(fraction: int, cap: int) -> str:      # fake-score warm-up: a fraction of the run, capped
        return str(min(cap, steps // fraction))

    if teacher == "ring":
        options = {
            "kd": ["--student-preset", "mlp-toy", "--loss", "l2", "--warmup-kimg", f"{kimg / 10:g}", "--lr", "2e-3"],
            "pd": ["--student-preset", "mlp-toy", "--lr", "2e-3"],
            "di": ["--gen-lr", "2e-3", "--fake-lr", "2e-3", "--fake-warmup-steps", warmup(4, 200),
                   "--ema", f"{kimg / 10:g}"],
            "gdd": ["--gen-lr", "1e-3", "--disc-lr", "1e-3", "--r1-gamma", "6.4", "--ema", f"{kimg / 10:g}"],
            "cd": ["--lr", "1e-3", "--ema", f"{kimg / 40:g}"],
            "dmd2": ["--lr", "1e-3", "--fake-warmup-steps", warmup(8, 100), "--ema", f"{kimg / 40:g}",
                     "--warmup-kimg", "0"],
            "sid": ["--gen-lr", "3e-4", "--fake-lr", "1e-3", "--loss-scale", "1.0",
                    "--fake-warmup-steps", warmup(8, 100), "--ema", f"{kimg / 40:g}"],
        }
    else:
        options = {
            "kd": ["--loss", "l2", "--warmup-kimg", f"{kimg / 10:g}", "--lr", "5e-4"],
            "pd": ["--lr", "5e-4"],
            "di": ["--gen-lr", "1e-4", "--fake-lr", "1e-4", "--init-sigma", "2.5"],
            "gdd": ["--gen-lr", "1e-4", "--disc-lr", "2e-4"],
            "cd": ["--lr", "2e-4"],
            "dmd2": ["--lr", "1e-4", "--gen-every", "2", "--warmup-kimg", "0"],
            "sid": ["--gen-lr", "5e-5", "--fake-lr", "1e-4", "--loss-scale", "1.0"],
        }
    if method not in options:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(options)})")
    # The papers' EMAs (half-lives of 10^2-10^4 steps, or 500 kimg with EDM's ramp-up) are made for long runs:
    # short runs keep a half-life of 5% of the run unless a method's settings say otherwise.
    ema = [] if "--ema" in options[method] else ["--ema", f"{0.05 * kimg:g}"]
    return options[method] + ema
