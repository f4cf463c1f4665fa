"""The ``resnet_remote`` flow: compile a model with TVM once, run it on a TVM RPC device every time.

    import-model -> build -> export-library -> upload -> load -> set-input -> run -> postprocess

The first three stages are cached by explicit content keys in the artifact store; the device stages always
run. Run ``python -m flows.resnet_remote --help`` for the command line; the flow itself is
``flows/resnet_remote.py:resnet_remote`` for Prefect deployments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from prefect import flow

from flows._cli import Parser
from pipeline import keys
from pipeline.device import Device
from pipeline.errors import CheckFailed, DeviceLost, PipelineError, StaleDeviceCopy, UsageError
from pipeline.models import MODEL_NAMES
from pipeline.request import DEFAULT_MODEL, DEFAULT_TARGET, ResolvedRequest, RunRequest, resolve
from pipeline.store import ENV_VAR, Artifact, ArtifactStore
from pipeline.targets import toolchain_for
from tasks._cache import Built, store_cache_options
from tasks._sessions import registered
from tasks.build import build_task
from tasks.export_library import LIBRARY_FILE, export_library_task
from tasks.import_model import import_model_task
from tasks.load import load_task
from tasks.postprocess import format_report, postprocess_task
from tasks.report import publish_run_artifacts
from tasks.check import check_task, raise_if_failed
from tasks.reference import load_reference, reference_key, reference_task
from tasks.run import RunResult, run_task
from tasks.set_input import set_input_task
from tasks.tune import LOCAL_RUNNER, tracker_runner, tune_key, tune_task
from tasks.upload import Uploaded, upload_task

log = logging.getLogger("flows.resnet_remote")

UNTUNED_NOTE = (
    "untuned build: TVM 0.27's default CPU pipeline applies no tuned schedules, so this latency is far above what "
    "the CPU can do (ResNet-18 v2 here: 782 ms untuned, 30 ms after --tune-trials 1024, 8.3 ms with onnxruntime; "
    "see bench/RESULTS.md)"
)

STAGES = (
    "import-model", "tune", "build", "export-library", "reference", "upload", "load", "set-input", "run", "check", "postprocess",
)


def _cached_stage(stage_task: Any, store: ArtifactStore, key: str, refresh: bool, **params: Any) -> tuple[Built, str]:
    """Run a cached stage; return its result and ``"cached"`` or ``"ran"``.

    Prefect is asked to refresh its record whenever the store's copy is missing or fails its digest check,
    so a cached reference to deleted or corrupted files is never returned.
    """
    stale = refresh or store.get(key) is None
    state = stage_task.with_options(**store_cache_options(store, stale))(
        **params, store_root=str(store.root), key=key, refresh=refresh, return_state=True
    )
    built: Built = state.result()  # raises the stage's exception if it failed
    return built, "cached" if state.name == "Cached" or not built.built else "ran"


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    if p.get("tracker"):
        device = f"{p.get('key')}@{p['tracker']}"
    elif p.get("host"):
        device = f"{p['host']}:{p.get('port')}"
    else:
        device = "embedded"
    model = os.path.basename(str(p.get("model") or DEFAULT_MODEL))  # a file's name, not its whole path
    return f"{model}@{p.get('target', DEFAULT_TARGET)} on {device}"


@flow(name="resnet-remote", flow_run_name=_run_name, log_prints=False)
def resnet_remote(
    model: str = DEFAULT_MODEL,
    weights: str = "pretrained",
    seed: int = 0,
    target: str = DEFAULT_TARGET,
    opt_level: int = 3,
    host: str | None = None,
    port: int | None = None,
    tracker: str | None = None,
    key: str | None = None,
    connect_timeout: float = 10.0,
    request_timeout: float = 30.0,
    call_timeout: float = 300.0,
    device_retries: int = 1,
    image: str | None = None,
    number: int = 1,
    repeat: int = 5,
    artifacts: str | None = None,
    refresh: bool = False,
    check: bool = True,
    max_abs_diff: float | None = None,
    tune_trials: int = 0,
    tune_on: str = "host",
    device_cache: str = "auto",
) -> dict[str, Any]:
    """Import, compile (cached), export (cached), upload, load, set the input, run and time a model.

    Returns:
        The run summary (see ``--json`` in the README): model, digests, keys, stages ran/cached, top-5, latency.
    """
    req = resolve(RunRequest(**{name: value for name, value in locals().items()}))
    with Device(req.device) as device:  # the embedded server starts now and imports TVM while we compile
        return _pipeline(req, device)


def _on_device(req: ResolvedRequest, device: Device, library: Artifact) -> tuple[Uploaded, RunResult, str]:
    """upload -> load -> set-input -> run on a fresh session; retried (only here) when the device is lost.

    A library copy the device kept from an earlier run is used at most until it fails: a copy that does not
    load, or a device lost while it was in use, makes the next attempt upload the library again.
    """
    if req.device_cache is not None and req.device.kind == "local":
        Path(req.device_cache).mkdir(parents=True, exist_ok=True)  # the embedded server's cache, in the store
    reuse, stale_retried = True, False
    attempt = 1
    while True:
        try:
            with device.session() as session, registered(session) as ref:
                uploaded = upload_task(ref, library, str(req.store.root), req.target.arch, req.device_cache, reuse)
                load_task(ref)
                set_input_task(ref, req.input)
                return uploaded, run_task(ref, req.number, req.repeat), ref.description
        except StaleDeviceCopy as exc:
            if stale_retried:
                raise
            log.warning("%s", exc)
            reuse, stale_retried = False, True
        except DeviceLost as exc:
            if attempt > req.device_retries:
                raise DeviceLost(
                    f"{exc}. Gave up after {attempt} attempt(s): check that the device is up and stable "
                    f"(or allow more with --device-retries)"
                ) from exc
            attempt += 1
            log.warning("device lost (%s); retrying on a fresh session (attempt %d of %d)",
                        exc, attempt, req.device_retries + 1)
            reuse = False
            device.recover()


def _tuning_runner(req: ResolvedRequest) -> str:
    """Where tuning measures: here, or on the run's device when it comes from a tracker and --tune-on device."""
    if req.tune_on == "device":
        if req.device.kind != "tracker":
            raise UsageError("--tune-on device measures through a TVM tracker: give --tracker HOST:PORT --key KEY")
        return tracker_runner(str(req.device.tracker), str(req.device.key))
    return LOCAL_RUNNER


