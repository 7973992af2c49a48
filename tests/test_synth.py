"""Tests of the synthetic action-video generator (tools.synth). Tiny specs: fast."""

from __future__ import annotations

import argparse
import csv
import hashlib

import av
import numpy as np
import pytest

from cli.synth import add_cli
from tools.synth.plan import APPROACH_FADE_PHASE, MOTION_OBJECT_SHAPE
from tools.synth import (
    CLASS_NAMES,
    MOTION_CLASSES,
    SynthSpec,
    generate_dataset,
    object_track,
    render_video,
    video_plan,
)

TINY = dict(sizes=((64, 48),), fps_choices=(10,), min_seconds=1.0, max_seconds=2.0)


def tiny_spec(**overrides) -> SynthSpec:
    return SynthSpec(**{"num_classes": 6, "videos_per_class": 4, **TINY, **overrides})


def decode(path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wrapped_step(a: np.ndarray, period: float) -> np.ndarray:
    """Per-frame differences of a coordinate that wraps modulo ``period``."""
    return (np.diff(a) + period / 2.0) % period - period / 2.0


# ------------------------------------------------------------------ catalogue & rendering


def test_catalogue():
    assert CLASS_NAMES == (
        "move_left", "move_right", "approach", "recede", "rotate_cw", "rotate_ccw",
        "shape_circle", "shape_square", "shape_triangle", "shape_cross",
    )
    assert MOTION_CLASSES == frozenset(CLASS_NAMES[:6])
    assert SynthSpec(num_classes=3).class_names == CLASS_NAMES[:3]


def test_render_is_deterministic_and_seed_dependent():
    spec = tiny_spec()
    for class_index in range(spec.num_classes):
        frames, fps = render_video(spec, class_index, 1)
        again, fps_again = render_video(spec, class_index, 1)
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[1:] == (48, 64, 3)
        assert fps == fps_again == 10.0
        np.testing.assert_array_equal(frames, again)
    other, _ = render_video(tiny_spec(seed=1), 0, 1)
    frames, _ = render_video(spec, 0, 1)
    assert other.shape != frames.shape or not np.array_equal(other, frames)
    # Different videos of one spec differ too.
    assert not np.array_equal(render_video(spec, 0, 0)[0][0], render_video(spec, 0, 1)[0][0])


def test_video_does_not_depend_on_class_count_or_videos_per_class():
    a, _ = render_video(tiny_spec(num_classes=2, videos_per_class=1), 1, 3)
    b, _ = render_video(tiny_spec(num_classes=10, videos_per_class=50), 1, 3)
    np.testing.assert_array_equal(a, b)


def test_frame_count_size_and_fps_follow_the_spec():
    spec = SynthSpec(sizes=((64, 48), (80, 60)), fps_choices=(10, 12), min_seconds=1.0, max_seconds=2.0)
    seen_sizes, seen_fps = set(), set()
    for video_index in range(40):
        plan = video_plan(spec, 7, video_index)
        seen_sizes.add((plan.width_px, plan.height_px))
        seen_fps.add(plan.fps)
        assert 1.0 * plan.fps - 0.5 <= plan.num_frames <= 2.0 * plan.fps + 0.5
        assert plan.centre_xy_px.shape == (plan.num_frames, 2)
        assert plan.radius_px.shape == plan.angle_rad.shape == (plan.num_frames,)
    assert seen_sizes == {(64, 48), (80, 60)} and seen_fps == {10, 12}


def test_rendered_object_is_at_its_track():
    """The circle's centre pixel has the object colour (the object is drawn on top)."""
    spec = tiny_spec(num_classes=10, sizes=((160, 120),))
    circle = CLASS_NAMES.index("shape_circle")
    for video_index in range(5):
        frames, _ = render_video(spec, circle, video_index)
        plan = video_plan(spec, circle, video_index)
        for i in (0, len(frames) - 1):
            x, y = np.floor(plan.centre_xy_px[i]).astype(int)
            pixel = frames[i, y, x].astype(int)
            assert np.abs(pixel - plan.colour_rgb).max() <= 3, (video_index, i, pixel, plan.colour_rgb)


# ------------------------------------------------------------------ motion-only pairs

N_PLANS = 300  # plans are cheap (no pixels)
DEFAULT_SIZES = SynthSpec()  # default sizes/fps/durations: the real distribution


def _plans(name: str, spec: SynthSpec = DEFAULT_SIZES):
    return [video_plan(spec, CLASS_NAMES.index(name), v) for v in range(N_PLANS)]


def test_left_right_same_positions_opposite_velocity():
    stats = {}
    for name, sign in (("move_left", -1), ("move_right", 1)):
        x_all, x_first = [], []
        for plan in _plans(name):
            x = plan.centre_xy_px[:, 0] / plan.width_px
            x_all.append(x.mean())
            x_first.append(x[0])
            # On screen the object always moves in the class direction, pan included.
            assert np.all(np.sign(wrapped_step(x, 1.0)) == sign), (name, plan.video_index)
        stats[name] = (np.mean(x_all), np.mean(x_first), np.std(x_first))
    (mean_l, first_l, std_l), (mean_r, first_r, std_r) = stats["move_left"], stats["move_right"]
    assert abs(mean_l - mean_r) < 0.06 and abs(mean_l - 0.5) < 0.06
    # x at a fixed frame index ~ U[0, 1) for both directions (std of U[0,1) = 0.289).
    assert abs(first_l - first_r) < 0.08 and abs(std_l - 0.289) < 0.03 and abs(std_r - 0.289) < 0.03


def test_approach_recede_same_sizes_opposite_growth():
    stats = {}
    for name, sign in (("approach", 1), ("recede", -1)):
        log_r_all, log_r_first = [], []
        for plan in _plans(name):
            log_r = np.log(plan.radius_px / min(plan.width_px, plan.height_px))
            log_r_all.append(log_r.mean())
            log_r_first.append(log_r[0])
            steps = np.diff(log_r)
            # Growth (resp. shrinking) on every frame except at the rare sawtooth resets.
            assert np.sign(np.median(steps)) == sign
            assert np.mean(np.sign(steps) == sign) > 0.85, (name, plan.video_index)
        stats[name] = (np.mean(log_r_all), np.mean(log_r_first), np.std(log_r_first))
    (mean_a, first_a, std_a), (mean_r, first_r, std_r) = stats["approach"], stats["recede"]
    assert abs(mean_a - mean_r) < 0.05
    assert abs(first_a - first_r) < 0.08 and abs(std_a - std_r) < 0.05


@pytest.mark.parametrize("name,sign", (("approach", 1), ("recede", -1)))
def test_looming_is_an_endless_zoom_without_a_visible_reset(name, sign):
    """At each sawtooth wrap the fading object is (nearly) gone and its nested copy, now fully
    shown, continues at the object's new radius: nothing on screen ever moves the other way."""
    wraps = 0
    for plan in _plans(name):
        r, inner, alpha = plan.radius_px, plan.inner_radius_px, plan.opacity
        assert r.shape == inner.shape == alpha.shape == (plan.num_frames,)
        assert np.all((alpha >= 0) & (alpha <= 1)) and np.all(inner < r)
        log_steps = np.abs(np.diff(np.log(r)))
        wrapping = np.diff(r) * sign < 0  # the main object's radius wraps around
        growth = log_steps[~wrapping].max()  # one frame of the zoom, in log radius
        phase_step = growth / np.log(r[0] / inner[0])  # one frame, in sawtooth periods
        for i in np.flatnonzero(wrapping):
            wraps += 1
            before, after = (i, i + 1) if sign > 0 else (i + 1, i)  # in the zoom's own (approach) order
            assert alpha[before] <= phase_step / APPROACH_FADE_PHASE + 1e-9 and alpha[after] == 1.0, (plan.video_index, i)
            step = abs(np.log(inner[before] / r[after]))
            assert step <= growth * 1.001, (plan.video_index, i, step, growth)  # one frame's growth, not a jump
    assert wraps > 0


def test_other_classes_draw_one_opaque_object():
    for name in ("move_left", "rotate_cw", "shape_square"):
        plan = _plans(name)[0]
        assert plan.opacity is None and plan.inner_radius_px is None


def test_rotation_same_angles_opposite_spin():
    stats = {}
    for name, sign in (("rotate_cw", -1), ("rotate_ccw", 1)):  # angles are CCW-positive
        first = []
        for plan in _plans(name):
            assert np.all(np.sign(np.diff(plan.angle_rad)) == sign)
            first.append(np.exp(1j * plan.angle_rad[0]))
        stats[name] = np.mean(first)
    # Initial orientation uniform on the circle for both: mean resultant near zero.
    assert abs(stats["rotate_cw"]) < 0.15 and abs(stats["rotate_ccw"]) < 0.15


def test_pairs_share_appearance_distribution():
    """Shape, palette and background do not depend on the class within a motion pair."""
    for a, b in (("move_left", "move_right"), ("approach", "recede"), ("rotate_cw", "rotate_ccw")):
        plans_a, plans_b = _plans(a), _plans(b)
        assert {p.shape for p in plans_a} == {p.shape for p in plans_b} == {MOTION_OBJECT_SHAPE}
        colours_a = np.mean([p.colour_rgb for p in plans_a], axis=0)
        colours_b = np.mean([p.colour_rgb for p in plans_b], axis=0)
        assert np.abs(colours_a - colours_b).max() < 20
        pan_a = np.mean([np.any(p.pan_velocity_px_per_s) for p in plans_a])
        pan_b = np.mean([np.any(p.pan_velocity_px_per_s) for p in plans_b])
        assert abs(pan_a - 0.3) < 0.08 and abs(pan_b - 0.3) < 0.08


def test_appearance_classes_have_distinct_shapes():
    shapes = {name: {p.shape for p in _plans(name)[:5]} for name in CLASS_NAMES[6:]}
    assert shapes == {"shape_circle": {"circle"}, "shape_square": {"square"},
                      "shape_triangle": {"triangle"}, "shape_cross": {"cross"}}


# ------------------------------------------------------------------ dataset on disk


def test_generate_dataset_layout_decode_and_resume(tmp_path):
    spec = tiny_spec()
    out = tmp_path / "ds"
    summary = generate_dataset(out, spec, workers=1, progress=False)
    assert summary["num_videos"] == 24 and summary["num_classes"] == 6
    assert summary["num_written"] == 24 and summary["num_skipped"] == 0
    assert summary["out_dir"] == str(out)

    assert (out / "classes.txt").read_text().splitlines() == list(CLASS_NAMES[:6])
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label"]
    assert len(rows) == 25
    expected_seconds = 0.0
    for (rel, label), (class_index, video_index) in zip(rows[1:], [(c, v) for c in range(6) for v in range(4)]):
        assert label == CLASS_NAMES[class_index]
        assert rel == f"videos/{label}/{label}_{video_index:04d}.mp4"
        frames, fps = decode(out / rel)
        plan = video_plan(spec, class_index, video_index)
        assert frames.shape == (plan.num_frames, 48, 64, 3)
        assert fps == plan.fps == 10
        expected_seconds += plan.num_frames / plan.fps
        # Lossy, but close to the rendered frames.
        rendered, _ = render_video(spec, class_index, video_index)
        assert np.abs(frames.astype(int) - rendered).mean() < 8
    assert summary["seconds_total"] == pytest.approx(expected_seconds)
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))

    # Re-run: nothing rewritten (mtimes unchanged), a deleted video is regenerated identically.
    victim = out / rows[5][0]
    digest = sha256(victim)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    victim.unlink()
    again = generate_dataset(out, spec, workers=1, progress=False)
    assert again["num_written"] == 1 and again["num_skipped"] == 23
    assert sha256(victim) == digest
    for path, mtime in mtimes.items():
        if path != victim:
            assert path.stat().st_mtime_ns == mtime


