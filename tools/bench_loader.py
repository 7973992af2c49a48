"""`tsn bench-loader`: clips/s of the data paths on the same data, same sampling, same threads.

Rows, each for (K=8, L=1, rgb) and (K=3, L=5, rgb_diff), train-mode sampling and full TSN
augmentation (multi-scale corner crop, resize to 224, flip, normalise):

- ``dali``: the product's DALI pipeline on the packed shards.
- ``reference``: the plain-Python reference loader (OpenCV + numpy) on the same shards.
- ``peer_decord``: how mmaction2 loads TSN clips: decord random access into the *source*
  videos, resize to short side 256, MultiScaleCrop (5 positions), resize, flip, normalise.
- ``decode_limit``: DALI decoding only the sampled frames, whole, no augmentation.
- with ``--remote s3://...`` (the same dataset uploaded to object storage), ``storage``: the
  DALI row (K=8, L=1) from local disk and from object storage in interleaved rounds, in
  clips/s and bytes/s, the bytes read per clip, and the server's own raw GET rate for the
  same objects (the rate object storage allows: its MB/s over the bytes per clip); and the
  ``cached`` row: the same loader from object storage through a fresh node-local shard cache
  (`dataloading.cache`, ``data.cache_dir``): the bytes the first and second epochs cost object
  storage, and the steady-state clips/s once the copies are local.

Ratios are computed within the same run (absolute numbers drift on shared machines).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from dataloading import augment, sampling, shards, storage
from tools import reference
from dataloading.cache import ShardCache
from dataloading.dali_pipeline import build_pipeline
from dataloading.loader import TSNLoader
from dataloading.spec import PipelineSpec

CONFIGS = (("K8_L1_rgb", 8, 1, "rgb"), ("K3_L5_rgbdiff", 3, 5, "rgb_diff"))
TARGETS = {"dali_over_peer": 5.0, "dali_over_reference": 2.0, "dali_over_decode_limit": 0.5}


def _rate(fn_batch, batches: int, warmup: int) -> float:
    """Clips/s of ``fn_batch()`` (returns clips produced) over ``batches`` calls after warmup."""
    for _ in range(warmup):
        fn_batch()
    t0, clips = time.perf_counter(), 0
    for _ in range(batches):
        clips += fn_batch()
    return clips / (time.perf_counter() - t0)


def _cycle(make_iter):
    """Endless iteration over a re-creatable iterable (epochs restart transparently)."""
    while True:
        yielded = False
        for item in make_iter():
            yielded = True
            yield item
        if not yielded:
            raise RuntimeError("data source yielded nothing")


def bench_dali(dataset_dir, spec: PipelineSpec, batches: int, warmup: int,
               cache: ShardCache | None = None) -> tuple[float, float]:
    """The product path: `TSNLoader` (DALI graph + the resize backend the spec resolves to).

    Returns (clips/s in steady state, seconds of an epoch start). The loader builds one
    pipeline per epoch (exact resume); that costs ~0.25 s once per epoch, which a real epoch
    (UCF101: ~1,200 batches of 8) amortises to nothing but a benchmark split of a few batches
    would not. So the first batch of each epoch is timed apart and reported as the epoch-start
    cost; the rate is over the other batches, after ``warmup`` batches: a process's first ~50
    batches fault its heap and DALI's buffers in (measured 139k, then 76k minor page faults
    per 26 batches, ~11k after; the rate went 150 -> 260 clips/s), a one-off cost of a
    training run that a short benchmark must not count as its steady state.
    """
    loader = TSNLoader(dataset_dir, "train", spec, cache=cache)  # built once; each pass is the next epoch
    steady_s, steady_clips, starts = 0.0, 0, []
    done = -warmup
    while done < batches:
        it = iter(loader)
        first = True
        while done < batches:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            dt = time.perf_counter() - t0
            if done >= 0:
                if first:
                    starts.append(dt)
                else:
                    steady_s, steady_clips = steady_s + dt, steady_clips + batch.frames.shape[0]
            first = False
            done += 1
    if not steady_clips:
        raise ValueError(f"{dataset_dir}: the train split has one batch per epoch; the steady-state rate "
                         f"needs more videos")
    return steady_clips / steady_s, (sum(starts) / len(starts) if starts else 0.0)


def bench_decode_limit(dataset_dir, spec: PipelineSpec, batches: int, warmup: int) -> float:
    """DALI decoding the sampled frames whole (same reader, sampling and threads), nothing else."""
    manifest = shards.load_manifest(dataset_dir)
    tars, idxs, n = shards.split_shards(dataset_dir, "train")
    pipe = build_pipeline(tars, idxs, manifest["layout"], spec, num_samples=n, decode_only=True)
    pipe.build()

    def one():
        pipe.run()
        return spec.batch_size

    return _rate(one, batches, warmup)


def bench_reference(dataset_dir, spec: PipelineSpec, batches: int, warmup: int, threads: int) -> float:
    manifest = shards.load_manifest(dataset_dir)
    tars, _, _ = shards.split_shards(dataset_dir, "train")
    it = _cycle(lambda: reference.Loader(tars, manifest["layout"], spec, threads=threads))
    return _rate(lambda: len(next(it)["label"]), batches, warmup)


def peer_sources(dataset_dir, sources_csv: str | None) -> list[str]:
    """Source videos for the peer row: from a labels CSV, else the paths recorded at packing."""
    if sources_csv:
        base = Path(sources_csv).parent
        with open(sources_csv, newline="") as f:
            paths = [str(base / row["path"]) if not os.path.isabs(row["path"]) else row["path"]
                     for row in csv.DictReader(f)]
    else:
        tars, _, _ = shards.split_shards(dataset_dir, "train")
        paths = [json.loads(s.members["json"])["source"] for t in tars for s in reference.iter_shard(t)]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError("no source videos found for the peer baseline: pass --sources LABELS.csv")
    return paths


def mmaction_tsn_clip(path: str, spec: PipelineSpec, rng: np.random.Generator, threads: int) -> np.ndarray:
    """One clip the way mmaction2's TSN train pipeline makes it (DecordInit, SampleFrames,
    DecordDecode, Resize(-1, 256), MultiScaleCrop 5 positions, Resize 224, Flip, Normalize)."""
    import decord

    vr = decord.VideoReader(path, num_threads=threads)
    n = len(vr)
    K, Lf = spec.num_segments, spec.frames_per_snippet
    idx = sampling.frame_indices("train", n, K, Lf, sampling.draw(rng, K)).reshape(-1)
    frames = vr.get_batch(list(idx)).asnumpy()
    h, w = frames.shape[1:3]
    scale = 256 / min(h, w)
    size = (int(round(w * scale)), int(round(h * scale)))
    frames = [cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in frames]
    crop = augment.CropSpec(input_size=spec.crop.input_size, more_fix_crop=False)
    box = augment.train_crop(size[1], size[0], crop, *sampling.draw(rng, 3))
    return reference.augment_frames(frames, box, spec)


def bench_peer(paths: list[str], spec: PipelineSpec, batches: int, warmup: int, threads: int) -> float:
    rng = sampling.rng_for(spec.seed, 0, 0, 0)
    order = iter(_cycle(lambda: paths))

    def one():
        for _ in range(spec.batch_size):
            mmaction_tsn_clip(next(order), spec, rng, threads)
        return spec.batch_size

    return _rate(one, batches, warmup)


def raw_get_bytes_per_s(locations: list[str]) -> float:
    """Bytes/s of reading every object in ``locations`` whole, one after the other (a GET
    each on object storage; the loader's reader cannot beat what the server serves)."""
    t0, total = time.perf_counter(), 0
    for loc in locations:
        total += len(storage.read_bytes(loc))
    return total / (time.perf_counter() - t0)


def bench_reader(dataset_dir, spec: PipelineSpec, batches: int, warmup: int) -> float:
    """Clips/s of DALI's webdataset reader alone (the train shards' ``info`` and RGB members,
    shuffled as in training, nothing decoded): the rate the reader fetches samples at, which
    bounds the whole pipeline from below on object storage."""
    from nvidia.dali import fn, pipeline_def

    manifest = shards.load_manifest(dataset_dir)
    tars, idxs, _ = shards.split_shards(dataset_dir, "train")

    @pipeline_def(batch_size=spec.batch_size, num_threads=spec.num_threads, device_id=None)
    def reader_only():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=idxs,
                                           ext=["info", *shards.LAYOUT_MEMBERS[manifest["layout"]]],
                                           random_shuffle=True, initial_fill=spec.shuffle_buffer, name="reader"))

    pipe = reader_only()
    pipe.build()

    def one():
        pipe.run()
        return spec.batch_size

    return _rate(one, batches, warmup)