def _pipeline(req: ResolvedRequest, device: Device) -> dict[str, Any]:
    store, model, target = req.store, req.model, req.target
    stages: dict[str, str] = {}

    import_key = keys.key_of(keys.import_inputs(model.digest))
    imported, stages["import-model"] = _cached_stage(import_model_task, store, import_key, req.refresh, model=model)

    toolchain = toolchain_for(target)  # fail before compiling if the cross compiler is missing
    tuning = None
    if req.tune_trials > 0:
        tuned, stages["tune"] = _cached_stage(
            # --refresh does not retune (minutes to hours); a missing or corrupt tuning is still redone.
            tune_task, store, tune_key(model.digest, target, req.tune_trials), False,
            module=imported.artifact, model_digest=model.digest, target=target, trials=req.tune_trials,
            runner=_tuning_runner(req),
        )
        tuning = tuned.artifact
    build_key = keys.key_of(
        keys.build_inputs(model.digest, target.canonical, req.opt_level, tuning.key if tuning else None)
    )
    built, stages["build"] = _cached_stage(
        build_task, store, build_key, req.refresh,
        module=imported.artifact, model_digest=model.digest, target=target, opt_level=req.opt_level,
        tuning=tuning,
    )

    library_key = keys.key_of(keys.export_inputs(build_key, toolchain.identity))
    library, stages["export-library"] = _cached_stage(
        export_library_task, store, library_key, req.refresh,
        build=built.artifact, target=target, toolchain=toolchain,
    )

    # The framework's reference output is computed (or found cached) before the device is held.
    expected = None
    if req.check:
        expected, stages["reference"] = _cached_stage(
            reference_task, store, reference_key(model, req.input), req.refresh, model=model, data=req.input,
        )

    uploaded, result, device_name = _on_device(req, device, library.artifact)
    stages.update({"upload": "ran", "load": "ran", "set-input": "ran", "run": "ran"})

    checked = None
    if expected is not None:
        checked = check_task(result.output, load_reference(expected, str(store.root)), req.thresholds)
        stages["check"] = "ran"
    prediction = postprocess_task(model, result.output, result.latency)
    stages["postprocess"] = "ran"

    notes = [*model.notes, *([] if tuning else [UNTUNED_NOTE])]
    summary = {
        "model": model.name,
        "model_digest": model.digest,
        "weights": model.spec.weights if model.kind == "resnet18_v2" else None,
        "target": target.canonical,
        "opt_level": req.opt_level,
        "tune_trials": req.tune_trials,
        "tuning_key": tuning.key if tuning else None,
        "import_key": import_key,
        "build_key": build_key,
        "library_key": library_key,
        "artifact": str(store.file(library.artifact, LIBRARY_FILE)),
        "device": device_name,
        "image": str(req.image),
        "stages": {name: stages.get(name, "skipped") for name in STAGES},
        "top5": [entry.as_dict() for entry in prediction.top],
        "latency_ms": prediction.latency.as_dict(),
        "timing": {"number": req.number, "repeat": req.repeat},
        "upload": uploaded.as_dict(),
        "check": checked.as_dict() if checked is not None else None,
        "notes": notes,
    }
    publish_run_artifacts(summary)
    if checked is not None:
        raise_if_failed(checked, model.name, summary)  # the flow run fails; the summary rides on the error
    return summary


