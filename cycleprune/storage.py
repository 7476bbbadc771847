"""Writing outputs so that a reader never sees half of one.

Every stage writes through these helpers: a file appears under its final name only once it is
complete (write to a temporary sibling, flush, ``os.replace``), and a folder output is built in a
temporary sibling folder and renamed into place as a whole (on Linux swapped with the previous
output in one atomic step, so the name is never missing). A crash leaves at most a ``.tmp-*``
sibling, which readers ignore and the next writer of the same name removes once it is older than
:data:`STALE_SECONDS` (a younger one may belong to a writer still at work). A folder output
replaces an existing folder only if that folder is empty or holds the file every output of its
kind has (``replaces``), so a mistyped ``--out`` never deletes somebody else's files.

The second half is one interface for local paths and ``gs://bucket/prefix`` URIs (read, write,
list, copy, publish a prefix with a manifest written last, compare-and-swap one object); see the
comment that opens it. google-cloud-storage is imported only when a ``gs://`` URI is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
# A temporary sibling older than this is a crashed writer's leftover (no write takes this long).
STALE_SECONDS = 6 * 3600


def local_path(path: str | os.PathLike) -> Path:
    """``path`` as a local Path; a ``gs://`` URI (or one that ``Path`` folded to ``gs:/``) is an
    error, not a local folder named ``gs:`` that vanishes with the pod."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith("gs:/"):
        raise ValueError(
            f"{text} is a gs:// URI, but this is read from or written to a local folder: give a "
            f"local path (on a cluster, KFP maps artifacts to /gcs/...)"
        )
    return Path(path)


def _remove_stale(parent: Path, name: str) -> None:
    """Remove crashed writers' temporary siblings of ``name`` (see :data:`STALE_SECONDS`)."""
    pattern = re.compile(rf"{re.escape(TMP_PREFIX + name)}\.(?:[A-Za-z0-9_]{{8}}|old-\d+)")
    cutoff = time.time() - STALE_SECONDS
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not pattern.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for binary writing; rename it to ``path`` on success.

    The file is flushed and fsynced before the rename; on an exception it is removed and
    ``path`` is left as it was. Readers see the old file or the whole new one, never a part.
    """
    path = local_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file owner-only; give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling + fsync + rename)."""
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def _umask() -> int:
    # Read it where the kernel shows it: setting the umask to read it would briefly apply 0 to
    # files that other threads (TensorFlow's writers) create meanwhile.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as pretty, key-sorted JSON, atomically."""
    return atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def to_json_value(obj: Any) -> Any:
    """``obj`` as plain JSON values, as it would be read back (numpy values, Paths converted)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays, Paths: the usual suspects in metrics.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def check_output_dir(
    path: str | os.PathLike, *, overwrite: bool = True, replaces: str | None = None
) -> Path:
    """Raise unless :func:`atomic_dir` may write ``path`` (same arguments); return it as a Path.

    Stages call it before their work too, so that a refused folder costs no compute.
    """
    path = local_path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Output folder {path} is a file")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"Output folder already exists and is not empty: {path}")
        if replaces is None or not (path / replaces).exists():
            what = f"no {replaces} of a previous output" if replaces else "files of its own"
            raise FileExistsError(
                f"Output folder {path} is not empty and holds {what}; refusing to replace it "
                f"(choose a new or empty folder, or remove it yourself)"
            )
    return path


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, *, overwrite: bool = True, replaces: str | None = None
) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``path`` only if the block succeeds.

    Yields the temporary folder to write into. On an exception it is removed and ``path`` is left
    as it was. ``path`` may exist as an empty folder (KFP creates artifact folders before the
    component runs). A non-empty ``path`` is replaced only with ``overwrite`` and only if it holds
    ``replaces``, the file (or folder) every output of this kind has (a previous run's output):
    any other folder is an error (:func:`check_output_dir`), raised before the block runs, and
    nothing in it is touched.
    """
    path = check_output_dir(path, overwrite=overwrite, replaces=replaces)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists() and _exchange(tmp, path):
        # One atomic step: ``path`` holds the new output and ``tmp`` the old one.
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if path.exists():  # no atomic swap here: a crash between the renames leaves ``old``
        old = path.with_name(f"{TMP_PREFIX}{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the system or file system cannot (not Linux, an
    old glibc, a file system without it): the caller then falls back to two renames.
    """
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                function = ctypes.CDLL(None, use_errno=True).renameat2
                function.argtypes = [
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_uint,
                ]
                function.restype = ctypes.c_int
                _renameat2 = function
    if not _renameat2:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    # Any failure (a file system without the swap, gcsfuse, a seccomp profile) changed nothing:
    # the two renames then run, and report a real error themselves.
    return result == 0


_renameat2: Any = None  # resolved on first use: the libc function, or False where absent


def tree_size(path: str | os.PathLike) -> int:
    """Bytes in a file, or in all files under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# URIs: one interface for local paths and ``gs://bucket/prefix``
