"""diffdistill benchmarks: sampling speed, quality against NFE, training throughput, memory (issue 9).

Run `python -m benchmarks [--quick]` (or `diffdistill bench`) from the repository root. Each benchmark writes one
JSON record to `benchmarks/results/<name>.json` (machine, torch version, threads, device, command, load) and the
runner regenerates `BENCHMARKS.md` from all records. Every figure is a median of repeated runs; every comparison is
a ratio measured in one process, alternating the two sides round by round.
"""

BENCHMARKS = ["speed", "quality", "quality_real", "converged", "throughput", "memory", "gpu"]
