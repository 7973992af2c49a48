"""A bounded node-local cache of shard objects (``data.cache_dir``): TSN trains for tens of
epochs over the same shards, so each object is downloaded from object storage once per node,
and later epochs read local files.

Layout of ``cache_dir`` (one per node, shared by every rank and every run on it)::

    <key>.<name>          a complete copy of one object (a shard's tar)
    needs/<pid>-<h>.json  when a live holder will next read each copy (+ its .lock, held while it lives)
    cache.room            lock file: held while room is made for a download
    <key>.<name>.pin      lock file: shared-locked while a pipeline may read the copy
    <key>.<name>.fetch    lock file: exclusive-locked while one process downloads the copy
    <key>.<name>.part.*   a download in progress (renamed into place when complete)

``key`` hashes the object's URI, size and modification time: a rewritten object (other size
or newer mtime; pyarrow's FileInfo exposes no ETag) has another key, so a stale copy is never
served (no one needs it: it is evicted first).

Contracts:

- A copy appears atomically: downloaded to a ``.part`` name, fsynced, renamed. A reader never
  sees a partial file.
- Several processes on one node (the ranks of a Ray node, a second run) download an object
  once: the ``.fetch`` lock (``fcntl.flock``) serialises the download, and whoever comes
  second finds the copy.
- The total size of the copies (and downloads in progress) stays <= ``size_limit_bytes``:
  before a download, copies are evicted (furthest next use first; below). A copy whose
  ``.pin`` lock a holder has (a rank reading it, in this or another process) is never
  evicted. When the limit cannot be met without evicting a pinned copy, the object is not
  cached and the rank reads its samples in place (ranged GETs of the sampled frames).

What a loader asks: `ShardCache.acquire` per shard, from the streamer
(`dataloading.store.streamer`) in the order the rank reads them, a few ahead; each copy is pinned
until the rank has read it (`unpin`). Room is made by evicting the unpinned copy whose next use
by any live holder is furthest away (the holders publish it: `set_needs`; Belady's rule, exact
because the epoch order is known ahead), copies no one needs first, then least recently used;
a download claims its space (a ``.part`` file of the object's size, under the ``cache.room``
lock) before it starts, so concurrent downloads never overshoot the limit together.

A ``.part`` file left by a killed download is removed by the next eviction (its process is
gone); lock files (empty) are never removed.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from dataloading.store import storage
from dataloading.store.files import atomic_write_text as files_atomic_write, fsync_dir

DOWNLOAD_CHUNK_BYTES = 8 << 20
# Left free on the cache's disk (its needs and lock files, other writers): the copies take at
# most the disk's free space less this, whatever data.cache_size_bytes says (`room_bytes`).
DISK_MARGIN_BYTES = 16 << 20
_LOCK_SUFFIXES = (".pin", ".fetch", ".room")


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
        self._pin_of: dict[tuple[object, str], int] = {}  # (holder, uri) -> its pin fd (`acquire`)
        self._needs_fds: dict[object, tuple[int, Path]] = {}  # holder -> (flock-ed fd, path) of its needs file
        self._lock = threading.Lock()
        self.downloaded_bytes = 0  # by this process, since it opened the cache

    # --- what the streamer calls ------------------------------------------------------------

    def acquire(self, uri: str, size: int, mtime_ns: int, holder: object = None,
                read_range=None, pool=None, part_bytes: int = 0) -> tuple[Path | None, int]:
        """(the local copy of ``uri``, bytes downloaded for it now): downloaded whole when
        missing, pinned for ``holder`` until its `unpin` / `release`; (None, 0) when it does
        not fit the limit beside the pinned copies (the caller reads the object itself).
        ``read_range(uri, start, end) -> bytes`` with a thread ``pool``: the download as ranged
        GETs of ``part_bytes`` in flight on the pool (default: one stream)."""
        try:
            local, pin, downloaded = self._get(uri, size, mtime_ns, read_range, pool, part_bytes)
        except OSError as e:
            disk = cache_disk_error(e, self.dir)
            if disk is None:
                raise
            raise disk from e
        if local is None:
            return None, 0
        with self._lock:
            self._pins.setdefault(holder, []).append(pin)
            self._pin_of[(holder, uri)] = pin
        return local, downloaded

    def unpin(self, holder: object, uri: str) -> None:
        """Drop ``holder``'s pin of ``uri`` (it has read what it needed of the copy)."""
        with self._lock:
            pin = self._pin_of.pop((holder, uri), None)
            if pin is None:
                return
            self._pins[holder].remove(pin)
        os.close(pin)

    def name_of(self, uri: str, size: int, mtime_ns: int) -> str:
        """The file name the copy of ``uri`` has (or will have) in the cache."""
        return self._name(uri, size, mtime_ns)

    def set_needs(self, holder: object, next_use: dict[str, float]) -> None:
        """Publish when ``holder`` will next read each copy ({copy name: time}, smaller =
        sooner; a comparable clock across the node's ranks, e.g. epoch + fraction of it):
        eviction drops the copy whose next use by any live holder is furthest away (Belady's
        rule, exact because the epoch order is known ahead: `dataloading.planning.order`), copies no
        one needs first. The file stays flock-ed while this process lives."""
        needs = self.dir / "needs"
        path = needs / f"{os.getpid()}-{abs(hash(holder)) % (1 << 40):x}.json"
        try:
            needs.mkdir(exist_ok=True)
            with self._lock:
                if holder not in self._needs_fds:
                    # held while this process lives: an evictor whose LOCK_EX|LOCK_NB on it
                    # succeeds knows the file's writer is gone
                    self._needs_fds[holder] = (_lock_fd(path, ".lock", fcntl.LOCK_SH), path)
            files_atomic_write(path, json.dumps(next_use), durable=False)
        except OSError as e:
            disk = cache_disk_error(e, self.dir)
            if disk is None:
                raise
            raise disk from e

    def release(self, holder: object = None) -> None:
        """Unpin what ``holder`` pinned (its pipeline is gone); its copies become evictable."""
        with self._lock:
            fds = self._pins.pop(holder, [])
            for key in [k for k in self._pin_of if k[0] == holder]:
                del self._pin_of[key]
        for fd in fds:
            os.close(fd)  # closing the descriptor drops its flock

    def forget(self, holder: object) -> None:
        """``holder`` is gone: unpin everything and withdraw its needs file."""
        self.release(holder)
        with self._lock:
            fd_path = self._needs_fds.pop(holder, None)
        if fd_path is not None:
            fd_path[1].unlink(missing_ok=True)
            os.close(fd_path[0])

    def entries(self) -> dict[str, int]:
        """{file name: size in bytes} of the complete copies now in the cache."""
        return {p.name: p.stat().st_size for p in self._copies()}

    # --- internals ---------------------------------------------------------------------------

    def _name(self, uri: str, size: int, mtime_ns: int) -> str:
        key = hashlib.sha256(f"{uri}\0{size}\0{mtime_ns}".encode()).hexdigest()[:20]
        return f"{key}.{uri.rsplit('/', 1)[-1]}"

    def _get(self, uri: str, size: int, mtime_ns: int, read_range=None, pool=None,
             part_bytes: int = 0) -> tuple[Path | None, int, int]:
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
                part = self._reserve(size, path)
                if part is None:
                    os.close(pin)
                    return None, -1, 0
                _download(uri, path, size, read_range, pool, part_bytes, part=part)
            finally:
                os.close(fetch)
        except BaseException:
            if pin >= 0:
                os.close(pin)
            raise
        with self._lock:
            self.downloaded_bytes += size
        return path, pin, size

    def _reserve(self, size: int, path: Path) -> Path | None:
        """Make room for ``size`` bytes and claim it with a ``.part`` file of that size (which
        `_make_room` counts), under the cache-wide ``.room`` lock: concurrent downloads of this
        and other processes never overshoot the limit together. None when it cannot be met."""
        room = _lock_fd(self.dir / "cache", ".room", fcntl.LOCK_EX)
        try:
            if not self._make_room(size, keep=path):
                return None
            part = path.with_name(f"{path.name}.part.{os.getpid()}.{threading.get_ident()}")
            try:
                with open(part, "wb") as f:
                    _claim(f.fileno(), size, part)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            return part
        finally:
            os.close(room)

    def _next_uses(self) -> dict[str, float]:
        """{copy name: soonest next use by a live holder} from the needs files (a file whose
        process is gone, its flock free, is removed)."""
        out: dict[str, float] = {}
        needs = self.dir / "needs"
        if not needs.is_dir():
            return out
        for path in needs.glob("*.json"):
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink(missing_ok=True)  # nobody holds it: its process ended
                    continue
                except BlockingIOError:
                    pass
                try:
                    table = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
            finally:
                os.close(fd)
            for name, t in table.items():
                out[name] = min(out.get(name, float("inf")), float(t))
        return out

    def _copies(self) -> list[Path]:
        return [p for p in self.dir.iterdir()
                if p.is_file() and not p.name.endswith(_LOCK_SUFFIXES) and ".part." not in p.name]

    def room_bytes(self, used: int | None = None) -> int:
        """The most the copies may take: the limit, or what the disk holds when that is less
        (the copies and downloads already here, ``used``, plus its free space, less
        `DISK_MARGIN_BYTES`): a limit above the disk's size evicts instead of failing."""
        if used is None:
            used = 0
            for p in self._copies():
                try:
                    used += p.stat().st_size
                except FileNotFoundError:  # evicted meanwhile
                    pass
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            return self.size_limit_bytes
        return min(self.size_limit_bytes, used + max(0, free - DISK_MARGIN_BYTES))

    def _make_room(self, size: int, keep: Path) -> bool:
        """Evict unpinned copies, furthest next use first, until ``size`` more bytes fit the
        limit (`room_bytes`); False (nothing more evicted) when they cannot."""
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
        for part in self.dir.glob("*.part.*"):  # other downloads in progress take their space already
            pid = part.name.rsplit(".part.", 1)[1].split(".")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                part.unlink(missing_ok=True)  # left by a killed download
                continue
            try:
                total += part.stat().st_size
            except FileNotFoundError:
                pass
        limit = self.room_bytes(total)
        # Furthest next use first (never needed again: infinitely far), then least recently used.
        nxt = self._next_uses()
        inf = float("inf")
        order_key = lambda c: (-nxt.get(c[1].name, inf), c[0], c[1].name)  # noqa: E731
        for _, p, s in sorted(copies, key=order_key):
            if total + size <= limit:
                break
            if p != keep and _evict(p):
                total -= s
        return total + size <= limit


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