# -- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flows.resnet_remote``."""
    p = Parser(
        prog="python -m flows.resnet_remote",
        description="Compile a model with TVM (cached) and run it on a TVM RPC device; print its top-5 and latency.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"one of {', '.join(MODEL_NAMES)}, or a path to an .onnx file, a torch.export .pt2 file, "
                        f"or MXNet export files (PREFIX-symbol.json with PREFIX-0000.params) (default: %(default)s)")
    m.add_argument("--weights", default="pretrained",
                   help="resnet18_v2 only: pretrained (MXNet model store; downloads when online), random (seeded; "
                        "the labels then mean nothing), or a path to a Gluon .params file (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="seed for --weights random (default: %(default)s)")
    b = p.add_argument_group("build")
    b.add_argument("--target", default=DEFAULT_TARGET,
                   help='TVM target: "llvm", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon", '
                        '"llvm -target=x86_64-pc-linux-gnu", or JSON \'{"kind": "llvm", "mcpu": "znver4"}\'; '
                        "-mcpu=native means this host's CPU (default: %(default)s)")
    b.add_argument("--opt-level", type=int, default=3, choices=range(4), metavar="{0,1,2,3}",
                   help="TVM PassContext opt_level (default: %(default)s)")
    b.add_argument("--tune-trials", type=int, default=0,
                   help="MetaSchedule tuning budget (trials); 0 = no tuning. Tuned once per (model, target, "
                        "budget) and cached like the build (default: %(default)s)")
    b.add_argument("--tune-on", choices=("host", "device"), default="host",
                   help="measure tuning candidates on this host, or on the --tracker/--key device (default: %(default)s)")
    b.add_argument("--artifacts", default=None,
                   help=f"artifact store directory (default: ${ENV_VAR} or artifacts/ at the repository root)")
    b.add_argument("--refresh", action="store_true", help="rebuild import-model, build and export-library")
    d = p.add_argument_group("device (default: an embedded TVM RPC server on 127.0.0.1, started for the run)")
    d.add_argument("--host", help="a running TVM RPC server (python -m tvm.exec.rpc_server)")
    d.add_argument("--port", type=int, help="its port (with --host)")
    d.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker to request a device from")
    d.add_argument("--key", help="the device key to request from the tracker")
    d.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to open a session (default: %(default)s)")
    d.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds to wait for the tracker to hand out a device (default: %(default)s)")
    d.add_argument("--call-timeout", type=float, default=300.0,
                   help="seconds any one remote call (upload, load, run...) may take (default: %(default)s)")
    d.add_argument("--device-cache", metavar="DIR|auto|off", default="auto",
                   help="directory on the device that keeps uploaded libraries between runs, so an unchanged "
                        "library is not sent again; it must exist there. auto: inside the artifact store for the "
                        "embedded server, /tmp on other devices; off: upload every run (default: %(default)s)")
    d.add_argument("--device-retries", type=int, default=1,
                   help="fresh sessions to try when the device is lost mid-run; the embedded device is "
                        "restarted (default: %(default)s)")
    c = p.add_argument_group("check (the compiled model's output vs the model's own framework, every run)")
    c.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the reference output and the check")
    c.add_argument("--max-abs-diff", type=float, default=None,
                   help="largest allowed |TVM - reference| (default for float32: 1e-4; top-5 must match)")
    r = p.add_argument_group("input and output")
    r.add_argument("--image", help="image to classify (default: the cat photo in data/cat.png)")
    r.add_argument("--number", type=int, default=1, help="time_evaluator: runs per measurement (default: %(default)s)")
    r.add_argument("--repeat", type=int, default=5, help="time_evaluator: measurements (default: %(default)s)")
    r.add_argument("--json", action="store_true", help="print the run summary as one JSON object on the last line")
    r.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    return p


class _NoExpectedTracebacks(logging.Filter):
    """Drop tracebacks of our own errors from console logs: the CLI prints them as ``Error: ...``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_console() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_NoExpectedTracebacks())


_HEARTBEAT_VARS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def cli_prefect_settings() -> Iterator[None]:
    """Prefect settings for a run started from the command line: no flow-run heartbeats unless asked for.

    Heartbeats (Prefect's default: one every 180 s) let an automation mark a run whose process died as
    crashed; a command line run has its user watching. Prefect's heartbeat thread sleeps in 1 s steps and the
    engine waits for it when the run ends: 0.8 s of a 2.1 s warm run here (bench/RESULTS.md). Deployment
    runs (a worker starts them, not this command) keep Prefect's setting; so does a command line run when
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set in the environment or the Prefect profile.
    """
    from prefect.context import get_settings_context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    profile = {setting.name for setting in get_settings_context().profile.settings}
    if any(name in os.environ or name in profile for name in _HEARTBEAT_VARS):
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 bad usage/input, 1 a stage failed)."""
    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    # No network here or on many devices' hosts: keep Prefect's (ephemeral) server from phoning home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecation chatter
    # SIGTERM (a cancelled run, `kill`) unwinds like Ctrl-C, so the embedded device is stopped, not orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = vars(build_parser().parse_args(argv))
        as_json, verbose = args.pop("json"), args.pop("verbose")
        resolve(RunRequest(**args))  # fail fast on bad input, before Prefect starts
        if not verbose:
            _quiet_console()
        with cli_prefect_settings():
            summary = resnet_remote(**args)
    except CheckFailed as exc:  # the run completed: show what it measured, then why it failed
        if exc.summary is not None:
            print(format_report(exc.summary))
            if as_json:
                print(json.dumps(exc.summary))
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except PipelineError as exc:
        if verbose:
            logging.getLogger(__name__).exception("run failed")
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"Error: interrupted{f' ({exc})' if str(exc) else ''}; the embedded device was stopped", file=sys.stderr)
        return 130
    print(format_report(summary))
    if as_json:
        print(json.dumps(summary, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
