"""What the command lines share: parsers generated from the request type, and one way to run and fail.

The run's parameters are declared once, as the fields of :class:`pipeline.planning.request.RunRequest` (with their
defaults, flags and help). :func:`add_request_arguments` builds the argparse options from them, and
:func:`request_signature` gives the flow the same parameters (so a deployment's parameters stay flat:
``--param key=rpi4``). :func:`run_command` is the command-line contract of every entry point: ``Error:
<message>`` and the error's exit code (2 bad usage or input, 1 a stage failed, 130 interrupted), no
traceback unless ``--verbose``, and no process of the run left behind, even when the CLI is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import os
import signal
import sys
import threading
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipeline.errors import OrchestrationError, PipelineError, UsageError, clip
from pipeline.local_stack import REPO, LocalServer, StackError, local_server

log = logging.getLogger("flows")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError` (``Error: ...``, exit 2), not argparse's own."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _arg_type(annotation: Any) -> Any:
    """The argparse ``type`` of a field annotation: ``int | None`` -> int; ``str`` -> None (text)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return None if annotation is str else annotation


def add_request_arguments(parser: argparse.ArgumentParser, cls: type, only: Sequence[str] | None = None) -> None:
    """Add an option for every field of the dataclass ``cls`` that has ``metadata["cli"]`` (see ``pipeline.planning.request.arg``)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        spec = dict(f.metadata.get("cli") or {})
        if not spec or (only is not None and f.name not in only):
            continue
        group_name = spec.pop("group")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = spec.pop("flag") or "--" + f.name.replace("_", "-")
        help_text = spec.pop("help")
        if "action" not in spec:
            spec.setdefault("type", _arg_type(hints[f.name]))
            if spec["type"] is None:
                del spec["type"]
            help_text += " (default: %(default)s)"
        group.add_argument(flag, dest=f.name, default=f.default, help=help_text, **spec)


def request_fields(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s fields in a parsed namespace."""
    return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}


def request_signature(cls: type, return_annotation: Any = inspect.Signature.empty) -> inspect.Signature:
    """A keyword-only signature with ``cls``'s fields and defaults: a flow's parameters, declared once."""
    hints = typing.get_type_hints(cls)
    return inspect.Signature(
        [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
         for f in dataclasses.fields(cls)],
        return_annotation=return_annotation,
    )


class _NoExpectedTracebacks(logging.Filter):
    """Keep our own errors out of the console logs: the CLI prints each once, as ``Error: ...``.

    Prefect's run loggers report the exception that ended a run ("Encountered exception during execution:
    ...", with its traceback); the line still goes to the API (the UI shows it), not to the terminal.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError | KeyboardInterrupt):
            if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
                return False
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


PROJECT_LOGGERS = ("flows", "tasks", "pipeline")


class _InARun(logging.Filter):
    """Pass only records made inside a Prefect flow or task run (the API log handler needs the run's id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _send_project_logs() -> None:
    """Send the project's log lines (sessions, uploads, top-5, latency, tuning progress) to the run's logs in
    the Prefect UI, as ``PREFECT_LOGGING_EXTRA_LOGGERS`` does for the stack's worker; the terminal still shows
    only warnings and errors of them."""
    from prefect.logging.handlers import APILogHandler

    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler = APILogHandler()
            handler.addFilter(_InARun())
            logger.addHandler(handler)
            quiet = logging.StreamHandler(sys.stderr)
            quiet.setLevel(logging.WARNING)
            quiet.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s",
                                                 "%H:%M:%S"))
            logger.addHandler(quiet)
            logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    # Progress of long work (tuning, slow uploads) is a line per step when stderr is not a terminal (a terminal
    # gets tasks.progress's own bar): those lines are for the user, not only for the UI.
    progress = logging.getLogger("tasks.progress")
    if not sys.stderr.isatty() and not any(getattr(h, "_tvmrp_progress", False) for h in progress.handlers):
        lines = logging.StreamHandler(sys.stderr)
        lines.setLevel(logging.INFO)
        lines.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | PROGRESS | %(message)s", "%H:%M:%S"))
        lines._tvmrp_progress = True  # type: ignore[attr-defined]
        progress.addHandler(lines)


