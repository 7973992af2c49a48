"""dataloading.sources.flow: quantisation (exact), flow sign and magnitude per algorithm, warped flow,
and `tsn bench-flow`. Synthetic frames of at most 96x128: fast."""

import json

import cv2
import numpy as np
import pytest

from dataloading.sources import flow
from tools import bench_flow


def texture(h, w, seed=0, sigma=1.5):
    """Smooth noise: corners everywhere, no aperture problem."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (0, 0), sigma)


def shifted_pair(dx, dy, h=48, w=64, seed=0):
    """Two gray frames whose content moves by (+dx, +dy) pixels from the first to the second."""
    pad = 16
    c = texture(h + 2 * pad, w + 2 * pad, seed)
    return c[pad : pad + h, pad : pad + w], c[pad - dy : pad - dy + h, pad - dx : pad - dx + w]


# ---------------------------------------------------------------------------------------------
# quantisation: q = rint((clip(f) + bound) * 255 / (2 * bound)), half to even


@pytest.mark.parametrize("bound,f,q", [
    (20, 0.0, 128),  # 127.5 -> 128 (half to even, like the authors' cvRound)
    (20, -20.0, 0), (20, 20.0, 255),
    (20, -25.0, 0), (20, 1e6, 255), (20, -np.inf, 0),  # clipped to the bound
    (20, 0.5, 131),  # 130.6875
    (20, -0.5, 124),  # 124.3125
    (20, 19.9, 254), (20, -19.9, 1),  # 254.36 / 0.64
    (20, 10.0, 191),  # 191.25
    (127.5, 0.5, 128), (127.5, -0.5, 127), (127.5, 1.0, 128),  # 128.0, 127.0, 128.5 -> 128 (even)
    (127.5, 2.0, 130),  # 129.5 -> 130 (even)
    (10, 10.0, 255), (10, 0.0, 128), (10, -10.0, 0), (10, 15.0, 255),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_table(bound, f, q, dtype):
    assert flow.quantize(np.array([f], dtype), bound).tolist() == [q]
    assert flow.quantize(np.array([f], dtype), bound).dtype == np.uint8


def test_quantize_dequantize_round_trip_within_half_a_step():
    f = np.linspace(-20, 20, 10001, dtype=np.float32)
    back = flow.dequantize(flow.quantize(f, 20), 20)
    assert back.dtype == np.float32
    assert np.abs(back - f).max() <= 20 / 255 + 1e-5  # half of a 40/255 px step
    assert flow.quantize(np.float32([-3.0, 0.0]), 20).tolist() == [108, 128]
    with pytest.raises(ValueError, match="bound must be > 0"):
        flow.quantize(f, 0)


@pytest.mark.parametrize("x,flipped", [(0, 255), (255, 0), (128, 127), (127, 128), (1, 254), (200, 55)])
def test_flip_inverts_x(x, flipped):
    assert flow.flip_x(np.array([x], np.uint8)).tolist() == [flipped]


def test_flip_of_quantized_flow_is_quantized_negated_flow():
    """Away from the half-step ties, 255 - q(f) == q(-f): the flip negates the x flow."""
    f = np.float32([-20, -7.3, -1.1, 0.9, 3.3, 12.6, 20])
    assert flow.flip_x(flow.quantize(f)).tolist() == flow.quantize(-f).tolist()
    assert flow.flip_x(flow.quantize(np.float32([0.0]))).tolist() == [127]  # the tie: 128 -> 127


def test_flip_x_is_one_formula_for_numpy_torch_and_the_dali_graph():
    """The reference loader (uint8 numpy), the torch finishing step (float tensor) and the DALI
    graph (`dali_flow`: DataNodes, per-sample flip) all apply `flow.flip_x` itself."""
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from dataloading.pipeline.dali_flow import flip_x_where

    q = np.array([[0, 1, 127, 128, 255]], np.uint8)
    expected = flow.flip_x(q)
    assert expected.dtype == np.uint8 and expected.tolist() == [[255, 254, 128, 127, 0]]
    assert flow.flip_x(torch.tensor(q, dtype=torch.float32)).tolist() == expected.astype(float).tolist()

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [q, q], batch=True, dtype=types.UINT8)
        flip = fn.external_source(source=lambda: [np.array(1, np.int64), np.array(0, np.int64)], batch=True,
                                  dtype=types.INT64)
        return flip_x_where(x, flip), fn.cast(flow.flip_x(x), dtype=types.UINT8)

    p = pipe()
    p.build()
    where, always = p.run()
    assert np.array(where[0]).dtype == np.uint8
    assert np.array(where[0]).tolist() == expected.tolist() and np.array(where[1]).tolist() == q.tolist()
    assert np.array(always[0]).tolist() == np.array(always[1]).tolist() == expected.tolist()


def test_levels_per_px_is_the_quantisation_scale():
    assert flow.levels_per_px(20.0) == 255 / 40 == 6.375
    assert flow.quantize(np.float32([1.0]), 20.0).tolist() == [round(21 * flow.levels_per_px(20.0))]
    with pytest.raises(ValueError, match="bound must be > 0"):
        flow.levels_per_px(-1.0)


# ---------------------------------------------------------------------------------------------
# flow of known motion


@pytest.mark.parametrize("algorithm", flow.ALGORITHMS)
@pytest.mark.parametrize("dx,dy", [(3, 0), (-2, 0), (0, 2)])
def test_translation_has_the_right_sign_and_magnitude(algorithm, dx, dy):
    a, b = shifted_pair(dx, dy)
    f = flow.compute_flow(a, b, algorithm)
    assert f.shape == (48, 64, 2) and f.dtype == np.float32
    inner = f[8:-8, 8:-8]  # borders: content entering the frame has no match
    assert inner[..., 0].mean() == pytest.approx(dx, abs=0.25)
    assert inner[..., 1].mean() == pytest.approx(dy, abs=0.25)


def test_extractor_streams_quantised_planes():
    frames = [shifted_pair(3 * t, 0, seed=1)[1] for t in range(4)]  # +3 px per frame
    stats = flow.FlowStats()
    items = list(flow.video_flow(iter(frames), "dis", 20, ("flow",), stats))
    assert len(items) == 3 == stats.num_flow_frames
    for item in items:
        x, y = item["flow"]
        assert x.dtype == y.dtype == np.uint8 and x.shape == y.shape == (48, 64)
        assert flow.dequantize(x[8:-8, 8:-8]).mean() == pytest.approx(3, abs=0.3)
        assert flow.dequantize(y[8:-8, 8:-8]).mean() == pytest.approx(0, abs=0.3)


def test_flow_errors():
    a, b = shifted_pair(1, 0)
    with pytest.raises(flow.FlowError, match="unknown flow algorithm 'lk'"):
        flow.compute_flow(a, b, "lk")
    with pytest.raises(flow.FlowError, match="one size"):
        flow.compute_flow(a, b[:40], "dis")
    with pytest.raises(flow.FlowError, match="too small"):
        flow.compute_flow(a[:6, :6], b[:6, :6], "dis")
    with pytest.raises(flow.FlowError, match="unknown flow modality"):
        flow.FlowExtractor("dis", 20, ("depth",))


# ---------------------------------------------------------------------------------------------
# warped flow


def pan_scene(t, h=96, w=128, pan=2, obj_speed=-3):
    """Frame t: a background panning +pan px/frame (camera motion) and a textured square
    moving obj_speed px/frame; returns (gray frame, object box (x0, x1, y0, y1))."""
    bg, obj = texture(h + 60, w + 60, 1), texture(30, 30, 2, 1.0)
    img = bg[30 : 30 + h, 30 - pan * t : 30 - pan * t + w].copy()
    x = 70 + obj_speed * t
    img[33:63, x : x + 30] = obj
    return img, (x, x + 30, 33, 63)


@pytest.mark.parametrize("algorithm", flow.ALGORITHMS)
def test_warped_flow_cancels_the_camera_pan_and_keeps_the_object(algorithm):
    (f0, _), (f1, _) = pan_scene(0), pan_scene(1)
    hom = flow.estimate_homography(f0, f1)
    assert not hom.fallback and hom.inliers >= flow.MIN_MATCHES
    assert hom.matrix[0, 2] == pytest.approx(2, abs=0.2) and hom.matrix[1, 2] == pytest.approx(0, abs=0.2)
    est = flow.FlowEstimator(algorithm)
    plain = est(f0, f1)
    warped, fell_back = flow.compute_warped_flow(f0, f1, est)
    assert not fell_back
    background = np.zeros(f0.shape, bool)
    background[8:-8, 8:-8] = True
    background[25:70, 60:105] = False  # the object in both frames, with a margin
    inside = np.zeros(f0.shape, bool)
    inside[38:58, 75:95] = True  # well inside the object in frame 0
    assert plain[background, 0].mean() == pytest.approx(2, abs=0.3)  # the pan
    assert abs(warped[background, 0].mean()) < 0.2 and abs(warped[background, 1].mean()) < 0.2
    assert plain[inside, 0].mean() == pytest.approx(-3, abs=0.5)  # the object's motion on screen
    assert warped[inside, 0].mean() == pytest.approx(-5, abs=0.5)  # relative to the background


def test_homography_falls_back_to_identity_without_texture():
    flat = np.full((48, 64), 90, np.uint8)
    hom = flow.estimate_homography(flat, flat)
    assert hom.fallback and hom.reason == "too few corners"
    np.testing.assert_array_equal(hom.matrix, np.eye(3))
    ex = flow.FlowExtractor("dis", 20, ("flow", "warped_flow"))
    ex.push(flat)
    item = ex.push(flat)
    assert ex.stats.homography_fallbacks == 1 and ex.stats.fallback_reasons == {"too few corners": 1}
    for c in (0, 1):  # identity warp: warped flow == flow
        np.testing.assert_array_equal(item["warped_flow"][c], item["flow"][c])


@pytest.mark.parametrize("algorithm", flow.ALGORITHMS)
def test_naive_path_computes_the_same_flow(algorithm):
    frames = [cv2.cvtColor(pan_scene(t)[0], cv2.COLOR_GRAY2RGB) for t in range(3)]
    mods = ("flow", "warped_flow")
    fast = list(flow.video_flow(frames, algorithm, 20, mods))
    naive = flow.naive_video_flow(frames, algorithm, 20, mods)
    assert len(fast) == len(naive) == 2
    for a, b in zip(fast, naive):
        for m in mods:
            for c in (0, 1):
                # the gray conversions differ by rounding (cv2 fixed point vs float64): ~0 levels
                assert np.abs(a[m][c].astype(int) - b[m][c]).mean() < 0.5


# ---------------------------------------------------------------------------------------------
# tsn bench-flow


def test_bench_flow_cli_prints_json_and_table(capsys, tmp_path):
    from cli.main import main

    out = tmp_path / "bench.json"
    rc = main(["bench-flow", "--frames", "3", "--size", "48x32", "--algorithms", "dis,farneback",
               "--workers", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    start = text.index("{")
    end = text.index("\n}\n") + 2
    result = json.loads(text[start:end])
    assert result == json.loads(out.read_text())
    assert result["flow_frames"] == 2 and (result["width"], result["height"]) == (48, 32)
    assert set(result["rows"]) == {"dis/flow", "dis/warped_flow", "farneback/flow", "farneback/warped_flow"}
    for row in result["rows"].values():
        for key in ("fast_fps", "naive_fps", "fast_over_naive", "parallel_fps", "parallel_fps_per_core"):
            assert row[key] > 0, key
        assert row["mean_abs_diff_q"] < 2
    assert "flow frames/s per core" in text[end:] and "dis/warped_flow" in text[end:]


def test_bench_flow_on_video_frames_and_errors(tmp_path, capsys):
    from videos import make_test_video

    from cli.main import main

    video = make_test_video(tmp_path / "v.mp4", 4, (64, 48))
    frames = bench_flow.video_frames(str(video), 3, 32)
    assert len(frames) == 3 and frames[0].shape == (32, 42, 3)
    result = bench_flow.run_bench(frames, ("dis",), ("flow",), naive=False, log=lambda m: None)
    assert set(result["rows"]["dis/flow"]) == {"algorithm", "modality", "fast_fps", "fast_ms_per_frame"}
    assert main(["bench-flow", "--algorithms", "raft"]) == 2
    assert "--algorithms 'raft'" in capsys.readouterr().err
    assert main(["bench-flow", "--frames", "1"]) == 2
