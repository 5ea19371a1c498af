"""The distillation methods and their one registry.

Each method lives in one module that defines `SPEC = MethodSpec(...)`: its typed settings (a `MethodConfig`
dataclass, methods/options.py), the function that builds its `Method` (methods/base.py) from resolved settings,
and what the command line says about it. `REGISTRY` below is the only list of methods: the CLI
(`diffdistill distill METHOD`), the Python API (`diffdistill.distill`), the demo and the benchmarks read it.
Modules are imported on first use, so listing the methods costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UsageError

# name -> module defining SPEC. The order is the CLI's and the reports'.
REGISTRY: dict[str, str] = {
    "kd": "diffdistill.methods.kd",
    "pd": "diffdistill.methods.pd",
    "di": "diffdistill.methods.di",
    "gdd": "diffdistill.methods.gdd",
    "cd": "diffdistill.methods.cd",
    "dmd2": "diffdistill.methods.dmd2",
    "sid": "diffdistill.methods.sid",
}


@dataclass(frozen=True)
class MethodSpec:
    """What the library needs to know about a method.

    create(cfg, teacher, data, loop) builds the `Method` from settings already resolved
    (`cfg.resolve(teacher, loop)`); `data` is the opened real data set or None, `loop` the run's TrainConfig.
    run(method, loop, data, evaluate) trains it and returns the loop's result dict: None means one call of the
    loop (`train.loop.train`); a method whose training is several loops, or a loop over data it makes itself,
    gives its own driver.
    """

    name: str
    help: str                                  # one line: `diffdistill distill --help`
    config: type                               # a MethodConfig subclass
    create: Callable
    needs_data: bool = False                   # real data required (GDD, PD)
    title: str = ""                            # heading of the method's options in `distill METHOD --help`
    recipes: dict = field(default_factory=dict)  # name -> base.Recipe (the papers' published settings)
    ema_help: str | None = None                # the `--ema` help when the method's EMA differs from EDM's
    best_metric: str | None = None             # the method's own model selection: a metric of method.evaluate(ema)
    run: Callable | None = None                # its training driver (None: one call of the loop)


def run_method(spec: MethodSpec, method, loop, data, evaluate=None) -> dict:
    """Train a built method as its spec says: its own driver, or one call of the loop. Returns the loop's result."""
    if spec.run is not None:
        return spec.run(method, loop, data, evaluate)
    from ..train.loop import train

    return train(method, loop, data, evaluate=evaluate)


def names() -> list[str]:
    """The registered methods, in order."""
    return list(REGISTRY)


def get(name: str) -> MethodSpec:
    """The spec of method `name` (imports its module)."""
    if name not in REGISTRY:
        raise UsageError(f"unknown method {name!r} (known: {', '.join(REGISTRY)})")
    spec = getattr(importlib.import_module(REGISTRY[name]), "SPEC", None)
    if not isinstance(spec, MethodSpec) or spec.name != name:
        raise UsageError(f"{REGISTRY[name]} does not define SPEC = MethodSpec(name={name!r}, ...)")
    return spec


def register(name: str, module: str) -> None:
    """Add (or replace) a method: `module` must define `SPEC = MethodSpec(name=name, ...)`. For plugins and
    tests; the built-in methods are listed in REGISTRY."""
    REGISTRY[name] = module
