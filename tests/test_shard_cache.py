"""The node-local shard cache (`dataloading.cache`) against the session's S3 server: later
epochs read local copies (same batches as local disk), LRU eviction under the size limit,
pinned copies kept, one download per node under concurrent processes, changed objects
re-downloaded."""

import multiprocessing as mp
import os

import pytest
import torch

import s3
from dataloading import augment, order, shards
from dataloading.cache import ShardCache, rank_shards
from dataloading.loader import TSNLoader
from dataloading.spec import PipelineSpec

CROP = augment.CropSpec(input_size=40, resize_short=48)


def _spec(batch_size=2):
    return PipelineSpec(mode="train", num_segments=3, snippet_length=1, modality="rgb", batch_size=batch_size,
                        crop=CROP, num_threads=1, seed=3, shuffle_buffer=4)


def _assert_same(a, b):
    for name in ("frames", "label", "sample_index", "frame_indices", "crop", "frame_size"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _put(server, key: str, data: bytes) -> str:
    s3.client(server).put_object(Bucket=server["bucket"], Key=key, Body=data)
    return f"s3://{server['bucket']}/{key}"


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
    tar_bytes = sum(s["num_bytes"] for s in split["shards"])
    # Epoch 0 downloads the split's tars (every rank reads every part over the rotation) and
    # indexes; later epochs read the node's copies only.
    assert tar_bytes < cached.object_storage_bytes[0] == cache.downloaded_bytes < 1.1 * tar_bytes
    assert cached.object_storage_bytes[1] == cached.object_storage_bytes[2] == 0
    assert len(cache.entries()) == 2 * len(split["shards"])
    # A resize (here: 1 -> 2 ranks, a new process's cache object on the node's directory): the
    # new ranks' parts are already on the node.
    resized = TSNLoader(packed_jpeg_s3, "train", _spec(), rank=1, world_size=2,
                        cache=ShardCache(tmp_path / "cache", 1 << 30))
    assert len(list(resized)) >= 1 and resized.object_storage_bytes == {0: 0}
    resized.close()


def test_a_split_larger_than_the_cache_streams_with_the_same_batches(s3_env, packed_jpeg, packed_jpeg_s3, tmp_path):
    """All-or-nothing tars (DALI cannot mix local and s3:// tars): the indexes are cached, the
    tars stream every epoch, and each epoch costs the shards of this rank's chunk of the
    epoch's order (`dataloading.order`)."""
    split = shards.load_manifest(packed_jpeg)["splits"]["train"]
    tar_bytes = sum(s["num_bytes"] for s in split["shards"])
    cache = ShardCache(tmp_path / "cache", tar_bytes // 2)
    cached = TSNLoader(packed_jpeg_s3, "train", _spec(), rank=0, world_size=2, epochs=2, cache=cache)
    local = TSNLoader(packed_jpeg, "train", _spec(), rank=0, world_size=2)
    for _ in range(2):
        for x, y in zip(list(cached), list(local), strict=True):
            _assert_same(x, y)
    assert all(name.endswith(".idx") for name in cache.entries()) and len(cache.entries()) == len(split["shards"])
    per_shard = [s["num_samples"] for s in split["shards"]]
    chunks = [order.split(order.full(sum(per_shard)), 2)[0] for e in range(2)]
    part = [sum(split["shards"][i]["num_bytes"]
                for i in order.shards_of(order.epoch_order(per_shard, _spec().seed, e), chunks[e])) for e in range(2)]
    assert cached.object_storage_bytes[1] == part[1] and cached.object_storage_bytes[0] > part[0]

def test_rank_shards_covers_each_part():
    per_shard = [3, 3, 3, 3]  # 12 samples
    assert rank_shards(per_shard, 0, 1) == {0, 1, 2, 3}
    assert rank_shards(per_shard, 0, 2) == {0, 1} and rank_shards(per_shard, 1, 2) == {2, 3}
    assert rank_shards(per_shard, 1, 3) == {1, 2}  # samples 4..7 span shards 1 and 2
    parts = [rank_shards([5, 1, 7, 2], s, 3) for s in range(3)]
    assert set().union(*parts) == {0, 1, 2, 3}


def test_lru_eviction_keeps_the_most_recent_copies_within_the_limit(s3_env, tmp_path):
    uris = [_put(s3_env, f"evict/{n}.tar", bytes([n]) * 1000) for n in range(4)]
    cache = ShardCache(tmp_path / "c", 2500)
    for n in (0, 1, 0, 2, 3):  # uses, in order; each holder releases its pin at once
        got = cache.resolve([uris[n]])
        cache.release()
        assert got.paths[0] != uris[n] and open(got.paths[0], "rb").read() == bytes([n]) * 1000
    # 2 copies fit: 0 and 1 were evicted least recently used first (0 was used after 1: 1 went first).
    assert sorted(name.split(".", 1)[1] for name in cache.entries()) == ["2.tar", "3.tar"]
    assert sum(cache.entries().values()) <= 2500
    assert cache.downloaded_bytes == 4000  # 0, 1, 2, 3 once each: the second use of 0 was a hit


def test_a_pinned_copy_is_not_evicted_the_newcomer_streams(s3_env, tmp_path):
    a, b = _put(s3_env, "pin/a.tar", b"a" * 1000), _put(s3_env, "pin/b.tar", b"b" * 1000)
    cache = ShardCache(tmp_path / "c", 1500)
    other = ShardCache(tmp_path / "c", 1500)  # another rank of the node (pins are file locks)
    assert cache.resolve([a], holder="rank0").cached == [a]
    got = other.resolve([b], holder="rank1")
    assert got.paths == [b] and got.streamed_bytes == 1000 and got.downloaded_bytes == 0
    assert [n.split(".", 1)[1] for n in cache.entries()] == ["a.tar"]
    cache.release("rank0")
    assert other.resolve([b], holder="rank1").cached == [b]  # now a could go
    assert [n.split(".", 1)[1] for n in cache.entries()] == ["b.tar"]


def test_a_changed_object_is_downloaded_again(s3_env, tmp_path):
    uri = _put(s3_env, "changed/x.tar", b"old" * 100)
    cache = ShardCache(tmp_path / "c", 1 << 20)
    first = cache.resolve([uri])
    assert open(first.paths[0], "rb").read() == b"old" * 100 and first.downloaded_bytes == 300
    assert cache.resolve([uri]).downloaded_bytes == 0
    _put(s3_env, "changed/x.tar", b"new!" * 100)
    again = cache.resolve([uri])
    assert again.downloaded_bytes == 400 and open(again.paths[0], "rb").read() == b"new!" * 100
    assert again.paths[0] != first.paths[0]


def _fetch_in_process(cache_dir, uri, start, out):
    cache = ShardCache(cache_dir, 1 << 30)
    start.wait()  # both processes imported and ready: they ask at the same moment
    got = cache.resolve([uri])
    out.put((got.downloaded_bytes, os.path.getsize(got.paths[0]), got.paths[0]))


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


def test_bench_cached_row(s3_env, packed_jpeg_s3):
    from tools.bench_loader import bench_cached

    row = bench_cached(packed_jpeg_s3, _spec(batch_size=4), batches=3, warmup=1)
    first, second = (e["object_storage_bytes"] for e in row["epochs"])
    assert first > 0 and second == 0 and row["clips_per_s"] > 0
    assert all(e["clips_per_s"] > 0 for e in row["epochs"])