def request_latency_s(location: str, requests: int = 40, num_bytes: int = 4096) -> float:
    """Median seconds of one small ranged read (a GET with a Range header on object storage)
    at spread-out offsets of ``location``: the per-request cost a reader pays for each member
    it fetches, whatever its size."""
    import pyarrow.fs as pafs

    if storage.is_uri(location):
        f = storage.s3_filesystem().open_input_file(str(location).removeprefix(storage.S3_SCHEME))
    else:
        f = pafs.LocalFileSystem().open_input_file(str(location))
    size = f.size()
    times = []
    with f:
        for i in range(requests):
            t0 = time.perf_counter()
            f.read_at(min(num_bytes, size), (i * 7919 * 512) % max(1, size - num_bytes))
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def request_rate_per_s(locations: list[str], streams: int = 4, requests: int = 60, num_bytes: int = 4096) -> float:
    """Small ranged reads per second the server answers with ``streams`` concurrent readers
    (each its own file handle, ``requests`` reads): its request rate, the bound of a reader
    that fetches each member with a request of its own, however many it keeps in flight."""
    import threading

    errors: list[BaseException] = []

    def one_stream(i: int) -> None:
        try:
            request_latency_s(locations[i % len(locations)], requests, num_bytes)
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return streams * requests / (time.perf_counter() - t0)


