"""Streaming from object storage shaped like a real store: the session's S3 server behind
`tools.shaping_proxy` (latency per request, a bandwidth cap, an outage on demand). A server
restart mid-shard is retried with nothing lost and exact accounting; two ranks of a node share
one download of each shard; a replaced shard is refused by its size or its checksums, named."""

import multiprocessing as mp
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

import s3
from dataloading.format import shards
from dataloading.format.shard_index import ShardIndex
from dataloading.pipeline.loader import TSNLoader
from dataloading.planning import augment, order
from dataloading.planning.spec import PipelineSpec
from dataloading.store.byteranges import ShardChangedError
from dataloading.store.cache import ShardCache
from tools.shaping_proxy import ProxyProcess

CROP = augment.CropSpec(input_size=40, resize_short=48)


def _spec():
    return PipelineSpec(mode="train", num_segments=3, snippet_length=1, modality="rgb", batch_size=2, crop=CROP,
                        num_threads=1, seed=3)


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("frames", "label", "sample_index", "frame_indices"))


@pytest.fixture
def shaped(s3_env, monkeypatch):
    """The session's server behind a proxy of 5 ms per request and 0.4 MB/s: a tiny shard
    (~60 kB) takes ~0.15 s, an epoch of the train split a few seconds."""
    u = urlparse(s3_env["endpoint"])
    with ProxyProcess(f"{u.hostname}:{u.port}", latency_ms=5, bandwidth_mbps=0.4) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield proxy


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False], ids=["whole-shard-cache", "sparse-ranged-gets"])
def test_a_server_restart_mid_epoch_is_retried_with_nothing_lost(shaped, packed_jpeg, packed_jpeg_s3, tmp_path,
                                                                  cached):
    """The proxy drops every connection and refuses new ones for 1.5 s while shards stream:
    the reads are retried (backoff), the epoch's batches equal local disk's, and the bytes
    counted are exactly what the epoch needed (a cold cache: every shard once)."""
    cache = ShardCache(tmp_path / "cache", 1 << 30) if cached else None
    remote = TSNLoader(packed_jpeg_s3, "train", _spec(), cache=cache)
    local = list(TSNLoader(packed_jpeg, "train", _spec()))
    outage = threading.Timer(0.5, lambda: (shaped.stop_serving(), time.sleep(1.5), shaped.start_serving()))
    t0 = time.monotonic()
    outage.start()
    try:
        got = list(remote)
    finally:
        outage.join()
    assert time.monotonic() - t0 > 2.0  # the epoch was still streaming when the server went away
    assert len(got) == len(local) and all(_same(a, b) for a, b in zip(got, local))
    assert remote.skipped == []
    split = shards.load_manifest(packed_jpeg)["splits"]["train"]
    if cached:
        assert remote.object_storage_bytes[0] == sum(s["num_bytes"] for s in split["shards"])
        assert sorted(cache.entries().values()) == sorted(s["num_bytes"] for s in split["shards"])
    else:
        ranged = remote._access.objects.counters.snapshot()
        assert remote.object_storage_bytes[0] == ranged["bytes"] > 0
    remote.close()


def _one_rank(cache_dir, uri, rank, start, out):
    loader = TSNLoader(uri, "train", _spec(), rank=rank, world_size=2, cache=ShardCache(cache_dir, 1 << 30))
    start.wait()  # both ranks stream at the same moment
    batches = [(b.sample_index.tolist(), b.frames.sum().item()) for b in loader]
    out.put((rank, batches, loader.object_storage_bytes[0]))
    loader.close()


