"""CUDA builds on a machine without a GPU: the library holds a cubin, not CUDA source (pipeline/cuda/builder.py).

Here what needs neither the optional ``cuda`` extra nor gcc: the stub driver's source, the package pins, the
GPU code bytes in a library, target parsing. (The compile tests: tests/integration/test_cuda_build.py.)
"""

from __future__ import annotations

import json
import struct

import pytest

from pipeline.cuda import builder as cuda
from pipeline.errors import TargetError

from support import REPO


# ----------------------------------------------------------------------------------------- toolchain


def test_stub_source_covers_new_symbols():
    source = cuda.stub_source(["cuModuleLoadData", "cuBrandNewThing"])
    assert source.count("cuModuleLoadData") == 1
    assert "TVMRP_NO_DEVICE(cuBrandNewThing)" in source


def test_missing_packages_say_what_to_install(monkeypatch):
    real = cuda.metadata.version

    def version(dist):
        if dist == "nvidia-cuda-nvrtc":
            raise cuda.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(cuda.metadata, "version", version)
    monkeypatch.setattr(cuda, "_package_file", lambda dist, rel: None)
    with pytest.raises(cuda.CudaToolchainMissing) as info:
        cuda.cuda_toolchain()
    message = str(info.value)
    assert "\n" not in message and "nvidia-cuda-nvrtc" in message and "scripts/setup --cuda" in message


def test_pins_match_requirements_file():
    pins = {}
    for line in (REPO / "requirements-cuda.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    assert pins == cuda.CUDA_PACKAGES


# ------------------------------------------------------------------------------------- gpu code bytes


def _module_bytes(fmt: bytes, payload: bytes) -> bytes:
    body = struct.pack("<Q", len(fmt)) + fmt + payload
    return b"junk" + struct.pack("<Q", 4) + b"cuda" + struct.pack("<Q", len(body)) + body + b"tail"


def test_gpu_code_of_bytes():
    cuda_elf = b"\x7fELF" + b"\x02\x01\x01" + b"\x00" * 11 + struct.pack("<H", 190) + b"\x00" * 40
    host_elf = b"\x7fELF" + b"\x02\x01\x01" + b"\x00" * 11 + struct.pack("<H", 62) + b"\x00" * 40
    assert cuda.gpu_code_of_bytes(_module_bytes(b"cubin", cuda_elf)) == "cubin"
    assert cuda.gpu_code_of_bytes(_module_bytes(b"cubin", host_elf)) == "none"
    assert cuda.gpu_code_of_bytes(_module_bytes(b"ptx", b".version 9.0\n.target sm_90\n")) == "ptx"
    assert cuda.gpu_code_of_bytes(_module_bytes(b"cuda", b'extern "C" __global__ void k() {}')) == "source"
    assert cuda.gpu_code_of_bytes(b"\x7fELF nothing here") == "none"
    both = _module_bytes(b"cubin", cuda_elf) + _module_bytes(b"cuda", b"__global__")
    assert cuda.gpu_code_of_bytes(both) == "source"


# -------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("text", "arch", "host_arch"),
    [
        ("cuda -arch=sm_90", "sm_90", "x86_64"),
        ('{"kind": "cuda", "arch": "sm_89"}', "sm_89", "x86_64"),
        ("nvidia/h100", "sm_90a", "x86_64"),
        ("nvidia/nvidia-a100", "sm_80", "x86_64"),
        ("H200", "sm_90a", "x86_64"),
        ("l4", "sm_89", "x86_64"),
        ("rtx30xx", "sm_86", "x86_64"),
        ("t4", "sm_75", "x86_64"),
        ("jetson-orin", "sm_87", "aarch64"),
        ("nvidia/jetson-agx-orin-32gb", "sm_87", "aarch64"),
        ("cuda -arch=sm_87 -host=aarch64-linux-gnu", "sm_87", "aarch64"),
    ],
)
def test_parse_cuda_target(text, arch, host_arch):
    import tvm

    target = cuda.parse_cuda_target(text)
    canonical, parsed_arch = target
    assert parsed_arch == arch and target.host_arch == host_arch
    config = json.loads(canonical)
    assert config["kind"] == "cuda" and config["arch"] == arch and config["host"]["kind"] == "llvm"
    assert config["max_threads_per_block"] == 1024 and config["max_shared_memory_per_block"] == 49152
    assert str(tvm.target.Target(config)) == canonical  # canonical: stable through a round trip
    info = target.target_info()
    assert info.kind == "cuda" and info.arch == host_arch and info.triple == target.host_triple


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cuda", "needs an arch"),
        ("cuda -arch=sm_70", "too old for CUDA 13"),
        ("cuda -arch=compute_90", "needs an arch like sm_90"),
        ("voodoo-5", "not a CUDA target"),
        ('{"kind": "llvm"}', '"kind": "cuda"'),
        ("", "empty"),
        ("nvidia/not-a-gpu", "does not know the target tag"),
    ],
)
def test_parse_cuda_target_rejects(text, match):
    with pytest.raises(TargetError, match=match):
        cuda.parse_cuda_target(text)


def test_parse_cuda_target__quoted_values_are_unquoted():
    from pipeline.targets import parse_target

    assert cuda.parse_cuda_target('cuda -arch="sm_90"') == cuda.parse_cuda_target("cuda -arch=sm_90")
    quoted = parse_target("cuda -arch='sm_89' -host=\"aarch64-linux-gnu\"")
    assert quoted == parse_target("cuda -arch=sm_89 -host=aarch64-linux-gnu") and quoted.arch == "aarch64"


@pytest.mark.parametrize(
    "text",
    ["cuda -arch=" + "x" * 5000, "cuda -" + "y" * 5000, "cuda " + "z" * 5000, "voodoo" * 900,
     '{"kind": "cuda", "arch": "' + "q" * 5000 + '"}', "nvidia/" + "n" * 5000, 'cuda -arch="' + "u" * 5000],
)
def test_parse_cuda_target__long_junk_is_echoed_clipped(text):
    with pytest.raises(TargetError) as info:
        cuda.parse_cuda_target(text)
    assert len(str(info.value)) < 800, len(str(info.value))
