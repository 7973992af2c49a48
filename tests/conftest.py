"""Session-wide fixtures: one tiny synthetic dataset, packed once per layout, shared by all tests."""

import os
import signal

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network


@pytest.fixture(autouse=True)
def _pytest_keeps_its_sigterm():
    """A test that runs `tsn train --local` in this process installs app.preemption's handler, which
    turns SIGTERM into a stop request: left in place, pytest would then ignore SIGTERM (a `timeout`
    or CI cancel could not end it) and the next in-process run would start already asked to stop."""
    from app.preemption import STOP

    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)
    STOP.clear()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """6 classes x 3 tiny videos (64x48 / 80x60, 1.5-2.5 s at 10-12 fps)."""
    from tools.synth import SynthSpec, generate_dataset

    out = tmp_path_factory.mktemp("synth")
    spec = SynthSpec(num_classes=6, videos_per_class=3, seed=0, min_seconds=1.5, max_seconds=2.5,
                     sizes=((64, 48), (80, 60)), fps_choices=(10, 12))
    generate_dataset(out, spec, workers=2, progress=False)
    return out


def _pack(synth_dir, out, codec, **kw):
    from dataloading.pack import pack_dataset
    from dataloading.sources.inputs import read_inputs

    items, classes = read_inputs(csv_path=synth_dir / "labels.csv", val_fraction=0.34, seed=0)
    pack_dataset(items, classes, out, codec=codec, short_side=kw.pop("short_side", 48), min_frames=8,
                 workers=2, progress=False, **kw)
    return out


@pytest.fixture(scope="session")
def packed_jpeg(synth_dir, tmp_path_factory):
    """JPEG frame packs, short side 48, small shards (several per split)."""
    return _pack(synth_dir, tmp_path_factory.mktemp("packed-jpeg"), "jpeg", shard_size_bytes=60_000)


@pytest.fixture(scope="session")
def packed_vp9(synth_dir, tmp_path_factory):
    return _pack(synth_dir, tmp_path_factory.mktemp("packed-vp9"), "vp9", gop=8)


@pytest.fixture(scope="session")
def packed_mjpeg(synth_dir, tmp_path_factory):
    return _pack(synth_dir, tmp_path_factory.mktemp("packed-mjpeg"), "mjpeg")


@pytest.fixture(scope="session")
def packed_flow(synth_dir, tmp_path_factory):
    """JPEG frame packs + flow + warped flow (DIS: ~1 s for the whole set; TV-L1 would take ~20 s)."""
    return _pack(synth_dir, tmp_path_factory.mktemp("packed-flow"), "jpeg",
                 modalities=("rgb", "flow", "warped_flow"), flow_algorithm="dis")


# --- object storage: a real S3-compatible server on loopback (helpers in tests/s3.py) -------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port for the whole session (`s3.start_server`:
    request signatures checked); stopped at the end. {endpoint, access_key, secret_key, bucket}."""
    import s3

    server, proc = s3.start_server(tmp_path_factory.mktemp("s3-server") / "moto.log")
    try:
        yield server
    finally:
        s3.stop_server(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This test's process (and the processes it starts) talk to the session's S3 server
    through the standard AWS variables, as a user would set them."""
    import s3

    for var in s3.OTHER_AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in s3.environment(s3_server).items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def packed_jpeg_s3(s3_server, packed_jpeg):
    """`packed_jpeg` uploaded to the session's S3 server: its ``s3://`` URI."""
    import s3

    return s3.upload_dir(s3_server, packed_jpeg, "packed-jpeg")
