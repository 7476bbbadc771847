"""A checkpoint folder that lives in a bucket: work in a local copy, publish it whole.

:func:`mirrored_dir` gives a stage a local folder for a ``checkpoint_dir`` that may be a
``gs://bucket/prefix`` URI. A local path is used as it is. For a URI, the newest complete
remote state is downloaded into a temporary folder, the stage works there, and
:meth:`MirroredDir.sync` (after every checkpoint, and once at exit) publishes the folder
with :func:`cycleprune.storage.write_prefix` (manifest written last).

Two slots, ``<uri>/slot-0`` and ``<uri>/slot-1``, take turns: a sync writes the slot that does
*not* hold the newest complete state, so a sync killed half-way (a preempted pod's grace period
running out) leaves that state untouched, and a restart resumes from it. Each manifest records a
``sequence`` number; the complete slot with the highest one is the newest. Files the target slot
already holds with the same checksums are not uploaded again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cycleprune import storage

logger = logging.getLogger(__name__)

SLOTS = ("slot-0", "slot-1")


class MirroredDir:
    """The local folder of a (possibly remote) checkpoint folder; see :func:`mirrored_dir`."""

    def __init__(self, uri: str | os.PathLike, path: Path) -> None:
        self.uri = uri
        self.path = path
        self.remote = storage.is_gcs(uri)
        self.sequence = 0
        self.slot: str | None = None  # the slot holding the newest complete state
        self._synced: tuple | None = None

    def restore(self) -> None:
        """Fill the (empty) local folder with the newest complete remote state, if any."""
        candidates = []
        for slot in SLOTS:
            uri = storage.join_uri(self.uri, slot)
            try:
                manifest = storage.read_manifest(uri)
            except (storage.IncompletePrefixError, storage.ObjectNotFoundError):
                continue
            sequence = (manifest.get("metadata") or {}).get("sequence", 0)
            candidates.append((int(sequence), slot, uri))
        for sequence, slot, uri in sorted(candidates, reverse=True):
            try:
                storage.read_prefix(uri, self.path)
            except (storage.ChecksumError, storage.ObjectNotFoundError) as err:
                logger.warning("Skipping an unreadable checkpoint state %s: %s", uri, err)
                continue
            (self.path / storage.MANIFEST).unlink(missing_ok=True)
            self.sequence, self.slot = sequence, slot
            self._synced = self._fingerprint()
            logger.info("Restored checkpoint state %s (sequence %d)", uri, sequence)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if candidates:
            logger.warning("No readable checkpoint state under %s: starting afresh", self.uri)

    def sync(self) -> None:
        """Publish the local folder (a no-op for a local path, or when nothing changed)."""
        if not self.remote:
            return
        fingerprint = self._fingerprint()
        if fingerprint == self._synced:
            return
        target = SLOTS[1] if self.slot == SLOTS[0] else SLOTS[0]
        uri = storage.join_uri(self.uri, target)
        manifest = storage.write_prefix(
            self.path, uri, metadata={"sequence": self.sequence + 1}, reuse=True
        )
        self.sequence, self.slot, self._synced = self.sequence + 1, target, fingerprint
        # Objects of earlier states that the new manifest does not list: no reader uses them.
        listed = {e["path"] for e in manifest["files"]} | {storage.MANIFEST}
        with contextlib.suppress(storage.StorageError):
            for name in storage.list_uri(uri):
                if name not in listed:
                    storage.remove(storage.join_uri(uri, name))

    def _fingerprint(self) -> tuple:
        return tuple(
            sorted(
                (p.relative_to(self.path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in self.path.rglob("*")
                if p.is_file()
            )
        )


@contextlib.contextmanager
def mirrored_dir(uri: str | os.PathLike) -> Iterator[MirroredDir]:
    """A local folder for the checkpoint folder ``uri``, published back when it is a GCS URI.

    A local path is yielded as it is (``sync`` does nothing). For ``gs://bucket/prefix``, a
    temporary folder is filled with the newest complete state under ``uri`` (empty when there
    is none), yielded, and published once more when the block ends, also on an exception (the
    checkpoints written so far are kept; a failure of that last publish is logged, and the
    block's own exception is raised). The temporary folder is then removed.

    Raises:
        cycleprune.storage.StorageError: reading or (at a normal exit) publishing failed.
    """
    if not storage.is_gcs(uri):
        yield MirroredDir(uri, Path(uri))
        return
    root = Path(tempfile.mkdtemp(prefix="cycleprune-ckpt-"))
    try:
        mirror = MirroredDir(str(uri).rstrip("/"), root / "checkpoints")
        mirror.restore()
        try:
            yield mirror
        except BaseException:
            try:
                mirror.sync()
            except Exception as err:  # keep the original error
                logger.error("Could not publish the checkpoints to %s: %s", uri, err)
            raise
        mirror.sync()
    finally:
        shutil.rmtree(root, ignore_errors=True)
