"""One exception tree for the whole pipeline.

Every error a user can meet is a :class:`PipelineError`. The CLI prints ``Error: <message>`` and exits
with :attr:`PipelineError.exit_code`: 2 for bad usage or bad input (fix the command line or the files),
1 for a stage that failed (the device, the build, the store), 3 for a latency regression when the run was
asked to fail on one (``--fail-on-regression``, a CI gate). TVM's and the frameworks' own exceptions
are wrapped at the boundary with a message that says what to do.

    PipelineError                 exit 1
    +-- UsageError                exit 2: bad command line or bad input
    |   +-- ModelError            unknown model name, missing/corrupt model file, weights unavailable
    |   +-- TargetError           target string/JSON TVM cannot parse, bad opt_level
    |   +-- InputError            image missing, unreadable or not an image
    +-- BuildError                import/compile failed
    +-- ExportError               linking the library failed (e.g. missing cross compiler)
    +-- StoreError                artifact store unwritable, corrupt beyond repair
    +-- CheckFailed               the compiled model's output differs from its framework's beyond the thresholds
    +-- FleetFailed               some pairs of a fleet run failed, the others completed (carries the summary)
    +-- RegressionFound           exit 3: --fail-on-regression and a run was judged a latency regression
    +-- PairFailed                one (device, model) pair of a fleet run failed (carries the pair's result)
    +-- OrchestrationError        the Prefect API failed the run (down, or overloaded past its client's retries)
    +-- DeviceError               anything on the device side
        +-- DeviceUnavailable     cannot connect / tracker has no device for the key
        +-- DeviceTimeout         a remote call exceeded its timeout
        +-- ArchMismatch          library built for another architecture than the device
        +-- VersionSkew           the device runs another minor version of TVM (--allow-version-skew runs anyway)
        +-- RemoteRunError        the device answered with an error
            +-- DeviceLost        the connection died mid-call (device killed, rebooted, network cut)
            +-- DeviceDiskFull    an upload was cut short: the disk it went to on the device is full
            +-- KeptCopyFailed    a library the device kept failed its file check, did not load, or its output
                                  failed the check: forgotten, and the device chain uploads it again
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.results import AccuracySummary, FleetSummary, PairResult, RunSummary


def clip(text: object, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters for echoing in a message, saying how long it was.

    Untrusted input (a target string, a path, a framework's error) is echoed in messages; a 10 KB target
    must not produce a 30 KB error. Quote the result with ``!r`` where control characters may occur.
    """
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An error's first line, capped: what tables and JSON show (the ledger keeps the whole message)."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return clip(first or (type(exc).__name__ if isinstance(exc, BaseException) else ""), limit)


class PipelineError(Exception):
    """Root of every error the pipeline reports to a user."""

    exit_code = 1


class UsageError(PipelineError):
    """Bad command line or bad input: the user must change what they asked for."""

    exit_code = 2


class ModelError(UsageError):
    """The model cannot be found, read, or imported (unknown name, missing or corrupt file)."""


class TargetError(UsageError):
    """The target or opt_level is not something TVM can build for."""


class InputError(UsageError):
    """The input image cannot be read or preprocessed."""


class OrchestrationError(PipelineError):
    """The Prefect API did not serve the run: unreachable, or still failing after its client's retries."""


class BuildError(PipelineError):
    """Importing or compiling the model failed."""


class ExportError(PipelineError):
    """Linking the compiled objects into a shared library failed."""


class StoreError(PipelineError):
    """The artifact store cannot be read or written."""


class CheckFailed(PipelineError):
    """The compiled model's output broke the accuracy thresholds against its own framework's output.

    Attributes:
        check: the check's figures (``CheckResult.as_dict()``), when known.
        summary: what the run produced, when it got that far (the CLI still prints it, then the error).
    """

    def __init__(
        self, message: str, check: dict[str, Any] | None = None, summary: RunSummary | AccuracySummary | None = None
    ) -> None:
        super().__init__(message)
        self.check = check
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the attributes through pickling (Prefect persists states)
        return type(self), (str(self), self.check, self.summary)


class FleetFailed(PipelineError):
    """Some pairs of a fleet run failed (exit 1); the others completed.

    Attributes:
        summary: the run's :class:`pipeline.results.FleetSummary` (every pair's result), when known; the CLI
            prints its table, then the error.
    """

    def __init__(self, message: str, summary: FleetSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the summary through pickling (Prefect persists states)
        return type(self), (str(self), self.summary)


REGRESSION_EXIT_CODE = 3
"""The exit code of a run that ``--fail-on-regression`` failed: a regression, nothing else wrong."""


class RegressionFound(PipelineError):
    """A run (or a pair of a fleet run) was judged a latency regression and the run was asked to fail on one
    (``--fail-on-regression``): exit code 3, so that CI tells it from a failure (1) and bad usage (2).

    Attributes:
        summary: what the run produced (a :class:`pipeline.results.RunSummary` or
            :class:`pipeline.results.FleetSummary`); the CLI prints it, then the error.
    """

    exit_code = REGRESSION_EXIT_CODE

    def __init__(self, message: str, summary: RunSummary | FleetSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the summary through pickling (Prefect persists states)
        return type(self), (str(self), self.summary)


class PairFailed(PipelineError):
    """One (device, model) pair of a fleet run failed: its task's failure; the fleet goes on with the others.

    The message is the error's line (``result.error``, else ``failed``).

    Attributes:
        result: the pair's :class:`pipeline.results.PairResult` (status ``failed``, with the error and its type).
    """

    def __init__(self, result: PairResult) -> None:
        super().__init__(result.error or "failed")
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the result through pickling (Prefect persists states)
        return type(self), (self.result,)


class DeviceError(PipelineError):
    """Something failed on, or on the way to, the remote device."""


class DeviceUnavailable(DeviceError):
    """No session could be opened: server not listening, tracker has no device for the key."""


class DeviceTimeout(DeviceError):
    """A remote call did not answer within its timeout."""


class ArchMismatch(DeviceError):
    """The library was built for a different architecture than the device's."""


class VersionSkew(DeviceError):
    """The device runs another major or minor version of TVM than this machine builds with.

    Libraries and the RPC protocol may change between minor versions, so the run is refused at session start
    unless ``--allow-version-skew`` is given (a different patch version only warns).

    Attributes:
        device_version: the TVM version the device reported.
        local_version: the TVM version of this machine.
    """

    def __init__(self, message: str, device_version: str | None = None, local_version: str | None = None) -> None:
        super().__init__(message)
        self.device_version = device_version
        self.local_version = local_version

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the attributes through pickling (Prefect persists states)
        return type(self), (str(self), self.device_version, self.local_version)


class RemoteRunError(DeviceError):
    """The device answered a call with an error."""


class DeviceLost(RemoteRunError):
    """The connection to the device died during a call: transient, the flow retries on a fresh session."""


class DeviceDiskFull(RemoteRunError):
    """An upload reached the device short: the disk that holds its directory there is full. TVM's upload does not
    report a failed write; the pipeline finds out by checking what was written (``pipeline.device.cache``)."""


class KeptCopyFailed(RemoteRunError):
    """A library copy the device kept from an earlier run did not hold up: its size or SHA-256 on the device is
    not what was sent, it did not load, or its output failed the check. The copy is forgotten (marker and file
    removed) before this is raised; :func:`tasks.chains.device_chain` then runs once more with a fresh upload."""
