"""The prefetching thread: `dataloading.pipeline.prefetch.Prefetcher` on its own (fast, no DALI), then
`TSNLoader` with it: the same batches in the same order as on the training thread, exact
positions, errors and shutdown."""

import gc
import shutil
import threading
import time
import traceback

import pytest
import torch

from dataloading.format import shards
from dataloading.pipeline.loader import TSNLoader, batch_bytes, prefetch_depth
from dataloading.pipeline.prefetch import DONE, Prefetcher
from dataloading.planning import augment
from dataloading.planning.spec import PipelineSpec

CROP = augment.CropSpec(input_size=40, resize_short=48)


# ------------------------------------------------------------------------------ Prefetcher


class Counter:
    """A step function that counts its calls, optionally fails at call ``fail_at``."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at, self.calls = n, fail_at, 0

    def step(self):
        self.calls += 1
        if self.calls == self.fail_at:
            broken_producer_step()
        return self.calls if self.calls <= self.n else DONE


def broken_producer_step():
    raise KeyError("bad sample 17")


def _wait_for(condition, timeout_s=5.0):
    end = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_prefetcher_delivers_in_order_then_done():
    c = Counter(5)
    p = Prefetcher(c.step, depth=2)
    assert [p.get() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert p.get() is DONE and p.finished and p.get() is DONE
    assert _wait_for(lambda: not p._thread.is_alive())


def test_prefetcher_runs_at_most_depth_ahead():
    c = Counter(100)
    p = Prefetcher(c.step, depth=2)
    assert _wait_for(lambda: c.calls >= 3)
    time.sleep(0.3)  # a thread that ignored the bound would be far ahead by now
    assert c.calls == 3  # 2 queued + 1 waiting to be queued
    assert p.get() == 1
    assert _wait_for(lambda: c.calls == 4)
    time.sleep(0.2)
    assert c.calls == 4
    p.close()
    assert not p._thread.is_alive() and p.get() is DONE


def test_prefetcher_error_reaches_consumer_after_earlier_items_with_its_traceback():
    c = Counter(10, fail_at=3)
    p = Prefetcher(c.step, depth=4)
    assert p.get() == 1 and p.get() == 2
    with pytest.raises(KeyError, match="bad sample 17") as info:
        p.get()
    names = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "broken_producer_step" in names and "step" in names  # the producer thread's frames
    assert p.finished and p.get() is DONE
    assert _wait_for(lambda: not p._thread.is_alive()) and c.calls == 3  # nothing after the error


def test_prefetcher_thread_ends_when_its_owner_is_collected():
    c = Counter(1000)
    p = Prefetcher(c.step, depth=1)
    thread = p._thread
    assert _wait_for(lambda: c.calls >= 2)
    del c
    gc.collect()
    assert _wait_for(lambda: not thread.is_alive())


def test_prefetcher_rejects_depth_zero():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda: DONE, depth=0)


# ------------------------------------------------------------------------------ TSNLoader


def spec_for(mode="train", modality="rgb_diff", l=2, batch_size=2):
    return PipelineSpec(mode=mode, num_segments=3, snippet_length=l, modality=modality, batch_size=batch_size,
                        crop=CROP, num_threads=1, seed=3)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tsn-prefetch")]


def _assert_same(a, b):
    for name in ("frames", "label", "sample_index", "frame_indices", "crop", "frame_size"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


@pytest.mark.parametrize("mode", ["train", "test"])
def test_prefetched_batches_are_bit_identical_to_the_training_thread(packed_jpeg, mode):
    """Three epochs, the thread running ahead into the next one: the same batches, same order."""
    spec = spec_for(mode, batch_size=2 if mode == "train" else 1)
    sync = TSNLoader(packed_jpeg, "train", spec, rank=1, world_size=2, prefetch_batches=0)
    ahead = TSNLoader(packed_jpeg, "train", spec, rank=1, world_size=2, prefetch_batches=2, epochs=3)
    epochs = 3 if mode == "train" else 1
    for epoch in range(epochs):
        a, b = list(sync), list(ahead)
        assert len(a) == len(b) == len(sync) == len(ahead) >= 2
        for x, y in zip(a, b):
            _assert_same(x, y)
        assert sync.position == ahead.position == (epoch + 1, 0)
    ahead.close()
    assert not _prefetch_threads()


def test_position_counts_batches_taken_not_prepared(packed_jpeg):
    """Mid-epoch the thread is ahead; position is what the consumer took, a loader resumed there
    replays the rest exactly, and leaving a pass early then iterating again continues exactly."""
    spec = spec_for()
    reference = TSNLoader(packed_jpeg, "train", spec, prefetch_batches=0)
    epoch0, epoch1 = list(reference), list(reference)
    loader = TSNLoader(packed_jpeg, "train", spec, prefetch_batches=3, epochs=2)
    it = iter(loader)
    first = next(it)
    assert _wait_for(lambda: loader._p_batch >= 3)  # prepared ahead...
    assert loader.position == (0, 1)  # ...but not taken
    _assert_same(first, epoch0[0])
    resumed = TSNLoader(packed_jpeg, "train", spec, start_epoch=0, start_batch=1)
    for x, y in zip(list(resumed), epoch0[1:]):
        _assert_same(x, y)
    resumed.close()
    del it  # the pass is abandoned; the prepared batches are kept for the next one
    rest = list(loader)
    assert len(rest) == len(epoch0) - 1 and loader.position == (1, 0)
    for x, y in zip(rest, epoch0[1:]):
        _assert_same(x, y)
    for x, y in zip(list(loader), epoch1):
        _assert_same(x, y)
    loader.close()


def test_close_stops_the_thread_and_iteration_resumes_at_position(packed_jpeg):
    spec = spec_for()
    epoch0 = list(TSNLoader(packed_jpeg, "train", spec, prefetch_batches=0))
    loader = TSNLoader(packed_jpeg, "train", spec, prefetch_batches=2, epochs=5)
    it = iter(loader)
    _assert_same(next(it), epoch0[0])
    assert len(_prefetch_threads()) == 1
    loader.close()
    assert not _prefetch_threads() and loader.position == (0, 1)
    for x, y in zip(list(loader), epoch0[1:]):  # rebuilt at (0, 1)
        _assert_same(x, y)
    loader.close()
    loader.close()  # idempotent


def test_thread_stops_at_epoch_end_unless_told_the_epochs(packed_jpeg):
    spec = spec_for()
    # epochs=None: the next epoch starts when asked
    one_pass = TSNLoader(packed_jpeg, "train", spec, prefetch_batches=2)
    list(one_pass)
    assert _wait_for(lambda: not _prefetch_threads())
    assert one_pass._it_epoch == 0  # epoch 1's pipeline not built ahead
    training = TSNLoader(packed_jpeg, "train", spec, prefetch_batches=2, epochs=2)
    list(training)
    assert _wait_for(lambda: training._it_epoch == 1)  # epoch 1 built while epoch 0 ended
    list(training)
    assert _wait_for(lambda: not _prefetch_threads())  # no epoch 2: the thread ended
    assert training._it_epoch == 1 and training.position == (2, 0)
    one_pass.close()
    training.close()


def test_dropped_loader_stops_its_thread(packed_jpeg):
    loader = TSNLoader(packed_jpeg, "train", spec_for(), prefetch_batches=2, epochs=10)
    next(iter(loader))
    assert len(_prefetch_threads()) == 1
    del loader
    gc.collect()
    assert _wait_for(lambda: not _prefetch_threads())


def test_error_in_the_thread_is_raised_in_the_consumer_with_its_traceback(packed_jpeg, tmp_path):
    """The shards are gone once the loader is built: the prefetching thread's read fails,
    and the consumer gets the reader's own error (naming the file), raised on the thread."""
    dataset = tmp_path / "copy"
    shutil.copytree(packed_jpeg, dataset)
    spec = spec_for()
    loader = TSNLoader(dataset, "train", spec, prefetch_batches=2, epochs=3)
    first = shards.load_manifest(dataset)["splits"]["train"]["shards"]
    for shard in first:
        (dataset / shard["path"]).unlink()
    with pytest.raises(FileNotFoundError) as info:
        list(loader)
    assert "train-" in str(info.value) and ".tar" in str(info.value)
    names = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "_produce" in names and "load" in names  # raised on the prefetching thread, by the source
    assert loader.position == (0, 0)
    assert _wait_for(lambda: not _prefetch_threads())
    loader.close()


