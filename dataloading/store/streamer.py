"""Whole shards from object storage into the node's cache, ahead of the rank's reads.

A rank knows the order it will read its shards in (its chunk of the epoch's order,
`dataloading.planning.order`, or its val/test part). `ShardStreamer` fetches them in that order, at
most ``ahead_shards`` beyond the one being read, each as whole-object ranged GETs of
``part_bytes`` with ``requests_in_flight`` of them at once (`cache.ShardCache.acquire`), written
into the cache as they arrive and handed to the sample source as soon as each shard is
complete: the first batch waits for one shard, not the split. The node's ranks share each
download (the cache's per-copy file lock: whoever comes second finds the copy).

Each epoch the streamer publishes when this rank will next read each shard (this epoch and,
at the same world size, the next), so the cache evicts the copy whose next use is furthest
away (`ShardCache.set_needs`): with a cache of half the data about half is fetched again per
epoch, where least-recently-used eviction refetches nearly everything. A shard the source has
finished with is unpinned at once (`done`).

The parts of all shards in flight share ``requests_in_flight`` slots, the shard read soonest
first (`PriorityPool`): a shard further ahead never takes bandwidth from the one the source
waits for. The first shard of an epoch's sequence is cut into ``requests_in_flight`` parts (not
``part_bytes``), so that on a cold start it alone fills every slot: the first batch waits for one
shard at the link's full rate (a few more requests per epoch; not below ``MIN_SPLIT_PART_BYTES``).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from dataloading.store.byteranges import ObjectFiles
from dataloading.store.cache import ShardCache

AHEAD_SHARDS = 2  # shards fetched beyond the one being read
REQUESTS_IN_FLIGHT = 4  # ranged GETs of whole-shard parts at once (per process)
PART_BYTES = 64 << 20  # a 256 MB shard: 4 GETs + 1 HEAD; memory: requests_in_flight x part_bytes
# The epoch's first shard is cut into requests_in_flight parts, none smaller than this (below
# a few MB a part costs more in its round trip than it gains in parallel transfer).
MIN_SPLIT_PART_BYTES = 8 << 20


class ShardStreamer:
    """Fetch-ahead of one loader's shards (``infos``: {uri: (size, mtime_ns)}) into ``cache``,
    pinned for ``holder``. Thread-safe: the source's reading threads call `copy`."""

    def __init__(self, cache: ShardCache, infos: dict[str, tuple[int, int]], objects: ObjectFiles, *, holder: object,
                 ahead_shards: int = AHEAD_SHARDS, requests_in_flight: int = REQUESTS_IN_FLIGHT,
                 part_bytes: int = PART_BYTES, on_done=None):
        for name, value, least in (("ahead_shards", ahead_shards, 0), ("requests_in_flight", requests_in_flight, 1),
                                   ("part_bytes", part_bytes, 1)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self.cache, self.infos, self.objects, self.holder = cache, infos, objects, holder
        self._on_done = on_done  # called with a copy's path once it is no longer read (close its descriptors)
        self.ahead_shards, self.part_bytes = ahead_shards, part_bytes
        # at most two shards at a time, in read order, their parts in parallel: the shard needed
        # next completes early (time to first batch: about one shard), the second keeps the
        # link busy while the first's last part drains
        # (daemon threads, the shard read soonest first: a process ending on an error never
        # waits at exit for a download still retrying a dead server)
        self._shards = PriorityPool(min(2, ahead_shards + 1), thread_name_prefix="tsn-fetch")
        self._parts = PriorityPool(requests_in_flight, thread_name_prefix="tsn-fetch-part")
        self.requests_in_flight = requests_in_flight
        self._lock = threading.Lock()
        self._sequence: list[str] = []
        self._position: dict[str, int] = {}
        self._futures: dict[str, Future] = {}
        self._uses: dict[str, list[float]] = {}
        self.downloaded_bytes = 0
        self.streamed: set[str] = set()  # shards that did not fit: read in place by ranged GETs

    def start_epoch(self, sequence: Sequence[str], next_uses: dict[str, Sequence[float]]) -> None:
        """The shards this epoch reads, in order, and when each is needed (``next_uses``,
        {uri: [epoch + fraction, ...]} ascending: this epoch's use, then the next epoch's);
        the previous epoch's pins are dropped. A shard's first use is dropped when the source
        is done with it (`done`), so the cache sees its *next* use, not a past one."""
        with self._lock:
            old, self._futures = self._futures, {}
            self._sequence = list(dict.fromkeys(sequence))
            self._position = {u: i for i, u in enumerate(self._sequence)}
            self._uses = {u: sorted(float(t) for t in ts) for u, ts in next_uses.items() if len(ts)}
        for f in old.values():
            f.cancel()
        self.cache.release(self.holder)
        self._publish()
        for uri in self._sequence[:self.ahead_shards + 1]:
            self._submit(uri)

    def copy(self, uri: str) -> str | None:
        """The local copy of ``uri`` (waiting for its fetch; the next ``ahead_shards`` of the
        sequence are started), or None when it does not fit the cache: read it in place."""
        k = self._position.get(uri)
        if k is not None:
            for nxt in self._sequence[k:k + self.ahead_shards + 1]:
                self._submit(nxt)
        path = self._submit(uri).result()
        return None if path is None else str(path)

    def _publish(self) -> None:
        with self._lock:
            needs = {self.cache.name_of(u, *self.infos[u]): ts[0] for u, ts in self._uses.items() if ts}
        self.cache.set_needs(self.holder, needs)

    def done(self, uri: str) -> None:
        """The source has read what it needs of ``uri`` this epoch: unpin it (evictable now),
        its next use becomes the next epoch's (or none)."""
        with self._lock:
            f = self._futures.pop(uri, None)
            uses = self._uses.get(uri)
            if f is not None and uses:
                uses.pop(0)
        if f is None:
            return
        self._publish()
        if self._on_done is not None and f.done() and not f.cancelled() and f.exception() is None \
                and f.result() is not None:
            self._on_done(str(f.result()))
        self.cache.unpin(self.holder, uri)

    def _submit(self, uri: str) -> Future:
        with self._lock:
            f = self._futures.get(uri)
            if f is None:
                f = self._futures[uri] = self._shards.submit(self._position.get(uri, len(self._sequence)),
                                                             self._fetch, uri)
            return f

    def _fetch(self, uri: str):
        size, mtime_ns = self.infos[uri]
        with self._lock:
            position = self._position.get(uri, len(self._sequence))
        part_bytes = self.part_bytes
        if position == 0:  # the first batch waits for it: every slot on it (module docstring)
            part_bytes = min(part_bytes, max(MIN_SPLIT_PART_BYTES, -(-size // self.requests_in_flight)))
        path, downloaded = self.cache.acquire(uri, size, mtime_ns, holder=self.holder,
                                              read_range=self.objects.read_range,
                                              pool=self._parts.at(position), part_bytes=part_bytes)
        with self._lock:
            self.downloaded_bytes += downloaded
            if path is None:
                self.streamed.add(uri)
        return path

    def close(self) -> None:
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
        for f in futures:
            f.cancel()
        self._shards.shutdown(wait=True, cancel_futures=True)
        self._parts.shutdown(wait=True, cancel_futures=True)
        self.cache.forget(self.holder)


class PriorityPool:
    """``workers`` threads running submitted calls lowest priority first (FIFO among equals):
    `at(priority)` gives the ``submit(fn, *args) -> Future`` view a download uses, so parts
    of the shard read soonest run before those of shards further ahead."""

    def __init__(self, workers: int, thread_name_prefix: str = "pool"):
        self._queue: list = []  # heap of (priority, sequence number, future, fn, args)
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{thread_name_prefix}_{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def at(self, priority: float) -> "_PriorityView":
        return _PriorityView(self, priority)

    def submit(self, priority: float, fn, *args) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("cannot submit to a pool that was shut down")
            heapq.heappush(self._queue, (priority, next(self._order), future, fn, args))
            self._ready.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                _, _, future, fn, args = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter, as an executor does
                future.set_exception(e)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """No more submissions; queued calls cancelled (``cancel_futures``) or run; the
        threads joined (``wait``)."""
        with self._ready:
            self._closed = True
            queued, self._queue = (self._queue, []) if cancel_futures else ([], self._queue)
            self._ready.notify_all()
        for item in queued:
            item[2].cancel()
        if wait:
            for t in self._threads:
                t.join()


class _PriorityView:
    def __init__(self, pool: PriorityPool, priority: float):
        self._pool, self._priority = pool, priority

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(self._priority, fn, *args)
