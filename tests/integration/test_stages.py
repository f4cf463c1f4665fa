"""Each stage's plain function, on a tiny real ONNX model, a real store and a real TVM RPC server."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

import numpy as np
import psutil
import pytest
from support import compile_all

from pipeline.device import DeviceSpec, open_session
from pipeline.errors import ArchMismatch, DeviceError, ExportError, StoreError
from pipeline.latency import Timing
from pipeline.models import ModelSpec, reference_forward, resolve_model
from pipeline.planning.plan import plan_build
from pipeline.store import ArtifactStore
from pipeline.targets import parse_target
from tasks._live import opened
from pipeline.store.layout import KERNELS_FILE, LIBRARY_FILE, MODULE_FILE, OBJECTS_FILE
from tasks.build import build
from tasks.export_library import extract_objects, link
from tasks.load import load
from tasks.run import run
from tasks.set_input import set_input
from tasks.upload import upload

# ``server``, an embedded rpc_server for the module: tests/integration/conftest.py.


def test_compile_stages__produce_verified_artifacts_and_reuse_them(tiny_onnx, store_root):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, imported, built, library = compile_all(model, store_root)
    store = ArtifactStore(store_root)
    assert imported.built and built.built and library.built
    assert {f.name for f in imported.artifact.files} == {MODULE_FILE}
    assert {f.name for f in built.artifact.files} == {OBJECTS_FILE, KERNELS_FILE}
    assert {f.name for f in library.artifact.files} == {LIBRARY_FILE}
    assert built.artifact.inputs["opt_level"] == 3 and built.artifact.inputs["target"] == target.canonical
    so = store.file(library.artifact, LIBRARY_FILE)
    assert so.read_bytes()[:4] == b"\x7fELF"
    # A second pass finds everything in the store and builds nothing.
    _, imported2, built2, library2 = compile_all(model, store_root)
    assert not (imported2.built or built2.built or library2.built)
    assert library2.artifact == library.artifact


def test_build__refresh_rebuilds(tiny_onnx, store_root):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, imported, built, _ = compile_all(model, store_root)
    again = build(imported.artifact, target, 3, plan_build(model, target, 3).build, ArtifactStore(store_root), refresh=True)
    assert again.built


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="scripts/setup --dev installs the cross compiler")
def test_export_library__cross_compiled_aarch64_elf(tiny_onnx, store_root):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    _, _, built, library = compile_all(model, store_root, "llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
    so = ArtifactStore(store_root).file(library.artifact, LIBRARY_FILE)
    header = so.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64
    host = compile_all(model, store_root, "llvm")[2]
    assert host.artifact.key != built.artifact.key  # cached separately from the host build


def _archive(path, members):
    """A build archive holding ``members`` (name -> bytes, or a tarfile.TarInfo for a link)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _object(tmp_path, source, name):
    (tmp_path / f"{name}.c").write_text(source)
    subprocess.run(["gcc", "-c", "-fPIC", "-o", str(tmp_path / f"{name}.o"), str(tmp_path / f"{name}.c")], check=True)
    return (tmp_path / f"{name}.o").read_bytes()


def test_export__only_object_files_of_the_archive_reach_the_linker(tmp_path):
    """A member named like an object file that is a linker script (which ld would obey), a shared library, a
    link or a path: the archive is not the build's, and nothing of it is linked."""
    good = _object(tmp_path, "int f(void) { return 1; }\n", "good")
    work = tmp_path / "work"
    work.mkdir()
    assert extract_objects(_archive(tmp_path / "ok.tar", {"lib0.o": good, "devc.o": good}), work) == \
        [str(work / "devc.o"), str(work / "lib0.o")]
    link_member = tarfile.TarInfo("lib1.o")
    link_member.type, link_member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    subprocess.run(["gcc", "-shared", "-o", str(tmp_path / "shared.so"), str(tmp_path / "good.o")], check=True)
    bad = {
        "a linker script": {"lib0.o": b"INPUT(/etc/passwd)\n"},
        "a shared library": {"lib0.o": (tmp_path / "shared.so").read_bytes()},
        "a link": {"lib0.o": good, "lib1.o": link_member},
        "a path": {"../lib0.o": good},
        "a directory": {"sub/lib0.o": good},
        "another name": {"lib0.so": good},
        "nothing": {},
    }
    for case, members in bad.items():
        target = tmp_path / case.replace(" ", "-")
        target.mkdir()
        with pytest.raises(StoreError, match="not what the build stage wrote.*--refresh") as failed:
            extract_objects(_archive(tmp_path / f"{target.name}.tar", members), target)
        assert "\n" not in str(failed.value), case
    (tmp_path / "not.tar").write_bytes(b"not a tar")
    with pytest.raises(StoreError, match="cannot be read"):
        extract_objects(tmp_path / "not.tar", tmp_path / "not")


def test_export__a_link_failure_is_one_line(tmp_path):
    twice = [_object(tmp_path, "int f(void) { return 1; }\n", name) for name in ("a", "b")]
    assert twice
    with pytest.raises(ExportError, match="multiple definition of .f.") as failed:
        link("gcc", tmp_path / "out.so", [str(tmp_path / "a.o"), str(tmp_path / "b.o")], "x86_64-linux-gnu")
    assert "\n" not in str(failed.value) and str(failed.value).startswith("linking the library for x86_64-linux-gnu")