def test_negative_prefetch_is_rejected(packed_jpeg):
    with pytest.raises(ValueError, match="prefetch_batches"):
        TSNLoader(packed_jpeg, "train", spec_for(), prefetch_batches=-1)


def test_corrupt_sample_is_quarantined_on_the_thread_as_on_the_training_thread(packed_jpeg, tmp_path):
    dataset = tmp_path / "copy"
    shutil.copytree(packed_jpeg, dataset)
    shard = shards.load_manifest(dataset)["splits"]["train"]["shards"][0]
    line = (dataset / shard["index_path"]).read_text().splitlines()[1].split()
    offset, size = (int(v) for v in dict(zip(line[0::4], zip(line[1::4], line[2::4])))["frames"])
    with open(dataset / shard["path"], "r+b") as f:  # wipe a sample's frames, keep the tar intact
        f.seek(offset)
        f.write(b"\0" * size)
    spec = spec_for("val", batch_size=3)
    sync = TSNLoader(dataset, "train", spec)
    ahead = TSNLoader(dataset, "train", spec, prefetch_batches=2, epochs=2)
    for _ in range(2):
        a, b = list(sync), list(ahead)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    assert len(ahead.skipped) == len(sync.skipped) == 1
    ahead.close()


def test_training_loaders_prefetch_and_know_the_epochs(packed_jpeg):
    from app.build import PREFETCH_BUDGET_BYTES, build_loaders
    from app.config import load_config

    cfg = load_config(None, [f"data.shards={packed_jpeg}", "augment.input_size=32", "augment.resize_short=48",
                             "train.batch_size_per_worker=4", "train.epochs=3"])
    loaders = build_loaders(cfg, torch.device("cpu"), rank=0, world_size=1, start_epoch=1, start_batch=1)
    for loader in loaders.values():
        assert 2 <= loader._prefetch_batches and loader._epochs == 3
        assert loader._prefetch_batches * batch_bytes(loader.spec) <= PREFETCH_BUDGET_BYTES
        loader.close()
    assert loaders["train"].position == (1, 1)


