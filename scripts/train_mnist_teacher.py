"""Train an MNIST teacher (28x28, class-conditional, EDM loss) with the `mnist` preset.

    python scripts/train_mnist_teacher.py /path/to/mnist.npz --out runs/mnist-teacher [--kimg 2000] [--device cuda]
    torchrun --nproc_per_node=4 scripts/train_mnist_teacher.py /path/to/mnist.npz --out runs/mnist-teacher

Rerunning the same command resumes from the newest checkpoint. The result is RUN/model (EMA weights and an
18-step Heun recipe), ready for `diffdistill sample` and for distillation.
"""

from __future__ import annotations

import argparse
import sys

from diffdistill.cli.main import main as cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("npz", help="MNIST as .npz (x_train/y_train arrays, e.g. keras' mnist.npz)")
    parser.add_argument("--out", default="runs/mnist-teacher", help="run directory")
    parser.add_argument("--kimg", type=float, default=None, help="training length (default: the preset's 2000)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 128)")
    parser.add_argument("--batch-gpu", type=int, default=None, help="per-process micro-batch")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--loss", choices=["edm", "vp"], default="edm", help="edm, or vp (then --pred v)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers")
    args, rest = parser.parse_known_args(argv)
    cmd = ["train-teacher", "--data", args.npz, "--out", args.out, "--preset", "mnist", "--loss", args.loss,
           "--workers", str(args.workers)]
    for flag, value in (("--kimg", args.kimg), ("--batch", args.batch), ("--batch-gpu", args.batch_gpu),
                        ("--device", args.device)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.loss == "vp":
        cmd += ["--pred", "v"]
    return cli_main(cmd + rest)


if __name__ == "__main__":
    sys.exit(main())
