"""Where a packed dataset lives: a local directory or an object-storage prefix (``s3://bucket/prefix``).

Every reader of a packed dataset (manifest, DALI index files, `inspect`, `quarantine`, the
shard checks before training) goes through these functions; DALI's webdataset reader streams
the tars itself from the same ``s3://`` URLs (its bundled AWS SDK).

Local paths keep plain file-system semantics (pathlib). ``s3://`` URIs go through
``pyarrow.fs.S3FileSystem``: pyarrow is already installed with Ray (whose Train storage uses
the same class for ``run.storage_path: s3://...``), so data and checkpoints share one S3
client, one set of credentials and one endpoint, and the product gains no new dependency
(boto3 only comes with the test server). Credentials and endpoint come from the standard AWS
variables and profile, never from the config: ``AWS_ENDPOINT_URL`` (an S3-compatible server:
MinIO, Ceph RGW, GCS's S3 API), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (+
``AWS_SESSION_TOKEN``), ``AWS_REGION``, or ``AWS_PROFILE`` and the shared config files.

Transient errors (a server restarting, throttling, a dropped connection): every request is
retried with back-off a bounded number of times, then fails naming the object. The standard
``AWS_MAX_ATTEMPTS`` bounds both clients: this module's (default `S3_MAX_ATTEMPTS`) and the one
DALI's reader bundles (measured with DALI 2.4 against a closed port: 1 attempt failed after
0.8 s, 6 after 17.6 s; unset, the SDK's default failed after 2.1 s). A read that still fails
mid-epoch fails the training worker; a Ray job restarts from its last checkpoint
(``cluster.max_failures``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

S3_SCHEME = "s3://"
# Attempts per request (the first + retries) of the S3 client here (AWS's standard strategy:
# exponential back-off, retried on throttling, 5xx and connection errors).
S3_MAX_ATTEMPTS = 5  # unless AWS_MAX_ATTEMPTS says otherwise
# Read-ahead of a streamed tar (`open_tar`): large enough that a shard is a few GETs.
STREAM_BUFFER_BYTES = 8 << 20

# The standard variables that configure an S3 client (read by pyarrow, DALI's AWS SDK, boto3).
AWS_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
CREDENTIALS_HINT = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_ENDPOINT_URL and "
                    "AWS_REGION in this process's environment")


class StorageError(OSError, ValueError):
    """An object that cannot be looked up or read (access denied, wrong credentials, server
    unreachable after the retries): the message names the object. An OSError (an I/O
    failure) and a ValueError (a bad setting: the CLI reports it as a one-line error, as it
    does bad config values), like the standard library's ``io.UnsupportedOperation``."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations (object storage), False for local paths."""
    return "://" in str(path)


