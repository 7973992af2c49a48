"""Reading byte ranges of shards: what the training path reads instead of whole tar members.

A TSN sample needs its ``info`` member, one offset table and the K x L sampled frames of a
frame pack: tens of kilobytes of a pack that holds megabytes. The readers here fetch exactly
those ranges, merged where they touch (`coalesce`):

* `LocalFiles`: ``os.pread`` on descriptors kept open, each opened with
  ``POSIX_FADV_RANDOM`` so the kernel reads only the pages asked for (measured here, ext4 on
  virtio: 200 random 12 kB reads of a cold 64 MB file read 1.32x the bytes asked for, the page
  rounding; without the advice the kernel may read ahead up to the device's 8 MB window).
* `ObjectFiles`: ranged GETs (pyarrow's S3 client, the one `dataloading.store.storage` uses), the
  objects' handles kept open (pyarrow makes one HEAD per open, which also tells the size: an
  object of another size than the manifest lists is refused, naming it), ranges closer than
  ``max_gap_bytes`` merged into one request (a request costs a round trip; at 20 ms and
  200 MB/s a round trip is worth 4 MB of transfer, so a few kB of gap are always cheaper), a
  failed request retried with back-off and then reported naming the object.

Both are thread-safe: the sample source (`dataloading.pipeline.source`) keeps many reads in flight from
a pool of threads (pread and pyarrow release the GIL). Both count what they did
(`ReadCounters`) so benchmarks and tests measure requests and bytes, not guess them.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from dataloading.store import storage

Span = tuple[int, int]  # [start, end) byte offsets in a file or object

# Merging ranges of a local file: within a page the bytes come with the page anyway.
LOCAL_MAX_GAP_BYTES = 4096
# Merging ranges of an object: a request costs a round trip (tens of ms on real object
# storage), worth megabytes of transfer; 64 kB of gap cost ~0.3 ms at 200 MB/s.
OBJECT_MAX_GAP_BYTES = 64 << 10
OPEN_FILES = 64  # descriptors / object handles kept open per reader (least recently used closed)
# Attempts of one ranged read on object storage on top of the S3 client's own retries (a
# dropped connection, a server restarting): back-off 0.5 s, 1 s, 2 s, 4 s between them.
OBJECT_READ_ATTEMPTS = 5
OBJECT_RETRY_BASE_SECONDS = 0.5


def coalesce(spans: Sequence[Span], max_gap_bytes: int = 0) -> list[tuple[int, int, list[int]]]:
    """Merge ``spans`` (any order, overlaps allowed) into the reads that fetch them: sorted
    ``(start, end, [indices of the spans inside])``; two spans share a read when the gap
    between them is at most ``max_gap_bytes`` (0: only touching or overlapping ones)."""
    if max_gap_bytes < 0:
        raise ValueError(f"max_gap_bytes must be >= 0, got {max_gap_bytes}")
    for start, end in spans:
        if not 0 <= start <= end:
            raise ValueError(f"span [{start}, {end}) is not a byte range")
    reads: list[tuple[int, int, list[int]]] = []
    for i in sorted(range(len(spans)), key=lambda j: (spans[j][0], spans[j][1])):
        start, end = spans[i]
        if reads and start - reads[-1][1] <= max_gap_bytes:
            first, last, members = reads[-1]
            reads[-1] = (first, max(last, end), [*members, i])
        else:
            reads.append((start, end, [i]))
    return reads


def _slices(spans: Sequence[Span], reads, buffers) -> list[memoryview]:
    """Each span's bytes as a view of the read that holds it."""
    out: list[memoryview | None] = [None] * len(spans)
    for (first, _, members), buf in zip(reads, buffers):
        view = memoryview(buf)
        for i in members:
            start, end = spans[i]
            out[i] = view[start - first:end - first]
    return out  # type: ignore[return-value]


@dataclass
class ReadCounters:
    """What a reader did: ``requests`` (preads or GETs; object storage also counts the HEAD of
    each open in ``opens``), ``bytes`` returned, ``retries``. Updated under a lock."""

    requests: int = 0
    opens: int = 0
    bytes: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, requests: int = 0, opens: int = 0, num_bytes: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.opens += opens
            self.bytes += num_bytes
            self.retries += retries

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "opens": self.opens, "bytes": self.bytes, "retries": self.retries}


class _Handles:
    """An LRU of open handles by location, at most ``limit``; ``open(location)`` makes one,
    ``close(handle)`` ends one. Thread-safe; a handle in use by another thread may be closed
    under it only when more than ``limit`` locations are in use at once (then the read fails
    and is retried by the caller with a fresh handle)."""

    def __init__(self, open_fn, close_fn, limit: int = OPEN_FILES):
        self._open, self._close, self._limit = open_fn, close_fn, limit
        self._handles: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}

    def get(self, location: str):
        with self._lock:
            handle = self._handles.get(location)
            if handle is not None:
                self._handles.move_to_end(location)
                return handle
            gate = self._opening.setdefault(location, threading.Lock())
        with gate:  # one open per location, however many threads ask at once
            with self._lock:
                handle = self._handles.get(location)
                if handle is not None:
                    return handle
            handle = self._open(location)
            with self._lock:
                self._handles[location] = handle
                self._opening.pop(location, None)
                evicted = []
                while len(self._handles) > self._limit:
                    evicted.append(self._handles.popitem(last=False)[1])
            for h in evicted:
                self._close(h)
            return handle

    def drop(self, location: str) -> None:
        with self._lock:
            handle = self._handles.pop(location, None)
        if handle is not None:
            self._close(handle)

    def close(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), OrderedDict()
        for h in handles:
            self._close(h)