def bench_cached(remote_dir: str, spec: PipelineSpec, batches: int, warmup: int) -> dict:
    """`TSNLoader` from ``remote_dir`` through a fresh shard cache (a temporary directory,
    removed after): two whole epochs ({clips/s, bytes from object storage} each; the first
    downloads the copies), then the steady-state rate as `bench_dali` measures it on the
    filled cache."""
    cache_dir = tempfile.mkdtemp(prefix="tsn-bench-cache-")
    try:
        cache = ShardCache(cache_dir, 1 << 50)  # no eviction: the row measures reuse
        t0 = time.perf_counter()
        loader = TSNLoader(remote_dir, "train", spec, cache=cache)  # builds epoch 0: its downloads
        epochs = []
        for epoch in range(2):
            if epoch:  # epoch 1's build (a listing, the copies looked up) inside its timer too
                t0 = time.perf_counter()
                loader.close()
            clips = sum(b.frames.shape[0] for b in loader)
            epochs.append({"clips_per_s": clips / (time.perf_counter() - t0),
                           "object_storage_bytes": loader.object_storage_bytes.get(epoch, 0)})
        loader.close()
        rate = bench_dali(remote_dir, spec, batches, warmup, cache=cache)[0]
        return {"clips_per_s": rate, "epochs": epochs}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def bench_storage(dataset_dir, remote_dir: str, spec: PipelineSpec, batches: int, warmup: int, repeats: int,
                  log=print) -> dict:
    """The DALI row from local disk and from ``remote_dir`` (the same dataset in object
    storage), ``repeats`` interleaved rounds, each rate the median. Bytes per clip: the train
    shards' bytes over their samples (DALI streams whole samples; a clip is one sample).
    ``dataset_dir`` None: object storage only (no local row, no cached/local ratio).

    Where the streamed time goes (``reader``): DALI's reader alone from object storage and from
    local disk, the requests it makes per clip (one ranged GET per member it reads: ``info``
    and the layout's members), the median latency of one small ranged GET, and the rate one
    request at a time allows (``latency_bound_clips_per_s`` = 1 / (requests per clip x
    latency)), and the server's request rate with several concurrent readers over the requests
    per clip (``request_bound_clips_per_s``). On small clips these, not the server's bandwidth,
    limit streaming; ``remote_over_server_limit`` compares the streamed rate with the lower of
    the bandwidth and request-rate bounds."""
    remote_manifest = shards.load_manifest(remote_dir)
    if dataset_dir is not None and shards.load_manifest(dataset_dir).get("splits") != remote_manifest.get("splits"):
        raise ValueError(f"{remote_dir} holds another dataset than {dataset_dir} (manifests differ)")
    split = remote_manifest["splits"]["train"]
    bytes_per_clip = sum(s["num_bytes"] for s in split["shards"]) / split["num_samples"]
    requests_per_clip = 1 + len(shards.LAYOUT_MEMBERS[remote_manifest["layout"]])
    remote_tars, _, _ = shards.split_shards(remote_dir, "train")
    rounds = {"local": [], "remote": [], "raw_get_bytes_per_s": [], "cached": [], "reader_remote": [],
              "reader_local": [], "request_latency_s": [], "requests_per_s": []}
    cached_epochs = []
    for r in range(repeats):
        log(f"[storage] round {r + 1}/{repeats}: local, cached, object storage, raw GET, reader ...")
        if dataset_dir is not None:
            rounds["local"].append(bench_dali(dataset_dir, spec, batches, warmup)[0])
        # right after local disk: the cached/local ratio is taken per round (a neighbour's load
        # drifts between rows), then its median
        cached = bench_cached(remote_dir, spec, batches, warmup)
        rounds["cached"].append(cached["clips_per_s"])
        cached_epochs.append(cached["epochs"])
        rounds["remote"].append(bench_dali(remote_dir, spec, batches, warmup)[0])
        rounds["raw_get_bytes_per_s"].append(raw_get_bytes_per_s(remote_tars))
        rounds["reader_remote"].append(bench_reader(remote_dir, spec, batches, warmup))
        if dataset_dir is not None:
            rounds["reader_local"].append(bench_reader(dataset_dir, spec, batches, warmup))
        rounds["request_latency_s"].append(request_latency_s(remote_tars[0]))
        rounds["requests_per_s"].append(request_rate_per_s(remote_tars))
    med = {k: float(np.median(v)) if v else None for k, v in rounds.items()}
    first_bytes = cached_epochs[-1][0]["object_storage_bytes"]
    second_bytes = cached_epochs[-1][1]["object_storage_bytes"]
    server_bound = med["raw_get_bytes_per_s"] / bytes_per_clip
    latency_bound = 1.0 / (requests_per_clip * med["request_latency_s"])
    request_bound = med["requests_per_s"] / requests_per_clip
    out = {"uri": remote_dir, "local_dir": None if dataset_dir is None else str(dataset_dir),
           "bytes_per_clip": bytes_per_clip,
           "remote": {"clips_per_s": med["remote"], "bytes_per_s": med["remote"] * bytes_per_clip},
           "raw_get_bytes_per_s": med["raw_get_bytes_per_s"], "server_bound_clips_per_s": server_bound,
           "remote_over_server_bound": med["remote"] / server_bound,
           "reader": {"remote_clips_per_s": med["reader_remote"], "local_clips_per_s": med["reader_local"],
                      "requests_per_clip": requests_per_clip, "request_latency_s": med["request_latency_s"],
                      "latency_bound_clips_per_s": latency_bound,
                      "remote_over_latency_bound": med["reader_remote"] / latency_bound,
                      "server_requests_per_s": med["requests_per_s"],
                      "request_bound_clips_per_s": request_bound},
           # the streamed rate against what the server allows both by its bandwidth and by its
           # request rate (a reader fetching members with a request each cannot beat either)
           "remote_over_server_limit": med["remote"] / min(server_bound, request_bound),
           "cached": {"clips_per_s": med["cached"],
                      "epoch_object_storage_bytes": [first_bytes, second_bytes],
                      "second_over_first_bytes": second_bytes / first_bytes if first_bytes else 0.0,
                      "epochs": cached_epochs[-1]},
           "rounds": rounds}
    if dataset_dir is not None:
        out["local"] = {"clips_per_s": med["local"], "bytes_per_s": med["local"] * bytes_per_clip}
        out["remote_over_local"] = med["remote"] / med["local"]
        out["cached"]["over_local"] = float(np.median(np.divide(rounds["cached"], rounds["local"])))
        # What the loader could reach at best: the server's rate or this machine's local-disk
        # rate (decoding), whichever is lower.
        out["remote_over_attainable"] = med["remote"] / min(server_bound, med["local"])
    return out


