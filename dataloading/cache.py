"""A bounded node-local cache of shard objects (``data.cache_dir``): TSN trains for tens of
epochs over the same shards, so each object is downloaded from object storage once per node,
and later epochs read local files.

Layout of ``cache_dir`` (one per node, shared by every rank and every run on it)::

    <key>.<name>          a complete copy of one object (a shard's tar or its DALI index)
    <key>.<name>.pin      lock file: shared-locked while a pipeline may read the copy
    <key>.<name>.fetch    lock file: exclusive-locked while one process downloads the copy
    <key>.<name>.part.*   a download in progress (renamed into place when complete)

``key`` hashes the object's URI, size and modification time: a rewritten object (other size
or newer mtime; pyarrow's FileInfo exposes no ETag) has another key, so a stale copy is never
served (it ages out by LRU).

Contracts:

- A copy appears atomically: downloaded to a ``.part`` name, fsynced, renamed. A reader never
  sees a partial file.
- Several processes on one node (the ranks of a Ray node, a second run) download an object
  once: the ``.fetch`` lock (``fcntl.flock``) serialises the download, and whoever comes
  second finds the copy.
- The total size of the copies stays <= ``size_limit_bytes``: before a download, copies are
  evicted least recently used first (mtime, set on every use: ``atime`` is often off, noatime
  mounts). A copy whose ``.pin`` lock another holder has (a pipeline reading it, in this or
  another process) is never evicted. When the limit cannot be met without evicting a pinned
  copy, the object is not cached and the pipeline streams it from object storage.
- A pin is held from `ShardCache.resolve` until the same holder's next `resolve` or
  `release` (a loader: from one epoch's pipeline build to the next): a rank's shard set may
  change between epochs (resizes, the per-epoch rotation of each rank's part) and the cache
  follows it, per node, not per rank.

What a loader asks (`ShardCache.resolve_shards`, at each epoch's pipeline build): every index
and every tar of the split, all-or-nothing for the tars (DALI cannot mix local and ``s3://``
tars). Fetching at the build, before the epoch, rather than streaming epoch 1 while a thread
fills the cache: each byte crosses the network once (streaming and filling would move the
first epoch twice), and the download runs at the server's GET rate, which is what DALI's
streaming reader is bound by anyway; with the loader's prefetching thread the next epoch's
build (a listing, the copies looked up) runs while the current epoch ends.

Byte accounting (`Resolved.object_storage_bytes`, the third value of `resolve_shards`): bytes
downloaded plus the size of every object of the rank's part still handed to DALI as ``s3://``
(DALI's own reads are not visible here; it reads at most the object).

Not handled: a ``.part`` file left by a killed download stays (outside the limit) until removed
by hand; lock files (empty) are never removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dataloading import storage
from dataloading.files import fsync_dir

DOWNLOAD_CHUNK_BYTES = 8 << 20
_LOCK_SUFFIXES = (".pin", ".fetch")


@dataclass
class Resolved:
    """What `ShardCache.resolve` hands a pipeline: ``paths`` in the order asked (a local copy,
    or the location as given), and the bytes this call costs object storage."""

    paths: list[str]
    downloaded_bytes: int = 0
    streamed_bytes: int = 0  # sizes of the objects left as s3:// URIs among those ``needed``
    cached: list[str] = field(default_factory=list)  # the locations served from local copies

    @property
    def object_storage_bytes(self) -> int:
        return self.downloaded_bytes + self.streamed_bytes


class ShardCache:
    """The node's cache in ``cache_dir`` (created when missing), at most ``size_limit_bytes``
    of copies. Thread-safe; any number of processes may share one directory."""

    def __init__(self, cache_dir: str | os.PathLike, size_limit_bytes: int):
        if size_limit_bytes < 1:
            raise ValueError(f"shard cache size limit must be >= 1 byte, got {size_limit_bytes}")
        if storage.is_uri(cache_dir):
            raise ValueError(f"data.cache_dir {cache_dir}: must be a local directory (node-local disk)")
        self.dir = Path(cache_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"data.cache_dir {cache_dir}: cannot create the cache directory: {e}") from e
        self.size_limit_bytes = int(size_limit_bytes)
        self._pins: dict[object, list[int]] = {}  # holder -> open, shared-locked .pin fds
        self._lock = threading.Lock()
        self.downloaded_bytes = 0  # by this process, since it opened the cache

    # --- what a pipeline build calls -------------------------------------------------------

    def resolve(self, locations: list[str], *, needed: set[int] | None = None, holder: object = None,
                _infos: dict[str, tuple[int, int]] | None = None) -> Resolved:
        """Local copies for the ``s3://`` entries of ``locations`` whose positions are in
        ``needed`` (None: all), downloaded now when missing and pinned for ``holder`` (its
        previous pins are released first); every other entry is returned as given. Local
        paths pass through. One listing per folder gives the objects' sizes and mtimes."""
        needed = set(range(len(locations))) if needed is None else set(needed)
        self.release(holder)
        infos = _infos if _infos is not None else \
            _object_infos([loc for i, loc in enumerate(locations) if i in needed and storage.is_uri(loc)])
        out = Resolved(paths=list(locations))
        fds: list[int] = []
        try:
            for i, loc in enumerate(locations):
                if i not in needed or not storage.is_uri(loc):
                    continue
                size, mtime_ns = infos[loc]
                local, pin, downloaded = self._get(loc, size, mtime_ns)
                out.downloaded_bytes += downloaded
                if local is None:
                    out.streamed_bytes += size
                    continue
                fds.append(pin)
                out.paths[i] = str(local)
                out.cached.append(loc)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        with self._lock:
            self._pins[holder] = fds
        return out

    def release(self, holder: object = None) -> None:
        """Unpin what ``holder`` pinned (its pipeline is gone); its copies become evictable."""
        with self._lock:
            fds = self._pins.pop(holder, [])
        for fd in fds:
            os.close(fd)  # closing the descriptor drops its flock

    def entries(self) -> dict[str, int]:
        """{file name: size in bytes} of the complete copies now in the cache."""
        return {p.name: p.stat().st_size for p in self._copies()}

    def resolve_shards(self, tars: list[str], indexes: list[str], *, part: set[int],
                       holder: object = None) -> tuple[list[str], list[str], int]:
        """(tars, indexes, bytes from object storage) for one epoch's DALI pipeline, whose rank
        reads the tars at positions ``part`` (`rank_shards`).

        Every index is cached (DALI parses them all at build; they are small). The tars are
        all-or-nothing: DALI 2.4's webdataset reader crashed (SIGFPE, measured) when its list
        mixed local paths and ``s3://`` URIs, so either every tar of the split is local
        (downloaded now when missing: over the epochs' rotation every rank reads every part,
        and the node's ranks share the copies) or every tar streams from object storage (the
        split does not fit the limit beside pinned copies). Bytes: downloads + the ``part``
        tars when they stream."""
        n = len(tars)
        infos = _object_infos([loc for loc in [*tars, *indexes] if storage.is_uri(loc)])
        fits = sum(infos[t][0] for t in tars if storage.is_uri(t)) <= self.size_limit_bytes
        got = self.resolve([*tars, *indexes], needed=set(range(0 if fits else n, 2 * n)), holder=holder,
                           _infos=infos)
        local_tars = got.paths[:n]
        if any(storage.is_uri(t) for t in local_tars):
            local_tars = list(tars)
            streamed = sum(infos[t][0] for i, t in enumerate(tars) if i in part and storage.is_uri(t))
        else:
            streamed = 0
        return local_tars, got.paths[n:], got.downloaded_bytes + streamed

    # --- internals ---------------------------------------------------------------------------

    def _name(self, uri: str, size: int, mtime_ns: int) -> str:
        key = hashlib.sha256(f"{uri}\0{size}\0{mtime_ns}".encode()).hexdigest()[:20]
        return f"{key}.{uri.rsplit('/', 1)[-1]}"

    def _get(self, uri: str, size: int, mtime_ns: int) -> tuple[Path | None, int, int]:
        """(local copy or None when it does not fit, its pin fd, bytes downloaded)."""
        path = self.dir / self._name(uri, size, mtime_ns)
        pin = _lock_fd(path, ".pin", fcntl.LOCK_SH)  # from here on no one evicts it
        try:
            if _complete(path, size):
                os.utime(path)  # most recently used
                return path, pin, 0
            fetch = _lock_fd(path, ".fetch", fcntl.LOCK_EX)  # one download per node
            try:
                if _complete(path, size):  # another process fetched it while we waited
                    os.utime(path)
                    return path, pin, 0
                if not self._make_room(size, keep=path):
                    os.close(pin)
                    return None, -1, 0
                _download(uri, path, size)
            finally:
                os.close(fetch)
        except BaseException:
            if pin >= 0:
                os.close(pin)
            raise
        with self._lock:
            self.downloaded_bytes += size
        return path, pin, size

    def _copies(self) -> list[Path]:
        return [p for p in self.dir.iterdir()
                if p.is_file() and not p.name.endswith(_LOCK_SUFFIXES) and ".part." not in p.name]

    def _make_room(self, size: int, keep: Path) -> bool:
        """Evict unpinned copies, least recently used first, until ``size`` more bytes fit the
        limit; False (nothing more evicted) when they cannot."""
        if size > self.size_limit_bytes:
            return False
        copies = []
        for p in self._copies():
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            copies.append((st.st_mtime_ns, p, st.st_size))
        total = sum(s for _, _, s in copies)
        for _, p, s in sorted(copies, key=lambda c: (c[0], c[1].name)):
            if total + size <= self.size_limit_bytes:
                break
            if p != keep and _evict(p):
                total -= s
        return total + size <= self.size_limit_bytes


