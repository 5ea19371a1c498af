"""The fuzz suite's seeded subset (tests/fuzz): for every loader its valid base and a few malformed variants run
through the real CLI in forked children, each one clean (one line naming the file, no traceback, hang, crash,
silent acceptance or file written outside the output folder). `python -m tests.fuzz --full` runs 120 variants
per loader (README, Reliability)."""

from __future__ import annotations

import pytest

from tests.fuzz import harness
from tests.fuzz.loaders import LOADERS
from tests.fuzz.runner import make_base, prepare, variants_of

PER_LOADER = 3       # variants per loader in the normal suite (plus the valid base)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    prepare()
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("name", list(LOADERS))
def test_fuzz_subset(fuzz_root, name):
    loader = LOADERS[name]
    base = make_base(loader, fuzz_root / "bases")
    work = fuzz_root / "work" / name.replace(" ", "-")
    work.mkdir(parents=True)
    variants = variants_of(loader, PER_LOADER, seed=0)
    assert variants[0].name == "the valid base" and len(variants) == PER_LOADER + 1
    results = [harness.run_variant(loader, v, base, work, time_limit=60) for v in variants]
    assert results[0].code == 0 or name == "CLI values", results[0]      # the base is accepted
    bad = [f"{r.variant}: {r.outcome} ({r.detail})" for r in results if r.outcome != "clean"]
    assert not bad, bad


def test_every_loader_has_at_least_100_variants():
    import random

    for name, loader in LOADERS.items():
        assert len(loader.variants(random.Random(0), 100)) >= 100, name


# --------------------------------------------------------------------------------------------------
# The classification itself


def _classify(code, stderr, what="", expect="error", problem=None, stray=(), names=("data.zip",)):
    return harness.classify(code, stderr, what, harness.Variant("v", expect=expect), names, problem,
                            list(stray))[0]


def test_classify_outcomes():
    assert _classify(1, "diffdistill dataset: error: /x/data.zip: not a zip\n") == "clean"
    assert _classify(2, "diffdistill dataset: error: --kimg: bad\n", names=("--kimg",)) == "clean"
    assert _classify(1, "Traceback (most recent call last):\n  File ...\nValueError: x\n") == "traceback"
    assert _classify(98, "") == "traceback"                       # an exception escaped main
    assert _classify(None, "", "hang") == "hang"
    assert _classify(None, "", "crash SIGBUS") == "crash"
    assert _classify(0, "") == "accepted"                         # a malformed input: exit 0 is a failure
    assert _classify(0, "", expect="any") == "clean"              # possibly still valid
    assert _classify(0, "", expect="any", problem="s.npz holds NaN") == "accepted"
    assert _classify(1, "usage: ...\nx: error: data.zip bad\n") == "unclear"     # not one line
    assert _classify(1, "error: something failed\n") == "unclear"                # does not name the file
    assert _classify(1, "error: data.zip: out of memory (MemoryError)\n") == "unclear"
    assert _classify(1, "error: data.zip: bad\n", stray=["cwd/PWNED"]) == "stray"


def test_strays_finds_created_changed_and_removed_files(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "out").mkdir()
    before = harness.tree(tmp_path, skip=("out",))
    (tmp_path / "out" / "ok").write_text("output")     # the output folder may change
    (tmp_path / "b").write_text("new")
    (tmp_path / "a").unlink()
    assert harness.strays(before, harness.tree(tmp_path, skip=("out",))) == ["a (removed)", "b"]