def test_prefetch_depth_fits_the_memory_budget():
    small = spec_for(batch_size=2)  # 2 x 3 segments x 3 frames x 3 x 40 x 40 float32
    assert batch_bytes(small) == 4 * 2 * 3 * 3 * 3 * 40 * 40
    assert prefetch_depth(small, 10 * batch_bytes(small)) == 10
    assert prefetch_depth(small, 0) == 2 and prefetch_depth(small, 1 << 40) == 64
    test = spec_for("test", batch_size=2)  # 10 views
    assert batch_bytes(test) == 10 * batch_bytes(small)


def test_thread_runs_at_most_one_epoch_ahead(packed_jpeg):
    loader = TSNLoader(packed_jpeg, "train", spec_for(), prefetch_batches=64, epochs=10)
    n = len(loader)
    it = iter(loader)
    next(it)
    # queued: the rest of epoch 0, its end, epoch 1's first batch (n + 1); the second in hand
    assert _wait_for(lambda: loader._prefetcher._queue.qsize() == n + 1 and loader._p_batch == 2)
    time.sleep(0.3)
    assert (loader._p_epoch, loader._p_batch) == (1, 2) and len(_prefetch_threads()) == 1
    reference = TSNLoader(packed_jpeg, "train", spec_for(), start_epoch=0, start_batch=1)
    for _ in range(3):  # the rest of epoch 0, then epochs 1 and 2
        for x, y in zip(list(it), list(reference)):
            _assert_same(x, y)
        it = iter(loader)
    assert loader.position == reference.position == (3, 0)
    loader.close()
