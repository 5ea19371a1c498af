"""Package boundaries: `diffdistill --help` and `import diffdistill` import only what they need, the lazily imported
public names are the functions they were, and no package module imports the command line (the demo included)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import diffdistill

ROOT = Path(diffdistill.__file__).parent

# Modules that `diffdistill --help` must not import: what only evaluating, reading data or loading teachers needs.
NOT_FOR_HELP = ["scipy", "sklearn", "matplotlib", "diffusers", "lmdb", "torch.utils.tensorboard",
                "diffdistill.metrics.features", "diffdistill.metrics.fid", "diffdistill.metrics.inception",
                "diffdistill.metrics.protocol", "diffdistill.metrics.toy", "diffdistill.data.formats",
                "diffdistill.data.images", "diffdistill.teachers", "diffdistill.export"]


# In one fresh interpreter (each test reads its part): `import diffdistill` alone, then `diffdistill --help`, then
# every public name, then submodules named like public names.
PROBE = f"""
import contextlib, io, json, sys, types
import diffdistill as dd
bare = [n for n in ('torch', 'numpy', 'diffdistill.metrics', 'diffdistill.data') if n in sys.modules]
import diffdistill.cli.main as m
out, code = io.StringIO(), None
with contextlib.redirect_stdout(out):
    try:
        m.main(['--help'])
    except SystemExit as e:
        code = e.code
help = dict(code=code, usage=out.getvalue()[:40], loaded=[n for n in {NOT_FOR_HELP!r} if n in sys.modules])
from diffdistill import *
names = {{n: 'module' if isinstance(getattr(dd, n), types.ModuleType) else type(getattr(dd, n)).__name__
          for n in dd.__all__}}
import diffdistill.train.checkpoint, diffdistill.train.loop, diffdistill.metrics.kid
import diffdistill.metrics.precision_recall, diffdistill.metrics.inception_score
from diffdistill.metrics import kid, precision_recall, inception_score, protocol
from diffdistill.data import open_dataset
print(json.dumps(dict(bare=bare, help=help, names=names, star=sorted(n for n in dd.__all__ if n in globals()),
                      train=dd.train.__module__, protocol=protocol.__name__, open_dataset=open_dataset.__module__,
                      kid=[f.__module__ for f in (kid, dd.metrics.kid, precision_recall, inception_score)])))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_help_imports_no_heavy_module(probe):
    assert probe["help"]["code"] == 0 and probe["help"]["usage"].startswith("usage: diffdistill"), probe["help"]
    assert probe["help"]["loaded"] == []


def test_import_diffdistill_is_lazy_and_keeps_the_public_names(probe):
    assert probe["bare"] == []                                  # nothing heavy until a name is used
    assert probe["star"] == sorted(diffdistill.__all__)
    assert probe["names"]["metrics"] == probe["names"]["methods"] == "module"
    assert all(kind != "module" for name, kind in probe["names"].items() if name not in ("metrics", "methods")), \
        probe["names"]
    # submodules imported after the names were read leave the names the functions (dd.train, metrics.kid, ...)
    assert probe["train"] == "diffdistill.train.loop"
    assert probe["kid"] == ["diffdistill.metrics.kid", "diffdistill.metrics.kid",
                            "diffdistill.metrics.precision_recall", "diffdistill.metrics.inception_score"]
    assert probe["protocol"] == "diffdistill.metrics.protocol"
    assert probe["open_dataset"] == "diffdistill.data.images"


# Package modules that import the command line, with the reason (none may be added): only the program's entry point.
IMPORTS_CLI = {"__main__.py": "`python -m diffdistill` is the command line"}


