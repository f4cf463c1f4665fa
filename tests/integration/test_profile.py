"""``--profile`` where the time is measured: the stages on the embedded device, a local VM as the bench holds
one, and the build's FLOPs of its kernels. (Parsing, grouping and renderings: tests/unit/test_profiling.py; a
stock server: tests/integration/test_device.py; the CLI, history show and compare --kernels:
test_history_runs.py; the demo and the emulated aarch64 device: tests/system.)"""

from __future__ import annotations

import numpy as np
import pytest
from support import compile_all, make_conv_onnx

from pipeline.device import Device, DeviceSpec
from pipeline.latency import Timing
from pipeline.models import ModelSpec, resolve_model
from pipeline.profiling import kernel_flops, profile_vm, summarize
from pipeline.store import ArtifactStore
from pipeline.store.layout import LIBRARY_FILE
from tasks._live import opened
from tasks.load import load
from tasks.run import run
from tasks.set_input import set_input
from tasks.upload import upload

CHANNELS = 32
CONV_FLOPS = 2 * CHANNELS * 32 * 32 * CHANNELS * 3 * 3  # the second convolution's multiply-adds, x2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The two-convolution model built with the rule-based schedules, and its store."""
    root = tmp_path_factory.mktemp("profile")
    model = resolve_model(ModelSpec(str(make_conv_onnx(root / "conv.onnx", channels=CHANNELS))))
    store_root = root / "artifacts"
    target, _, build, library = compile_all(model, store_root)
    return model, ArtifactStore(store_root), target, build.artifact, library.artifact


def test_profile__kernels_and_glue_add_up_to_the_median_with_their_flops(server, built):
    model, store, target, build, library = built
    flops = kernel_flops(store, build)
    assert flops is not None and flops["fused_conv2d1_add_relu1_prepacked"] >= CONV_FLOPS
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    host, port = server.address
    seen = []
    with Device(DeviceSpec(host=host, port=port, connect_timeout=60)) as device, device.session() as session, \
            opened(session) as ref:
        loaded = load(upload(ref, library, store, target.arch), store)
        inputs = set_input(loaded, x)
        for _ in range(2):  # a shared host's load may move one of the two medians; not two runs' in a row
            # One TVM thread: on a shared 2-core host two make the latency itself bimodal
            # (docs/performance.md#stable-numbers).
            result = run(inputs, Timing(threads=1), profile=True)
            profile = summarize(result.calls, flops)
            median = result.latency.median
            seen.append(f"latency median {median:.4f} ms, profile total {profile.total_ms:.4f} ms (kernels "
                        f"{profile.kernels_ms:.4f}, glue {profile.glue_ms:.4f}, {profile.repeat} repeats)")
            if abs(profile.total_ms - median) <= 0.10 * median:
                break
    print("conv model: " + "; then ".join(seen))
    assert abs(profile.total_ms - median) <= 0.10 * median, seen
    assert loaded.load_seconds is not None and 0 < loaded.load_seconds <= loaded.seconds
    assert result.first_inference_ms > 0 and result.peak_memory_bytes > 50 << 20 and not result.notes
    assert sum(k.share for k in profile.kernels) + profile.glue_share == pytest.approx(1.0)
    convolutions = [k for k in profile.kernels if "conv2d" in k.name]
    assert len(convolutions) == 2 and profile.kernels[0] in convolutions  # the 32-channel one leads
    assert all(k.flops and k.gflop_per_s > 0 for k in convolutions)
    assert profile.repeat >= 10  # adaptive: at least ten instrumented inferences


def test_profile_vm__a_local_vm_as_the_bench_holds_one(built):
    """``profile_vm`` on a VM in this process, FLOPs from the build: the same kernels as on a device."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    model, store, _, build, library = built
    vm = VirtualMachine(tvm.runtime.load_module(str(store.file(library, LIBRARY_FILE))), tvm.cpu())
    vm.set_input("main", tvm.runtime.tensor(np.zeros(model.input_shape, np.float32)))
    profile = profile_vm(vm, repeat=20, flops=kernel_flops(store, build))
    assert profile.repeat == 20 and profile.flops_known
    assert {k.name for k in profile.kernels} >= {k for k in kernel_flops(store, build) if "conv2d" in k and
                                                 k.endswith("_prepacked")}
    vm.invoke_stateful("main")  # the instrument is gone again


def test_profile__a_stock_server_runs_without_and_says_why(built):
    """A stock rpc_server: the run stage gives no profile and no peak memory, says why, and the run goes on."""
    from pipeline.device import EmbeddedServer

    model, store, target, _, library = built
    x = np.zeros(model.input_shape, np.float32)
    with EmbeddedServer(identify=False) as stock:
        host, port = stock.wait_ready()
        with Device(DeviceSpec(host=host, port=port, connect_timeout=60)) as device, device.session() as session, \
                opened(session) as ref:
            loaded = load(upload(ref, library, store, target.arch), store)
            result = run(set_input(loaded, x), Timing(repeat=3), profile=True)
    assert result.calls is None and result.peak_memory_bytes is None and result.latency.repeat == 3
    assert result.first_inference_ms > 0 and loaded.load_seconds > 0
    (note,) = result.notes
    assert note.startswith("profiling needs a device started from the bundle (or the embedded/emulated device): ")
    assert "does not register tvmrp.profile" in note
