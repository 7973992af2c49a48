"""The data-path subcommands end to end: stream, bench-loader, user errors."""

import json

import pytest

from cli.main import main

SMALL = ["--set", "augment.input_size=32", "--set", "augment.resize_short=48", "--set", "train.batch_size_per_worker=2",
         "--set", "loader.num_threads=1"]


def test_stream_a_packed_dataset(packed_jpeg, tmp_path, capsys):
    out = tmp_path / "stats.json"
    assert main(["stream", "--set", f"data.shards={packed_jpeg}", *SMALL, "--epochs", "2", "--no-progress",
                 "--json", str(out)]) == 0
    stats = json.loads(out.read_text())
    train_n = json.loads((packed_jpeg / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    assert [e["clips"] for e in stats["epochs"]] == [train_n // 2 * 2] * 2  # drop-last batches of 2
    assert stats["val"]["clips"] > 0 and stats["skipped_corrupt"] == 0
    assert "clips/s" in capsys.readouterr().out


def test_stream_refuses_a_missing_user_dataset(tmp_path, capsys):
    assert main(["stream", "--set", f"data.shards={tmp_path / 'nope'}", "--no-progress"]) == 2
    assert "not a packed dataset" in capsys.readouterr().err


def test_bad_config_key_fails_before_work(capsys):
    assert main(["stream", "--set", "model.num_segmnets=3"]) == 2
    assert "model.num_segmnets: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_loader_reports_every_row(packed_jpeg, synth_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench-loader", str(packed_jpeg), "--sources", str(synth_dir / "labels.csv"), "--batches", "2",
                 "--batch-size", "2", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for row in result["configs"].values():  # each row is the median of its interleaved rounds
        for key in ("dali", "reference", "peer_decord", "decode_limit"):
            assert len(row["rounds"][key]) == 2 and row[key] == pytest.approx(sum(row["rounds"][key]) / 2)
    for key in ("dali", "reference", "peer_decord"):
        assert result[key]["clips_per_s"] > 0
    assert result["decode_limit_clips_per_s"] > 0
    for row in result["configs"].values():
        assert set(row["ratios"]) == {"dali_over_peer", "dali_over_reference", "dali_over_decode_limit",
                                      "timed_over_untimed"}  # the stage timers' cost (issue 26)
        assert row["ratios"]["timed_over_untimed"] == pytest.approx(row["dali"] / row["dali_untimed"])
        assert set(row["stages_s_per_batch"]) == {"read", "plan", "read_wait", "decode", "finish"}
        assert row["slowest_stage"] == max(row["stages_s_per_batch"], key=row["stages_s_per_batch"].get)
    assert "dali/peer" in capsys.readouterr().out


def test_split_smaller_than_one_batch_per_rank_trains_with_padded_batches(packed_jpeg):
    """Training pads instead of dropping incomplete batches (issue 14's exact data accounting,
    `dataloading.pipeline.loader`): a split with less than one batch per rank yields one batch per rank
    whose real entries are that rank's half of the split. (It used to be refused.)"""
    from dataloading.format.shards import load_manifest
    from dataloading.pipeline.loader import TSNLoader
    from dataloading.planning.spec import PipelineSpec

    n = load_manifest(packed_jpeg)["splits"]["train"]["num_samples"]
    batches = list(TSNLoader(packed_jpeg, "train", PipelineSpec(mode="train", batch_size=n), rank=0, world_size=2))
    assert len(batches) == 1 and int(batches[0].real.sum()) == -(-n // 2) and len(batches[0].real) == n


def test_embedded_default_dataset_is_rebuilt_only_when_it_is_its_own(tmp_path):
    """ensure_dataset rebuilds the embedded default when its recipe changed, and never touches
    a packed directory it did not build."""
    import json

    from app.data import RECIPE_FILE, ensure_dataset

    shards, synth = tmp_path / "packed", tmp_path / "synth"
    kw = dict(classes=2, seed=0, short_side=32, val_fraction=0.5, progress=False)
    m = ensure_dataset(str(shards), str(synth), videos_per_class=2, **kw)
    assert m["num_samples"] == 4 and (shards / RECIPE_FILE).is_file()
    again = ensure_dataset(str(shards), str(synth), videos_per_class=2, **kw)
    assert again == m  # same recipe: reused
    m3 = ensure_dataset(str(shards), str(synth), videos_per_class=3, **kw)
    assert m3["num_samples"] == 6  # another recipe: rebuilt
    # Videos of an older generator (same spec): regenerated, not just repacked.
    from tools.synth import SYNTH_VERSION

    for path in (synth / "synth_spec.json", shards / RECIPE_FILE):
        path.write_text(json.dumps({**json.loads(path.read_text()), "synth_version": SYNTH_VERSION - 1}))
    old_video = next((synth / "videos").rglob("*.mp4"))
    old_video.write_bytes(b"not the current generator's video")
    assert ensure_dataset(str(shards), str(synth), videos_per_class=3, **kw)["num_samples"] == 6
    assert old_video.read_bytes() != b"not the current generator's video"
    assert json.loads((synth / "synth_spec.json").read_text())["synth_version"] == SYNTH_VERSION
    # A dataset without the recipe file is not ours: used as it is, never deleted.
    (shards / RECIPE_FILE).unlink()
    kept = ensure_dataset(str(shards), str(synth), videos_per_class=5, **kw)
    assert kept["num_samples"] == 6 and (shards / "manifest.json").is_file()
    assert json.loads((synth / "synth_spec.json").read_text())["synth"]["videos_per_class"] == 3