#
# A *URI* is a local path or ``gs://bucket/name``. Objects are read and written whole; a
# *prefix* (a folder, on GCS a name prefix) is written file by file, then its manifest
# ``_MANIFEST.json`` (every file's size, md5 and crc32c) last: a prefix without a manifest is
# incomplete, and readers refuse it. Downloads are checked against the object's crc32c (and
# files of a prefix against its manifest), so corrupted bytes are an error, never data.
#
# GCS credentials come from the environment: Application Default Credentials (Workload
# Identity on GKE, ``gcloud auth application-default login`` on a laptop). With
# ``STORAGE_EMULATOR_HOST`` set, the client talks to that emulator, anonymously.

GCS_SCHEME = "gs://"
MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = "cycleprune-prefix/1"
# Uploads larger than this go as resumable uploads in CHUNK_SIZE pieces (each piece retried on
# its own); smaller ones in one request. CHUNK_SIZE must be a multiple of 256 KiB.
RESUMABLE_THRESHOLD = 8 * 1024 * 1024
CHUNK_SIZE = 8 * 1024 * 1024
_ABSENT = "0"  # the CAS token of an object that does not exist (GCS: if_generation_match=0)
_COPY_BUFFER = 1 << 20


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The bucket, object, file or folder does not exist."""


class StoragePermissionError(StorageError, PermissionError):
    """The credentials may not read or write the URI."""


class ChecksumError(StorageError):
    """Downloaded bytes do not match the stored checksum or the prefix's manifest."""


class IncompletePrefixError(StorageError):
    """A prefix has no manifest: it was never finished (or is being written right now)."""


class ConcurrentUpdateError(StorageError):
    """A compare-and-swap lost: the object changed since it was read."""


