"""Stage ``export-library``: link the build's object files into a shared library for the device.

Links with the host's ``g++`` when the target architecture is the host's, else with the matching cross
compiler (``aarch64-linux-gnu-gcc`` for aarch64...). Keyed (by the plan) by the build key, the linker's
identity and our export code version.

Only what the build stage writes reaches the linker: regular members of the build's archive named like
object files (``lib0.o``, ``devc.o``) that are ELF relocatable objects. Anything else (a member that is a
linker script, which ``ld`` would read as commands, a link, a path) means the archive is not the build's, and
the stage fails before linking. The link runs in a process group of its own under :data:`LINK_TIMEOUT_S`;
a failure is one line (the linker's first error), its whole output in the debug log.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

import psutil
from prefect import task

from pipeline.errors import ExportError, StoreError, clip
from pipeline.planning.plan import StageKey
from pipeline.processes import stop_process_tree
from pipeline.store import Artifact, ArtifactStore
from pipeline.store.layout import LIBRARY, LIBRARY_FILE, OBJECTS_FILE
from pipeline.targets import TargetInfo, Toolchain
from tasks._cache import Built, ensure_artifact

log = logging.getLogger(__name__)

LINK_TIMEOUT_S = 600.0
"""Longest a link may take (ResNet-18: ~1 s; a stuck or hostile linker must not hold the run)."""

_OBJECT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}\.o")
_ET_REL = 1  # ELF e_type of a relocatable object file


def export_library(
    build: Artifact,
    target: TargetInfo,
    toolchain: Toolchain,
    stage: StageKey,
    store: ArtifactStore,
    refresh: bool = False,
) -> Built:
    """Link ``build`` into ``model.so`` with ``toolchain`` and store it under ``stage.key`` (``plan.library``).

    Raises:
        ExportError: the linker failed or ran past :data:`LINK_TIMEOUT_S`.
        StoreError: the build's archive holds something else than the build's object files.
    """

    def produce(directory: Path) -> None:
        if store.get(build.key) is None:
            raise StoreError(f"the build {build.key} vanished from the store; run again")
        with tempfile.TemporaryDirectory(prefix="export-") as work:
            objects = extract_objects(store.file(build, OBJECTS_FILE), Path(work))
            link(toolchain.compiler, directory / LIBRARY_FILE, objects, target.triple)

    return ensure_artifact(store, stage, LIBRARY, produce, refresh)


def extract_objects(archive: Path, work: Path) -> list[str]:
    """The object files of the build archive ``archive``, extracted into ``work``, sorted.

    Raises:
        StoreError: a member is not a regular file named like an object file, or not an ELF relocatable object
            (e.g. a linker script, which the linker would obey): the archive is not what the build wrote.
    """
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                if not (member.isfile() and _OBJECT_NAME.fullmatch(member.name)):
                    raise StoreError(_not_the_build(archive, f"holds {clip(member.name, 60)!r}, which is not an object file"))
            tar.extractall(work, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise StoreError(_not_the_build(archive, f"cannot be read ({clip(exc, 120)})")) from exc
    objects = [work / member.name for member in members]
    for path in objects:
        if not _is_relocatable_object(path):
            raise StoreError(_not_the_build(archive, f"holds {path.name}, which is not an ELF object file"))
    if not objects:
        raise StoreError(_not_the_build(archive, "holds no object file"))
    return sorted(str(path) for path in objects)


def link(compiler: str, output: Path, objects: list[str], triple: str, timeout: float = LINK_TIMEOUT_S) -> None:
    """``compiler -shared -fPIC -o output objects`` (what TVM's ``create_shared`` runs), in a process group of its
    own, ended (with the linker it ran) after ``timeout`` seconds.

    Raises:
        ExportError: the link failed (one line: the linker's first error) or did not finish in time.
    """
    argv = [compiler, "-shared", "-fPIC", "-o", str(output), *objects]
    what = f"linking the library for {clip(triple, 80)} with {clip(compiler, 80)}"
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as exc:
        raise ExportError(f"{what} failed: cannot run it ({exc.strerror or exc})") from exc
    started = psutil.Process(proc.pid).create_time()  # our child: readable until we reap it
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:  # the timeout, or an interrupt: the linker's whole tree goes
        stop_process_tree(proc.pid, started, grace=1.0, popen=proc)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise ExportError(f"{what} did not finish within {timeout:.0f} s: it was stopped") from None
        raise
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        log.debug("%s failed (exit %d):\n%s", what, proc.returncode, text[-20_000:])
        raise ExportError(f"{what} failed: {clip(_first_error(text) or f'exit code {proc.returncode}', 300)}")


def _first_error(output: str) -> str:
    """The line of a compiler driver's output that says what went wrong: its first error, else its first line that
    is neither context (``ld: x.o: in function `f':``), a warning nor collect2's summary."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    useful = [line for line in lines
              if not line.startswith("collect2:") and not line.endswith(":") and "warning:" not in line]
    errors = [line for line in useful if "error" in line.lower()]
    return (errors or useful or lines or [""])[0]


def _is_relocatable_object(path: Path) -> bool:
    """Whether ``path`` is an ELF relocatable object file (``ET_REL``), by its header."""
    with open(path, "rb") as f:
        header = f.read(18)
    if len(header) < 18 or header[:4] != b"\x7fELF" or header[5] not in (1, 2):
        return False
    return int.from_bytes(header[16:18], "little" if header[5] == 1 else "big") == _ET_REL


def _not_the_build(archive: Path, what: str) -> str:
    return (f"the build archive {archive} {what}: it is not what the build stage wrote, so nothing of it is linked. "
            "Run again with --refresh to rebuild it")


export_library_task = task(name="export-library", task_run_name="export-library", retries=0)(export_library)
