"""`tsn predict --out` (`app.batch_predict`, `cluster.batch_predict`): a collection scored in
parts into one parquet table. On a packed split its scores are `tsn eval`'s; a killed run is
finished by a re-run that scores only the missing parts; unreadable videos are rows with their
reason; the same table from 2 Ray actors as from one process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app import batch_predict as bp
from app.evaluate import evaluate_checkpoint
from app.run_store import load_scores
from cli import main as cli
from dataloading.format import shards
from procs import start_tsn, wait_tsn
from test_predict import make_checkpoint, source_videos


@pytest.fixture(scope="module")
def ckpt(packed_flow, tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("bp-ckpt") / "rgb.pt", packed_flow, "rgb", 1))


@pytest.fixture(scope="module")
def eval_scores(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bp-eval") / "scores.npz"
    evaluate_checkpoint(ckpt, split="val", out=str(out))
    return load_scores(out)


@pytest.fixture(scope="module")
def local_table(ckpt, packed_flow, tmp_path_factory):
    """The val split in parts of 2 videos, scored in this process."""
    out = tmp_path_factory.mktemp("bp-local") / "scores.parquet"
    job = bp.plan_job(ckpt, shards=str(packed_flow), split="val", part_size=2, top_k=3)
    summary = bp.run_local(job, str(out))
    return job, summary, bp.read_table(str(out)).to_pydict()


def test_a_packed_split_scores_as_tsn_eval_does(local_table, eval_scores, packed_flow):
    job, summary, t = local_table
    n = shards.load_manifest(packed_flow)["splits"]["val"]["num_samples"]
    assert job.num_parts == -(-n // 2) >= 2
    assert summary["videos"] == summary["scored_now"] == n and summary["errors"] == 0
    assert t["sample_index"] == sorted(eval_scores["sample_index"].tolist())
    assert t["label"] == eval_scores["label"].tolist()
    ours = np.array(t["scores"], np.float32)
    # the same loader, plan and network, cut into parts: the same numbers, bit for bit
    np.testing.assert_array_equal(ours, eval_scores["scores"])
    names = eval_scores["class_names"]
    for row_scores, top, top_scores, label, label_name in zip(ours, t["top_classes"], t["top_scores"],
                                                             t["label"], t["label_name"]):
        best = np.argsort(-row_scores, kind="stable")[:3]
        assert top == [names[i] for i in best] and len(top_scores) == 3
        assert label_name == names[label]
    assert all(v.startswith("val/") and "#" in v for v in t["video"])
    assert t["error"] == [None] * n


def test_a_killed_run_is_finished_by_scoring_only_the_missing_parts(ckpt, packed_flow, local_table, tmp_path):
    job = bp.plan_job(ckpt, shards=str(packed_flow), split="val", part_size=2, top_k=3)
    out = tmp_path / "scores.parquet"

    def die_after_first(part, rows):
        raise KeyboardInterrupt  # the driver killed after its first part was written

    with pytest.raises(KeyboardInterrupt):
        bp.run_local(job, str(out), on_part=die_after_first)
    assert not out.exists()  # nothing committed
    assert [p.name for p in sorted((tmp_path / "scores.parquet.parts").glob("part-*"))] == ["part-00000.parquet"]
    seen = []
    summary = bp.run_local(job, str(out), on_part=lambda p, rows: seen.append(p))
    assert seen == list(range(1, job.num_parts))
    assert summary["scored_now"] == summary["videos"] - 2
    assert bp.read_table(str(out)).to_pydict() == local_table[2]
    assert not (tmp_path / "scores.parquet.parts").exists()
    recorded = json.loads(bp.read_table(str(out)).schema.metadata[b"tsn.job"])
    assert recorded["part_size"] == 2 and recorded["split"] == "val"
    # once committed, the same job again scores nothing and reports the table
    again = bp.run_local(job, str(out), on_part=lambda p, rows: seen.append(p))
    assert again["scored_now"] == 0 and again["videos"] == summary["videos"] and len(seen) == job.num_parts - 1
    assert bp.read_table(str(out)).to_pydict() == local_table[2]
    # and another job never overwrites it
    with pytest.raises(ValueError, match="scores.parquet holds the table of another job \\(differs in num_parts"):
        bp.run_local(bp.plan_job(ckpt, shards=str(packed_flow), split="val", part_size=3, top_k=3), str(out))


def test_another_job_on_the_same_output_is_refused(ckpt, packed_flow, tmp_path):
    out = str(tmp_path / "s.parquet")
    bp.Output(out, bp.plan_job(ckpt, shards=str(packed_flow), part_size=2)).open()
    with pytest.raises(ValueError, match="another job \\(differs in num_parts, part_size\\)"):
        bp.Output(out, bp.plan_job(ckpt, shards=str(packed_flow), part_size=3)).open()


@pytest.mark.parametrize("kwargs,message", [
    ({"split": "nope"}, "no split 'nope'"),
    ({"part_size": 0}, "--part-size and --top-k must be >= 1"),
    ({"shards": None}, "either packed shards or video files"),
])
def test_a_bad_job_fails_before_any_work(ckpt, packed_flow, kwargs, message):
    args = {"shards": str(packed_flow), **kwargs}
    with pytest.raises(ValueError, match=message):
        bp.plan_job(ckpt, **args)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: nope.pt"):
        bp.plan_job("nope.pt", shards=str(packed_flow))


def test_video_files_with_unreadable_ones_become_rows_with_their_reason(ckpt, packed_flow, synth_dir, tmp_path):
    from app.predict import load_stream, predict_videos

    videos = source_videos(synth_dir, packed_flow)
    good = [videos[i] for i in sorted(videos)[:3]]
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    listing = tmp_path / "videos.txt"
    listing.write_text("# three good, one broken\n" + "\n".join([good[0], "broken.mp4", *good[1:]]) + "\n\n")
    assert bp.list_videos(str(listing)) == [good[0], str(bad), *good[1:]]
    out = tmp_path / "files.parquet"
    job = bp.plan_job(ckpt, videos=bp.list_videos(str(listing)), part_size=3)
    summary = bp.run_local(job, str(out))
    t = bp.read_table(str(out)).to_pydict()
    assert (summary["videos"], summary["errors"]) == (4, 1)
    assert t["video"] == [good[0], str(bad), *good[1:]] and t["sample_index"] == [0, 1, 2, 3]
    assert isinstance(t["error"][1], str) and t["error"][1]  # the reason, in the broken file's row
    assert t["error"][:1] + t["error"][2:] == [None] * 3
    assert t["scores"][1] is None and t["label"] == [-1] * 4
    expected = predict_videos(good, [load_stream(ckpt)])
    for row, p in zip([0, 2, 3], expected):
        np.testing.assert_array_equal(np.array(t["scores"][row], np.float32), p.scores)


def test_videos_directory_and_missing_sources(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.MP4", "b.avi", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert bp.list_videos(str(tmp_path)) == [str(tmp_path / "a/x.MP4"), str(tmp_path / "b.avi")]
    with pytest.raises(FileNotFoundError, match="--videos .*nothing-here: no such file or directory"):
        bp.list_videos(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        bp.list_videos(str(tmp_path / "empty"))


def test_cli_refuses_mixed_modes(ckpt, packed_flow, tmp_path, capsys):
    out = str(tmp_path / "x.parquet")
    for argv, message in [
        (["--shards", str(packed_flow)], "give --out"),
        (["--out", out], "exactly one of --shards DIR or --videos"),
        (["--out", out, "--shards", str(packed_flow), "--checkpoint", ckpt], "scores one checkpoint"),
    ]:
        assert cli.main(["predict", "--checkpoint", ckpt, *argv]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_ray_actors_write_the_same_table_as_one_process(ckpt, packed_flow, local_table, tmp_path):
    # `tsn predict` in its own process, as users run it: Ray started in the pytest process would
    # keep its auth settings for the Ray clusters later tests start.
    out = tmp_path / "ray.parquet"
    printed = wait_tsn(start_tsn(["predict", "--checkpoint", ckpt, "--shards", str(packed_flow), "--split", "val",
                                  "--out", str(out), "--address", "local", "--workers", "2", "--part-size", "2",
                                  "--top-k", "3"], tmp_path / "predict.log"), tmp_path / "predict.log")
    assert bp.read_table(str(out)).to_pydict() == local_table[2]
    n = local_table[1]["videos"]
    assert f"wrote {out}: {n} videos (0 failed); scored {n} now" in printed and "on 2 worker(s)" in printed


def test_a_split_in_object_storage_scores_as_its_local_copy(packed_jpeg, packed_jpeg_s3, s3_env, tmp_path):
    ckpt = str(make_checkpoint(tmp_path / "jpeg.pt", packed_jpeg, "rgb", 1))
    tables = []
    for source in (str(packed_jpeg), packed_jpeg_s3):
        out = tmp_path / f"{len(tables)}.parquet"
        bp.run_local(bp.plan_job(ckpt, shards=source, split="val", part_size=3), str(out))
        tables.append(bp.read_table(str(out)).to_pydict())
    assert tables[0]["scores"] == tables[1]["scores"] and tables[0]["video"] == tables[1]["video"]
    assert len(tables[0]["video"]) > 3 and tables[0]["error"] == [None] * len(tables[0]["video"])