def is_gcs(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a ``gs://`` URI (anything else is a local path)."""
    return isinstance(uri, str) and uri.startswith(GCS_SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``.

    Raises:
        ValueError: not a ``gs://`` URI, or no bucket name.
    """
    if not is_gcs(uri):
        raise ValueError(f"Argument `uri` must start with gs://. Received: uri={uri!r}")
    bucket, _, name = uri[len(GCS_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"Argument `uri` must name a bucket (gs://BUCKET/...). Received: {uri!r}")
    return bucket, name


def join_uri(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts with ``/`` onto a URI or a local path."""
    if is_gcs(base):
        out = str(base).rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out
    return os.fspath(Path(base).joinpath(*parts))


def _gcs_client() -> Any:
    """One client per process and emulator setting; credentials from the environment."""
    from google.cloud import storage as gcs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    key = (os.getpid(), emulator)
    client = _CLIENTS.get(key)
    if client is None:
        if emulator:
            from google.auth.credentials import AnonymousCredentials

            project = os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator")
            client = gcs.Client(project=project, credentials=AnonymousCredentials())
        else:
            client = gcs.Client()
        _CLIENTS[key] = client
    return client


_CLIENTS: dict[tuple[int, str], Any] = {}


def _not_found(uri: str) -> ObjectNotFoundError:
    bucket, _ = split_gcs(uri)
    try:
        missing_bucket = not _gcs_client().bucket(bucket).exists()
    except Exception:  # the original 404 is the error to report, whatever this says
        missing_bucket = False
    if missing_bucket:
        return ObjectNotFoundError(
            f"{uri}: bucket {bucket!r} does not exist (or these credentials cannot see it)"
        )
    return ObjectNotFoundError(f"No such object: {uri}")


@contextlib.contextmanager
def _gcs_errors(uri: str, action: str) -> Iterator[None]:
    """Translate google-cloud errors (after the client's own retries) into StorageErrors."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth
    from google.cloud.storage.exceptions import DataCorruption

    try:
        yield
    except StorageError:
        raise
    except api.NotFound as err:
        raise _not_found(uri) from err
    except (api.Forbidden, api.Unauthorized) as err:
        raise StoragePermissionError(
            f"Permission denied to {action} {uri}: {getattr(err, 'message', err)}. Credentials "
            "come from the environment (Application Default Credentials, Workload Identity "
            "on GKE): grant the service account access to the bucket."
        ) from err
    except api.PreconditionFailed as err:
        raise ConcurrentUpdateError(f"{uri} changed while it was being updated: {err}") from err
    except DataCorruption as err:
        raise ChecksumError(f"Checksum mismatch downloading {uri}: {err}") from err
    except auth.DefaultCredentialsError as err:
        raise StorageError(
            f"Cannot {action} {uri}: no Google Cloud credentials in the environment ({err}). "
            "Use Application Default Credentials (Workload Identity on GKE, or `gcloud auth "
            "application-default login`), or STORAGE_EMULATOR_HOST for an emulator."
        ) from err
    except (api.GoogleAPIError, auth.GoogleAuthError, OSError, ValueError) as err:
        raise StorageError(f"Cannot {action} {uri}: {err}") from err
    except Exception as err:  # requests/urllib3 transport errors once retries are spent
        if type(err).__module__.split(".")[0] in ("requests", "urllib3", "google"):
            raise StorageError(f"Cannot {action} {uri}: {err}") from err
        raise


@contextlib.contextmanager
def _local_errors(path: str | os.PathLike, action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as err:
        raise ObjectNotFoundError(f"No such file or folder: {path}") from err
    except PermissionError as err:
        raise StoragePermissionError(f"Permission denied to {action} {path}: {err}") from err
    except OSError as err:
        raise StorageError(f"Cannot {action} {path}: {err}") from err


def _blob(uri: str) -> Any:
    bucket, name = split_gcs(uri)
    if not name or name.endswith("/"):
        raise ValueError(f"Argument `uri` must name an object, not a prefix. Received: {uri!r}")
    return _gcs_client().bucket(bucket).blob(name)


def _b64(digest: bytes) -> str:
    import base64

    return base64.b64encode(digest).decode("ascii")


class _Hasher:
    """md5 and crc32c (base64, as GCS reports them) of a byte stream."""

    def __init__(self) -> None:
        import hashlib

        import google_crc32c

        self._md5 = hashlib.md5(usedforsecurity=False)
        self._crc = google_crc32c.Checksum()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._md5.update(chunk)
        self._crc.update(chunk)
        self.size += len(chunk)

    @property
    def md5(self) -> str:
        return _b64(self._md5.digest())

    @property
    def crc32c(self) -> str:
        return _b64(self._crc.digest())


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through."""

    def __init__(self, handle: Any, hasher: _Hasher) -> None:
        self._handle, self._hasher = handle, hasher

    def write(self, chunk: bytes) -> int:
        self._hasher.update(chunk)
        return self._handle.write(chunk)

    def flush(self) -> None:
        self._handle.flush()


def file_checksums(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "md5", "crc32c"}`` of a local file (digests base64, as GCS reports them)."""
    hasher = _Hasher()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_COPY_BUFFER), b""):
            hasher.update(chunk)
    return {"size": hasher.size, "md5": hasher.md5, "crc32c": hasher.crc32c}


def _download_blob(
    blob: Any, uri: str, handle: Any, max_bytes: int | None, generation: int | None = None
) -> _Hasher:
    """Stream an object (of ``generation``, if given) into ``handle``; its crc32c must match
    the stored one."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    hasher = _Hasher()
    with _gcs_errors(uri, "read"):
        if max_bytes is not None:
            blob.reload(retry=DEFAULT_RETRY)
            if blob.size is not None and blob.size > max_bytes:
                raise StorageError(f"{uri} has {blob.size} bytes, more than the limit {max_bytes}")
        # The client checks the crc32c of the response against its X-Goog-Hash header...
        blob.download_to_file(
            _HashingWriter(handle, hasher),
            checksum="crc32c",
            if_generation_match=generation,
            retry=DEFAULT_RETRY,
        )
        expected = blob.crc32c
        if expected is None:  # ...when there is one: otherwise ask for the stored value.
            blob.reload(retry=DEFAULT_RETRY)
            expected = blob.crc32c
    if expected is None:
        raise ChecksumError(f"{uri} has no stored crc32c: cannot verify the download")
    if expected != hasher.crc32c:
        raise ChecksumError(
            f"Checksum mismatch downloading {uri}: stored crc32c {expected}, received "
            f"{hasher.crc32c} ({hasher.size} bytes)"
        )
    return hasher


def read_bytes(uri: str | os.PathLike, *, max_bytes: int | None = None) -> bytes:
    """The whole content of a file or object (GCS: crc32c-verified).

    Args:
        uri: A local path or ``gs://bucket/name``.
        max_bytes: Refuse larger objects (checked before downloading).

    Returns:
        The bytes.

    Raises:
        ObjectNotFoundError: no such file, object or bucket.
        StoragePermissionError: the credentials may not read it.
        ChecksumError: the downloaded bytes do not match the stored crc32c.
        StorageError: any other failure once retries are spent.
    """
    if not is_gcs(uri):
        with _local_errors(uri, "read"):
            path = Path(uri)
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise StorageError(f"{path} has {size} bytes, more than the limit {max_bytes}")
            return path.read_bytes()
    import io

    buffer = io.BytesIO()
    _download_blob(_blob(str(uri)), str(uri), buffer, max_bytes)
    return buffer.getvalue()


def open_uri(uri: str | os.PathLike) -> Any:
    """A binary, seekable file object to read ``uri`` from (close it, or use ``with``).

    A GCS object is downloaded (verified) into a temporary file that spills to disk past
    8 MiB, so memory stays small whatever the object's size.

    Raises:
        ObjectNotFoundError, StoragePermissionError, ChecksumError, StorageError: as
            :func:`read_bytes`.
    """
    if not is_gcs(uri):
        with _local_errors(uri, "read"):
            return open(uri, "rb")
    handle = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # noqa: SIM115
    try:
        _download_blob(_blob(str(uri)), str(uri), handle, None)
    except BaseException:
        handle.close()
        raise
    handle.seek(0)
    return handle


def download_file(uri: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy ``uri`` to the local file ``path``, atomically (GCS: streamed, crc32c-verified).

    Raises:
        ObjectNotFoundError, StoragePermissionError, ChecksumError, StorageError: as
            :func:`read_bytes`; nothing is left at ``path`` on failure.
    """
    path = Path(path)
    with atomic_file(path) as handle:
        if is_gcs(uri):
            _download_blob(_blob(str(uri)), str(uri), handle, None)
        else:
            with _local_errors(uri, "read"), open(uri, "rb") as source:
                shutil.copyfileobj(source, handle, _COPY_BUFFER)
    return path


def _upload(uri: str, handle: Any, size: int, *, if_generation_match: int | None) -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY, DEFAULT_RETRY_IF_GENERATION_SPECIFIED

    blob = _blob(uri)
    if size > RESUMABLE_THRESHOLD:
        blob.chunk_size = CHUNK_SIZE  # a resumable upload, piece by piece
    # Transient errors (429, 5xx, timeouts) are retried with the client's policy. A whole-object
    # write of content we own is safe to repeat; a conditional one (write-once with
    # if_generation_match=0, or compare-and-swap) is safe because of its precondition.
    retry = (
        DEFAULT_RETRY_IF_GENERATION_SPECIFIED if if_generation_match is not None else DEFAULT_RETRY
    )
    blob.upload_from_file(
        handle,
        size=size,
        checksum="crc32c",
        if_generation_match=if_generation_match,
        retry=retry,
    )
    return blob


def _stored_crc32c(uri: str) -> str | None:
    from google.cloud.storage.retry import DEFAULT_RETRY

    blob = _blob(uri)
    with _gcs_errors(uri, "read"):
        blob.reload(retry=DEFAULT_RETRY)
    return blob.crc32c


def upload_file(
    path: str | os.PathLike, uri: str | os.PathLike, *, create_only: bool = False
) -> dict[str, Any]:
    """Copy the local file ``path`` to ``uri`` (GCS: crc32c sent and checked by the server;
    resumable in chunks past :data:`RESUMABLE_THRESHOLD`; local: atomic).

    Args:
        path: Local file.
        uri: Destination.
        create_only: The destination must not exist yet (GCS: ``if_generation_match=0``,
            which also makes the upload safe to retry). An existing object with the same
            crc32c counts as done (a retried upload whose first try landed).

    Returns:
        ``{"size", "md5", "crc32c"}`` of the file.

    Raises:
        StorageError (and subclasses): the upload failed; ``ConcurrentUpdateError`` when
            ``create_only`` and a different object is already there.
    """
    sums = file_checksums(path)
    if not is_gcs(uri):
        target = Path(uri)
        with _local_errors(uri, "write"):
            if create_only and target.exists():
                if file_checksums(target)["crc32c"] == sums["crc32c"]:
                    return sums
                raise ConcurrentUpdateError(f"{target} already exists with other content")
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target) as out, open(path, "rb") as source:
                shutil.copyfileobj(source, out, _COPY_BUFFER)
        return sums
    uri = str(uri)
    try:
        with _gcs_errors(uri, "write"), open(path, "rb") as handle:
            _upload(uri, handle, sums["size"], if_generation_match=0 if create_only else None)
    except ConcurrentUpdateError:
        if _stored_crc32c(uri) != sums["crc32c"]:
            raise ConcurrentUpdateError(f"{uri} already exists with other content") from None
    return sums


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``uri`` as a whole (local: atomic rename; GCS: one object, crc32c
    checked by the server).

    Raises:
        StorageError (and subclasses): the write failed.
    """
    if not is_gcs(uri):
        with _local_errors(uri, "write"):
            atomic_write_bytes(uri, data)
        return
    import io

    with _gcs_errors(str(uri), "write"):
        _upload(str(uri), io.BytesIO(data), len(data), if_generation_match=None)


def exists(uri: str | os.PathLike) -> bool:
    """Whether a file or object exists at ``uri`` (False for a missing bucket).

    Raises:
        StoragePermissionError, StorageError: the check itself failed.
    """
    if not is_gcs(uri):
        return Path(uri).is_file()
    from google.cloud.storage.retry import DEFAULT_RETRY

    bucket, name = split_gcs(str(uri))
    if not name:
        return False
    try:
        with _gcs_errors(str(uri), "read"):
            return bool(_gcs_client().bucket(bucket).blob(name).exists(retry=DEFAULT_RETRY))
    except ObjectNotFoundError:
        return False


def remove(uri: str | os.PathLike) -> None:
    """Delete one file or object; a missing one is fine.

    Raises:
        StoragePermissionError, StorageError: the delete failed.
    """
    if not is_gcs(uri):
        with _local_errors(uri, "delete"), contextlib.suppress(FileNotFoundError):
            os.unlink(uri)
        return
    from google.cloud.storage.retry import DEFAULT_RETRY

    try:
        with _gcs_errors(str(uri), "delete"):
            _blob(str(uri)).delete(retry=DEFAULT_RETRY)
    except ObjectNotFoundError:
        pass


def list_uri(uri: str | os.PathLike, *, recursive: bool = True) -> list[str]:
    """Names under a folder or prefix, relative to it, ``/``-separated, sorted.

    Args:
        uri: A local folder or ``gs://bucket/prefix`` (a trailing ``/`` is implied).
        recursive: Every file below (``a/b/c.png``); otherwise the direct children only,
            sub-folders with a trailing ``/`` (``a/``).

    Returns:
        The names; ``[]`` for a GCS prefix with no objects.

    Raises:
        ObjectNotFoundError: a missing local folder or GCS bucket.
        StoragePermissionError, StorageError: the listing failed.
    """
    if not is_gcs(uri):
        root = Path(uri)
        with _local_errors(uri, "list"):
            if not root.is_dir():
                raise ObjectNotFoundError(f"No such folder: {root}")
            if recursive:
                return sorted(
                    p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                )
            return sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    from google.cloud.storage.retry import DEFAULT_RETRY

    bucket, prefix = split_gcs(str(uri))
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    names: list[str] = []
    with _gcs_errors(str(uri), "list"):
        blobs = _gcs_client().list_blobs(
            bucket, prefix=prefix, delimiter=None if recursive else "/", retry=DEFAULT_RETRY
        )
        for page in blobs.pages:
            names += [b.name[len(prefix) :] for b in page]
            if not recursive:
                names += [p[len(prefix) :] for p in page.prefixes]
    return sorted(n for n in names if n and n != "/")


def _walk_files(local_dir: Path) -> list[str]:
    return sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy every file under ``src`` to the same relative name under ``dst`` (local or GCS,
    either way round). A plain copy: see :func:`write_prefix` for one readers can trust.

    Returns:
        The relative names copied.

    Raises:
        ObjectNotFoundError: ``src`` does not exist.
        StorageError (and subclasses): a copy failed.
    """
    names = list_uri(src)
    for name in names:
        source, target = join_uri(src, name), join_uri(dst, name)
        if is_gcs(source) and is_gcs(target):
            with tempfile.TemporaryDirectory() as tmp:
                local = download_file(source, Path(tmp) / "object")
                upload_file(local, target)
        elif is_gcs(source):
            download_file(source, target)
        else:
            upload_file(source, target)
    return names


def _safe_relative(name: Any, where: str) -> str:
    """A manifest's file name must stay inside its prefix."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        raise StorageError(f"{where}: invalid file name {name!r} in {MANIFEST}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise StorageError(f"{where}: invalid file name {name!r} in {MANIFEST}")
    return name


def write_prefix(
    local_dir: str | os.PathLike,
    uri: str | os.PathLike,
    *,
    metadata: Any = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """Publish a local folder at ``uri`` so that readers see all of it or none of it.

    Every file is written first; the manifest ``_MANIFEST.json`` (format, creation time,
    ``metadata``, and each file's ``path``, ``size``, ``md5``, ``crc32c``) goes last. Readers
    (:func:`read_prefix`, :func:`is_complete`) accept only prefixes with a manifest, so an
    upload killed half-way is never taken for a finished one. An existing manifest at ``uri``
    is deleted before the first file is written. A local ``uri`` is built in a temporary
    sibling and renamed into place (see :func:`atomic_dir`).

    Args:
        local_dir: The folder to publish.
        uri: Local folder or ``gs://bucket/prefix``.
        metadata: JSON-able data to record in the manifest.
        reuse: GCS only: if ``uri`` is complete now, do not upload again the files its manifest
            lists with the same size, md5 and crc32c (they are still checked on every read).

    Returns:
        The manifest.

    Raises:
        ObjectNotFoundError: ``local_dir`` does not exist.
        StorageError (and subclasses): a write failed; the prefix stays incomplete.
    """
    import datetime

    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ObjectNotFoundError(f"No such folder: {local_dir}")
    names = [n for n in _walk_files(local_dir) if n != MANIFEST]
    entries = [{"path": n, **file_checksums(local_dir / n)} for n in names]
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": entries,
        "total_bytes": sum(e["size"] for e in entries),
        "metadata": metadata,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if not is_gcs(uri):
        with _local_errors(uri, "write"), atomic_dir(uri, replaces=MANIFEST) as tmp:
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local_dir / name, tmp / name)
            atomic_write_text(tmp / MANIFEST, text)
        return manifest
    stored: dict[str, Any] = {}
    if reuse:
        with contextlib.suppress(IncompletePrefixError, ObjectNotFoundError, StorageError):
            stored = {e["path"]: e for e in read_manifest(uri)["files"]}
    remove(join_uri(uri, MANIFEST))  # from here until the end, the prefix is incomplete
    for entry in entries:
        if stored.get(entry["path"]) == entry:
            continue
        upload_file(local_dir / entry["path"], join_uri(uri, entry["path"]))
    write_bytes(join_uri(uri, MANIFEST), text.encode("utf-8"))
    return manifest


def read_manifest(uri: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete prefix.

    Raises:
        IncompletePrefixError: no manifest (never finished, or being written).
        StorageError: an unreadable or malformed manifest.
    """
    where = join_uri(uri, MANIFEST)
    try:
        raw = read_bytes(where)
    except ObjectNotFoundError:
        raise IncompletePrefixError(
            f"{uri} is incomplete: it has no {MANIFEST} (an unfinished or interrupted write)"
        ) from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        for entry in files:
            _safe_relative(entry["path"], str(uri))
            int(entry["size"]), str(entry["md5"]), str(entry["crc32c"])
    except (ValueError, KeyError, TypeError) as err:
        raise StorageError(f"{where} is malformed: {err}") from None
    return manifest


def is_complete(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a finished prefix (its manifest exists and is readable)."""
    try:
        read_manifest(uri)
    except (IncompletePrefixError, ObjectNotFoundError):
        return False
    return True


def read_prefix(
    uri: str | os.PathLike,
    local_dir: str | os.PathLike,
    *,
    files: Any = None,
) -> dict[str, Any]:
    """Download a complete prefix into ``local_dir``, checking every file against the manifest.

    Args:
        uri: A prefix written by :func:`write_prefix`.
        local_dir: Destination folder, replaced as a whole (nothing is left on failure).
        files: Only these relative names, or names below these folder names (default: all).

    Returns:
        The manifest.

    Raises:
        IncompletePrefixError: ``uri`` has no manifest.
        ChecksumError: a file's size, md5 or crc32c differs from the manifest.
        ObjectNotFoundError: a listed file is missing.
        StorageError: any other failure.
    """
    manifest = read_manifest(uri)
    entries = manifest["files"]
    if files is not None:
        wanted = [str(f).strip("/") for f in files]
        entries = [
            e
            for e in entries
            if any(e["path"] == w or e["path"].startswith(w + "/") for w in wanted)
        ]
        found = {
            w for w in wanted for e in entries if e["path"] == w or e["path"].startswith(w + "/")
        }
        if set(wanted) - found:
            raise ObjectNotFoundError(
                f"{uri} has no {', '.join(sorted(set(wanted) - found))} (per its {MANIFEST})"
            )
    with atomic_dir(local_dir, replaces=MANIFEST) as tmp:
        for entry in entries:
            source = join_uri(uri, entry["path"])
            target = download_file(source, tmp / entry["path"])
            got = file_checksums(target)
            for key in ("size", "md5", "crc32c"):
                if got[key] != entry[key]:
                    raise ChecksumError(
                        f"Checksum mismatch: {source} has {key} {got[key]}, its {MANIFEST} "
                        f"says {entry[key]} (corrupted, or changed after it was written)"
                    )
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ---- compare-and-swap of one small object (e.g. a production pointer)


def read_with_token(uri: str | os.PathLike) -> tuple[bytes | None, str]:
    """The content of ``uri`` (None when absent) and a token for :func:`compare_and_swap`.

    The token is the object's generation on GCS, and the content's sha256 for a local file;
    ``"0"`` when the object does not exist.

    Raises:
        StoragePermissionError, ChecksumError, StorageError: the read failed.
    """
    if not is_gcs(uri):
        try:
            data = read_bytes(uri)
        except ObjectNotFoundError:
            return None, _ABSENT
        return data, _sha256(data)
    import io

    from google.cloud.storage.retry import DEFAULT_RETRY

    # The generation first, then the content of exactly that generation (a 412 means it
    # changed in between: read again).
    for _ in range(5):
        blob = _blob(str(uri))
        try:
            with _gcs_errors(str(uri), "read"):
                blob.reload(retry=DEFAULT_RETRY)
            generation = blob.generation
            buffer = io.BytesIO()
            _download_blob(blob, str(uri), buffer, None, generation=generation)
        except ObjectNotFoundError:
            return None, _ABSENT
        except ConcurrentUpdateError:
            continue
        return buffer.getvalue(), str(generation)
    raise ConcurrentUpdateError(f"{uri} kept changing while it was being read")


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``path`` (between processes and
    threads alike: each call opens its own file description)."""
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def compare_and_swap(uri: str | os.PathLike, data: bytes, token: str) -> str:
    """Replace ``uri`` with ``data`` only if it is still what :func:`read_with_token` saw.

    GCS: an upload with ``if_generation_match=token`` (``0`` = must not exist); the server
    rejects it with 412 when another writer got there first. It is retried on transient
    errors (the precondition makes that safe); a 412 after a retry whose first try landed is
    recognised by the content. Local: under an exclusive lock file beside the target, the
    current content is re-read and compared, then replaced by an atomic rename.

    Args:
        uri: The object.
        data: The new content.
        token: From :func:`read_with_token`.

    Returns:
        The new token.

    Raises:
        ConcurrentUpdateError: the object changed since ``token`` was read.
        StorageError (and subclasses): the write failed.
    """
    if not is_gcs(uri):
        path = Path(uri)
        with _local_errors(uri, "update"), _file_lock(path):
            current = path.read_bytes() if path.exists() else None
            now = _ABSENT if current is None else _sha256(current)
            if now != token:
                raise ConcurrentUpdateError(f"{path} changed since it was read")
            atomic_write_bytes(path, data)
        return _sha256(data)
    import io

    uri = str(uri)
    try:
        with _gcs_errors(uri, "update"):
            blob = _upload(uri, io.BytesIO(data), len(data), if_generation_match=int(token))
        return str(blob.generation)
    except ConcurrentUpdateError:
        current, now = read_with_token(uri)
        if current == data:  # our own write, whose response was lost and then retried
            return now
        raise
