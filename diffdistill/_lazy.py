"""Packages whose public names are imported on first use (PEP 562), so that importing the package (and the command
line's start, `diffdistill --help`) does not import torch, scipy, PIL and every submodule up front.

    install(__name__, {"kid": ".kid", "fid_from_stats": ".fid", ...}, modules=("metrics",))

at the end of a package's __init__ makes `package.kid` import `.kid` and return its `kid` when first read (then
it is an ordinary attribute). A public name that is also a submodule's name (`metrics.kid`, the function, and
`metrics/kid.py`; `diffdistill.train`, the function, and `diffdistill/train/`) stays the function when the
submodule is imported later, as it did with eager `from .kid import kid` imports: the import system's binding of
the submodule on its package is dropped for those names (the submodule stays in sys.modules, which
`from package.kid import x` and `from package import submodule` read).
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package's module type that keeps its public names over same-named submodules (see the module doc)."""

    def __setattr__(self, name, value):
        api = self.__dict__.get("_lazy_api", {})
        if name in api and name not in self.__dict__.get("_lazy_modules", ()) and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def install(package: str, api: dict[str, str], modules: tuple[str, ...] = ()) -> None:
    """Make the names of `api` (name -> the module, relative to `package`, that defines it) attributes of
    `package` imported on first use; names in `modules` are that module itself (`diffdistill.metrics`)."""
    module = sys.modules[package]

    def __getattr__(name: str):
        where = api.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(where, package)
        value = loaded if name in modules else getattr(loaded, name)
        module.__dict__[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(module.__dict__) | set(api))

    module.__dict__.update(__getattr__=__getattr__, __dir__=__dir__, _lazy_api=dict(api), _lazy_modules=modules)
    module.__dict__.setdefault("__all__", sorted(api))
    module.__class__ = LazyPackage