def check_supported(path: str | os.PathLike) -> None:
    """ValueError unless ``path`` is a local path or an ``s3://`` URI (what DALI's reader
    streams; GCS, MinIO and Ceph serve the same S3 API: set ``AWS_ENDPOINT_URL``)."""
    if is_uri(path) and not str(path).startswith(S3_SCHEME):
        raise ValueError(f"{path}: only local paths and s3://bucket/prefix URIs are supported for datasets (DALI "
                         f"streams s3:// only; for GCS, MinIO or Ceph use their S3 API through AWS_ENDPOINT_URL)")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base / parts`` as a string: a local path, or a URI (``s3://b/p`` + ``x.tar`` ->
    ``s3://b/p/x.tar``; pathlib would fold the ``//``)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def display(path: str | os.PathLike) -> str:
    """How a dataset location is shown: a URI as given, a local path made absolute."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def _s3_env_key() -> tuple:
    return tuple(os.environ.get(v) for v in AWS_ENV_VARS)


_FILESYSTEMS: dict[tuple, object] = {}


def s3_filesystem():
    """A ``pyarrow.fs.S3FileSystem`` from the standard AWS variables / profile (one per
    process and set of variables: a changed environment gets a new client)."""
    import pyarrow.fs as pafs

    key = _s3_env_key()
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        # pyarrow's S3FileSystem() does not read AWS_ENDPOINT_URL by itself (measured, pyarrow
        # 26: it went to amazonaws.com; FileSystem.from_uri does, but cannot set the retry
        # strategy): pass it on, and the region requests are signed for.
        kwargs = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_override"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        attempts = os.environ.get("AWS_MAX_ATTEMPTS") or str(S3_MAX_ATTEMPTS)
        if not attempts.isdigit() or int(attempts) < 1:
            raise ValueError(f"AWS_MAX_ATTEMPTS={attempts!r}: expected a whole number >= 1")
        attempts = int(attempts)
        fs = pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
        _FILESYSTEMS.clear()
        _FILESYSTEMS[key] = fs
    return fs


def _s3_path(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key`` (pyarrow's path form)."""
    check_supported(uri)
    return str(uri)[len(S3_SCHEME):].strip("/")


def _storage_error(uri: str, what: str, error: Exception) -> StorageError:
    text = str(error)
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Couldn't connect" in text:
        # no answer at all: credentials are not the question yet
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f"the server at AWS_ENDPOINT_URL={endpoint}" if endpoint else "the S3 endpoint"
        return StorageError(f"{uri}: cannot {what}: {text}; {where} does not answer: check that it is up and "
                            f"the URL (AWS_ENDPOINT_URL, AWS_REGION), then run the same command again")
    return StorageError(f"{uri}: cannot {what}: {text}; {CREDENTIALS_HINT}")


def object_size(path: str | os.PathLike) -> int | None:
    """Size in bytes of the file or object at ``path``; None when there is none (a HEAD
    request on S3). Raises `StorageError` when it cannot be asked (credentials, server)."""
    if not is_uri(path):
        p = Path(path)
        return p.stat().st_size if p.is_file() else None
    import pyarrow.fs as pafs

    try:
        info = s3_filesystem().get_file_info(_s3_path(str(path)))
    except OSError as e:
        raise _storage_error(str(path), "look up the object", e) from e
    return info.size if info.type == pafs.FileType.File else None


def bucket_exists(uri: str) -> bool:
    """Whether the bucket of the ``s3://`` ``uri`` exists (and these credentials may see it):
    a missing object and a missing bucket are both "not found" to a HEAD of the object."""
    import pyarrow.fs as pafs

    bucket = _s3_path(uri).split("/", 1)[0]
    try:
        return s3_filesystem().get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as e:
        raise _storage_error(f"{S3_SCHEME}{bucket}", "look up the bucket", e) from e


def exists(path: str | os.PathLike) -> bool:
    """True when a file / object exists at ``path``."""
    return object_size(path) is not None


def list_sizes(prefix: str | os.PathLike) -> dict[str, int]:
    """{location: size in bytes} of every file / object under ``prefix`` (recursive; one
    paginated LIST on S3, not a HEAD per object). Locations are written like ``join`` does."""
    if not is_uri(prefix):
        root = Path(prefix)
        return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}
    import pyarrow.fs as pafs

    try:
        infos = s3_filesystem().get_file_info(pafs.FileSelector(_s3_path(str(prefix)), recursive=True,
                                                                allow_not_found=True))
    except OSError as e:
        raise _storage_error(str(prefix), "list the objects under it", e) from e
    return {S3_SCHEME + i.path: i.size for i in infos if i.type == pafs.FileType.File}


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file / object. FileNotFoundError when there is none, `StorageError` when it
    cannot be read."""
    if not is_uri(path):
        return Path(path).read_bytes()
    fs = s3_filesystem()
    try:
        with fs.open_input_stream(_s3_path(str(path))) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such object") from None
    except OSError as e:
        if "NOT_FOUND" in str(e) or "NoSuchKey" in str(e):
            raise FileNotFoundError(f"{path}: no such object") from None
        raise _storage_error(str(path), "read the object", e) from e


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of the whole file / object, read in `STREAM_BUFFER_BYTES` pieces
    (a shard's identity: the manifest records it at pack time, `dataloading.pack.writer`).
    FileNotFoundError when there is none, `StorageError` when it cannot be read."""
    digest = hashlib.sha256()
    if not is_uri(path):
        with open(path, "rb") as f:
            while chunk := f.read(STREAM_BUFFER_BYTES):
                digest.update(chunk)
        return digest.hexdigest()
    fs = s3_filesystem()
    try:
        with fs.open_input_stream(_s3_path(str(path)), buffer_size=STREAM_BUFFER_BYTES) as f:
            while chunk := f.read(STREAM_BUFFER_BYTES):
                digest.update(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such object") from None
    except OSError as e:
        raise _storage_error(str(path), "read the object", e) from e
    return digest.hexdigest()


@contextlib.contextmanager
def open_tar(path: str | os.PathLike) -> Iterator[tarfile.TarFile]:
    """A shard opened for one pass over its members in order (``for m in tar:
    tar.extractfile(m).read()``): a local file as a seekable tar, an object streamed with
    read-ahead (tarfile's stream mode: members only in order, each while it is current)."""
    if not is_uri(path):
        with tarfile.open(path, "r:") as tar:
            yield tar
        return
    fs = s3_filesystem()
    try:
        stream = fs.open_input_stream(_s3_path(str(path)), buffer_size=STREAM_BUFFER_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such object") from None
    except OSError as e:
        raise _storage_error(str(path), "open the object", e) from e
    with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        yield tar


def check_objects(expected: dict[str, int | None], prefix: str | os.PathLike) -> None:
    """Fail before any work unless every location in ``expected`` ({location: size in bytes,
    or None for any size}) exists under ``prefix`` with that size: FileNotFoundError naming
    the missing ones, ValueError naming those of another size, `StorageError` (credentials,
    server) naming the prefix. One listing of ``prefix``."""
    have = list_sizes(prefix)
    missing = [p for p in expected if p not in have]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} object(s) listed in the manifest are missing: "
                                f"{', '.join(missing[:5])}{more}")
    wrong = [f"{p} ({have[p]} bytes, manifest lists {n})" for p, n in expected.items()
             if n is not None and have[p] != n]
    if wrong:
        raise ValueError(f"object(s) of another size than the manifest lists (a partial upload?): "
                         f"{', '.join(wrong[:5])}")


