"""The object-storage rows of `tsn bench-loader --remote URI`: the product loader from object
storage against local disk and against what the server can serve, in one run.

Each *shape* is a (latency ms, bandwidth MB/s) pair: the rows run through
`tools.shaping_proxy` in front of the configured endpoint (loopback servers only), which adds
that latency to every request and caps the node's download bandwidth; ``shapes=None`` runs
them once against the endpoint as it is (a real store). Per shape:

- ``local``: `TSNLoader` on the local copy, 3 epochs: epoch 1 with the shards' pages evicted from the
  page cache (``posix_fadvise(DONTNEED)`` after ``sync``) and the process's physical reads
  (``/proc/self/io`` read_bytes) over it, against the sampled frames' bytes; the better warm
  epoch's clips/s is *the local rate*.
- ``cached``: from object storage through a fresh node cache that holds the split
  (whole-shard streaming): epoch 1 cold (time to first batch, clips/s, requests and bytes per
  clip from object storage), epoch 2 from the filled cache (clips/s over local's).
- ``half_cache``: a cache of half the split's bytes, three epochs: bytes re-downloaded per
  epoch over the split's bytes (furthest-next-use eviction).
- ``sparse``: no cache: ranged GETs of only the sampled frames (many in flight).
- baselines, measured the way the loader could best use the server: whole-object GETs at the
  streamer's concurrency (bytes/s, then clips/s = bytes/s / bytes per clip), the bandwidth
  bound (the cap / bytes per clip), small ranged GETs per second at the sparse reader's
  concurrency (that rate / the sparse row's requests per clip bounds the sparse row).

Epochs are whole epochs of the train split, timed with their pipeline build (a user's epoch
pays it too); the split should hold a few hundred clips for the rates to mean much.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from dataloading.format import shards
from dataloading.pipeline.loader import TSNLoader
from dataloading.planning.spec import PipelineSpec
from dataloading.store.byteranges import ObjectFiles
from dataloading.store.cache import ShardCache
from dataloading.store.streamer import PART_BYTES, REQUESTS_IN_FLIGHT

SHAPES = ((20.0, 200.0), (50.0, 200.0))
# The sparse row reads this many batches (its rate settles within a few; the whole-shard rows
# need whole epochs, their window of shards ahead is the point).
SPARSE_BATCHES = 16
TARGETS = {"cold_over_attainable": 0.8, "cached_over_local": 0.95, "requests_per_clip": 0.05,
           "half_cache_refetch": 0.55, "disk_over_sampled": 2.0}


def read_bytes_so_far() -> int:
    """This process's bytes read from storage devices (``/proc/self/io`` read_bytes: page
    cache hits do not count), all threads included."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise OSError("/proc/self/io has no read_bytes line")


def evict(paths) -> None:
    """Drop ``paths``' pages from the page cache (written back first), so the next reads go
    to the disk and count in `read_bytes_so_far`."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Counts:
    """Requests and bytes the server saw between two points: the proxy's own counters when
    shaped (every request: the HEAD and GETs of each shard, its index, the manifest and the
    listings), else the loader's own (its shard reads only)."""

    def __init__(self, proxy):
        self.proxy, self.loader = proxy, None  # the loader's counters start at 0 when it is made
        self.mark = self._now() if proxy is not None else (0, 0)

    def _now(self) -> tuple[int, int]:
        if self.proxy is not None:
            st = self.proxy.stats()
            return st["requests"], st["bytes_down"]
        return self.loader.object_storage_requests, sum(self.loader.object_storage_bytes.values())

    def take(self) -> tuple[int, int]:
        now = self._now()
        out = (now[0] - self.mark[0], now[1] - self.mark[1])
        self.mark = now
        return out