def run_bench(dataset_dir, sources_csv: str | None = None, threads: int = 1, batches: int = 24,
              batch_size: int = 8, warmup: int = 2, repeats: int = 3, log=print, remote: str | None = None,
              skip_peers: bool = False, local_dir=None) -> dict:
    """All rows for every config; returns the JSON-ready result (see `tsn bench-loader`).

    Each config runs ``repeats`` rounds of all four rows, interleaved, and reports each row's
    median (the rounds are kept under ``rounds``): these shared 2-core machines drift by up to
    ~30 % between runs (the reference row measured 79-107 clips/s), and a neighbour's burst
    during one row must not decide a ratio. ``remote``: the same dataset in object storage
    (``s3://...``): adds ``storage`` (`bench_storage`); ``skip_peers``: only that.
    ``dataset_dir`` an ``s3://`` URI: only the object-storage rows (``storage``), compared with
    ``local_dir`` (the same dataset on local disk) when given.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if storage.is_uri(dataset_dir):
        if remote:
            raise ValueError(f"{dataset_dir} is already in object storage: --remote names the object-storage copy "
                             f"of a local DATASET (use --local DIR for the local copy of an s3:// DATASET)")
        dataset_dir, remote, skip_peers = local_dir, str(dataset_dir), True
    elif local_dir is not None:
        raise ValueError("--local applies to an s3:// DATASET")
    if dataset_dir is None:  # object storage only
        manifest = shards.load_manifest(remote)
        if manifest["layout"] != shards.LAYOUT_JPEG:
            raise ValueError(f"{remote}: bench-loader compares JPEG frame packs; pack with --codec jpeg")
        name, K, L, modality = CONFIGS[0]
        spec = PipelineSpec(mode="train", num_segments=K, snippet_length=L, modality=modality,
                            batch_size=batch_size, num_threads=threads, shuffle_buffer=32)
        return {"threads": threads, "batch_size": batch_size, "batches": batches, "repeats": repeats,
                "dataset": remote, "configs": {},
                "storage": {"config": name, **bench_storage(None, remote, spec, batches, max(warmup, batches),
                                                            repeats, log)}}
    manifest = shards.load_manifest(dataset_dir)
    if manifest["layout"] != shards.LAYOUT_JPEG:
        raise ValueError(f"{dataset_dir}: bench-loader compares JPEG frame packs; pack with --codec jpeg")
    paths = None if skip_peers else peer_sources(dataset_dir, sources_csv)
    # "Same threads" for every row: DALI's pool, torch's intra-op pool (the resize backend) and
    # OpenCV's internal pool (reference and peer rows) all get `threads`.
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    result = {"threads": threads, "batch_size": batch_size, "batches": batches, "repeats": repeats,
              "dataset": str(dataset_dir), "configs": {}}
    if remote:
        name, K, L, modality = CONFIGS[0]
        spec = PipelineSpec(mode="train", num_segments=K, snippet_length=L, modality=modality,
                            batch_size=batch_size, num_threads=threads, shuffle_buffer=32)
        result["storage"] = {"config": name, **bench_storage(dataset_dir, remote, spec, batches, max(warmup, batches),
                                                             repeats, log)}
        if skip_peers:
            return result
    for name, K, L, modality in CONFIGS:
        spec = PipelineSpec(mode="train", num_segments=K, snippet_length=L, modality=modality,
                            batch_size=batch_size, num_threads=threads, shuffle_buffer=32)
        rounds = {key: [] for key in ("dali", "dali_epoch_start_s", "decode_limit", "reference", "peer_decord")}
        for r in range(repeats):
            tag = f"[{name}] round {r + 1}/{repeats}:"
            log(f"{tag} dali ...")
            # the DALI rows warm up as long as they measure (see bench_dali)
            rate, start_s = bench_dali(dataset_dir, spec, batches, max(warmup, batches))
            rounds["dali"].append(rate)
            rounds["dali_epoch_start_s"].append(start_s)
            log(f"{tag} decode limit ...")
            rounds["decode_limit"].append(bench_decode_limit(dataset_dir, spec, batches, max(warmup, batches)))
            log(f"{tag} reference ...")
            rounds["reference"].append(bench_reference(dataset_dir, spec, max(2, batches // 2), 1, threads))
            log(f"{tag} peer (decord) ...")
            rounds["peer_decord"].append(bench_peer(paths, spec, max(2, batches // 2), 1, threads))
        row = {key: float(np.median(values)) for key, values in rounds.items()}
        row["rounds"] = rounds
        row["ratios"] = {"dali_over_peer": row["dali"] / row["peer_decord"],
                         "dali_over_reference": row["dali"] / row["reference"],
                         "dali_over_decode_limit": row["dali"] / row["decode_limit"]}
        row["targets_met"] = {k: row["ratios"][k] >= v for k, v in TARGETS.items()}
        result["configs"][name] = row
    main = result["configs"][CONFIGS[0][0]]
    # The interface's top-level keys: the first config (K=8, L=1).
    result.update({"dali": {"clips_per_s": main["dali"]}, "reference": {"clips_per_s": main["reference"]},
                   "peer_decord": {"clips_per_s": main["peer_decord"]},
                   "decode_limit_clips_per_s": main["decode_limit"]})
    return result


def format_table(result: dict) -> str:
    lines = []
    if "storage" in result:
        st = result["storage"]
        where = f"local disk vs {st['uri']}" if "local" in st else f"from {st['uri']}"
        lines += [f"DALI ({st['config']}) {where}: {st['bytes_per_clip'] / 1e6:.2f} MB read per clip"]
        if "local" in st:
            local = st["local"]
            lines += [f"  local   {local['clips_per_s']:8.1f} clips/s {local['bytes_per_s'] / 1e6:8.1f} MB/s"]
        lines += [f"  remote  {st['remote']['clips_per_s']:8.1f} clips/s {st['remote']['bytes_per_s'] / 1e6:8.1f} MB/s"
                  + (f" ({st['remote_over_local']:.2f}x local)" if "local" in st else ""),
                  f"  server raw GET {st['raw_get_bytes_per_s'] / 1e6:.1f} MB/s = {st['server_bound_clips_per_s']:.1f} "
                  f"clips/s bound; remote at {st['remote_over_server_bound']:.2f}x of it"
                  + (f", {st['remote_over_attainable']:.2f}x of min(server bound, local)" if "local" in st else "")]
        rd = st.get("reader")
        if rd:
            local_reader = f", local disk {rd['local_clips_per_s']:.0f} clips/s" if rd["local_clips_per_s"] else ""
            lines += [f"  reader alone: object storage {rd['remote_clips_per_s']:.1f} clips/s{local_reader}; "
                      f"{rd['requests_per_clip']} ranged GETs per clip x {rd['request_latency_s'] * 1e3:.1f} ms = "
                      f"{rd['latency_bound_clips_per_s']:.1f} clips/s one request at a time "
                      f"(reader at {rd['remote_over_latency_bound']:.2f}x of that)",
                      f"  server request rate {rd['server_requests_per_s']:.0f}/s (4 concurrent readers) = "
                      f"{rd['request_bound_clips_per_s']:.1f} clips/s bound; remote at "
                      f"{st['remote_over_server_limit']:.2f}x of min(bandwidth bound, request bound)"]
        if "cached" in st:
            c = st["cached"]
            first, second = c["epoch_object_storage_bytes"]
            over = (f" ({c['over_local']:.2f}x local, median of the rounds' ratios; target >= 0.9x)"
                    if "over_local" in c else "")
            lines += [f"  cached  {c['clips_per_s']:8.1f} clips/s{over}; "
                      f"from object storage: epoch 1 {first / 1e6:.2f} MB, epoch 2 {second / 1e6:.2f} MB "
                      f"({c['second_over_first_bytes']:.1%}; target < 10%)"]
        if not result["configs"]:
            return "\n".join(lines)
    lines += [f"clips/s, {result['threads']} thread(s), batch {result['batch_size']}, median of "
             f"{result.get('repeats', 1)} interleaved round(s)",
             f"{'config':<15}{'dali':>9}{'reference':>11}{'peer':>9}{'decode':>9}"
             f"{'dali/peer':>11}{'dali/ref':>10}{'dali/dec':>10}{'epoch start':>13}"]
    for name, r in result["configs"].items():
        q = r["ratios"]
        lines.append(f"{name:<15}{r['dali']:>9.1f}{r['reference']:>11.1f}{r['peer_decord']:>9.1f}"
                     f"{r['decode_limit']:>9.1f}{q['dali_over_peer']:>10.2f}x{q['dali_over_reference']:>9.2f}x"
                     f"{q['dali_over_decode_limit']:>9.2f}x{r.get('dali_epoch_start_s', 0.0):>12.2f}s")
    lines.append("targets: dali/peer >= 5x, dali/ref >= 2x, dali/decode >= 0.5x; dali = steady state (the "
                 "pipeline rebuilt at each epoch start is timed apart)")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench-loader", help="benchmark the data paths (DALI, reference, mmaction2-style decord)")
    p.add_argument("dataset", help="a directory written by `tsn pack --codec jpeg`, or its s3://bucket/prefix (AWS_* "
                                   "variables; then only the object-storage rows)")
    p.add_argument("--sources", help="labels CSV of the source videos (default: source paths recorded at packing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of all rows; each row reports its median")
    p.add_argument("--remote", metavar="URI",
                   help="the same dataset in object storage (s3://bucket/prefix; AWS_* variables): adds local-vs-remote "
                        "DALI rates, bytes per clip and the server's raw GET rate")
    p.add_argument("--storage-only", action="store_true", help="with --remote: only the storage rows")
    p.add_argument("--local", metavar="DIR", help="s3:// DATASET: the same dataset on local disk, for the local rows")
    p.add_argument("--json", help="write the result JSON here")
    p.set_defaults(func=_run)


def _run(args) -> int:
    result = run_bench(args.dataset, args.sources, args.threads, args.batches, args.batch_size,
                       repeats=args.repeats, log=lambda m: print(m, file=sys.stderr), remote=args.remote,
                       skip_peers=args.storage_only, local_dir=args.local)
    print(json.dumps(result, indent=2))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
