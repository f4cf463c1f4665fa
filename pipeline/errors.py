"""One exception tree for the whole pipeline.

Every error a user can meet is a :class:`PipelineError`. The CLI prints ``Error: <message>`` and exits
with :attr:`PipelineError.exit_code`: 2 for bad usage or bad input (fix the command line or the files),
1 for a stage that failed (the device, the build, the store). TVM's and the frameworks' own exceptions
are wrapped at the boundary with a message that says what to do.

    PipelineError                 exit 1
    +-- UsageError                exit 2: bad command line or bad input
    |   +-- ModelError            unknown model name, missing/corrupt model file, weights unavailable
    |   +-- TargetError           target string/JSON TVM cannot parse, bad opt_level
    |   +-- InputError            image missing, unreadable or not an image
    +-- BuildError                import/compile failed
    +-- ExportError               linking the library failed (e.g. missing cross compiler)
    +-- StoreError                artifact store unwritable, corrupt beyond repair
    +-- DeviceError               anything on the device side
        +-- DeviceUnavailable     cannot connect / tracker has no device for the key
        +-- DeviceTimeout         a remote call exceeded its timeout
        +-- ArchMismatch          library built for another architecture than the device
        +-- RemoteRunError        the device answered with an error
"""

from __future__ import annotations


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


class BuildError(PipelineError):
    """Importing or compiling the model failed."""


class ExportError(PipelineError):
    """Linking the compiled objects into a shared library failed."""


class StoreError(PipelineError):
    """The artifact store cannot be read or written."""


class DeviceError(PipelineError):
    """Something failed on, or on the way to, the remote device."""


class DeviceUnavailable(DeviceError):
    """No session could be opened: server not listening, tracker has no device for the key."""


class DeviceTimeout(DeviceError):
    """A remote call did not answer within its timeout."""


class ArchMismatch(DeviceError):
    """The library was built for a different architecture than the device's."""


class RemoteRunError(DeviceError):
    """The device answered a call with an error."""
