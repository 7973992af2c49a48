"""The node-local shard cache (`dataloading.store.cache`) against the session's S3 server: later
epochs read local copies (same batches as local disk), LRU eviction under the size limit,
pinned copies kept, one download per node under concurrent processes, changed objects
re-downloaded."""

import multiprocessing as mp
import os
import threading
import time

import pytest
import torch

import s3
from dataloading.format import shards
from dataloading.pipeline.loader import TSNLoader
from dataloading.planning import augment, order
from dataloading.planning.spec import PipelineSpec
from dataloading.store.cache import ShardCache, _object_infos

CROP = augment.CropSpec(input_size=40, resize_short=48)


def _spec(batch_size=2):
    return PipelineSpec(mode="train", num_segments=3, snippet_length=1, modality="rgb", batch_size=batch_size,
                        crop=CROP, num_threads=1, seed=3)


def _assert_same(a, b):
    for name in ("frames", "label", "sample_index", "frame_indices", "crop", "frame_size"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _put(server, key: str, data: bytes) -> str:
    s3.client(server).put_object(Bucket=server["bucket"], Key=key, Body=data)
    return f"s3://{server['bucket']}/{key}"


def _acquire(cache: ShardCache, uri: str, holder=None):
    """`ShardCache.acquire` as the streamer calls it (the object's size and mtime from a listing)."""
    size, mtime_ns = _object_infos([uri])[uri]
    return cache.acquire(uri, size, mtime_ns, holder)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_second_epoch_reads_the_cache_and_batches_match_local_disk(s3_env, packed_jpeg, packed_jpeg_s3, tmp_path,
                                                                   rank, world_size):
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    cached = TSNLoader(packed_jpeg_s3, "train", _spec(), rank=rank, world_size=world_size, prefetch_batches=2,
                       epochs=3, cache=cache)
    local = TSNLoader(packed_jpeg, "train", _spec(), rank=rank, world_size=world_size)
    for _ in range(3):
        a, b = list(cached), list(local)
        assert len(a) == len(b) >= 1
        for x, y in zip(a, b):
            _assert_same(x, y)
    cached.close()
    split = shards.load_manifest(packed_jpeg)["splits"]["train"]
    per_shard = [s["num_samples"] for s in split["shards"]]
    # Each epoch downloads the shards of this rank's chunk not yet on the node (the rank reads
    # its chunk, not the split); nothing else crosses the network (only the sampled frames of
    # the copies are read).
    have, expected = set(), []
    for e in range(3):
        chunk = order.split(order.full(sum(per_shard)), world_size)[rank]
        need = order.shards_of(order.epoch_order(per_shard, _spec().seed, e), chunk)
        expected.append(sum(split["shards"][i]["num_bytes"] for i in need - have))
        have |= need
    assert [cached.object_storage_bytes[e] for e in range(3)] == expected and expected[0] > 0
    assert cache.downloaded_bytes == sum(expected) and len(cache.entries()) == len(have)
    if world_size == 1:
        assert expected[1] == expected[2] == 0
    # A resize (here: a new process's cache object on the node's directory, rank 1 of 2): the
    # shards it reads that are already on the node cost nothing.
    resized = TSNLoader(packed_jpeg_s3, "train", _spec(), rank=1, world_size=2,
                        cache=ShardCache(tmp_path / "cache", 1 << 30))
    assert len(list(resized)) >= 1
    chunk = order.split(order.full(sum(per_shard)), 2)[1]
    need = order.shards_of(order.epoch_order(per_shard, _spec().seed, 0), chunk)
    assert resized.object_storage_bytes[0] == sum(split["shards"][i]["num_bytes"] for i in need - have)
    resized.close()


def test_a_cache_of_half_the_data_refetches_about_half_per_epoch(s3_env, packed_jpeg, packed_jpeg_s3, tmp_path):
    """Eviction by next use (the epoch order is known ahead): with room for half the shards,
    each epoch after the first fetches well under the whole split again (least recently used
    would refetch nearly all of it), the cache stays within its limit, and the batches are the
    same as from local disk."""
    split = shards.load_manifest(packed_jpeg)["splits"]["train"]
    tar_bytes = sum(s["num_bytes"] for s in split["shards"])
    cache = ShardCache(tmp_path / "cache", tar_bytes // 2)
    # No fetch-ahead: with 12 tiny shards a window of 3 pinned shards would be half the cache
    # (real shards are hundreds of MB; the window is a small part of a cache of half the data)
    cached = TSNLoader(packed_jpeg_s3, "train", _spec(), rank=0, world_size=1, epochs=4, cache=cache,
                       streaming={"ahead_shards": 0})
    local = TSNLoader(packed_jpeg, "train", _spec(), rank=0, world_size=1)
    for _ in range(4):
        for x, y in zip(list(cached), list(local), strict=True):
            _assert_same(x, y)
        assert sum(cache.entries().values()) <= tar_bytes // 2
    fetched = cached.object_storage_bytes
    cached.close()
    assert 0.9 * tar_bytes <= fetched[0] <= tar_bytes, fetched  # cold: every shard once (or its samples in place)
    # 12 shards, room for ~6 beside the 3 of the fetch-ahead window: the bound is 0.5
    print("fetched per epoch", fetched, tar_bytes)
    assert all(0 < fetched[e] <= 0.8 * tar_bytes for e in (1, 2, 3)), (fetched, tar_bytes)


def test_shards_that_do_not_fit_are_read_in_place(s3_env, packed_jpeg, packed_jpeg_s3, tmp_path):
    """A cache too small for any shard: every read is a ranged GET of the sample's bytes, the
    batches the same as from local disk."""
    cache = ShardCache(tmp_path / "cache", 1000)
    cached = TSNLoader(packed_jpeg_s3, "train", _spec(), rank=0, world_size=2, epochs=1, cache=cache)
    local = TSNLoader(packed_jpeg, "train", _spec(), rank=0, world_size=2)
    for x, y in zip(list(cached), list(local), strict=True):
        _assert_same(x, y)
    ranged = cached._access.objects.counters.snapshot()
    assert cache.entries() == {} and ranged["requests"] > 0 and cached.object_storage_bytes[0] == ranged["bytes"] > 0
    cached.close()


def test_lru_eviction_keeps_the_most_recent_copies_within_the_limit(s3_env, tmp_path):
    """With no holder's next uses published, the least recently used copy goes first."""
    uris = [_put(s3_env, f"evict/{n}.tar", bytes([n]) * 1000) for n in range(4)]
    cache = ShardCache(tmp_path / "c", 2500)
    for n in (0, 1, 0, 2, 3):  # uses, in order; each holder releases its pin at once
        local, _ = _acquire(cache, uris[n])
        cache.release()
        assert local is not None and open(local, "rb").read() == bytes([n]) * 1000
    # 2 copies fit: 0 and 1 were evicted least recently used first (0 was used after 1: 1 went first).
    assert sorted(name.split(".", 1)[1] for name in cache.entries()) == ["2.tar", "3.tar"]
    assert sum(cache.entries().values()) <= 2500
    assert cache.downloaded_bytes == 4000  # 0, 1, 2, 3 once each: the second use of 0 was a hit


def test_a_pinned_copy_is_not_evicted_the_newcomer_streams(s3_env, tmp_path):
    a, b = _put(s3_env, "pin/a.tar", b"a" * 1000), _put(s3_env, "pin/b.tar", b"b" * 1000)
    cache = ShardCache(tmp_path / "c", 1500)
    other = ShardCache(tmp_path / "c", 1500)  # another rank of the node (pins are file locks)
    local_a, downloaded = _acquire(cache, a, holder="rank0")
    assert local_a is not None and downloaded == 1000
    # no room beside a's pinned copy: not cached, nothing downloaded (the rank reads b in place)
    assert _acquire(other, b, holder="rank1") == (None, 0)
    assert [n.split(".", 1)[1] for n in cache.entries()] == ["a.tar"]
    cache.release("rank0")
    local_b, downloaded = _acquire(other, b, holder="rank1")  # now a could go
    assert local_b is not None and downloaded == 1000 and open(local_b, "rb").read() == b"b" * 1000
    assert [n.split(".", 1)[1] for n in cache.entries()] == ["b.tar"]


def test_a_changed_object_is_downloaded_again(s3_env, tmp_path):
    uri = _put(s3_env, "changed/x.tar", b"old" * 100)
    cache = ShardCache(tmp_path / "c", 1 << 20)
    first, downloaded = _acquire(cache, uri)
    assert open(first, "rb").read() == b"old" * 100 and downloaded == 300
    assert _acquire(cache, uri)[1] == 0
    _put(s3_env, "changed/x.tar", b"new!" * 100)
    again, downloaded = _acquire(cache, uri)
    assert downloaded == 400 and open(again, "rb").read() == b"new!" * 100
    assert again != first


def _fetch_in_process(cache_dir, uri, start, out):
    cache = ShardCache(cache_dir, 1 << 30)
    start.wait()  # both processes imported and ready: they ask at the same moment
    local, downloaded = _acquire(cache, uri)
    out.put((downloaded, os.path.getsize(local), str(local)))


def test_two_processes_fetch_a_shard_once_and_both_get_it_whole(s3_env, tmp_path):
    size = 24 << 20  # ~0.25 s from moto: both processes ask while the first download runs
    uri = _put(s3_env, "concurrent/big.tar", os.urandom(size))
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_process, args=(tmp_path / "c", uri, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(r[0] for r in results) == [0, size]  # one download on the node
    assert all(r[1] == size for r in results) and results[0][2] == results[1][2]


def test_bad_settings_are_clear(tmp_path):
    with pytest.raises(ValueError, match="must be >= 1 byte"):
        ShardCache(tmp_path, 0)
    with pytest.raises(ValueError, match="data.cache_dir s3://b/c: must be a local directory"):
        ShardCache("s3://b/c", 10)


def test_a_failed_part_ends_the_download_only_once_every_part_has_stopped(tmp_path):
    """A whole-shard download in parallel parts: when one part fails, the error is raised only
    after the others have stopped writing (they write into the part file's descriptor, which is
    closed and may be reused by another file), and no partial copy is left."""
    from concurrent.futures import ThreadPoolExecutor

    from dataloading.store.cache import _download

    running, lock = set(), threading.Lock()

    def read_range(uri, start, end):
        with lock:
            running.add(start)
        try:
            if start == 0:
                raise OSError("connection reset by peer")
            time.sleep(0.3)
            return b"x" * (end - start)
        finally:
            with lock:
                running.discard(start)

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(OSError, match="connection reset"):
            _download("s3://b/x.tar", tmp_path / "x.tar", 200, read_range, pool, 100)
        assert running == set()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A mount factory: ``mount(size, read_only=False)`` -> a fresh tmpfs directory (unmounted after)."""
    import subprocess

    mounts = []

    def mount(size: str, read_only: bool = False):
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs",
                            str(where)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("parts", [True, False])
def test_a_cache_disk_smaller_than_the_limit_is_the_limit(s3_env, small_tmpfs, parts, caplog):
    """Issue 24: on a full disk a parallel download's short pwrite passed as a complete copy
    (its right size, zeros from the first short write on), which every later run then read.
    A disk smaller than data.cache_size_bytes is now the limit: the object is read in place,
    nothing is left on the disk, and a roomier disk caches it whole."""
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(300_000)
    uri = _put(s3_env, "full-disk/x.tar", data)
    full = small_tmpfs("64k")
    cache = ShardCache(full, 1 << 40)
    assert cache.room_bytes() < len(data)
    size, mtime_ns = _object_infos([uri])[uri]
    with ThreadPoolExecutor(2) as pool:
        kw = dict(read_range=lambda u, a, b: data[a:b], pool=pool, part_bytes=100_000) if parts else {}
        assert cache.acquire(uri, size, mtime_ns, **kw) == (None, 0)
    assert [p.name for p in full.iterdir() if p.suffix == ".tar" or ".part." in p.name] == []
    roomy = ShardCache(small_tmpfs("64m"), 1 << 40)
    path, downloaded = roomy.acquire(uri, size, mtime_ns)
    assert downloaded == len(data) and path.read_bytes() == data


def test_a_disk_that_fills_during_a_download_fails_naming_the_cache(small_tmpfs):
    """Space is claimed before any GET (``posix_fallocate``): a disk another writer filled
    fails there, with one line naming data.cache_dir and the fix, not with a torn copy."""
    from dataloading.store.cache import _claim, cache_disk_error

    full = small_tmpfs("64k")
    with open(full / "x.part", "wb") as f, pytest.raises(OSError) as raised:
        _claim(f.fileno(), 1 << 20, full / "x.part")
    error = cache_disk_error(raised.value, full)
    assert error is not None and str(error).startswith(f"[Errno 28] data.cache_dir {full}: no space left on device")
    assert "free space there" in str(error) and str(full / "x.part") in str(error)


def test_a_read_only_cache_dir_fails_naming_it(s3_env, small_tmpfs):
    ro = small_tmpfs("1m", read_only=True)
    cache = ShardCache(ro, 1 << 30)
    with pytest.raises(OSError, match=rf"data.cache_dir {ro}: read-only file system .*make it writable"):
        cache.set_needs("h", {"a.tar": 0.0})
