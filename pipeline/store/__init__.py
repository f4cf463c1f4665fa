"""The artifact store: content-addressed artifacts, their manifests, and everything else its root holds.

:mod:`~pipeline.store.layout` declares every entry of a store's root and each artifact kind's file names;
:mod:`~pipeline.store.artifacts` is the store itself (:class:`ArtifactStore`); :mod:`~pipeline.store.ledger`
the run ledger it keeps.
"""

from pipeline.store.artifacts import (
    ENV_VAR,
    MANIFEST,
    Artifact,
    ArtifactStore,
    FileEntry,
    check_key,
    default_root,
    file_digest,
)

__all__ = ["ENV_VAR", "MANIFEST", "Artifact", "ArtifactStore", "FileEntry", "check_key", "default_root", "file_digest"]
