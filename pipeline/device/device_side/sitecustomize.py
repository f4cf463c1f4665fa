"""Start-up of a TVM device set up by tvm-remote-pipeline (this directory is on the device's PYTHONPATH).

Makes every Python process of the device register ``tvmrp.device_info`` (see ``tvmrp_device``), then runs
the ``sitecustomize`` this file shadows, if one lies further on ``sys.path`` (e.g. the emulated aarch64
device's). Nothing here may stop the interpreter from starting: every step is guarded.
"""


def _tvmrp_start() -> None:
    try:
        import tvmrp_device

        tvmrp_device.install()
    except Exception:  # noqa: BLE001
        pass


def _tvmrp_without_torch() -> None:
    """``TVMRP_DEVICE_WITHOUT_TORCH=1`` (the embedded server): keep torch out of this process. ``tvm_ffi`` imports
    torch whenever it is installed (3.3 s instead of 1.0 s per ``import tvm``); a device never needs it."""
    try:
        import importlib.abc
        import os
        import sys

        if os.environ.get("TVMRP_DEVICE_WITHOUT_TORCH") != "1":
            return

        class _NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN202
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is kept out of this TVM device process")
                return None

        sys.meta_path.insert(0, _NoTorch())
    except Exception:  # noqa: BLE001
        pass


def _tvmrp_chain() -> None:
    """Runs the next ``sitecustomize`` on ``sys.path`` (not this one, under any spelling of its path)."""
    try:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
        rest = [entry for entry in sys.path if os.path.realpath(os.path.abspath(entry or os.curdir)) != here]
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
        if spec is None or spec.loader is None or spec.origin is None:
            return
        if os.path.realpath(os.path.dirname(spec.origin)) == here:
            return
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001
        pass


_tvmrp_without_torch()
_tvmrp_start()
_tvmrp_chain()