@pytest.mark.slow
def test_two_ranks_of_a_node_share_one_download_of_each_shard(shaped, packed_jpeg, packed_jpeg_s3, tmp_path):
    """Two processes (ranks 0 and 1 of 2) on one cache directory, streaming at once: the node
    downloads each shard of their chunks once (a shard both chunks touch is fetched by one and
    waited for by the other), and each rank's batches equal local disk's."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_one_rank, args=(tmp_path / "c", packed_jpeg_s3, r, start, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    split = shards.load_manifest(packed_jpeg)["splits"]["train"]
    per_shard = [s["num_samples"] for s in split["shards"]]
    epoch = order.epoch_order(per_shard, _spec().seed, 0)
    needed = set().union(*(order.shards_of(epoch, c) for c in order.split(order.full(sum(per_shard)), 2)))
    assert sum(r[2] for r in results) == sum(split["shards"][i]["num_bytes"] for i in needed)
    for rank, batches, _ in results:
        local = [(b.sample_index.tolist(), b.frames.sum().item())
                 for b in TSNLoader(packed_jpeg, "train", _spec(), rank=rank, world_size=2)]
        assert batches == local


def _replace(server, remote: str, packed: Path, rel: str, data: bytes) -> None:
    bucket, _, prefix = remote.removeprefix("s3://").partition("/")
    s3.client(server).put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


def test_a_shard_replaced_by_another_size_is_refused_naming_it(s3_env, s3_server, packed_jpeg, tmp_path):
    """Replaced before the job: refused when the loader is built (one listing per split),
    before any batch. Replaced while loaders are open: refused when it is opened (its HEAD,
    against the manifest's size), by the whole-shard streamer and by sparse reads alike."""
    uri = s3.upload_dir(s3_server, packed_jpeg, "replaced-size")
    entry = shards.load_manifest(packed_jpeg)["splits"]["train"]["shards"][0]
    first, size = entry["path"], entry["num_bytes"]
    cached = TSNLoader(uri, "train", _spec(), cache=ShardCache(tmp_path / "c", 1 << 30))
    sparse = TSNLoader(uri, "train", _spec())
    _replace(s3_server, uri, packed_jpeg, first, (packed_jpeg / first).read_bytes() + bytes(512))
    for loader in (cached, sparse):
        with pytest.raises(ShardChangedError, match=f"{first}: {size + 512} bytes in object storage, the manifest "
                                                    f"lists {size} .the object was replaced since it was packed"):
            list(loader)
        loader.close()
    with pytest.raises(shards.DamagedShardError, match=f"{first}: {size + 512} bytes in object storage, manifest lists"):
        TSNLoader(uri, "train", _spec(), cache=ShardCache(tmp_path / "c", 1 << 30))


@pytest.mark.parametrize("cached", [True, False], ids=["whole-shard-cache", "sparse-ranged-gets"])
def test_a_shard_replaced_by_same_size_bytes_fails_its_checksums(s3_env, s3_server, packed_jpeg, tmp_path,
                                                                  cached):
    """Same size, other bytes (the frames of one sample zeroed): the checksums of the frames
    read catch it; the sample is skipped, named with its shard, the epoch goes on."""
    uri = s3.upload_dir(s3_server, packed_jpeg, f"replaced-bytes-{cached}")
    manifest = shards.load_manifest(packed_jpeg)
    first = manifest["splits"]["train"]["shards"][0]
    table = ShardIndex([str(packed_jpeg / first["index_path"])], ["frames"], [first["num_samples"]]).table(0)
    start, end = table.span(0, "frames")
    raw = bytearray((packed_jpeg / first["path"]).read_bytes())
    raw[start:end] = bytes(end - start)
    _replace(s3_server, uri, packed_jpeg, first["path"], bytes(raw))
    cache = ShardCache(tmp_path / "c", 1 << 30) if cached else None
    loader = TSNLoader(uri, "train", _spec(), cache=cache)
    batches = list(loader)
    assert sum(int(b.real.sum()) for b in batches) == manifest["splits"]["train"]["num_samples"] - 1
    (bad,) = loader.skipped
    assert bad["key"] == table.keys[0] and first["path"] in bad["shard"] and "differ from the checksum" in bad["reason"]
    loader.close()


def test_a_cached_copys_table_from_its_tar_headers_equals_its_index(packed_jpeg):
    """A node-cache copy's table is read from its own tar headers (no index GET): the same
    keys and byte spans as the DALI index the packer wrote, for every shard."""
    from dataloading.format.shard_index import parse_index, tar_table

    members = ("info", "frames", "offsets")
    tars, idxs, _ = shards.split_shards(packed_jpeg, "train")
    for tar, idx in zip(tars, idxs):
        want, got = parse_index(Path(idx).read_text(), members, idx), tar_table(tar, members)
        assert got.keys == want.keys and got.spans.tolist() == want.spans.tolist()
    lacking = tar_table(tars[0], ("info", "video"))  # every sample lacks it: each one's problem, to skip
    assert len(lacking.problems) == len(lacking.keys) > 0
    assert all(p.startswith("no member 'video' in the shard") for p in lacking.problems.values())


def test_the_whole_shard_path_sends_two_requests_per_shard(shaped, packed_jpeg, packed_jpeg_s3, tmp_path):
    """Counted by the proxy over a cold epoch: a HEAD and one GET per shard (its table comes
    from the copy's tar headers, not an index GET), plus a fixed handful for the manifest and
    the listings; a warm epoch sends nothing."""
    split = shards.load_manifest(packed_jpeg)["splits"]["train"]
    shaped.reset()
    loader = TSNLoader(packed_jpeg_s3, "train", _spec(), cache=ShardCache(tmp_path / "c", 1 << 30), epochs=2)
    list(loader)
    cold = shaped.stats()["by_method"]
    assert cold.get("HEAD", 0) + cold.get("GET", 0) <= 2 * len(split["shards"]) + 10, cold
    shaped.reset()
    list(loader)
    assert shaped.stats()["requests"] == 0
    loader.close()
