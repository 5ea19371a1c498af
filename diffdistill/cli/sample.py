"""`diffdistill sample {figures,tofolder,npz}`: draw samples from a run, a snapshot or any teacher.

A run or snapshot is sampled by its own recipe (`model.json`: e.g. one step at sigma_max for a DI student,
18 Heun steps for a teacher); `--steps` and `--sampler` change it. Image k comes from seed k alone (per-seed
noise, `samplers.make_noise`), so `--batch` never changes a sample. This module is the command line: the loading,
planning, labelling, sampling and figures are `diffdistill.sampling`'s.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..errors import DiffdistillError, UsageError
from ..sampling import few_step_sigmas, generate, is_image_shape, labels_for, load_model, sampling_plan, save_figure

__all__ = ["few_step_sigmas", "parse_classes", "parse_seeds", "register", "run", "sampling_plan"]

EXAMPLES = """\
examples:
  # a 7x7 grid of a student's one-step samples (its own recipe from RUN/model/model.json)
  diffdistill sample figures grid.png runs/di-digits --n-images 49

  # the teacher with 4 Euler steps, class 3 only
  diffdistill sample figures t4.png runs/digits --steps 4 --sampler euler --class 3

  # one grid row per class: classes 3 and 5, 8 samples each
  diffdistill sample figures t35.png runs/digits --class 3,5 --n 16

  # progressive distillation's clipped sampling: x-hat clipped to [-1, 1] at each DDIM step
  diffdistill sample figures pd.png runs/pd-digits --sampler ddim --steps 8 --clip 1

  # the exact 8-Gaussian ring (a scatter plot for 2-D data)
  diffdistill sample figures ring.png toy:ring8 --n-images 2000

  # one PNG per seed (000000.png ... 000099.png), e.g. for `diffdistill eval DIR`; a conditional model's
  # labels go to DIR/dataset.json (EDM's format), so DIR reads back as a labelled data set
  diffdistill sample tofolder samples/ runs/cd-digits --seeds 0-99 --steps 2

  # raw samples: x [N, *shape] float32, seeds, labels (-1 when unconditional)
  diffdistill sample npz samples.npz runs/kd-ring --n 10000
"""

KINDS = {
    "figures": "save one picture: an image grid, or a scatter plot for 2-D data",
    "tofolder": "save one PNG per image, named by its seed (000123.png), and a conditional model's labels "
                "as dataset.json",
    "npz": "save the raw samples (x, seeds, labels) as .npz",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="draw samples from a run, a snapshot or a teacher",
                              description="Draw samples from a run, a snapshot or a teacher: an image "
                                          "grid or scatter plot (figures), one PNG per seed (tofolder) or "
                                          "raw arrays (npz).",
                              epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", metavar="KIND", required=True, parser_class=type(p))
    for kind, help_text in KINDS.items():
        sp = sub.add_parser(kind, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        what = {"figures": "OUT.png", "tofolder": "DIR", "npz": "FILE.npz"}[kind]
        where = "where to write" + (" (created if missing)" if kind == "tofolder" else "")
        sp.add_argument("out", metavar=what, help=where)
        sp.add_argument("model", metavar="RUN",
                        help="a run or snapshot directory, a diffusers model folder, toy:ring8 or "
                             "gmm:PATH.json")
        sp.add_argument("--n", "--n-images", dest="n", type=int, default=None,
                        help="number of samples (default: 49 images or 2000 points for figures, else 100)")
        sp.add_argument("--seed", type=int, default=0, help="first seed: samples use seeds SEED..SEED+N-1")
        sp.add_argument("--seeds", default=None, metavar="LIST",
                        help="explicit seeds, e.g. 0-99 or 1,5,7 or 0-9,20 (instead of --seed/--n)")
        sp.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's recipe; teachers: 18)")
        sp.add_argument("--sampler", default=None,
                        help="euler, ddim, heun, ddpm, dpmpp_2m, onestep, multistep (default: the recipe's)")
        sp.add_argument("--class", dest="label", default=None, metavar="K[,K...]",
                        help="class label(s) for conditional models: K, or a list such as 3,5 that the samples "
                             "cycle through (sample i gets the (i mod length)-th class; `figures` instead "
                             "gives one grid row per class) (default: seed %% number of classes)")
        sp.add_argument("--clip", type=float, default=None, metavar="V",
                        help="clip the denoised x-hat to [-V, V] at every step (progressive distillation's "
                             "clipped sampling, diffusers' clip_sample; samplers euler, ddim, ddpm); 0 turns "
                             "a recipe's clipping off (default: the recipe's)")
        sp.add_argument("--batch", type=int, default=256, help="samples per batch (never changes a sample)")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        sp.add_argument("--force", action="store_true", help="overwrite existing output files")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        sp.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------
# Parsing the seed and class options


def parse_seeds(text: str) -> list[int]:
    """'0-99' (inclusive), '1,5,7' or a mix like '0-9,20' -> a list of distinct non-negative seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise UsageError(f"--seeds {text!r}: range {part!r} runs backwards")
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise UsageError(f"--seeds {text!r}: {part!r} is not a seed or a range A-B "
                             "(expected e.g. 0-99 or 1,5,7)") from None
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise UsageError(f"--seeds {text!r}: seeds must be non-negative 64-bit integers")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: a seed appears twice")
    return seeds


