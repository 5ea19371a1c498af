"""Bounds and parsers of the values users type (seeds, counts, lengths in kimg, device names).

Plain functions of a string that return the value or raise `argparse.ArgumentTypeError` (the message names what
was expected), so that they serve as argparse `type=` functions; shared by the command line (`cli.common`
re-exports them) and by the package modules that declare options of their own, without either importing the
other.
"""

from __future__ import annotations

import argparse
import math
import re

MAX_KIMG = 1e9                 # a length in kimg: at most 10^12 images
MAX_MAGNITUDE = 1e30           # any number option: finite and at most this large (float32 holds 3.4e38)
SEED_RANGE = 2**32             # seeds: 0 .. 2^32 - 1 (numpy's RandomState takes no more; the loop scales them)
MAX_BATCH = 2**20              # a global batch of more than a million samples is a typo, not a setting
MAX_SAMPLES = 10**7            # samples one command draws (--n, --seeds)
MAX_SIDE = 16384               # an image side (--resolution)
DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?|mps")


def float_value(text: str) -> float:
    """A finite number of magnitude at most MAX_MAGNITUDE."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise argparse.ArgumentTypeError(f"expected a finite number of magnitude at most {MAX_MAGNITUDE:g}, "
                                         f"got {text!r}")
    return value


def kimg_value(zero_ok: bool = False):
    """A length in kimg: a finite number of magnitude at most MAX_KIMG (whether it must be positive, or may be 0
    to turn a periodic action off, is `cli.common.check_loop_arguments`'s usage error, `zero_ok` says which)."""
    def parse(text: str) -> float:
        value = float_value(text)
        if abs(value) > MAX_KIMG:
            raise argparse.ArgumentTypeError(f"expected a length in kimg of at most {MAX_KIMG:g}, got {text}")
        return value
    parse.__name__ = "kimg"
    return parse


def seed_value(text: str) -> int:
    """A seed: a whole number in [0, 2^32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < SEED_RANGE:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), got {text}")
    return value


def count_value(minimum: int = 1, maximum: int = 2**40):
    """A whole number in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected a whole number in [{minimum}, {maximum}], got {text}")
        return value
    parse.__name__ = "count"
    return parse


def device_value(text: str) -> str:
    """The name of a device: cpu, cuda, cuda:N or mps (whether this machine has it: `cli.common.check_device`)."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text
