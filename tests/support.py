"""What the tests share besides fixtures: tiny real models, the CLIs in a subprocess, the compile chain, and
small process helpers (a free port, a child's next line of output).

On ``sys.path`` through pytest's ``pythonpath`` setting (pyproject.toml), so every tier imports it as
``from support import ...``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: The stages of ``resnet_remote``'s ``--json`` summary, in order, and the compile and device ones.
STAGES = ("import-model", "tune", "build", "export-library", "reference", "upload", "load", "set-input", "run",
          "check", "postprocess")
COMPILE = ("import-model", "build", "export-library")
DEVICE = ("upload", "load", "set-input", "run", "postprocess")
#: The target of the emulated aarch64 device (scripts/aarch64-device) and of the cross-compile tests.
AARCH64 = "llvm -mtriple=aarch64-linux-gnu -mattr=+neon"


def make_tiny_onnx(path: Path, seed: int = 0, classes: int = 10) -> Path:
    """A real ONNX classifier: Conv(3->4, 3x3) + Relu + GlobalAveragePool + Flatten + Gemm, input 1x3x32x32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "conv_w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv_b": rng.standard_normal(4).astype(np.float32),
        "fc_w": rng.standard_normal((classes, 4)).astype(np.float32),
        "fc_b": rng.standard_normal(classes).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["data", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_conv_onnx(path: Path, channels: int = 32, seed: int = 0) -> Path:
    """A small ONNX classifier whose speed the schedules decide: two 3x3 convolutions of ``channels`` channels on
    1x3x32x32, then GlobalAveragePool + Gemm. Without schedules (``--schedules none``) it is several times slower
    than with the rule-based ones (docs/history.md has the figures): a change no noise hides."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = channels
    weights = {
        "w1": rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.1, "b1": np.zeros(c, np.float32),
        "w2": rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.1, "b2": np.zeros(c, np.float32),
        "fw": rng.standard_normal((10, c)).astype(np.float32), "fb": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["data", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m flows.resnet_remote ARGS`` in a fresh process from the repository root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.resnet_remote", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def cli_json(prefect_api, store_root, *args, expect=0):
    """``python -m flows.resnet_remote ARGS --json --repeat 2`` against ``prefect_api``: its summary (exit 0), or the
    finished process (another ``expect``)."""
    proc = run_cli(*args, "--artifacts", str(store_root), "--json", "--repeat", "2",
                   env={"PREFECT_API_URL": prefect_api})
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]) if expect == 0 else proc


def run_fleet(fleet_file: Path, store_root: Path, prefect_api: str | None, *args: str,
              timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m flows.fleet FLEET_FILE --artifacts STORE --json ARGS`` in a fresh process, against
    ``prefect_api`` when given."""
    env = {**os.environ}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return subprocess.run([sys.executable, "-m", "flows.fleet", str(fleet_file), "--artifacts", str(store_root),
                           "--json", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    """The last line of a finished process's stdout (a ``--json`` summary), parsed."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_all(model, store_root, target_text="llvm", opt_level=3, schedules="rules"):
    """The compile chain's plain functions, keyed by the plan (as the flows are)."""
    from pipeline.planning.plan import plan_build
    from pipeline.store import ArtifactStore
    from pipeline.targets import parse_target
    from tasks.build import build
    from tasks.export_library import export_library
    from tasks.import_model import import_model

    target, store = parse_target(target_text), ArtifactStore(store_root)
    plan = plan_build(model, target, opt_level, schedules=schedules)
    imported = import_model(model, plan.imported, store)
    built = build(imported.artifact, target, opt_level, plan.build, store)
    library = export_library(built.artifact, target, plan.toolchain, plan.library, store)
    return target, imported, built, library


LLVM_CANONICAL = '{"kind":"llvm","tag":"","keys":["cpu"],"mtriple":"x86_64-conda-linux-gnu"}'


def make_summary(**changes):
    """A run's summary (``pipeline.results.RunSummary``) built in code; ``changes`` name fields of its
    BuildSummary or DeviceOutcome, ``run_id``, or ``regression`` (a ``Verdict``)."""
    import dataclasses

    from pipeline.latency import latency_of
    from pipeline.results import BuildSummary, DeviceOutcome, RunStamp, RunSummary, Top, Upload

    build = BuildSummary(
        model="efficientnet_lite0", model_digest="1f69048b3289aee0" * 4, weights=None, target=LLVM_CANONICAL,
        opt_level=3, tune_trials=0, schedules="rules", tuning_key=None, import_key="cd" * 32, build_key="ab" * 32,
        library_key="ef" * 32, artifact="/store/ab/cd/model.so", library_bytes=20_000_000, gpu_code=None,
        stages={"import-model": "cached", "tune": "skipped", "build": "cached", "export-library": "cached"},
    )
    outcome = DeviceOutcome(
        device="embedded 127.0.0.1:46055", device_identity="x86_64-conda-linux-gnu", image="data/cat.png",
        input_shape=(1, 3, 224, 224),
        stages={"upload": "ran", "load": "ran", "set-input": "ran", "run": "ran", "postprocess": "ran"},
        top5=tuple(Top(285 - i, f"cat {i}", 0.3 - i * 0.05) for i in range(5)),
        latency=latency_of([116.9, 118.97, 121.9, 118.0, 119.8], 1),
        upload=Upload("/tmp/tvmrp-x.so", 20_000_000, 0.33, False), check=None,
    )
    build_names = {f.name for f in dataclasses.fields(BuildSummary)}
    outcome_names = {f.name for f in dataclasses.fields(DeviceOutcome)}
    build = dataclasses.replace(build, **{k: v for k, v in changes.items() if k in build_names})
    outcome = dataclasses.replace(outcome, **{k: v for k, v in changes.items() if k in outcome_names})
    stamp = RunStamp(changes.get("run_id", "20261128T020000Z-abcdef"), "2026-11-28T02:00:00+00:00")
    return RunSummary(stamp, build, outcome, changes.get("regression"))


def run_tvm(model, x: np.ndarray) -> np.ndarray:
    """import_model -> tvm.compile for plain llvm -> Relax VM on the CPU."""
    import tvm
    from tvm import relax

    from pipeline.models import import_model

    mod = import_model(model)
    params = mod["main"].params
    assert len(params) == 1
    assert [int(d) for d in params[0].ty.shape] == list(model.input_shape)
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line of a child's stdout (a text pipe), stripped; fails the test after ``timeout`` s of silence."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    assert readable, f"no line from process {proc.pid} within {timeout} s"
    return proc.stdout.readline().strip()


def fill_disk(disk):
    """Fill the file system of ``disk`` to the last byte with ``disk/filler`` (delete it to free the space)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)


@dataclasses.dataclass
class LocalStack:
    """A stack directory and port of the tests' own (never a user's ``.stack/`` or port 4200), and the command
    lines' default path through it: no ``PREFECT_API_URL``, no ``TVMRP_PREFECT_SERVER`` opt-out, so the first
    run starts the local Prefect server there and later runs use it. :meth:`down` stops whatever runs there."""

    home: Path
    port: int

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "TVMRP_PREFECT_SERVER")}
        return {**env, "TVMRP_STACK_DIR": str(self.home), "TVMRP_STACK_PORT": str(self.port)}

    def argv(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def cli(self, *args: str, module: str = "flows.resnet_remote", timeout: float = 600) -> subprocess.CompletedProcess:
        """``python -m MODULE ARGS`` (default: the single run) through the default path."""
        return subprocess.run(self.argv(module, *args), cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def stack(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """``scripts/stack ARGS`` on this stack."""
        return subprocess.run([str(REPO / "scripts" / "stack"), *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def server_record(self) -> dict | None:
        """The server's pid record, or None."""
        try:
            return json.loads((self.home / "run" / "server.json").read_text())
        except (OSError, ValueError):
            return None

    @property
    def api_url(self) -> str:
        record = self.server_record()
        return f"http://127.0.0.1:{(record or {}).get('port') or self.port}/api"

    def down(self) -> None:
        """Stop everything of this stack (``scripts/stack down``) and check that nothing of it runs any more."""
        import psutil

        records = [json.loads(p.read_text()) for p in (self.home / "run").glob("*.json")] if self.home.is_dir() else []
        procs = []
        for record in records:
            try:
                proc = psutil.Process(record["pid"])
                procs += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                pass
        if records:
            done = self.stack("down", timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:  # never leave one behind, whatever the assertion says
            try:
                proc.kill()
            except psutil.Error:
                pass
        assert not alive, f"left running: {[p.pid for p in alive]}"


def start_local_stack(home: Path) -> LocalStack:
    """A :class:`LocalStack` in ``home`` on a free port; nothing started yet."""
    home.mkdir(parents=True, exist_ok=True)
    return LocalStack(home, free_port())


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
