"""scripts/device_bundle.py's parts, without building a bundle: wheel platforms, bundle names, the
``--tvm-version`` option, which files of TVM a runtime-only device keeps. (A bundle built, set up in a clean
venv and serving: tests/system/test_device_bundle.py.)
"""

from __future__ import annotations

import importlib.util

import pytest

from support import REPO


def _load_script():
    spec = importlib.util.spec_from_file_location("device_bundle", REPO / "scripts" / "device_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


device_bundle = _load_script()


def test_platform_helpers():
    assert device_bundle.compatible_platforms("manylinux_2_28_aarch64")[:3] == [
        "manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_26_aarch64"]
    assert "manylinux2014_x86_64" in device_bundle.compatible_platforms("manylinux_2_28_x86_64")
    assert device_bundle.bundle_name("3.12", "manylinux_2_28_x86_64", True) == "tvmrp-device-cp312-x86_64-cuda"
    with pytest.raises(device_bundle.BundleError, match="not a Linux wheel platform"):
        device_bundle.platform_arch("win_amd64")
    with pytest.raises(device_bundle.BundleError, match="3.11 or 3.12"):
        device_bundle.python_tag("3")


def test_tvm_version_option():
    assert device_bundle.check_tvm_version("0.26.0") == "0.26.0"
    assert device_bundle.check_tvm_version("0.27.0.post1") == "0.27.0.post1"
    with pytest.raises(device_bundle.BundleError, match="apache-tvm release"):
        device_bundle.check_tvm_version("0.27; rm -rf /")
    from importlib import metadata

    host = metadata.version("apache-tvm")
    assert device_bundle.bundle_name("3.11", "manylinux_2_28_x86_64", False, host) == "tvmrp-device-cp311-x86_64"
    assert device_bundle.bundle_name("3.11", "manylinux_2_28_aarch64", False, "0.26.0") == \
        "tvmrp-device-cp311-aarch64-tvm0.26.0"


def test_runtime_filter():
    keep = device_bundle._keep
    assert keep("lib/libtvm_runtime.so", cuda=False) and keep("runtime/vm.py", cuda=False)
    assert not keep("lib/libtvm_compiler.so", cuda=True)
    assert not keep("3rdparty/x.h", cuda=True) and not keep("include/tvm/x.h", cuda=True)
    assert not keep("relax/__pycache__/a.cpython-311.pyc", cuda=True)
    assert not keep("lib/libtvm_runtime_cuda.so", cuda=False) and keep("lib/libtvm_runtime_cuda.so", cuda=True)