def parse_classes(text: str) -> list[int]:
    """'3' or '3,5' -> a list of distinct non-negative class labels (`--class`)."""
    try:
        classes = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--class {text!r}: expected a class label or a list such as 3,5") from None
    if any(c < 0 for c in classes):
        raise UsageError(f"--class {text!r}: class labels are non-negative")
    if len(set(classes)) != len(classes):
        raise UsageError(f"--class {text!r}: a class appears twice")
    return classes


# --------------------------------------------------------------------------------------------------


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffdistillError(f"--device {name}: CUDA is not available on this machine")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return name


def _seeds(args) -> list[int]:
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
        if args.n is not None and args.n != len(seeds):
            raise UsageError(f"--n {args.n} disagrees with --seeds {args.seeds} ({len(seeds)} seeds)")
        return seeds
    if args.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {args.seed}")
    return list(range(args.seed, args.seed + args.n))


def _refuse_existing(paths: list[Path], force: bool) -> None:
    for p in paths:
        if p.is_dir():
            raise DiffdistillError(f"{p}: is a directory (expected a file to write)")
        if p.exists() and not force:
            more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
            raise DiffdistillError(f"{p}: already exists{more}; pass --force to overwrite")


def _folder_labels(path: Path) -> dict[str, int]:
    """The labels an existing `dataset.json` of a sample folder holds ({} when there is none), so that the
    labels of new samples are added to them; a malformed one is refused before sampling."""
    import json

    from ..data.formats import parse_labels

    if not path.is_file():
        return {}
    text = path.read_bytes()
    if parse_labels(text, [], str(path)) is None:                 # {"labels": null}
        return {}
    names = [entry[0].replace("\\", "/") for entry in json.loads(text)["labels"]]
    return dict(zip(names, parse_labels(text, names, str(path)).tolist()))


def run(args) -> int:
    import numpy as np
    import torch

    from ..io import atomic_write, atomic_write_json
    from ..metrics.features import to_uint8

    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    out = Path(args.out)
    if args.kind == "figures":
        _refuse_existing([out], args.force)
    elif args.kind == "npz":
        if out.suffix != ".npz":
            raise UsageError(f"{out}: the output of `sample npz` must end in .npz")
        _refuse_existing([out], args.force)
    elif out.exists() and not out.is_dir():
        raise DiffdistillError(f"{out}: exists and is not a directory")
    classes = parse_classes(args.label) if args.label is not None else None
    device = _device(args.device)
    denoiser, recipe, _ = load_model(args.model, device, note=lambda text: print(text, file=sys.stderr))
    shape = tuple(denoiser.shape)
    if args.n is None and args.seeds is None:
        args.n = (49 if is_image_shape(shape) else 2000) if args.kind == "figures" else 100
    seeds = _seeds(args)
    if args.kind == "tofolder":
        if not is_image_shape(shape):
            raise DiffdistillError(f"{args.model} makes samples of shape {shape}, not images; use "
                                   "`diffdistill sample npz` or `sample figures`")
        files = [out / f"{s:06d}.png" for s in seeds]
        existing = [f for f in files if f.exists()]
        _refuse_existing(existing, args.force)
    plan = sampling_plan(denoiser, recipe, args.steps, args.sampler, args.clip)
    ncol = None
    if classes is not None and len(classes) > 1 and args.kind == "figures":
        ncol = math.ceil(len(seeds) / len(classes))            # one grid row per class
    cond = labels_for(denoiser, seeds, classes, args.model, per_row=ncol)
    labelled = _folder_labels(out / "dataset.json") if args.kind == "tofolder" and cond is not None else None
    x = generate(denoiser, plan, seeds, cond, device, args.batch, progress=not args.no_progress)
    what = f"{len(seeds)} samples, {plan['sampler']} {len(plan['sigmas']) - 1} steps ({plan['nfe']} NFE)"

    if args.kind == "figures":
        save_figure(x, out, ncol=ncol)
    elif args.kind == "npz":
        labels = cond if cond is not None else torch.full((len(seeds),), -1, dtype=torch.long)

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, x=x.numpy().astype(np.float32), seeds=np.asarray(seeds, dtype=np.int64),
                         labels=labels.numpy().astype(np.int64))
        atomic_write(out, write)
    else:
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        images = to_uint8(x).permute(0, 2, 3, 1).numpy()   # EDM: (x * 127.5 + 128).clip(0, 255) -> uint8
        for f, img in zip(files, images):
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img, mode="L" if img.shape[-1] == 1
                                  else "RGB")
            atomic_write(f, lambda p, pil=pil: pil.save(p, format="PNG"))
        if labelled is not None:                               # EDM's dataset.json: [[file name, label], ...]
            labelled.update({f.name: int(c) for f, c in zip(files, cond.tolist())})
            atomic_write_json(out / "dataset.json", {"labels": [[k, labelled[k]] for k in sorted(labelled)]})
            what += f", labels in {out / 'dataset.json'}"
    print(f"{out}: {what}")
    return 0