# --- writing (`tsn pack --out s3://...`) ---------------------------------------------------------

# Whole-object attempts of `upload_file` / `put_bytes`, on top of the client's own per-request
# retries (`S3_MAX_ATTEMPTS`): a multipart upload that failed part-way is started again.
UPLOAD_ATTEMPTS = 3
UPLOAD_RETRY_BASE_SECONDS = 1.0  # back-off between whole-object attempts: 1 s, 2 s, ...
UPLOAD_CHUNK_BYTES = 8 << 20


def _write_object(uri: str, chunks_factory, num_bytes: int, attempts: int) -> None:
    """Write the chunks of ``chunks_factory()`` to the object ``uri`` and check its size;
    retried ``attempts`` times, then `StorageError` naming the object."""
    import time

    fs = s3_filesystem()
    path = _s3_path(uri)
    last: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(UPLOAD_RETRY_BASE_SECONDS * 2 ** (attempt - 1))
        try:
            # The object appears only when the stream is closed (a completed multipart upload
            # or one PUT): a reader never sees a half-written object under its final key.
            with fs.open_output_stream(path) as out:
                for chunk in chunks_factory():
                    out.write(chunk)
            size = object_size(uri)
            if size == num_bytes:
                return
            last = OSError(f"object has {size} bytes after the upload, expected {num_bytes}")
        except OSError as e:
            last = e
    raise _storage_error(uri, f"upload the object ({attempts} attempts)", last)


def upload_file(local_path: str | os.PathLike, uri: str, attempts: int = UPLOAD_ATTEMPTS) -> int:
    """Copy the local file ``local_path`` to ``uri`` (an ``s3://`` object, or a local path:
    an atomic copy); returns its size in bytes. The upload is checked by the object's size and
    retried ``attempts`` times (`UPLOAD_ATTEMPTS`); then `StorageError` naming the object."""
    local_path = Path(local_path)
    num_bytes = local_path.stat().st_size
    if not is_uri(uri):
        from dataloading.store import files

        files.atomic_write_bytes(Path(uri), local_path.read_bytes())
        return num_bytes

    def chunks():
        with open(local_path, "rb") as f:
            while chunk := f.read(UPLOAD_CHUNK_BYTES):
                yield chunk

    _write_object(str(uri), chunks, num_bytes, attempts)
    return num_bytes


def put_bytes(uri: str | os.PathLike, data: bytes, attempts: int = UPLOAD_ATTEMPTS) -> None:
    """Write ``data`` as the whole object / file at ``uri`` (local files: atomically)."""
    if not is_uri(uri):
        from dataloading.store import files

        files.atomic_write_bytes(Path(uri), data)
        return
    _write_object(str(uri), lambda: [data], len(data), attempts)


def delete(uri: str | os.PathLike) -> None:
    """Delete the object / file at ``uri``; nothing to delete is fine. `StorageError` when
    it cannot be deleted."""
    if not is_uri(uri):
        Path(uri).unlink(missing_ok=True)
        return
    try:
        s3_filesystem().delete_file(_s3_path(str(uri)))
    except FileNotFoundError:
        pass
    except OSError as e:
        if "NOT_FOUND" in str(e) or "NoSuchKey" in str(e):
            return
        raise _storage_error(str(uri), "delete the object", e) from e


def delete_prefix(prefix: str | os.PathLike) -> int:
    """Delete every object under the ``s3://`` ``prefix`` (the objects `list_sizes` lists);
    returns how many were deleted."""
    if not is_uri(prefix):
        raise ValueError(f"{prefix}: delete_prefix is for object storage prefixes")
    objects = list_sizes(prefix)
    for uri in objects:
        delete(uri)
    return len(objects)
