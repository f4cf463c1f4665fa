"""Import TVM without torch, and without its Relax compiler until something uses it.

``apache-tvm-ffi`` imports torch whenever it is installed.

``tvm_ffi/__init__.py`` imports torch first, as a workaround for a symbol clash seen only on Windows with
Python 3.12 and torch 2.9, then an optional DLPack speed-up for torch tensors. Here torch is installed (the
reference framework of torch models), so every ``import tvm`` paid for torch: 3.3 s instead of 1.0 s on the
2-core development machine. Neither the pipeline's processes that only run TVM (the embedded rpc_server and
its session workers, which never see torch) nor a run whose builds are cached need it.

:func:`import_tvm` imports TVM with torch held back for that import only; a later ``import torch`` (a cold
build of a torch model, its reference output) imports it as usual. What TVM-FFI then lacks is its DLPack
fast path for torch tensors and its torch dtype conversion, which the pipeline does not use (tensors cross
as numpy arrays).

``import tvm`` also imports ``tvm.relax``, the Python side of the Relax compiler (its passes, frontends and
pipelines: about half of ``import tvm``, 0.5 s of a warm run here). A run whose builds are cached never uses it:
it parses its target (``tvm.target``) and drives the device (``tvm.rpc``, ``tvm.runtime.vm``). In a process that
asked for it first (:func:`defer_relax`: the command lines), :func:`import_tvm` imports ``tvm.relax`` lazily
(:class:`importlib.util.LazyLoader`): the module is in place, and the first use of any of its attributes or
submodules executes it, as ``import tvm`` would have. What compiles takes TVM from :func:`compiler_tvm`, which
executes it first: TVM gives an object its Python class when the object reaches Python, so a Relax function
loaded (``tvm.ir.load_json``) before ``tvm.relax`` ran would not be a ``relax.Function`` (``tvm.compile`` would
then take the module for a TIR one).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

__all__ = ["LazyRelax", "TorchBlocker", "compiler_tvm", "defer_relax", "import_tvm"]

_DEFER_RELAX = False


class TorchBlocker(importlib.abc.MetaPathFinder):
    """A finder that refuses ``torch`` and its submodules (an ImportError, as if it were not installed)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is kept out of this import (pipeline.lean_import)")
        return None


class LazyRelax(importlib.abc.MetaPathFinder):
    """A finder that gives ``tvm.relax`` a lazy loader: executed on the first access to the module."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "tvm.relax":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def defer_relax() -> None:
    """Let :func:`import_tvm` leave ``tvm.relax`` to its first use, in this process (before TVM is imported)."""
    global _DEFER_RELAX
    _DEFER_RELAX = True


def import_tvm() -> Any:
    """``import tvm`` without importing torch, unless either is imported already (after :func:`defer_relax`, with
    ``tvm.relax`` executed on first use); returns the module."""
    if "tvm" in sys.modules:
        import tvm

        return tvm
    finders: list[importlib.abc.MetaPathFinder] = [LazyRelax()] if _DEFER_RELAX else []
    if "torch" not in sys.modules:
        finders.append(TorchBlocker())
    sys.meta_path[:0] = finders
    try:
        import tvm
    finally:
        for finder in finders:
            sys.meta_path.remove(finder)
    return tvm


def compiler_tvm() -> Any:
    """TVM for compiling: :func:`import_tvm` with ``tvm.relax`` executed (see the module's docstring)."""
    tvm = import_tvm()
    getattr(tvm.relax, "Function")  # the first attribute access executes a deferred module
    return tvm
