"""Everything a store's root holds, and each artifact kind's files: declared here once.

    <root>/<key[:2]>/<key[2:]>/      an artifact: its files (below) and manifest.json          shared
    <root>/.runs/<run id>.json       the run ledger (pipeline.store.ledger)                       shared
    <root>/.tuning/<family>.json     the tuning index: the tunings of a family by trial count     shared
                                     (pipeline.tuning.family)
    <root>/.keys/device-cache.key    this client's secret that authenticates libraries kept on    local
                                     devices
    <root>/.device/                  the libraries the embedded device keeps between runs         local
                                     (pipeline.device.cache)
    <root>/.locks/<key>.lock         one flock per key being produced                             local
    <root>/.tmp/                     artifacts being written (renamed into place when complete)   local
    <root>/.trash/                   artifacts being removed (renamed here first, then deleted)   local

A store on a local (or network) file system is that root and nothing else. A store on S3-compatible object
storage (``s3://BUCKET/PREFIX``, :mod:`pipeline.store.s3`) keeps the *shared* entries in the bucket under the
prefix, and a root of the same layout on this machine (:func:`s3_cache_root`) that holds the *local* ones and a
read-through copy of the shared ones: stages read an artifact's files from there. In the bucket
(:class:`RemoteLayout`):

    PREFIX/<key[:2]>/<key[2:]>/manifest.json          an artifact's manifest, created last and only if absent
    PREFIX/<key[:2]>/<key[2:]>/blobs/<sha256>         its files, each named by its digest (the manifest names them)
    PREFIX/.runs/<run id>.json                        the run ledger
    PREFIX/.tuning/<family>.json                      the tuning index
    PREFIX/.leases/<key>.json                         a lease on a key being produced (created only if absent,
                                                      renewed by its holder, taken over once expired)

The store key and the device cache's secret never go to the bucket; neither do the locks, the temporary
directories or the embedded device's libraries.

Nothing else reads or writes a path under a store's root or a name in its bucket: modules ask the store's
:class:`StoreLayout` (or the store's own methods) for it.
"""

from __future__ import annotations

import hashlib
import os
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
TUNING_SOURCES_FILE = "tuning_sources.json"
"""Which tunings scheduled how many kernels of a build that shares the store's tuning records (only such a build
has it): :class:`pipeline.results.TuningSources`."""
KERNELS_FILE = "kernels.json"
"""What a CPU build's kernels compute: each one's FLOPs per call (``pipeline.profiling``); absent from GPU builds."""
LIBRARY_FILE = "model.so"
"""The linked library a device loads."""
REFERENCE_FILE = "reference.npy"
"""The model's own framework's output on the run's input (``np.save``, never pickled)."""

RELAX_IR = ArtifactKind("relax-ir", (MODULE_FILE,))
TUNING = ArtifactKind("tuning", (*TUNING_DATABASE_FILES, TUNING_REPORT_FILE, TUNING_LOG_FILE))
BUILD = ArtifactKind("build", (OBJECTS_FILE, TUNING_SOURCES_FILE, KERNELS_FILE))
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


SHARED_ENTRIES = (".runs", ".tuning")
"""The entries of a root besides its artifacts that a store on object storage keeps in the bucket."""
LOCAL_ENTRIES = (".keys", ".device", ".locks", ".tmp", ".trash")
"""The entries of a root that stay on this machine, whatever the store."""


@dataclass(frozen=True)
class RemoteLayout:
    """The object names of a store in a bucket, under its prefix (see the module docstring)."""

    prefix: str
    """``""`` or a prefix without leading or trailing ``/``."""

    def name(self, relative: str) -> str:
        """The object name of ``relative`` (a path under the store's root, ``/``-separated)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def relative(self, name: str) -> str:
        """The path under the store's root of the object ``name`` (inverse of :meth:`name`)."""
        return name[len(self.prefix) + 1:] if self.prefix else name

    def artifact(self, key: str) -> str:
        """The name prefix (ending in ``/``) of every object of the artifact ``key``."""
        return self.name(f"{key[:2]}/{key[2:]}/")

    def manifest(self, key: str) -> str:
        return self.artifact(key) + MANIFEST

    def blob(self, key: str, sha256: str) -> str:
        """The object holding the file of ``key`` whose SHA-256 is ``sha256``."""
        return self.artifact(key) + f"blobs/{sha256}"

    @property
    def ledger(self) -> str:
        return self.name(".runs/")

    def lease(self, key: str) -> str:
        return self.name(f".leases/{key}.json")

    @property
    def leases(self) -> str:
        return self.name(".leases/")


def s3_cache_root(url: str) -> Path:
    """This machine's root of the store at ``url`` (``s3://BUCKET/PREFIX``): its local entries and the
    read-through copy of its shared ones, ``$XDG_CACHE_HOME/tvmrp/s3/<id>`` (default ``~/.cache``), where
    ``<id>`` hashes the URL and the endpoint and profile of the environment (``AWS_ENDPOINT_URL_S3``,
    ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``), so two buckets of one name on two endpoints get two roots."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    where = "\n".join([url, os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "",
                       os.environ.get("AWS_PROFILE", "")])
    return (base / "tvmrp" / "s3" / hashlib.sha256(where.encode()).hexdigest()[:16]).resolve()