def _claim(fd: int, size: int, path: Path) -> None:
    """Give ``fd`` ``size`` bytes of disk now (``posix_fallocate``: a full disk fails here,
    before any GET, instead of in the middle of a copy); a sparse file of that size where the
    filesystem cannot allocate ahead."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(e.errno, e.strerror, str(path)) from e
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Every byte of ``data`` at ``offset``: ``pwrite`` may write fewer (a filesystem that
    fills up writes what fits, then fails on the next call), which must never pass as a copy
    with holes."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def cache_disk_error(error: BaseException, cache_dir: Path) -> OSError | None:
    """A full, over-quota or read-only ``cache_dir`` as the one line the CLI prints (naming
    ``data.cache_dir`` and the fix), for an OSError anywhere in ``error``'s chain; else None."""
    seen, visited = error, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            fix = ("make it writable or set data.cache_dir to a writable node-local disk" if seen.errno == errno.EROFS
                   else "free space there, or lower data.cache_size_bytes below its free space, or move it")
            return OSError(seen.errno, f"data.cache_dir {cache_dir}: {os.strerror(seen.errno).lower()} "
                                       f"({seen.filename or 'a cache file'}); {fix}")
        seen = seen.__cause__ or seen.__context__
    return None


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


def _download(uri: str, path: Path, size: int, read_range=None, pool=None, part_bytes: int = 0,
              part: Path | None = None) -> None:
    """``uri`` -> ``path`` atomically and durably; ValueError when the object's size changed.

    With ``read_range`` and a ``pool``: parts of ``part_bytes`` fetched as ranged GETs in
    parallel on the pool and written at their offsets (a fast link needs several requests in
    flight: one stream reached 128 MB/s of a 200 MB/s link through a 20 ms proxy); else one
    stream of pyarrow's reads."""
    part = part or path.with_name(f"{path.name}.part.{os.getpid()}.{threading.get_ident()}")
    written = 0
    try:
        if read_range is not None and pool is not None and part_bytes > 0:
            ranges = [(a, min(a + part_bytes, size)) for a in range(0, size, part_bytes)]
            fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, size)  # the space is counted from the start (`_make_room`)

                def fetch(r):
                    data = read_range(uri, r[0], r[1])
                    if len(data) != r[1] - r[0]:
                        raise ValueError(f"{uri}: read {len(data)} bytes of [{r[0]}, {r[1]}), listed as {size} "
                                         f"bytes (the object changed while it was being cached?)")
                    _pwrite_all(fd, data, r[0])
                    return len(data)

                parts = [pool.submit(fetch, r) for r in ranges]
                # every part stops before the descriptor is closed: a part still running after
                # another failed would pwrite into whatever file reuses the descriptor number
                concurrent.futures.wait(parts)
                written = sum(f.result() for f in parts)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fs = storage.s3_filesystem()
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

