"""Everything a store's root holds, and each artifact kind's files: declared here once.

    <root>/<key[:2]>/<key[2:]>/      an artifact: its files (below) and manifest.json
    <root>/.runs/<run id>.json       the run ledger (pipeline.store.ledger)
    <root>/.tuning/<family>.json     the tuning index: the tunings of a family by trial count (pipeline.tuning.family)
    <root>/.keys/device-cache.key    this client's secret that authenticates libraries kept on devices
    <root>/.device/                  the libraries the embedded device keeps between runs (pipeline.device.cache)
    <root>/.locks/<key>.lock         one flock per key being produced
    <root>/.tmp/                     artifacts being written (renamed into place when complete)
    <root>/.trash/                   artifacts being removed (renamed here first, then deleted)

Nothing else reads or writes a path under a store's root: modules ask the store's :class:`StoreLayout` (or the
store's own methods) for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ArtifactKind:
    """What a kind of artifact holds: its manifest ``kind`` and the names of its files."""

    name: str
    files: tuple[str, ...]


# The files of each kind of artifact.
MODULE_FILE = "module.json"
"""The imported Relax module (``tvm.ir.save_json``)."""
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
TUNING_DATABASE_FILES = (WORKLOAD_FILE, RECORD_FILE)
"""MetaSchedule's JSON database of a tuning."""
TUNING_REPORT_FILE = "tuning.json"
"""What a tuning did (trials, estimate, history): :class:`pipeline.tuning.result.TuningReport`."""
TUNING_LOG_FILE = "tuning.log"
"""MetaSchedule's own log of a tuning."""
OBJECTS_FILE = "build.tar"
"""The compiled object files of a build, in a plain tar (linked by the export stage)."""
LIBRARY_FILE = "model.so"
"""The linked library a device loads."""
REFERENCE_FILE = "reference.npy"
"""The model's own framework's output on the run's input (``np.save``, never pickled)."""

RELAX_IR = ArtifactKind("relax-ir", (MODULE_FILE,))
TUNING = ArtifactKind("tuning", (*TUNING_DATABASE_FILES, TUNING_REPORT_FILE, TUNING_LOG_FILE))
BUILD = ArtifactKind("build", (OBJECTS_FILE,))
LIBRARY = ArtifactKind("library", (LIBRARY_FILE,))
REFERENCE = ArtifactKind("reference", (REFERENCE_FILE,))
KINDS = {kind.name: kind for kind in (RELAX_IR, TUNING, BUILD, LIBRARY, REFERENCE)}


@dataclass(frozen=True)
class StoreLayout:
    """The paths of a store's root (see the module docstring)."""

    root: Path

    def artifact(self, key: str) -> Path:
        """The directory of the artifact ``key`` (a checked 64-hex key)."""
        return self.root / key[:2] / key[2:]

    @property
    def ledger(self) -> Path:
        return self.root / ".runs"

    @property
    def tuning_index(self) -> Path:
        return self.root / ".tuning"

    @property
    def keys(self) -> Path:
        return self.root / ".keys"

    @property
    def device_cache_key(self) -> Path:
        return self.keys / "device-cache.key"

    @property
    def device_cache(self) -> Path:
        """The embedded device's directory of kept libraries."""
        return self.root / ".device"

    @property
    def locks(self) -> Path:
        return self.root / ".locks"

    @property
    def tmp(self) -> Path:
        return self.root / ".tmp"

    @property
    def trash(self) -> Path:
        return self.root / ".trash"