def _object_infos(uris: list[str]) -> dict[str, tuple[int, int]]:
    """{uri: (size in bytes, mtime in ns)}, one listing per folder."""
    import pyarrow.fs as pafs

    out: dict[str, tuple[int, int]] = {}
    fs = storage.s3_filesystem()
    for folder in sorted({u.rsplit("/", 1)[0] for u in uris}):
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder[len(storage.S3_SCHEME):], recursive=False,
                                                       allow_not_found=True))
        except OSError as e:
            raise storage.StorageError(f"{folder}: cannot list the objects under it: {e}; "
                                       f"{storage.CREDENTIALS_HINT}") from e
        for i in infos:
            if i.type == pafs.FileType.File:
                out[storage.S3_SCHEME + i.path] = (int(i.size), int(i.mtime_ns or 0))
    missing = [u for u in uris if u not in out]
    if missing:
        raise FileNotFoundError(f"{len(missing)} object(s) to cache are missing: {', '.join(missing[:5])}")
    return out


def _lock_fd(path: Path, suffix: str, mode: int) -> int:
    fd = os.open(f"{path}{suffix}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _evict(path: Path) -> bool:
    """Delete a copy unless someone holds its pin (a non-blocking exclusive lock tells)."""
    fd = os.open(f"{path}.pin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)  # the lock files stay: unlinking a lock file others may hold open races


def _download(uri: str, path: Path, size: int) -> None:
    """``uri`` -> ``path`` atomically and durably; ValueError when the object's size changed."""
    part = path.with_name(f"{path.name}.part.{os.getpid()}.{threading.get_ident()}")
    fs = storage.s3_filesystem()
    written = 0
    try:
        try:
            stream = fs.open_input_stream(uri[len(storage.S3_SCHEME):], buffer_size=DOWNLOAD_CHUNK_BYTES)
        except OSError as e:
            raise storage.StorageError(f"{uri}: cannot open the object to cache it: {e}; "
                                       f"{storage.CREDENTIALS_HINT}") from e
        with stream, open(part, "wb") as f:
            while chunk := stream.read(DOWNLOAD_CHUNK_BYTES):
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if written != size:
            raise ValueError(f"{uri}: read {written} bytes, listed as {size} (the object changed while it was "
                             f"being cached?)")
        os.replace(part, path)
        fsync_dir(path.parent)
    finally:
        part.unlink(missing_ok=True)


def rank_shards(samples_per_shard: list[int], reader_shard: int, num_shards: int) -> set[int]:
    """Positions of the shards holding samples of DALI's reader part ``reader_shard`` of
    ``num_shards`` (DALI's split of the n samples: [n * s // S, n * (s + 1) // S))."""
    total = sum(samples_per_shard)
    begin, end = total * reader_shard // num_shards, total * (reader_shard + 1) // num_shards
    out, first = set(), 0
    for i, n in enumerate(samples_per_shard):
        if first < end and first + n > begin:
            out.add(i)
        first += n
    return out

