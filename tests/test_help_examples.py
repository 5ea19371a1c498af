"""Issue 19 item 2: every example of every `--help` and every `diffdistill` command line of the README runs.

The examples are read from what users read: the `--help` text of every (sub)command of `diffdistill.cli.main`
(`\\` continuations joined) and the ```bash blocks of README.md. Each one parses with the real parser (paths moved
into tmp_path). Each one whose inputs are local runs in-process (`main(argv)`) in its own directory at a tiny length
(--kimg, --n, --n-pairs, ... overridden, see TINY) and must exit 0 and write what it promises. Its inputs are copied
in from the example (or the small setup step, SETUP) that made them: the chain starts from one tiny digits teacher
(`train-teacher --data digits --out runs/digits --preset digits`), which the sample, eval, kd-pairs and distill
examples reuse; images and LMDBs of a few tiny pictures stand in for ~/data/...; tiny random diffusers UNets stand
in for the diffusers DDPM teachers. Every example that needs a file that cannot exist here is listed in PARSE_ONLY
with the reason, and the test fails on any example that is neither run nor listed (a new example must be placed).
The README's synopsis block (```text) is checked option by option against the parsers.

The full-length quality of the toy examples was measured by hand (OMP_NUM_THREADS=1, 2-core CPU, --out in /tmp and
--no-progress added; 10,000 samples of RUN/model with its own sampling recipe, judged with diffdistill.metrics.toy:
within_nstd against the exact 0.989, and mode_shares):

  diffdistill distill di  --teacher toy:ring8 --out runs/di-ring  --kimg 200 --batch 256 --recipe short
      within 3 std 0.891, 8/8 modes, shares 0.113-0.140   (25 s)
  diffdistill distill kd  --teacher toy:ring8 --out runs/kd-ring  --kimg 200 --batch 256 --recipe short
      within 3 std 0.937, 8/8 modes, shares 0.121-0.131   (61 s, most of it the 1.024M teacher pairs)
  diffdistill distill gdd --teacher toy:ring8 --data toy:ring8 --out runs/gdd-ring --kimg 200 --batch 256 \\
      --recipe short
      within 3 std 0.886, 8/8 modes, shares 0.113-0.136   (27 s)

The same commands without --recipe short (the help's examples before this fix): DI within 3 std 0.128, GDD 0.728.
DI with --recipe short at --kimg 25.6 (100 steps): within 3 std 0.800 (0.818 in-process in the test below), 8/8
modes; without it, at --kimg 25.6 and at 51.2: 0.069 (`test_di_example_keeps_the_ring_at_an_eighth_of_its_length`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill.cli.main import _subparsers, build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------------------------
# The examples, as users read them


def _parser_paths() -> list[tuple[str, ...]]:
    """Every (sub)command of the parser tree, e.g. (), ('sample',), ('sample', 'figures'), ..."""
    out, seen = [], set()

    def walk(parser, path):
        if id(parser) in seen:
            return
        seen.add(id(parser))
        out.append(path)
        for action in _subparsers(parser):
            for name, child in action.choices.items():
                walk(child, (*path, name))

    walk(build_parser(), ())
    return out


def _help(path: tuple[str, ...]) -> str:
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0, path
    return text.getvalue()


def _command_lines(text: str) -> list[str]:
    """The `diffdistill ...` / `torchrun ...` lines of a text, `\\` continuations joined, whitespace collapsed."""
    lines, current = [], None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()    # a comment after the command
        if current is None:
            if not line.startswith(("diffdistill ", "torchrun ")):
                continue
            # the command keeps single spaces (aligned words aside): three or more are a `\` that Python
            # swallowed in a non-raw string, joining two lines
            assert not re.search(r"\S\s{3,}\S", line), f"joined lines in: {raw!r}"
            current = line
        else:
            current += " " + line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        lines.append(re.sub(r"\s+", " ", current))
        current = None
    assert current is None, f"unfinished continuation: {current}"
    return lines


def _help_examples() -> dict[str, list[str]]:
    """Example line -> the commands whose --help shows it."""
    found: dict[str, list[str]] = {}
    for path in _parser_paths():
        text = _help(path)
        if "\nexamples:\n" not in text:
            continue
        for line in _command_lines(text.split("\nexamples:\n", 1)[1]):
            found.setdefault(line, []).append(" ".join(("diffdistill", *path)))
    return found


def _readme_blocks(kind: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"^```{kind}\n(.*?)^```", text, flags=re.S | re.M)


HELP_EXAMPLES = _help_examples()
README_EXAMPLES = [line for block in _readme_blocks("bash") for line in _command_lines(block)]
EXAMPLES = list(dict.fromkeys([*HELP_EXAMPLES, *README_EXAMPLES]))


def _argv(line: str) -> list[str]:
    """The argument vector after the program (`diffdistill`, or torchrun's `-m diffdistill`); comments dropped."""
    words = shlex.split(line, comments=True)
    if words[0] == "torchrun":
        i = words.index("-m")
        assert words[i + 1] == "diffdistill", line
        return words[i + 2:]
    assert words[0] == "diffdistill", line
    return words[1:]


def _looks_like_path(word: str) -> bool:
    if word.startswith(("-", "toy:", "gmm:")):
        return False
    return "/" in word or bool(re.search(r"(\.(npz|json|pkl|zip|pt|pth|png|safetensors|gz)|_lmdb)$", word))


def _relative(word: str) -> str:
    """A path of an example made relative (to the directory it runs in): ~/, /, ./ and ../ dropped."""
    while word.startswith(("~/", "/", "./", "../")):
        word = word.split("/", 1)[1]
    return word.rstrip("/") or "."


def _id(line: str) -> str:
    argv = _argv(line)
    words = [w for w in argv[:2] if not w.startswith("-") and not _looks_like_path(w)]
    return "-".join(words) + ("-torchrun" if line.startswith("torchrun") else "")


# ------------------------------------------------------------------------------------------------------------------
# What each example needs, and how it is shortened

TINY_KIMG = "0.512"  # 2 steps of the ring examples' batch of 256, 4 of the digits teacher's 128


@dataclass
class Example:
    """A runnable example: its inputs (relative path -> the example line or SETUP name that makes it), the options
    set to shorten it (option -> value, None: a flag to add), the options it drops, and what it must write."""
    needs: dict[str, str] = field(default_factory=dict)
    tiny: dict[str, str | None] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


TEACHER = "diffdistill train-teacher --data digits --out runs/digits --preset digits"
REF = "diffdistill ref-stats digits --features digits --out digits-ref.npz"
DI_DIGITS = "diffdistill distill di --teacher runs/digits --out runs/di-digits --kimg 50"
PD_DIGITS = ("diffdistill distill pd --teacher runs/digits --data digits --out runs/pd-digits --start-steps 16 "
             "--end-steps 1")
KD_RING = "diffdistill distill kd --teacher toy:ring8 --out runs/kd-ring --kimg 200 --batch 256 --recipe short"
TOY = "diffdistill train-teacher --data toy:ring8 --out runs/toy --preset toy"
KD_PAIRS = ("diffdistill kd-pairs --teacher runs/digits --pairs runs/digits-pairs --n-pairs 100000 "
            "--heldout 10000")
KD_DIGITS = "diffdistill distill kd --teacher runs/digits --pairs runs/digits-pairs --out runs/kd-digits"
CELEBA_LMDB = ("diffdistill dataset convert ~/data/celeba celeba-64_lmdb --resolution 64x64 --transform "
               "center-crop")
MNIST_CLF = "diffdistill features train --data mnist.npz --out mnist-classifier.safetensors"

T = {"--kimg": TINY_KIMG}
EVAL_T = {"--kimg": TINY_KIMG, "--eval-kimg": TINY_KIMG, "--eval-n": "64"}
DIGITS_TEACHER = {"runs/digits": TEACHER}

RUNS: dict[str, Example] = {
    # diffdistill --help
    "diffdistill demo --quick": Example(drop=("--quick",), tiny={"--tiny": None}, writes=("demo-report/index.html",)),
    "diffdistill train-teacher --data digits --out runs/digits": Example(tiny=T, writes=("runs/digits/model",)),
    DI_DIGITS: Example(DIGITS_TEACHER, T, writes=("runs/di-digits/model",)),
    "diffdistill sample figures grid.png runs/di-digits": Example({"runs/di-digits": DI_DIGITS}, writes=("grid.png",)),
    "diffdistill eval runs/di-digits --metrics fid --features digits --ref-data digits":
        Example({"runs/di-digits": DI_DIGITS}, {"--n": "64"}),
    # demo --help (--tiny: the demo's test size, seconds on the ring; --quick and the default take minutes)
    "diffdistill demo": Example(tiny={"--tiny": None}, writes=("demo-report/index.html",)),
    "diffdistill demo --quick --out /tmp/d": Example(drop=("--quick",), tiny={"--tiny": None},
                                                     writes=("tmp/d/index.html",)),
    "diffdistill demo --methods di,cd --tracks ring": Example(tiny={"--tiny": None},
                                                              writes=("demo-report/index.html",)),
    # sample --help
    "diffdistill sample figures grid.png runs/di-digits --n-images 49": Example({"runs/di-digits": DI_DIGITS},
                                                                             writes=("grid.png",)),
    "diffdistill sample figures t4.png runs/digits --steps 4 --sampler euler --class 3":
        Example(DIGITS_TEACHER, writes=("t4.png",)),
    "diffdistill sample figures t35.png runs/digits --class 3,5 --n 16": Example(DIGITS_TEACHER, writes=("t35.png",)),
    "diffdistill sample figures pd.png runs/pd-digits --sampler ddim --steps 8 --clip 1":
        Example({"runs/pd-digits": PD_DIGITS}, writes=("pd.png",)),
    "diffdistill sample figures ring.png toy:ring8 --n-images 2000": Example(writes=("ring.png",)),
    "diffdistill sample tofolder samples/ runs/cd-digits --seeds 0-99 --steps 2":
        Example({"runs/cd-digits": "cd-digits"}, {"--seeds": "0-7"}, writes=("samples/000007.png",
                                                                            "samples/dataset.json")),
    "diffdistill sample npz samples.npz runs/kd-ring --n 10000": Example({"runs/kd-ring": KD_RING}, {"--n": "256"},
                                                                        writes=("samples.npz",)),
    # train-teacher --help
    TOY: Example(tiny=T, writes=("runs/toy/model",)),
    TEACHER: Example(tiny=T, writes=("runs/digits/model",)),
    REF: Example(writes=("digits-ref.npz",)),
    "diffdistill train-teacher --data digits --out runs/digits --preset digits --metrics fid --ref digits-ref.npz "
    "--features digits --eval-kimg 2 --eval-n 2000": Example({"digits-ref.npz": REF}, EVAL_T,
                                                             writes=("runs/digits/best",)),
    "diffdistill train-teacher --data digits --out runs/digits-v --preset digits --loss vp --pred v":
        Example(tiny=T, writes=("runs/digits-v/model",)),
    # distill --help
    "diffdistill distill di --teacher toy:ring8 --out runs/di-ring --kimg 200 --batch 256 --recipe short":
        Example(tiny=T, writes=("runs/di-ring/model",)),
    KD_RING: Example(tiny={**T, "--n-pairs": "512", "--heldout": "64"}, writes=("runs/kd-ring/model",)),
    "diffdistill distill gdd --teacher toy:ring8 --data toy:ring8 --out runs/gdd-ring --kimg 200 --batch 256 "
    "--recipe short": Example(tiny=T, writes=("runs/gdd-ring/model",)),
    PD_DIGITS: Example(DIGITS_TEACHER, T, writes=("runs/pd-digits/model",)),
    "diffdistill distill gdd --teacher runs/digits --data digits --out runs/gdd-digits --recipe short --metrics fid "
    "--ref digits-ref.npz --features digits --eval-kimg 5 --eval-n 2000":
        Example({**DIGITS_TEACHER, "digits-ref.npz": REF}, EVAL_T, writes=("runs/gdd-digits/best",)),
    # kd-pairs --help
    KD_PAIRS: Example(DIGITS_TEACHER, {"--n-pairs": "256", "--heldout": "32"}),
    KD_DIGITS: Example({**DIGITS_TEACHER, "runs/digits-pairs": KD_PAIRS}, T, writes=("runs/kd-digits/model",)),
    # eval --help
    "diffdistill eval runs/kd-digits --ref-data digits --features digits --metrics fid,kid,is,pr --n 2000":
        Example({"runs/kd-digits": KD_DIGITS}, {"--n": "64"}),
    "diffdistill eval runs/toy --ref-data toy:ring8 --n 10000": Example({"runs/toy": TOY}, {"--n": "500"}),
    # ref-stats --help
    "diffdistill ref-stats digits --features digits --out digits-ref.npz --save-features":
        Example(writes=("digits-ref.npz",)),
    # export diffusers --help: students of tiny random diffusers teachers (SETUP)
    "diffdistill export diffusers runs/di-ddpm exported/di-ddpm": Example({"runs/di-ddpm": "di-ddpm"},
                                                                         writes=("exported/di-ddpm/unet",)),
    "diffdistill export diffusers runs/pd-cosine/model exported/pd-4 --force --check 8":
        Example({"runs/pd-cosine": "pd-cosine"}, writes=("exported/pd-4/unet",)),
    # dataset --help: a few tiny pictures stand in for ~/data/...
    "diffdistill dataset info digits": Example(),
    "diffdistill dataset info ~/data/ffhq --resolution 64x64 --check": Example({"data/ffhq": "ffhq"}),
    "diffdistill dataset convert ~/data/imagenet/train imagenet-64x64.zip --resolution 64x64 --transform center-crop":
        Example({"data/imagenet": "imagenet"}, writes=("imagenet-64x64.zip",)),
    "diffdistill dataset convert ~/data/lsun/church_outdoor_train_lmdb church-64x64.zip --resolution 64x64 "
    "--transform center-crop": Example({"data/lsun/church_outdoor_train_lmdb": "lsun-church"},
                                       writes=("church-64x64.zip",)),
    "diffdistill dataset convert ~/data/lsun/cat_lmdb cat-256x256.zip --resolution 256x192 --transform "
    "center-crop-wide": Example({"data/lsun/cat_lmdb": "lsun-cat"}, writes=("cat-256x256.zip",)),
    CELEBA_LMDB: Example({"data/celeba": "celeba"}, writes=("celeba-64_lmdb/data.mdb",)),
    "diffdistill dataset info celeba-64_lmdb": Example({"celeba-64_lmdb": CELEBA_LMDB}),
    # features --help
    MNIST_CLF: Example({"mnist.npz": "mnist"}, {"--epochs": "1"}, writes=("mnist-classifier.safetensors",)),
    "diffdistill features info mnist-classifier.safetensors":
        Example({"mnist-classifier.safetensors": MNIST_CLF, "mnist-classifier.json": MNIST_CLF}),
    "diffdistill features info digits": Example(),
    "diffdistill eval runs/mnist --metrics fid --features mnist-classifier.safetensors --ref-data mnist.npz":
        Example({"runs/mnist": "mnist-teacher", "mnist.npz": "mnist", "mnist-classifier.safetensors": MNIST_CLF,
                 "mnist-classifier.json": MNIST_CLF}, {"--n": "32"}),
    # README: a tiny random diffusers DDPM stands in for ./ddpm-cifar10-32
    "diffdistill distill kd --teacher ./ddpm-cifar10-32 --out runs/kd-cifar --batch 512 --kimg 25000":
        Example({"ddpm-cifar10-32": "ddpm"}, {"--kimg": "0.512", "--n-pairs": "512", "--heldout": "16",
                                              "--pairs-steps": "4"}, writes=("runs/kd-cifar/model",)),
}

EDM_PICKLE = "needs one of NVIDIA's EDM pickles (a download) or a teacher converted from one"
CIFAR = "needs the CIFAR-10 python tarball (a download)"
INCEPTION = "needs the Inception-v3 FID weights pt_inception-2015-12-05 (a download)"
TORCHRUN = "a torchrun launch of 8 GPUs; its diffdistill command"
PARSE_ONLY: dict[str, str] = {
    "torchrun --nproc_per_node=8 -m diffdistill train-teacher --data cifar-10-python.tar.gz --out runs/cifar "
    "--preset cifar10 --batch-gpu 64": f"{TORCHRUN} {CIFAR}",
    "torchrun --nproc_per_node=8 -m diffdistill distill di --teacher teachers/cifar --out runs/di-cifar --recipe "
    "cifar10": f"{TORCHRUN} {EDM_PICKLE}",
    "torchrun --nproc_per_node=8 -m diffdistill kd-pairs --teacher ./ddpm-cifar10-32 --pairs pairs-cifar --n-pairs "
    "1024000": f"{TORCHRUN} makes 1.024M pairs of a CIFAR-10 DDPM (the same command without torchrun runs as the "
               "README's distill kd example)",
    "diffdistill eval runs/cd/model --ref cifar10-32x32.npz --features inception --inception pt_inception.pth":
        INCEPTION,
    "diffdistill eval samples_50000x64x64x3.npz --ref VIRTUAL_imagenet64_labeled.npz --metrics fid,is,pr "
    "--inception pt_inception.pth --is-split-size 5000": f"{INCEPTION}, and guided-diffusion's ImageNet batches",
    "diffdistill ref-stats cifar10-32x32.zip --features inception --inception "
    "pt_inception-2015-12-05-6726825d.pth --out cifar10-ref.npz": INCEPTION,
    "diffdistill convert edm edm-cifar10-32x32-uncond-vp.pkl teachers/edm-cifar10-uncond": EDM_PICKLE,
    "diffdistill convert edm network-snapshot-200000.pkl teachers/mine --key ema": EDM_PICKLE,
    "diffdistill sample figures grid.png teachers/edm-cifar10-uncond": EDM_PICKLE,
    "diffdistill dataset info ~/data/cifar-10-python.tar.gz": CIFAR,
    "diffdistill dataset convert ~/data/cifar-10-python.tar.gz cifar10-32x32.zip": CIFAR,
    "diffdistill features train --data cifar-10-python.tar.gz --out cifar-clf.safetensors --xflip": CIFAR,
    "diffdistill distill di --teacher teachers/edm-cifar10-uncond --out runs/di-cifar --recipe cifar10": EDM_PICKLE,
    "torchrun --nproc_per_node=8 -m diffdistill distill gdd --teacher teachers/edm-cifar10-uncond-ve --data "
    "cifar10.zip --out runs/gdd-cifar --recipe cifar10-gddi --disc projected --disc-vgg-weights "
    "vgg16_bn.safetensors --disc-effnet-weights tf_efficientnet_lite0.safetensors":
        f"{TORCHRUN} {EDM_PICKLE}, CIFAR-10 and torchvision/timm weights",
    "torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER:29500 -m diffdistill "
    "distill sid --teacher teachers/edm-cifar10-uncond --out runs/sid-cifar --recipe cifar10":
        f"a torchrun launch of 4 nodes; {EDM_PICKLE}",
    "diffdistill train-teacher --data cifar-10-python.tar.gz --out runs/cifar-small --preset cifar10 --xflip "
    "--channels 32 --channel-mult 1,2,2 --blocks 1 --attn 8 --dropout 0.1 --batch 128 --warmup 10 --ema 20": CIFAR,
}


# ------------------------------------------------------------------------------------------------------------------
# Inputs that are not made by an example: tiny stand-ins


def _save_images(folder: Path, sizes, names=None, fmt="PNG") -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / (names[i] if names else f"img{i:03d}.{fmt.lower()}")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
        paths.append(path)
    return paths


def _lmdb(path: Path, sizes) -> None:
    """An LMDB as LSUN ships it: every value an encoded image (webp in LSUN; JPEG here)."""
    import lmdb

    tmp = path.parent / "pictures"
    files = _save_images(tmp, sizes, fmt="JPEG")
    path.mkdir(parents=True)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, f in enumerate(files):
            txn.put(f"{i:040x}".encode(), f.read_bytes())
    env.close()
    shutil.rmtree(tmp)


def _mnist(path: Path) -> None:
    """A tiny labelled MNIST-like .npz: 300 of sklearn's digits, 28x28 uint8, with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.kron(d.images[:300], np.ones((3, 3)))[:, :, :] * 16).clip(0, 255).astype(np.uint8)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    np.savez(path, x=x, y=d.target[:300].astype(np.int64))


def _diffusers_teacher(path: Path, **scheduler) -> None:
    """A tiny random diffusers DDPM (UNet2DModel + DDPMScheduler), 1 x 8 x 8 like the digits."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4).save_pretrained(path / "unet")
    diffusers.DDPMScheduler(**scheduler).save_pretrained(path / "scheduler")


def _cli(*argv) -> None:
    assert main([*argv, "--no-progress"]) == 0, argv


SETUP = {
    "ffhq": lambda d: _save_images(d / "data/ffhq", [(80, 80), (96, 96), (64, 64), (70, 50)]),
    "imagenet": lambda d: [_save_images(d / f"data/imagenet/train/n0{c}", [(80, 70), (64, 90)], fmt="JPEG")
                           for c in (1440764, 1443537)],
    "lsun-church": lambda d: _lmdb(d / "data/lsun/church_outdoor_train_lmdb", [(96, 72), (80, 64), (100, 75)]),
    "lsun-cat": lambda d: _lmdb(d / "data/lsun/cat_lmdb", [(320, 240), (300, 240), (400, 300)]),
    "celeba": lambda d: _save_images(d / "data/celeba", [(89, 109)] * 4, fmt="JPEG"),
    "mnist": lambda d: _mnist(d / "mnist.npz"),
    "ddpm": lambda d: _diffusers_teacher(d / "ddpm-cifar10-32"),
    "di-ddpm": lambda d: (_diffusers_teacher(d / "ddpm"),
                          _cli("distill", "di", "--teacher", "ddpm", "--out", "runs/di-ddpm", "--kimg", "0.008",
                               "--batch", "4")),
    "pd-cosine": lambda d: (_diffusers_teacher(d / "ddpm-cos", beta_schedule="squaredcos_cap_v2",
                                               prediction_type="v_prediction"),
                            _cli("distill", "pd", "--teacher", "ddpm-cos", "--data", "digits", "--out",
                                 "runs/pd-cosine", "--start-steps", "8", "--end-steps", "4", "--kimg", "0.016",
                                 "--batch", "4")),
    "cd-digits": lambda d: (shutil.copytree(_done(TEACHER) / "runs/digits", d / "runs/digits"),
                            _cli("distill", "cd", "--teacher", "runs/digits", "--data", "digits", "--out",
                                 "runs/cd-digits", "--kimg", TINY_KIMG)),
    "mnist-teacher": lambda d: (_mnist(d / "mnist.npz"),
                                _cli("train-teacher", "--data", "mnist.npz", "--out", "runs/mnist", "--preset",
                                     "mnist", "--channels", "8", "--channel-mult", "1,1", "--blocks", "1", "--attn",
                                     "none", "--kimg", "0.064", "--batch", "32", "--grid-kimg", "0")),
}


# ------------------------------------------------------------------------------------------------------------------
# Running the chain: each example or setup step once, in its own directory, its inputs copied in


def _set(argv: list[str], option: str, value: str | None) -> list[str]:
    argv = list(argv)
    if option in argv:
        if value is not None:
            argv[argv.index(option) + 1] = value
    else:
        argv += [option] if value is None else [option, value]
    return argv


def _drop(argv: list[str], option: str) -> list[str]:
    return [w for w in argv if w != option]


def _accepts(argv: list[str], option: str) -> bool:
    """Whether the (sub)command of argv takes `option`."""
    parser = build_parser()
    for word in argv:
        subs = _subparsers(parser)
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return option in parser._option_string_actions


def tiny_argv(line: str) -> list[str]:
    ex = RUNS[line]
    argv = [_relative(w) if _looks_like_path(w) else w for w in _argv(line)]
    for option in ex.drop:
        argv = _drop(argv, option)
    for option, value in ex.tiny.items():
        argv = _set(argv, option, value)
    if _accepts(argv, "--no-progress"):
        argv = _set(argv, "--no-progress", None)
    return argv


_DONE: dict[str, Path] = {}
_BASE: list[Path] = []


@contextlib.contextmanager
def _inside(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _done(key: str) -> Path:
    """The directory where the example line (or SETUP step) `key` ran, running it (and what it needs) first."""
    if key in _DONE:
        return _DONE[key]
    assert _BASE, "the module fixture `chain` sets the base directory"
    folder = _BASE[0] / f"{len(_DONE):02d}-{_id(key) if key in RUNS else key}"
    folder.mkdir()
    if key in SETUP:
        with _inside(folder):
            SETUP[key](folder)
    else:
        for rel, producer in RUNS[key].needs.items():
            src, dest = _done(producer) / rel, folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)
        with _inside(folder):
            code = main(tiny_argv(key))
        assert code == 0, f"{key}: exit {code}"
    _DONE[key] = folder
    return folder


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    _BASE[:] = [tmp_path_factory.mktemp("examples")]
    _DONE.clear()
    yield _done
    _DONE.clear()
    _BASE.clear()


# ------------------------------------------------------------------------------------------------------------------
# The tests


def test_every_example_is_run_or_listed():
    """Each example is either run or listed with a reason; nothing listed is stale; every command with examples
    was found (a help that lost its examples section fails here)."""
    assert set(RUNS).isdisjoint(PARSE_ONLY)
    placed = set(RUNS) | set(PARSE_ONLY)
    assert [e for e in EXAMPLES if e not in placed] == []
    assert sorted(placed - set(EXAMPLES)) == []
    shown = {c for where in HELP_EXAMPLES.values() for c in where}
    for command in ("diffdistill", "diffdistill demo", "diffdistill sample figures", "diffdistill train-teacher",
                    "diffdistill distill di", "diffdistill kd-pairs", "diffdistill eval", "diffdistill ref-stats",
                    "diffdistill convert edm", "diffdistill export diffusers", "diffdistill dataset convert",
                    "diffdistill features", "diffdistill features train", "diffdistill features info"):
        assert command in shown, command
    assert len(README_EXAMPLES) >= 6


@pytest.mark.parametrize("line", EXAMPLES, ids=[f"{i}-{_id(e)}" for i, e in enumerate(EXAMPLES)])
def test_example_parses(line, tmp_path):
    """Each example, with its paths moved into tmp_path, parses with the real parser into a command."""
    argv = [str(tmp_path / _relative(w)) if _looks_like_path(w) else w for w in _argv(line)]
    args = build_parser().parse_args(argv)
    assert callable(getattr(args, "func", None))


RUNNABLE = [e for e in EXAMPLES if e in RUNS]


@pytest.mark.parametrize("line", RUNNABLE, ids=[f"{i}-{_id(e)}" for i, e in enumerate(RUNNABLE)])
def test_local_example_runs(line, chain):
    """Each local example, shortened, exits 0 (checked in `_done`) and writes what it promises."""
    folder = chain(line)
    for path in RUNS[line].writes:
        assert (folder / path).exists(), f"{line}: no {path}"


def test_readme_synopsis_names_real_options():
    """The README's command synopsis (```text block): each line's command exists and every option it names is one
    of that command's, and every choice it lists (`--preset toy|digits|...`, `{kd,pd,...}`) is accepted."""
    (block,) = [b for b in _readme_blocks("text") if "diffdistill train-teacher" in b]
    lines = [re.sub(r"\s+#.*", "", raw) for raw in block.splitlines()]
    commands, current = [], None
    for line in lines:
        if line.startswith("diffdistill "):
            current = [line]
            commands.append(current)
        elif line.strip():
            current.append(line)
    assert len(commands) >= 13
    root = build_parser()
    for command in commands:
        text = " ".join(command)
        words = text.split()[1:]
        parsers = [root]   # {a,b,...}: the parsers of every alternative; {figures OUT.png | ...}: the first
        for word in words:
            subs = _subparsers(parsers[0])
            names = word.strip("{}").split(",") if word.startswith("{") and "," in word else [word.lstrip("{")]
            if not subs or names[0] not in subs[0].choices:
                break
            assert set(names) <= set(subs[0].choices), f"{text}: {word}"
            parsers = [subs[0].choices[name] for name in names]
        assert parsers[0] is not root, text
        for option, value in re.findall(r"(--[a-z][a-z0-9-]*)(?:[ =]([^\s\]\[]+))?", text):
            actions = [p._option_string_actions.get(option) for p in parsers]
            assert None not in actions, f"{text}: {option} is not an option of every `{parsers[0].prog}`"
            if value and "|" in value and actions[0].choices:   # each choice listed: one the command takes
                accepted = set().union(*(a.choices for a in actions))
                assert set(value.split("|")) <= accepted, f"{text}: {option} {value}"


def test_di_example_keeps_the_ring_at_an_eighth_of_its_length(tmp_path):
    """The help's DI example at --kimg 25.6 (100 steps) already keeps all eight modes with most samples within
    3 std (measured 0.818; the same example without --recipe short, as the help had it: 0.069)."""
    from diffdistill.io import load_snapshot
    from diffdistill.metrics.toy import mode_shares, within_nstd
    from diffdistill.samplers import sample
    from diffdistill.teachers.analytic import ring8

    (line,) = [e for e in HELP_EXAMPLES if e.startswith("diffdistill distill di --teacher toy:ring8")]
    argv = [str(tmp_path / _relative(w)) if _looks_like_path(w) else w for w in _argv(line)]
    assert main(_set(_set(argv, "--kimg", "25.6"), "--no-progress", None)) == 0
    net, recipe, _ = load_snapshot(tmp_path / "runs/di-ring/model")
    with torch.no_grad():
        x = sample(net, range(4000), sampler=recipe["sampler"], sigmas=recipe["sigmas"], batch=4000)
    teacher = ring8()
    within, shares = within_nstd(teacher, x), mode_shares(teacher, x)
    print(f"di example, 100 steps: within 3 std {within:.3f}, shares {shares.round(3).tolist()}")
    assert within > 0.6
    assert shares.min() > 1 / 16

