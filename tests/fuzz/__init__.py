"""The fuzz suite: malformed variants of small valid inputs, made here, run through the real CLI.

Every loader of the project (image folder, EDM zip, CIFAR tarball, npz, LMDB, gmm JSON, snapshot, diffusers
folder, EDM pickle, reference statistics, KD pairs, CLI values) gets a valid base built in a temporary folder and
variants of it: truncations at random offsets, byte flips, wrong shapes, dtypes, NaN and inf, empty files,
directories, FIFOs, devices and dangling symlinks where files are expected, huge declared sizes, deep or
wrong-typed JSON, missing keys, zip path traversal and small zip bombs. Each variant runs `diffdistill.cli.main.main`
in a forked child (so a crash, a hang or a leak cannot take the runner down), with stderr captured at the file
descriptor, a memory limit and a time limit, and is classified (`harness.classify`):

  clean       exit 1 or 2 with exactly one stderr line that names the file (or the option), no traceback; or,
              for a variant that may still be valid (a flipped byte in pixel data), exit 0 with sane output
  traceback   a Python traceback on stderr (or an exception that escaped `main`)
  hang        still running at the time limit
  crash       killed by a signal (SIGSEGV, SIGBUS, ...)
  accepted    exit 0 on an input that is malformed by construction, or output that is not finite
  unclear     a non-zero exit whose stderr is not one line naming the file
  stray       a file written, changed or removed outside the output folder, or an earlier output in the output
              folder (a file every run starts with) changed

`python -m tests.fuzz` runs the full suite (at least 100 variants per loader) and prints the summary table;
`tests/test_fuzz.py` runs a seeded subset in the normal test suite.
"""
