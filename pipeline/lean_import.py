"""Import TVM without torch: ``apache-tvm-ffi`` imports torch whenever it is installed.

``tvm_ffi/__init__.py`` imports torch first, as a workaround for a symbol clash seen only on Windows with
Python 3.12 and torch 2.9, then an optional DLPack speed-up for torch tensors. Here torch is installed (the
reference framework of torch models), so every ``import tvm`` paid for torch: 3.3 s instead of 1.0 s on the
2-core development machine. Neither the pipeline's processes that only run TVM (the embedded rpc_server and
its session workers, which never see torch) nor a run whose builds are cached need it.

:func:`import_tvm` imports TVM with torch held back for that import only; a later ``import torch`` (a cold
build of a torch model, its reference output) imports it as usual. What TVM-FFI then lacks is its DLPack
fast path for torch tensors and its torch dtype conversion, which the pipeline does not use (tensors cross
as numpy arrays).
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

__all__ = ["TorchBlocker", "import_tvm"]


class TorchBlocker(importlib.abc.MetaPathFinder):
    """A finder that refuses ``torch`` and its submodules (an ImportError, as if it were not installed)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is kept out of this import (pipeline.lean_import)")
        return None


def import_tvm() -> Any:
    """``import tvm`` without importing torch, unless either is imported already; returns the module."""
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm

        return tvm
    blocker = TorchBlocker()
    sys.meta_path.insert(0, blocker)
    try:
        import tvm
    finally:
        sys.meta_path.remove(blocker)
    return tvm