class LocalFiles:
    """Byte ranges of local files by ``os.pread`` (module docstring)."""

    def __init__(self, max_gap_bytes: int = LOCAL_MAX_GAP_BYTES):
        self.max_gap_bytes = max_gap_bytes
        self.counters = ReadCounters()
        self._fds = _Handles(self._open, os.close)

    @staticmethod
    def _open(path: str) -> int:
        fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # only the pages asked for
        return fd

    def read(self, path: str, spans: Sequence[Span]) -> list[memoryview]:
        """The bytes of each span of the file at ``path`` (OSError naming the file when it
        cannot be read; ValueError when a span lies past its end)."""
        reads = coalesce(spans, self.max_gap_bytes)
        fd = self._fds.get(path)
        buffers = []
        for start, end, _ in reads:
            data = os.pread(fd, end - start, start)
            if len(data) != end - start:
                raise ValueError(f"{path}: bytes [{start}, {end}) asked, the file ends at {start + len(data)} "
                                 f"(truncated since it was listed?)")
            buffers.append(data)
        self.counters.add(requests=len(reads), num_bytes=sum(e - s for s, e, _ in reads))
        return _slices(spans, reads, buffers)

    def forget(self, path: str) -> None:
        """Close the descriptor of ``path`` (the file is about to be deleted or replaced)."""
        self._fds.drop(path)

    def close(self) -> None:
        self._fds.close()


class ObjectFiles:
    """Byte ranges of ``s3://`` objects by ranged GETs (module docstring). ``sizes``: the
    size each object must have (the manifest's), checked when it is opened."""

    def __init__(self, sizes: dict[str, int] | None = None, max_gap_bytes: int = OBJECT_MAX_GAP_BYTES,
                 attempts: int = OBJECT_READ_ATTEMPTS):
        self.max_gap_bytes, self.attempts = max_gap_bytes, attempts
        self.sizes = dict(sizes or {})
        self.counters = ReadCounters()
        self._files = _Handles(self._open, lambda f: f.close())

    def _open(self, uri: str):
        fs = storage.s3_filesystem()
        try:
            f = fs.open_input_file(uri[len(storage.S3_SCHEME):])
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such object (deleted since the dataset was checked?)") from None
        except OSError as e:
            if "NOT_FOUND" in str(e) or "NoSuchKey" in str(e):
                raise FileNotFoundError(f"{uri}: no such object (deleted since the dataset was checked?)") from None
            raise storage.StorageError(f"{uri}: cannot open the object: {e}; {storage.CREDENTIALS_HINT}") from e
        self.counters.add(opens=1)
        want, have = self.sizes.get(uri), f.size()
        if want is not None and have != want:
            f.close()
            raise ShardChangedError.of(uri, have, want)
        return f

    def read(self, uri: str, spans: Sequence[Span]) -> list[memoryview]:
        """The bytes of each span of the object ``uri``: one GET per merged range, retried
        (`OBJECT_READ_ATTEMPTS`) on failures and short reads, then `storage.StorageError`
        naming the object."""
        reads = coalesce(spans, self.max_gap_bytes)
        buffers = [self._read_range(uri, start, end) for start, end, _ in reads]
        return _slices(spans, reads, buffers)

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        """One range [start, end) of ``uri`` as one GET (retried like `read`)."""
        return self._read_range(uri, start, end)

    def _read_range(self, uri: str, start: int, end: int):
        last: Exception | None = None
        for attempt in range(self.attempts):
            if attempt:
                self.counters.add(retries=1)
                time.sleep(OBJECT_RETRY_BASE_SECONDS * 2 ** (attempt - 1))
            try:
                f = self._files.get(uri)
                data = f.read_at(end - start, start)
            except ShardChangedError:
                raise
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as e:  # a dropped connection, a closed handle, a server restarting
                last = e
                self._files.drop(uri)
                continue
            self.counters.add(requests=1, num_bytes=len(data))
            if len(data) == end - start:
                return data
            last = OSError(f"short read: {len(data)} of {end - start} bytes")
            self._files.drop(uri)
        hint = "" if isinstance(last, storage.StorageError) else f"; {storage.CREDENTIALS_HINT}"
        raise storage.StorageError(f"{uri}: cannot read bytes [{start}, {end}) after {self.attempts} attempts: "
                                   f"{last}{hint}")

    def close(self) -> None:
        self._files.close()


class ShardChangedError(ValueError):
    """A shard in object storage is not the object the manifest describes (another size)."""

    @classmethod
    def of(cls, uri: str, actual_bytes: int, manifest_bytes: int) -> "ShardChangedError":
        return cls(f"{uri}: {actual_bytes} bytes in object storage, the manifest lists {manifest_bytes} (the object "
                   f"was replaced since it was packed); re-run `tsn pack`, or point data.shards at the dataset the "
                   f"manifest describes")
