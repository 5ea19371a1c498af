"""`diffdistill export FORMAT RUN OUT`: a student in another library's format (diffusers)."""

from __future__ import annotations

import argparse

from .common import count_value

DIFFUSERS_EXAMPLES = """\
examples:
  diffdistill export diffusers runs/di-ddpm exported/di-ddpm       # a DI student of a diffusers DDPM teacher
  diffdistill export diffusers runs/pd-cosine/model exported/pd-4 --force --check 8

then, in Python (exported/di-ddpm/diffdistill_export.json holds the call that samples the student exactly):
  pipe = diffusers.DiffusionPipeline.from_pretrained("exported/di-ddpm")
  images = pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
"""


def _run_diffusers(args) -> int:
    from ..export import export_diffusers
    from ..sampling import load_model

    student, recipe, meta = load_model(args.run, "cpu", note=print)
    info = export_diffusers(student, recipe, args.out, force=args.force, check=args.check, source=args.run,
                            meta=meta)
    call = ", ".join(f"{k}={v!r}" for k, v in info["call"].items())
    check = info.get("check")
    checked = (f"max |diff| {check['max_abs_diff']:.3g} against diffdistill sample on {len(check['seeds'])} seeds"
               if check else "not checked")
    print(f"exported {args.run} ({info['student']['sampler']}, {len(info['timesteps'])} step(s), timesteps "
          f"{info['timesteps']}) -> {args.out}  [{info['pipeline']} + {info['scheduler']}; {checked}]")
    print(f"sample it with: DiffusionPipeline.from_pretrained({str(args.out)!r})({call})")
    return 0


def _add_diffusers(sub) -> None:
    p = sub.add_parser(
        "diffusers",
        help="a student of a diffusers teacher as a diffusers pipeline folder",
        description="Write a student of a diffusers teacher (a UNet2DModel run by diffdistill) as a diffusers "
                    "pipeline folder (model_index.json, unet/, scheduler/) that diffusers' own from_pretrained "
                    "loads and samples with the student's step count, equal to `diffdistill sample` from the same "
                    "noise: one-step students with an EulerDiscreteScheduler, DDIM (progressive distillation) "
                    "students with a first-order DPMSolverMultistepScheduler, both set to the student's noise "
                    "levels, in a ConsistencyModelPipeline. KD's paper student, consistency (CD) students, "
                    "stochastic samplers and this project's own networks have no exact diffusers counterpart and "
                    "are refused. The export samples a few seeds both ways and writes nothing if they differ.",
        epilog=DIFFUSERS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run directory (its model/, or latest/ if interrupted) or a snapshot")
    p.add_argument("out", metavar="OUT", help="the diffusers folder to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is an earlier export (a diffusers pipeline folder) or empty")
    p.add_argument("--check", type=count_value(0), default=2, metavar="N",
                   help="samples (seeds 0..N-1) drawn by the exported pipeline and by diffdistill and compared "
                        "before anything is written (default 2; 0: no check)")
    p.set_defaults(func=_run_diffusers)


FORMATS = [_add_diffusers]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a student in another library's format (diffusers)",
        description="Write a student in another library's format. Nothing is written if anything fails.",
        epilog="examples:\n  diffdistill export diffusers runs/di-ddpm exported/di-ddpm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True, parser_class=type(parser))
    for add in FORMATS:
        add(sub)