_HEARTBEAT_VARS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextlib.contextmanager
def cli_prefect_settings() -> Iterator[None]:
    """Prefect settings for a run started from the command line: no flow-run heartbeats unless asked for.

    Heartbeats (Prefect's default: one every 180 s) let an automation mark a run whose process died as
    crashed; a command line run has its user watching. Prefect's heartbeat thread sleeps in 1 s steps and the
    engine waits for it when the run ends, a large share of a warm run (measurements:
    docs/performance.md#command-line-start-up). Deployment runs (a worker starts them, not this command) keep
    Prefect's setting; so does a command line run when ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set in the
    environment or the Prefect profile.
    """
    from prefect.context import get_settings_context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    profile = {setting.name for setting in get_settings_context().profile.settings}
    if any(name in os.environ or name in profile for name in _HEARTBEAT_VARS):
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _temporary_servers() -> list[Any]:
    """Prefect's temporary servers in this process (Prefect 3.9's registry of them). Prefect imported its server
    module if it started one; importing it here for nothing would cost seconds (the whole server application)."""
    server_module = sys.modules.get("prefect.server.api.server")
    return list(getattr(server_module, "SubprocessASGIServer")._instances.values()) if server_module else []


def _settle_prefect(before: Sequence[Any] = ()) -> None:
    """Let Prefect finish before the command's last line: flush its log and event queues to the API, then stop
    the temporary server it started for this command, not one that ran ``before`` it (it shares our stderr;
    stopped at exit, its shutdown output would come after our ``Error:`` line)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
        for server in _temporary_servers():
            if not any(server is earlier for earlier in before):
                server.stop()
    except Exception as exc:  # noqa: BLE001 - the run's outcome is already decided
        log.debug("could not settle Prefect before exiting: %s", exc)


_LIFELINES: list[Any] = []
_LIFELINE_STARTED = threading.Event()


def start_early(argv: Sequence[str], embedded_device: bool) -> None:
    """What a command line starts before its heavy imports (Prefect, TVM): the lifeline, the local Prefect
    server when it must be started, and the embedded device when the command will use it (no
    --host/--tracker/--build-only, not --help), so that their start-up runs beside those imports instead of
    after them, and a warm run waits less (measurements: docs/performance.md#command-line-start-up)."""
    _watch_children()
    _start_local_server_early(argv)
    from pipeline.lean_import import defer_relax

    defer_relax()  # a run with cached builds never executes tvm.relax (pipeline/lean_import.py)
    if embedded_device and not {"--host", "--tracker", "--build-only", "-h", "--help"} & set(argv):
        from pipeline.device import prestart_embedded_server

        try:
            prestart_embedded_server()
        except Exception as exc:  # noqa: BLE001 - the run starts its own then, and says why if it cannot
            log.debug("could not start the embedded device early: %s", exc)
    _check_target_early(argv)


def _check_target_early(argv: Sequence[str]) -> None:
    """A ``--target`` that LLVM or TVM refuses ends the command here (exit 2), before Prefect is imported
    (which takes seconds, more on a busy machine); the run checks it again with everything else, which is
    cheap (measurements: docs/performance.md#command-line-start-up). TVM is imported now instead of a moment
    later, while the embedded device starts beside it. An early device is stopped at exit."""
    if {"-h", "--help"} & set(argv):
        return
    target = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--target"), None)
    target = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--target=")), target)
    if target is None:
        return
    from pipeline.targets import parse_target

    try:
        parse_target(target)
    except UsageError as exc:
        sys.exit(_fail(exc, "--verbose" in argv))


def _watch_children() -> None:
    """Start the lifeline (:class:`pipeline.processes.Lifeline`): if this process is killed (even SIGKILL: the
    OOM killer, a CI timeout), a watchdog ends every process it started (the embedded rpc_server and its
    workers, Prefect's temporary server) within about 2 s. Started on a thread: it is watching long before
    the first child starts, and the run does not wait for it. One per process: a second call does nothing."""
    from pipeline.processes import Lifeline

    if _LIFELINE_STARTED.is_set():
        return
    _LIFELINE_STARTED.set()

    def start() -> None:
        try:
            _LIFELINES.append(Lifeline().start())  # kept: its pipe must stay open while this process lives
        except OSError as exc:
            log.warning("no lifeline: processes of this run may outlive it if it is killed (%s)", exc)

    threading.Thread(target=start, name="lifeline", daemon=True).start()


SERVER_ENV = "TVMRP_PREFECT_SERVER"
"""Which Prefect server a command line without ``PREFECT_API_URL`` uses: ``local`` (the default: the local
stack's server, started when none runs, kept for later runs) or ``temporary`` (Prefect's temporary server for
this run only, which keeps no history: CI, throwaway machines)."""
_SERVER_MODES = ("local", "temporary")
_EARLY_SERVER: dict[str, Any] = {}


def _server_mode() -> str:
    mode = (os.environ.get(SERVER_ENV) or "local").strip().lower()
    if mode not in _SERVER_MODES:
        raise UsageError(f"{SERVER_ENV} must be one of {', '.join(_SERVER_MODES)} (got {clip(mode)!r})")
    return mode


def _profile_api_url() -> bool:
    """Whether Prefect's active profile sets ``PREFECT_API_URL`` (read without importing Prefect)."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        data = tomllib.loads((Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")).read_text())
        profile = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
        return bool(data.get("profiles", {}).get(profile, {}).get("PREFECT_API_URL"))
    except (OSError, ValueError, AttributeError):
        return False


def _start_local_server_early(argv: Sequence[str]) -> None:
    """Find or start the local Prefect server before the heavy imports, when the run will want it (no
    ``PREFECT_API_URL`` in the environment or the Prefect profile, ``TVMRP_PREFECT_SERVER`` not ``temporary``):
    a server that must be started (seconds) starts beside those imports. Its address goes into this process's
    environment, where Prefect reads it when imported (cheaper than changing Prefect's settings later, and the
    run's child processes inherit it); :func:`prefect_api` waits for it to answer."""
    if {"-h", "--help"} & set(argv) or "PREFECT_API_URL" in os.environ or _profile_api_url():
        return
    try:
        if _server_mode() != "local":
            return
        server = _find_local_server()  # returns at once; a server it starts is waited for later
    except PipelineError as exc:  # said by prefect_api, as the command's error
        _EARLY_SERVER["error"] = exc
        return
    _EARLY_SERVER["server"] = server
    os.environ["PREFECT_API_URL"] = server.api_url


def _find_local_server() -> LocalServer:
    """:func:`pipeline.local_stack.local_server`, announced; a stack directory it cannot use is a one-line
    error."""
    try:
        return _announce(local_server())
    except OSError as exc:
        raise OrchestrationError(
            f"the local Prefect server cannot be started: {clip(exc)}. Set TVMRP_STACK_DIR to a writable "
            f"directory, PREFECT_API_URL to use another server, or {SERVER_ENV}=temporary"
        ) from exc


def _announce(server: LocalServer) -> LocalServer:
    """Say once, when this run starts the local server, where its UI is and how to stop it."""
    if server.started:
        moved = (f" (port {server.moved_from} is taken by another program; TVMRP_STACK_PORT chooses)"
                 if server.moved_from is not None else "")
        stop = ("`scripts/stack down` stops it" if (REPO / "scripts" / "stack").is_file()
                else f"stop it with `kill {server.pid}`")
        print(f"Prefect: started the local Prefect server for this and later runs{moved}: UI {server.cfg.ui_url} "
              f"(every run's history); it keeps running, {stop}; {SERVER_ENV}=temporary runs without it",
              file=sys.stderr, flush=True)
    return server


def _ready(server: LocalServer) -> LocalServer:
    """``server`` once it answers (a bounded wait when it is starting)."""
    try:
        return server.ready()
    except StackError as exc:
        first = str(exc).splitlines()[0]
        raise OrchestrationError(
            f"the local Prefect server did not start: {first}. Set PREFECT_API_URL to use another server, or "
            f"{SERVER_ENV}=temporary for a temporary one per run"
        ) from None


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """The Prefect API of a command line run, yielded (None: Prefect's temporary server for this run).

    The configured one (``PREFECT_API_URL``, environment or profile); else, with ``TVMRP_PREFECT_SERVER``
    ``temporary``, Prefect's temporary server for this run (no history); else the local stack's server
    (:func:`pipeline.local_stack.local_server`: the running one, or one started now that stays for later runs,
    so every run is in the UI), found or started by :func:`start_early` when the command line began.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    early = _EARLY_SERVER.pop("server", None)
    configured = PREFECT_API_URL.value()
    if "error" in _EARLY_SERVER:
        _PENDING[:] = [_EARLY_SERVER.pop("error")]
        yield None
        return
    if early is not None and configured == early.api_url:
        _PENDING[:] = [early]
        yield early.api_url
        return
    if configured:
        yield configured
        return
    if _server_mode() == "temporary":
        yield None
        return
    try:
        server = _find_local_server()
    except PipelineError as exc:
        _PENDING[:] = [exc]
        yield None
        return
    _PENDING[:] = [server]
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


_PENDING: list[Any] = []
"""The local server :func:`prefect_api` chose and nobody waited for yet, or why there is none."""


def wait_for_api() -> None:
    """Wait (bounded) until the local server that :func:`prefect_api` chose answers; raise the reason when there
    is none (:class:`OrchestrationError`). Nothing to do after the first call, nor for any other server. The
    command calls it before its flow (:func:`run_command`, or :func:`recorded_run`, which records the failure
    as the run's)."""
    if not _PENDING:
        return
    pending = _PENDING.pop()
    if isinstance(pending, BaseException):
        raise pending
    _ready(pending)


def result_state(message: str, data: Any, failed: bool = False) -> Any:
    """A flow run's final state: ``Completed`` (``data`` its result) or ``Failed`` (``data`` the error a caller
    of the flow gets), ``message`` the result in one line, as the UI and ``prefect flow-run inspect`` show it.

    ``prefect deployment run --watch`` prints events, not state messages: the same line is also the name of
    the event ``tvmrp.run.completed`` (``tvmrp.run.failed``), which Prefect relates to the flow run, so the
    watch prints it just before the run's end (and the UI's event feed lists it).
    """
    from prefect.states import Completed, Failed

    try:
        from prefect.events import emit_event
        from prefect.runtime import flow_run

        emit_event(event="tvmrp.run.failed" if failed else "tvmrp.run.completed",
                   resource={"prefect.resource.id": f"tvmrp.flow-run.{flow_run.id}",
                             "prefect.resource.name": clip(message, 300)})
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its event
        log.debug("could not emit the run's result event: %s", exc)
    return (Failed if failed else Completed)(message=message, data=data)


_STAMP: contextvars.ContextVar[Any] = contextvars.ContextVar("tvmrp_stamp", default=None)


def run_stamp() -> Any:
    """The stamp (:class:`pipeline.results.RunStamp`) of the run a command line started (:func:`recorded_run`),
    else a new one."""
    from pipeline.results import RunStamp

    return _STAMP.get() or RunStamp.new()


@contextlib.contextmanager
def recorded_run(req: Any) -> Iterator[Any]:
    """Stamp the run that a command line starts (its flow takes the stamp, :func:`run_stamp`) and make sure the
    ledger records it: when the run ends with an error that its flow did not record (Prefect could not create
    or run the flow run: the API down or overloaded, its temporary server not starting; an interrupt before the
    flow began), the failure is recorded here, under the same id. A failure of Prefect's API is raised as
    :class:`OrchestrationError` (the message the command prints and the record keeps).

    Args:
        req: the run's :class:`pipeline.planning.request.ResolvedRequest`.
    """
    from pipeline.results import RunStamp

    stamp = RunStamp.new()
    token = _STAMP.set(stamp)
    try:
        wait_for_api()  # a local server that does not start is this run's failure, recorded below
        yield stamp
    except (Exception, KeyboardInterrupt) as exc:
        failure = _prefect_api_failure(exc)
        error = _orchestration_error(failure) if failure is not None else exc
        _record_unless_recorded(req, stamp, error)
        if error is not exc:
            raise error from exc
        raise
    finally:
        _STAMP.reset(token)


def _record_unless_recorded(req: Any, stamp: Any, error: BaseException) -> None:
    from pipeline.errors import UsageError as _Usage
    from pipeline.planning.plan import plan_run
    from tasks.report import record_failure

    try:
        req.store.ledger.find(stamp.id)
        return  # the flow recorded it
    except _Usage:
        pass
    try:
        plan = plan_run(req)
    except Exception:  # noqa: BLE001 - the record names what it can
        plan = None
    record_failure(req, plan, stamp, error)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_command(
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    execute: Callable[[argparse.Namespace], Any],
    show: Callable[[Any, bool], None],
    uses_prefect: bool = True,
    records_runs: bool = False,
) -> int:
    """Parse ``argv``, run ``execute(args)`` and ``show(result, as_json)`` it; return the exit code.

    ``execute`` raises :class:`PipelineError` for every failure a user can meet. An error that carries the
    run's summary (``exc.summary``: a failed check, a fleet with failed pairs) still shows it, then the error.

    Args:
        records_runs: ``execute`` waits for the Prefect API itself (:func:`wait_for_api`, in
            :func:`recorded_run`), so that a local server that does not start is recorded as its run's failure;
            otherwise it is waited for here, before ``execute``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    # No network here or on many devices' hosts: keep Prefect's (ephemeral) server from phoning home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecation chatter
    # SIGTERM (a cancelled run, `kill`) unwinds like Ctrl-C, so the embedded device is stopped, not orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    _watch_children()
    as_json = False
    _PENDING.clear()
    earlier = _temporary_servers()
    settle = functools.partial(_settle_prefect, earlier) if uses_prefect else (lambda: None)
    api_url = None
    try:
        args = parser.parse_args(argv)
        as_json = bool(getattr(args, "json", False))
        if uses_prefect:
            _send_project_logs()
            if not verbose:
                _quiet_console()
        with cli_prefect_settings() if uses_prefect else contextlib.nullcontext(), \
                prefect_api() if uses_prefect else contextlib.nullcontext() as api_url:
            if uses_prefect and not records_runs:
                wait_for_api()
            result = execute(args)
    except PipelineError as exc:
        settle()
        carried = getattr(exc, "summary", None)  # a run that completed (a failed check, a fleet with failed pairs)
        if carried is not None:
            show(carried, as_json)
        return _fail(exc, verbose)
    except KeyboardInterrupt as exc:
        print(f"Error: interrupted{f' ({exc})' if str(exc) else ''}; nothing of the run is left running", file=sys.stderr)
        return 130
    except Exception as exc:
        failure = _prefect_api_failure(exc)
        if failure is None:
            raise
        settle()
        return _fail(_orchestration_error(failure, api_url), verbose)
    settle()
    show(result, as_json)
    return 0


_PREFECT_RUNTIME_FAILURES = (
    "Timed out while attempting to connect to ephemeral Prefect API server",  # its temporary server
    "Failed to reach API at",  # the API version check, raised from the httpx error
)


def _prefect_api_failure(exc: BaseException) -> BaseException | None:
    """The error of Prefect's client behind ``exc`` (itself, or what it was raised from) when its API failed a
    request after the client's own retries, or its temporary server did not start; else None."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:  # e.g. RuntimeError("Failed to reach API") from a 503
        if isinstance(current, (PrefectHTTPStatusError, httpx.HTTPError)):
            return current
        if isinstance(current, RuntimeError) and str(current).startswith(_PREFECT_RUNTIME_FAILURES):
            return current if current.__cause__ is None else _prefect_api_failure(current.__cause__) or current
        current, seen = current.__cause__ or current.__context__, seen + 1
    return None


def _orchestration_error(failure: BaseException, api_url: str | None = None) -> OrchestrationError:
    """A failure of Prefect's client (or of its temporary server) as one line that says what failed and what
    to do. ``api_url``: the API the run used (default: Prefect's current setting; None: its temporary server)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES

    if str(failure).startswith(_PREFECT_RUNTIME_FAILURES[0]):
        return OrchestrationError(
            "Prefect's temporary server for this run did not start in time (too many runs at once on this "
            f"machine?): run again, or use the local server (unset {SERVER_ENV}) or another (PREFECT_API_URL)"
        )
    url = api_url or PREFECT_API_URL.value() or "the temporary server"
    response = getattr(failure, "response", None)
    what = (f"answered {response.status_code} {response.reason_phrase} to {response.request.method} "
            f"{clip(response.request.url)}" if response is not None else f"failed: {type(failure).__name__}: {clip(failure)}")
    return OrchestrationError(
        f"the Prefect API ({clip(url)}) {what}, after its client's {PREFECT_CLIENT_MAX_RETRIES.value()} retries. "
        "The server is down or overloaded (too many runs at once for its database?): run again, or check the "
        "server (`scripts/stack status`, PREFECT_API_URL)"
    )


def exit_command(code: int) -> typing.NoReturn:
    """End a command line's process with ``code`` (its ``__main__``: ``exit_command(main())``).

    A finished run (:func:`run_command` returned) ends without the interpreter's teardown, which took 0.3-0.4 s
    of a 3.4 s warm run here (the modules of Prefect and TVM torn down one by one, TVM's native destructors):
    by then the device is stopped, the ledger record written and synced, Prefect's logs and events sent and its
    temporary server stopped; the standard streams and logging handlers are flushed here, and the lifeline ends
    whatever is left, as at any exit. An interrupted run (130) exits as usual: Prefect's exit handlers still
    send what it had not.
    """
    if code == 130:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _fail(exc: PipelineError, verbose: bool) -> int:
    if verbose:
        log.error("run failed", exc_info=exc)
    sys.stdout.flush()
    print(f"Error: {exc}", file=sys.stderr)
    return exc.exit_code