def test_export__a_link_that_hangs_is_stopped_with_its_children(tmp_path):
    pids = tmp_path / "pids"
    hanging = tmp_path / "hanging-cc"
    hanging.write_text(f"#!/bin/sh\nsleep 120 &\necho $$ $! > {pids}\nwait\n")
    hanging.chmod(0o755)
    with pytest.raises(ExportError, match="did not finish within 2 s"):
        link(str(hanging), tmp_path / "out.so", [], "x86_64-linux-gnu", timeout=2)
    for pid in map(int, pids.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_device_stages__match_reference_on_real_server(tiny_onnx, store_root, server):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    x = np.random.default_rng(1).standard_normal(model.input_shape).astype(np.float32)
    with open_session(DeviceSpec(), server) as session, opened(session) as ref:
        up = upload(ref, library.artifact, ArtifactStore(store_root), target.arch)
        assert up.bytes == library.artifact.size and up.remote_name.endswith(".so")
        inputs = set_input(load(up, ArtifactStore(store_root)), x)
        assert inputs.shape == model.input_shape
        result = run(inputs, Timing(number=2, repeat=3))
        # Adaptive: the estimating sample is one of the 7.
        adaptive = run(inputs, Timing(min_samples=7, min_seconds=0.0)).latency
    np.testing.assert_allclose(result.output, reference_forward(model, x), atol=1e-4, rtol=1e-4)
    lat = result.latency
    assert 0 < lat.min <= lat.median <= lat.max and lat.min <= lat.mean <= lat.max and lat.std >= 0
    assert (lat.number, lat.repeat) == (2, 3)
    assert (adaptive.number, adaptive.repeat) == (1, 7) and adaptive.min > 0


def test_upload__refuses_corrupt_library(tiny_onnx, store_root, server):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    so = ArtifactStore(store_root).file(library.artifact, LIBRARY_FILE)
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    with open_session(DeviceSpec(), server) as session, opened(session) as ref:
        with pytest.raises(StoreError, match="not uploaded"):
            upload(ref, library.artifact, ArtifactStore(store_root), target.arch)


def test_upload__refuses_library_for_another_architecture(tiny_onnx, store_root, server):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    with open_session(DeviceSpec(), server) as session, opened(session) as ref:
        with pytest.raises(ArchMismatch, match="built for riscv64"):
            upload(ref, library.artifact, ArtifactStore(store_root), "riscv64")


def test_device_stages__a_closed_session_is_a_clear_error(tiny_onnx, store_root, server):
    """Stages take the previous stage's result, so they cannot run out of order; a result whose session has
    closed says so instead of failing deep in TVM."""
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    target, _, _, library = compile_all(model, store_root)
    with open_session(DeviceSpec(), server) as session, opened(session) as ref:
        loaded = load(upload(ref, library.artifact, ArtifactStore(store_root), target.arch), ArtifactStore(store_root))
    x = np.zeros(model.input_shape, np.float32)
    with pytest.raises(DeviceError, match="session to embedded 127.0.0.1:.* is closed"):
        set_input(loaded, x)


def test_build__untuned_cpu_build_schedules_every_kernel_with_the_rules(tiny_onnx):
    import tvm

    from pipeline.models import import_model
    from pipeline.tuning.rules import schedule_with_rules

    model = resolve_model(ModelSpec(str(tiny_onnx)))
    mod = import_model(model)
    scheduled = schedule_with_rules(mod, parse_target("llvm"))
    kernels = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert kernels and all(f.attrs.get("tirx.is_scheduled") for f in kernels.values())
    # Every kernel the model runs has the rules' parallel loops (TVM's default pipeline makes none); the weights'
    # layout rewrite runs once, when the build folds it into the constants.
    run_kernels = {name: f for name, f in kernels.items() if not name.endswith("_weight_prepack")}
    assert any(name.endswith("_prepacked") for name in run_kernels)
    assert [name for name, f in run_kernels.items() if "parallel" not in str(f)] == []


def test_build__rules_and_none_are_two_builds_with_the_same_output_on_device(tiny_onnx, store_root, server):
    model = resolve_model(ModelSpec(str(tiny_onnx)))
    x = np.random.default_rng(3).standard_normal(model.input_shape).astype(np.float32)
    outputs = {}
    for schedules in ("rules", "none"):
        plan = plan_build(model, parse_target("llvm"), 3, schedules=schedules)
        _, _, built, library = compile_all(model, store_root, schedules=schedules)
        assert built.artifact.key == plan.build.key
        assert ("schedules" in built.artifact.inputs) == (schedules == "rules")
        with open_session(DeviceSpec(), server) as session, opened(session) as ref:
            loaded = load(upload(ref, library.artifact, ArtifactStore(store_root), "x86_64"), ArtifactStore(store_root))
            outputs[schedules] = run(set_input(loaded, x), Timing(repeat=2)).output
    np.testing.assert_allclose(outputs["rules"], outputs["none"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outputs["rules"], reference_forward(model, x), atol=1e-4, rtol=1e-4)


def test_build__a_max_pooling_kernel_builds_with_the_rules_without_tvm_warnings(capfd):
    import tvm
    from onnx import TensorProto, helper
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.tuning.rules import schedule_with_rules

    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
    )
    mod = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    target = parse_target("llvm")
    executable = tvm.compile(schedule_with_rules(mod, target), target=target.tvm_target())
    data = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    padded = np.pad(data, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    expected = np.max([padded[:, :, i:i + 7:2, j:j + 7:2] for i in range(3) for j in range(3)], axis=0)
    np.testing.assert_allclose(out, expected)
    # TVM's pooling kernels name a CPU rule TVM 0.27 does not register; MetaSchedule warned on stderr for each.
    assert "Unknown schedule rule" not in capfd.readouterr().err