def test_parallel_output_is_byte_identical(tmp_path):
    spec = tiny_spec(num_classes=2, videos_per_class=2)
    serial = generate_dataset(tmp_path / "serial", spec, workers=1, progress=False)
    parallel = generate_dataset(tmp_path / "parallel", spec, workers=2, progress=False)
    assert serial["num_videos"] == parallel["num_videos"] == 4
    for path in sorted((tmp_path / "serial").rglob("*")):
        if path.is_file() and path.name != "synth.json":
            twin = tmp_path / "parallel" / path.relative_to(tmp_path / "serial")
            assert sha256(path) == sha256(twin), path


def test_resume_with_other_content_spec_is_refused(tmp_path):
    spec = tiny_spec(num_classes=2, videos_per_class=1)
    generate_dataset(tmp_path, spec, workers=1, progress=False)
    with pytest.raises(ValueError, match="seed"):
        generate_dataset(tmp_path, tiny_spec(num_classes=2, videos_per_class=1, seed=5), workers=1, progress=False)
    # Growing the dataset keeps existing videos.
    more = generate_dataset(tmp_path, tiny_spec(num_classes=3, videos_per_class=1), workers=1, progress=False)
    assert more["num_written"] == 1 and more["num_skipped"] == 2


# ------------------------------------------------------------------ validation & CLI


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=11), "num_classes"),
        (dict(num_classes=2.5), "num_classes"),
        (dict(videos_per_class=0), "videos_per_class"),
        (dict(seed=-1), "seed"),
        (dict(min_seconds=3.0, max_seconds=2.0), "min_seconds"),
        (dict(min_seconds=0.0), "min_seconds"),
        (dict(sizes=((65, 48),)), "even"),
        (dict(sizes=((64, 47),)), "even"),
        (dict(sizes=()), "sizes"),
        (dict(sizes=((8, 8),)), "sizes"),
        (dict(fps_choices=()), "fps_choices"),
        (dict(fps_choices=(0,)), "fps_choices"),
        (dict(camera_pan_fraction=1.5), "camera_pan_fraction"),
    ],
)
def test_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SynthSpec(**kwargs)