def run_epochs(dataset: str, spec: PipelineSpec, epochs: int, *, cache: ShardCache | None = None,
               proxy=None, evict_first: list[str] | None = None, max_batches: int | None = None,
               streaming: dict | None = None) -> list[dict]:
    """``epochs`` whole train epochs of a fresh `TSNLoader` on ``dataset``; per epoch:
    seconds (epoch 1 from the loader's construction), clips, clips/s, seconds to its first
    batch, requests and bytes object storage served, physical bytes read from local disk,
    and the sampled frames' bytes. ``evict_first``: files evicted before epoch 1;
    ``max_batches``: stop each epoch after that many batches (a partial epoch)."""
    if evict_first:
        evict(evict_first)
    out = []
    t0, disk0 = time.perf_counter(), read_bytes_so_far()
    counts, sampled0 = _Counts(proxy), 0  # from before the loader: its construction reads too
    loader = counts.loader = TSNLoader(dataset, "train", spec, cache=cache, streaming=streaming)
    try:
        for _ in range(epochs):
            clips, first = 0, None
            for i, batch in enumerate(loader):
                if first is None:
                    first = time.perf_counter() - t0
                clips += int(batch.real.sum())
                if max_batches is not None and i + 1 >= max_batches:
                    break
            seconds = time.perf_counter() - t0
            requests, num_bytes = counts.take()
            disk, sampled = read_bytes_so_far(), loader.sampled_bytes
            out.append({"seconds": seconds, "clips": clips, "clips_per_s": clips / seconds,
                        "first_batch_s": first, "requests": requests, "object_storage_bytes": num_bytes,
                        "disk_bytes": disk - disk0, "sampled_bytes": sampled - sampled0})
            t0, disk0, sampled0 = time.perf_counter(), disk, sampled
    finally:
        loader.close()
    return out


def whole_object_bytes_per_s(uris: list[str], sizes: list[int], requests_in_flight: int) -> float:
    """Bytes/s of GETting every object whole, ``requests_in_flight`` at once (the best a
    whole-shard streamer can do against this server)."""
    files = ObjectFiles(dict(zip(uris, sizes)), max_gap_bytes=0)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(requests_in_flight) as pool:
            total = sum(len(b) for b in pool.map(lambda a: files.read_range(a[0], 0, a[1]), zip(uris, sizes)))
        return total / (time.perf_counter() - t0)
    finally:
        files.close()


