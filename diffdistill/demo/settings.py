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
