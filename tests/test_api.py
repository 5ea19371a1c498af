"""The README's Python example and the public API names it lists."""

import re
from pathlib import Path

import torch

import diffdistill as dd

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert (tmp_path / "ring.png").stat().st_size > 1000
    x = scope["x"]
    assert x.shape == (2000, 2) and torch.isfinite(x).all()
    shares = torch.bincount(scope["teacher"].mode_of(x), minlength=8) / 2000
    assert (shares - 1 / 8).abs().max() < 0.04


def test_public_names_listed_in_readme_exist():
    text = README.read_text()
    table = text[text.index("## Python API"):text.index("## Command line")]
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\(.*?\))?`", table))
    names -= {"x", "D", "dd", "sigma", "cond", "x0", "digits"}  # not API names: math and a data spec
    missing = [n for n in sorted(names) if not (hasattr(dd, n) or hasattr(dd.metrics, n))]
    assert not missing, missing
    assert set(dd.__all__) <= set(dir(dd))