def ranged_gets_per_s(uris: list[str], sizes: list[int], requests_in_flight: int, requests: int = 256,
                      num_bytes: int = 16384) -> float:
    """Small ranged GETs per second with ``requests_in_flight`` at once, at spread-out offsets
    (the request rate a sparse reader can reach at most)."""
    files = ObjectFiles(dict(zip(uris, sizes)), max_gap_bytes=0)
    try:
        for u in uris:  # opened (HEAD) before the clock starts
            files.read_range(u, 0, 1)
        picks = [(uris[i % len(uris)], (i * 7919 * 4096) % max(1, sizes[i % len(uris)] - num_bytes))
                 for i in range(requests)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(requests_in_flight) as pool:
            list(pool.map(lambda p: files.read_range(p[0], p[1], p[1] + num_bytes), picks))
        return requests / (time.perf_counter() - t0)
    finally:
        files.close()


@contextlib.contextmanager
def shaped_endpoint(latency_ms: float, bandwidth_mbps: float):
    """A `tools.shaping_proxy` in front of ``AWS_ENDPOINT_URL`` (a loopback server), the
    variable pointed at it for the duration; yields the proxy."""
    from tools.shaping_proxy import ProxyProcess, parse_upstream

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    u = urlparse(endpoint or "")
    upstream = f"[{u.hostname}]:{u.port or 80}" if ":" in (u.hostname or "") else f"{u.hostname}:{u.port or 80}"
    try:
        parse_upstream(upstream)
    except ValueError as e:
        raise ValueError(f"--shape needs a loopback S3 endpoint (AWS_ENDPOINT_URL), got {endpoint!r}: the proxy "
                         f"shapes test servers, not a real store (run without --shape there)") from e
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    with ProxyProcess(upstream, latency_ms, bandwidth_mbps) as proxy:
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        try:
            yield proxy
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _per_clip(epoch: dict, key: str) -> float:
    return epoch[key] / max(epoch["clips"], 1)


def shape_rows(local_dir, remote: str, spec: PipelineSpec, *, proxy=None, bandwidth_mbps: float | None = None,
               half_remote: str | None = None, log=print) -> dict:
    """All rows for the endpoint as currently configured (module docstring). ``half_remote``:
    the same videos packed in smaller shards for the half-cache row (default ``remote``): with
    a few big shards, half the bytes is a couple of copies and the row measures rounding."""
    half_remote = half_remote or remote
    split = shards.load_manifest(remote)["splits"]["train"]
    uris = shards.split_shards(remote, "train")[0]
    sizes = [int(s["num_bytes"]) for s in split["shards"]]
    split_bytes, clips = sum(sizes), int(split["num_samples"])
    bytes_per_clip = split_bytes / clips
    row: dict = {"split_bytes": split_bytes, "clips_per_epoch": clips, "shards": len(sizes),
                 "bytes_per_clip": bytes_per_clip}
    if local_dir is not None:
        log("  local disk (epoch 1 evicted, epoch 2 warm) ...")
        tars = shards.split_shards(local_dir, "train")[0]
        e1, *warm = run_epochs(str(local_dir), spec, 3, evict_first=tars)
        row["local"] = {"clips_per_s": max(e["clips_per_s"] for e in warm), "cold_clips_per_s": e1["clips_per_s"],
                        "disk_bytes_per_clip": _per_clip(e1, "disk_bytes"),
                        "sampled_bytes_per_clip": _per_clip(e1, "sampled_bytes"),
                        "whole_pack_bytes_per_clip": bytes_per_clip}
        row["local"]["disk_over_sampled"] = e1["disk_bytes"] / max(e1["sampled_bytes"], 1)
    log("  baselines: whole-object GETs, small ranged GETs ...")
    whole = whole_object_bytes_per_s(uris, sizes, REQUESTS_IN_FLIGHT)
    ranged = ranged_gets_per_s(uris, sizes, 32)
    row["baselines"] = {"whole_object_bytes_per_s": whole, "whole_object_clips_per_s": whole / bytes_per_clip,
                        "ranged_gets_per_s": ranged, "requests_in_flight": REQUESTS_IN_FLIGHT}
    bound = whole / bytes_per_clip
    if bandwidth_mbps:
        row["baselines"]["bandwidth_bound_clips_per_s"] = bandwidth_mbps * 1e6 / bytes_per_clip
        bound = min(bound, row["baselines"]["bandwidth_bound_clips_per_s"])
    if local_dir is not None:
        # The server shares this machine's cores here (a real store does not): the split's
        # whole-object downloads and a local-disk epoch run at once, in the same process; the
        # clips over the time both take is what any streaming loader could reach on this box.
        log("  baseline: whole-object downloads during a local-disk epoch ...")
        with ThreadPoolExecutor(1) as side:
            t0 = time.perf_counter()
            downloads = side.submit(whole_object_bytes_per_s, uris, sizes, REQUESTS_IN_FLIGHT)
            (epoch,) = run_epochs(str(local_dir), spec, 1)
            downloads.result()
            both_s = time.perf_counter() - t0
        row["baselines"]["colocated_clips_per_s"] = epoch["clips"] / both_s
    cache_dir = Path(tempfile.mkdtemp(prefix="tsn-bench-cache-"))
    try:
        log("  whole-shard streaming into a cache that holds the split (3 epochs) ...")
        e1, *warm = run_epochs(remote, spec, 3, cache=ShardCache(cache_dir / "full", 1 << 50), proxy=proxy)
        e2 = max(warm, key=lambda e: e["clips_per_s"])  # warm epochs: the better of two, as for local disk
        attainable = min(bound, row["local"]["clips_per_s"]) if "local" in row else bound
        row["cached"] = {"first_batch_s": e1["first_batch_s"], "cold_clips_per_s": e1["clips_per_s"],
                         "attainable_clips_per_s": attainable, "cold_over_attainable": e1["clips_per_s"] / attainable,
                         # past the first batch: the streaming rate once the first shard is in (a
                         # bench epoch is seconds long; a node's epoch at scale is minutes)
                         "cold_after_first_batch_clips_per_s": (e1["clips"] - spec.batch_size)
                         / max(e1["seconds"] - e1["first_batch_s"], 1e-9),
                         "requests_per_clip": _per_clip(e1, "requests"),
                         # the per-shard cost alone (a HEAD and the GETs of its parts), without the
                         # loader's one-off manifest and listing requests
                         "shard_requests_per_clip": sum(1 + -(-n // PART_BYTES) for n in sizes) / clips,
                         "object_storage_bytes_per_clip": _per_clip(e1, "object_storage_bytes"),
                         "one_shard_fetch_s": max(sizes) / whole,
                         "warm_clips_per_s": e2["clips_per_s"],
                         "warm_object_storage_bytes": sum(e["object_storage_bytes"] for e in warm)}
        if "local" in row:
            row["cached"]["warm_over_local"] = e2["clips_per_s"] / row["local"]["clips_per_s"]
            row["cached"]["cold_over_colocated"] = e1["clips_per_s"] / row["baselines"]["colocated_clips_per_s"]
        half_split = shards.load_manifest(half_remote)["splits"]["train"]
        half_bytes = sum(int(s["num_bytes"]) for s in half_split["shards"])
        log(f"  a cache of half the split ({len(half_split['shards'])} shards, 3 epochs) ...")
        # no fetch-ahead here: on a bench split of a few shards the window (3 pinned shards)
        # would be most of a cache of half the data; on a real node's share (hundreds of
        # shards in the cache) it is a rounding error
        half = run_epochs(half_remote, spec, 3, cache=ShardCache(cache_dir / "half", half_bytes // 2), proxy=proxy,
                          streaming={"ahead_shards": 0})
        row["half_cache"] = {"uri": half_remote, "shards": len(half_split["shards"]), "cache_bytes": half_bytes // 2,
                             "epoch_object_storage_bytes": [e["object_storage_bytes"] for e in half],
                             "refetched_over_split": [e["object_storage_bytes"] / half_bytes for e in half[1:]],
                             "clips_per_s": [e["clips_per_s"] for e in half]}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    log(f"  sparse: ranged GETs of the sampled frames, no cache ({SPARSE_BATCHES} batches) ...")
    (sp,) = run_epochs(remote, spec, 1, proxy=proxy, max_batches=SPARSE_BATCHES)
    rpc = _per_clip(sp, "requests")
    row["sparse"] = {"clips_per_s": sp["clips_per_s"], "first_batch_s": sp["first_batch_s"], "requests_per_clip": rpc,
                     "object_storage_bytes_per_clip": _per_clip(sp, "object_storage_bytes"),
                     "sampled_bytes_per_clip": _per_clip(sp, "sampled_bytes"),
                     "request_bound_clips_per_s": ranged / max(rpc, 1e-9)}
    row["winner"] = "cached" if row["cached"]["cold_clips_per_s"] >= row["sparse"]["clips_per_s"] else "sparse"
    return row


def bench_storage(local_dir, remote: str, spec: PipelineSpec, *, shapes=SHAPES, half_remote: str | None = None,
                  log=print) -> dict:
    """`shape_rows` for each (latency ms, bandwidth MB/s) of ``shapes`` through the shaping
    proxy, or once unshaped (``shapes`` None/empty). ``local_dir``: the same dataset on local
    disk (None: no local rows)."""
    if local_dir is not None and shards.load_manifest(local_dir).get("splits") != \
            shards.load_manifest(remote).get("splits"):
        raise ValueError(f"{remote} holds another dataset than {local_dir} (manifests differ)")
    out = {"uri": remote, "local_dir": None if local_dir is None else str(local_dir), "shapes": {}}
    if local_dir is not None:
        # the process's first loader maps DALI's and torch's libraries from disk: not a read
        # of the data, and it would count in the first local row's read_bytes
        run_epochs(str(local_dir), spec, 1, max_batches=1)
    for latency_ms, bandwidth_mbps in (shapes or [(None, None)]):
        name = "direct" if latency_ms is None else f"{latency_ms:g}ms_{bandwidth_mbps:g}MBps"
        log(f"[storage] {name}:")
        if latency_ms is None:
            out["shapes"][name] = shape_rows(local_dir, remote, spec, half_remote=half_remote, log=log)
            continue
        with shaped_endpoint(latency_ms, bandwidth_mbps) as proxy:
            out["shapes"][name] = {"latency_ms": latency_ms, "bandwidth_mbps": bandwidth_mbps,
                                   **shape_rows(local_dir, remote, spec, proxy=proxy, bandwidth_mbps=bandwidth_mbps,
                                                half_remote=half_remote, log=log)}
    return out


def format_table(st: dict) -> list[str]:
    lines = [f"object storage {st['uri']}" + (f" vs local disk {st['local_dir']}" if st["local_dir"] else "")]
    for name, r in st["shapes"].items():
        b = r["baselines"]
        lines.append(f"[{name}] {r['clips_per_epoch']} clips in {r['shards']} shards, "
                     f"{r['bytes_per_clip'] / 1e6:.2f} MB per clip (whole pack)")
        if "local" in r:
            lo = r["local"]
            lines.append(f"  local disk      {lo['clips_per_s']:7.1f} clips/s warm; evicted: "
                         f"{lo['disk_bytes_per_clip'] / 1e3:.0f} kB read per clip for "
                         f"{lo['sampled_bytes_per_clip'] / 1e3:.0f} kB of sampled frames "
                         f"({lo['disk_over_sampled']:.2f}x; target <= 2x)")
        bw = (f", bandwidth bound {b['bandwidth_bound_clips_per_s']:.1f} clips/s"
              if "bandwidth_bound_clips_per_s" in b else "")
        lines.append(f"  baselines       whole-object GETs x{b['requests_in_flight']} "
                     f"{b['whole_object_bytes_per_s'] / 1e6:.0f} MB/s = {b['whole_object_clips_per_s']:.1f} clips/s{bw}; small ranged GETs x32 "
                     f"{b['ranged_gets_per_s']:.0f}/s")
        if "colocated_clips_per_s" in b:
            lines.append(f"                  a local epoch while the split downloads (server on the same cores): "
                         f"{b['colocated_clips_per_s']:.1f} clips/s")
        c = r["cached"]
        warm = f" ({c['warm_over_local']:.2f}x local; target >= 0.95x)" if "warm_over_local" in c else ""
        colo = (f", {c['cold_over_colocated']:.2f}x of local + downloads sharing the cores "
                f"{b['colocated_clips_per_s']:.1f}" if "cold_over_colocated" in c else "")
        lines.append(f"  cached, cold    {c['cold_clips_per_s']:7.1f} clips/s = {c['cold_over_attainable']:.2f}x of "
                     f"min(bounds, local) {c['attainable_clips_per_s']:.1f} (target >= 0.8x){colo}")
        lines.append(f"                  after the first batch {c['cold_after_first_batch_clips_per_s']:.1f} clips/s "
                     f"({c['cold_after_first_batch_clips_per_s'] / c['attainable_clips_per_s']:.2f}x of min(bounds, "
                     f"local))")
        lines.append(f"                  first batch {c['first_batch_s']:.2f} s (one shard's fetch "
                     f"{c['one_shard_fetch_s']:.2f} s); {c['requests_per_clip']:.3f} requests/clip in all, "
                     f"{c['shard_requests_per_clip']:.3f} per clip for the shards (target <= 0.05); "
                     f"{c['object_storage_bytes_per_clip'] / 1e6:.2f} MB/clip from object storage")
        lines.append(f"  cached, warm    {c['warm_clips_per_s']:7.1f} clips/s{warm}, "
                     f"{c['warm_object_storage_bytes']} bytes from object storage")
        h = r["half_cache"]
        lines.append(f"  half cache      ({h['shards']} shards) re-downloaded per epoch: "
                     + ", ".join(f"{x:.2f}" for x in h["refetched_over_split"]) + " of the split (target <= 0.55)")
        s = r["sparse"]
        lines.append(f"  sparse GETs     {s['clips_per_s']:7.1f} clips/s; {s['requests_per_clip']:.1f} requests/clip "
                     f"(request bound {s['request_bound_clips_per_s']:.1f} clips/s), "
                     f"{s['object_storage_bytes_per_clip'] / 1e3:.0f} kB/clip from object storage for "
                     f"{s['sampled_bytes_per_clip'] / 1e3:.0f} kB sampled; first batch {s['first_batch_s']:.2f} s")
        lines.append(f"  faster first epoch: {r['winner']}")
    return lines