def test_index_and_worker_validation(tmp_path):
    spec = tiny_spec(num_classes=2)
    with pytest.raises(ValueError, match="class_index"):
        render_video(spec, 2, 0)
    with pytest.raises(ValueError, match="video_index"):
        object_track(spec, 0, -1)
    with pytest.raises(ValueError, match="workers"):
        generate_dataset(tmp_path, spec, workers=0, progress=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsn")
    add_cli(parser.add_subparsers())
    return parser


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = _parser().parse_args([
        "synth", "--out", str(out), "--classes", "2", "--videos-per-class", "1", "--seed", "3",
        "--min-seconds", "1", "--max-seconds", "1", "--size", "64x48", "--size", "80x60",
        "--fps", "10", "--workers", "1", "--no-progress",
    ])
    assert args.func(args) == 0
    assert "2 videos" in capsys.readouterr().out
    assert (out / "classes.txt").read_text().splitlines() == ["move_left", "move_right"]
    frames, fps = decode(out / "videos/move_right/move_right_0000.mp4")
    assert fps == 10 and len(frames) == 10


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["synth", "--out", str(tmp_path), "--size", "64by48"])
    args = _parser().parse_args(["synth", "--out", str(tmp_path), "--classes", "12", "--no-progress"])
    assert args.func(args) == 2
    assert "num_classes" in capsys.readouterr().err