def _imports(path: Path) -> set[str]:
    """The absolute names of the modules `path` imports (relative imports resolved), anywhere in the file."""
    package = ".".join(("diffdistill", *path.relative_to(ROOT).parent.parts))
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def test_no_package_module_imports_the_command_line():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("cli/") or rel in IMPORTS_CLI:
            continue
        if any(m == "diffdistill.cli" or m.startswith("diffdistill.cli.") for m in _imports(path)):
            offenders.append(rel)
    assert offenders == []
    # the scan sees relative imports, also inside functions: the entry point's, and the command line's own
    assert "diffdistill.cli.main.main" in _imports(ROOT / "__main__.py")
    assert "diffdistill.cli.common" in _imports(ROOT / "cli" / "distill.py")
    assert "diffdistill.cli.distill.report_result" in _imports(ROOT / "cli" / "train.py")   # a function's import
    # the demo and its sampling helpers are the library's: they run without the command line
    assert "diffdistill.api" in _imports(ROOT / "demo" / "pipeline.py")
    assert "diffdistill.sampling.load_model" in _imports(ROOT / "demo" / "pipeline.py")



# What KD's pair storage must not import: making the pairs (the teacher's sampler) is `methods/kd_pairs.py`'s.
NOT_FOR_PAIRS = ("diffdistill.samplers", "diffdistill.teachers", "diffdistill.train", "diffdistill.methods",
                 "diffdistill.dist")


def _under(names, packages) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in packages))


def test_pairs_storage_imports_no_sampler_teacher_loop_or_method():
    code = ("import json, sys; import diffdistill.data.pairs as P; P.PairsDataset, P.verify_pairs, P.write_shard; "
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    assert _under(json.loads(done.stdout.splitlines()[-1]), NOT_FOR_PAIRS) == []
    # nor inside a function (imported on use): the whole file is scanned, which finds generation's sampler import
    assert _under(_imports(ROOT / "data" / "pairs.py"), NOT_FOR_PAIRS) == []
    assert "diffdistill.samplers.get_sampler" in _imports(ROOT / "methods" / "kd_pairs.py")


# Run in a fresh interpreter: every public name of diffdistill.metrics, and the protocol measuring given batches.
METRICS_PROBE = """
import json, sys
import torch
import diffdistill.metrics as metrics
import diffdistill.metrics.protocol as protocol
import diffdistill.metrics.npz_layouts
names = {n: type(getattr(metrics, n)).__name__ for n in metrics.__all__}
from diffdistill.metrics.features import Classifier, ClassifierConfig
torch.manual_seed(0)
net = Classifier(ClassifierConfig()).eval()
batches = [torch.rand(5, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1]
ref = protocol.reference_from_features(metrics.compute_features(net, [torch.rand(8, 1, 8, 8) * 2 - 1])[0])
results, n = protocol.evaluate(iter(batches), ["fid", "kid", "pr"], net, ref, protocol.MetricOptions(kid_subsets=2))
loaded = sorted(m for m in sys.modules if m.split(".")[:2] in (["diffdistill", "samplers"],
                                                                 ["diffdistill", "teachers"]))
print(json.dumps(dict(loaded=loaded, n=n, results=sorted(results), names=names)))
"""


def test_metrics_measure_given_samples_without_samplers_or_teachers():
    """metrics measures what it is given: importing it (every public name) and evaluating batches imports neither
    diffdistill.samplers nor diffdistill.teachers, and no metrics module imports them, even inside a function."""
    done = subprocess.run([sys.executable, "-c", METRICS_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.splitlines()[-1])
    assert probe["loaded"] == [] and probe["n"] == 8
    assert probe["results"] == ["fid", "kid", "precision", "recall"]
    assert "evaluate" in probe["names"] and "make_train_evaluator" not in probe["names"]
    offenders = {path.name: sorted(m for m in _imports(path) if m.split(".")[:2] in (["diffdistill", "samplers"],
                                                                                    ["diffdistill", "teachers"]))
                 for path in sorted((ROOT / "metrics").glob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}
    # the scan resolves relative imports: the evaluation hook that samples (train/evaluate.py) is seen to
    assert "diffdistill.samplers.sample_batches" in _imports(ROOT / "train" / "evaluate.py")
