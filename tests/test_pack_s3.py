"""`tsn pack --out s3://bucket/prefix` against a real S3-compatible server on loopback (moto's
server mode, `conftest.s3_server`, request signatures checked): the same objects as a local pack
of the same inputs, the manifest uploaded last, resuming after a failed upload without
re-uploading what is there, wrong credentials failing before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import s3

from cli import main as cli
from dataloading.pack import pack_dataset, remote
from dataloading.pack.options import PackError
from dataloading.sources.inputs import read_inputs
from dataloading.store import storage

# The options of conftest.packed_jpeg (its `_pack`): a local pack to compare with.
PACK_KW = dict(codec="jpeg", short_side=48, min_frames=8, workers=2, progress=False, shard_size_bytes=60_000)
LOCAL_ONLY = {"_lock"}  # files of a local pack that an upload leaves in staging


def inputs(synth_dir):
    return read_inputs(csv_path=synth_dir / "labels.csv", val_fraction=0.34, seed=0)


def without_time(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created_unix"}


def assert_same_as_local(server: dict, prefix: str, local: Path) -> None:
    """Every object under ``prefix`` has the bytes of the local pack's file (the manifest: up
    to its creation time), and every shard, index and result file of the local pack is there."""
    c = s3.client(server)
    # (pyarrow leaves an empty "prefix/" directory marker after deleting an earlier manifest)
    keys = {k for k in s3.keys_under(server, prefix + "/") if not k.endswith("/")}
    journals = {p.relative_to(local).as_posix() for p in local.glob("*/_journal.jsonl")}
    expected = {p.relative_to(local).as_posix() for p in local.rglob("*")
                if p.is_file() and p.name not in LOCAL_ONLY and p.name != "_journal.jsonl"}
    assert {k[len(prefix) + 1:] for k in keys} == expected | journals  # the journals mirrored too
    for rel in sorted(expected):
        body = c.get_object(Bucket=server["bucket"], Key=f"{prefix}/{rel}")["Body"].read()
        if rel == "manifest.json":
            assert without_time(json.loads(body)) == without_time(json.loads((local / rel).read_text()))
        else:
            assert body == (local / rel).read_bytes(), rel


class CountingUploads:
    """Wraps `storage.upload_file`: records each uploaded URI, raises once after ``fail_after`` uploads."""

    def __init__(self, monkeypatch, fail_after: int | None = None):
        self.uris: list[str] = []
        self.fail_after = fail_after
        self._real = storage.upload_file
        monkeypatch.setattr(storage, "upload_file", self)

    def __call__(self, local_path, uri, *args, **kwargs):
        if self.fail_after is not None and len(self.uris) >= self.fail_after:
            self.fail_after = None
            raise storage.StorageError(f"{uri}: cannot upload the object: injected failure")
        self.uris.append(uri)
        return self._real(local_path, uri, *args, **kwargs)


def test_pack_to_s3_equals_local_pack_and_resumes_after_a_failed_upload(
        s3_env, synth_dir, packed_jpeg, tmp_path, monkeypatch):
    items, classes = inputs(synth_dir)
    uri = f"s3://{s3_env['bucket']}/pack-resume"
    staging = tmp_path / "staging"
    first_tar = f"{uri}/train/train-000000.tar"

    # Run 1: the third upload (the second shard's tar) fails: the first shard is up, no manifest.
    uploads = CountingUploads(monkeypatch, fail_after=2)
    with pytest.raises(storage.StorageError, match="train-000001.tar: cannot upload"):
        pack_dataset(items, classes, uri, staging_dir=staging, **PACK_KW)
    assert uploads.uris == [first_tar, f"{uri}/train/train-000000.idx"]
    keys = s3.keys_under(s3_env, "pack-resume/")
    assert "pack-resume/manifest.json" not in keys and "pack-resume/train/train-000000.tar" in keys
    assert not (staging / "train" / "train-000000.tar").exists()  # removed once uploaded
    assert (staging / "train" / "train-000001.tar").is_file()  # journaled, waiting for its upload

    # Run 2 resumes: the staged shard is uploaded, the first shard is not uploaded again.
    uploads = CountingUploads(monkeypatch)
    stats: dict = {}
    manifest = pack_dataset(items, classes, uri, staging_dir=staging, run_stats=stats, **PACK_KW)
    assert first_tar not in uploads.uris
    assert uploads.uris[0] == f"{uri}/train/train-000001.tar"
    assert uploads.uris[-2:] == [f"{uri}/rejected.jsonl", f"{uri}/manifest.json"]  # the manifest last
    assert stats["uploaded_objects"] == len(uploads.uris) and stats["staging_dir"] == str(staging)
    assert_same_as_local(s3_env, "pack-resume", packed_jpeg)
    assert manifest["num_samples"] == json.loads((packed_jpeg / "manifest.json").read_text())["num_samples"]
    # Staging keeps only the bookkeeping: no shard is left behind.
    assert not list(staging.rglob("*.tar")) and not list(staging.rglob("*.idx"))
    assert (staging / "train" / "_journal.jsonl").is_file()

    # Run 3: everything is done; nothing but the result files is uploaded again.
    uploads = CountingUploads(monkeypatch)
    pack_dataset(items, classes, uri, staging_dir=staging, **PACK_KW)
    assert uploads.uris == [f"{uri}/rejected.jsonl", f"{uri}/manifest.json"]
    assert_same_as_local(s3_env, "pack-resume", packed_jpeg)


def test_a_rerun_with_an_empty_staging_directory_redoes_nothing_uploaded(s3_env, synth_dir, packed_jpeg, tmp_path,
                                                                        monkeypatch):
    """Issue 24: the journal lived only in staging, so a re-run on a new pod (a RayJob retry:
    staging is an emptyDir) re-packed and re-uploaded every shard. It is mirrored under the
    prefix after each shard: a re-run with a new staging directory takes it from there."""
    items, classes = inputs(synth_dir)
    uri = f"s3://{s3_env['bucket']}/pack-new-pod"
    first_tar = f"{uri}/train/train-000000.tar"
    CountingUploads(monkeypatch, fail_after=2)  # the second shard's upload fails: the first is up
    with pytest.raises(storage.StorageError, match="train-000001.tar: cannot upload"):
        pack_dataset(items, classes, uri, staging_dir=tmp_path / "pod-1", **PACK_KW)
    mirrored = storage.read_text(f"{uri}/train/_journal.jsonl").splitlines()
    # mirrored once a shard is up: the second, journaled in pod 1's staging but never uploaded, is not in it
    assert [json.loads(line)["path"] for line in mirrored if json.loads(line)["type"] == "shard"] == [
        "train/train-000000.tar"]

    uploads = CountingUploads(monkeypatch)
    stats: dict = {}
    pack_dataset(items, classes, uri, staging_dir=tmp_path / "pod-2", run_stats=stats, **PACK_KW)
    assert first_tar not in uploads.uris  # uploaded by the first pod: not redone
    assert stats["skipped"] > 0 and f"{uri}/train/train-000001.tar" in uploads.uris
    assert_same_as_local(s3_env, "pack-new-pod", packed_jpeg)


def test_cli_pack_to_s3_then_inspect(s3_env, synth_dir, packed_jpeg, tmp_path, capsys):
    uri = f"s3://{s3_env['bucket']}/pack-cli"
    code = cli.main(["pack", "--input", str(synth_dir / "labels.csv"), "--val-fraction", "0.34", "--out", uri,
                     "--staging", str(tmp_path / "staging"), "--short-side", "48", "--min-frames", "8",
                     "--shard-size", "60000", "--workers", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"in {uri} " in out and "uploaded" in out and str(tmp_path / "staging") in out
    assert_same_as_local(s3_env, "pack-cli", packed_jpeg)
    assert cli.main(["inspect", uri, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    local = json.loads((packed_jpeg / "manifest.json").read_text())
    assert s["ok"] and s["num_bytes"] == sum(sh["num_bytes"] for sh in local["shards"])
    assert s["source_bytes"] == local["source_bytes"] > 0


def test_wrong_credentials_fail_before_any_work(s3_env, synth_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    uri = f"s3://{s3_env['bucket']}/pack-denied"
    staging = tmp_path / "staging"
    code = cli.main(["pack", "--input", str(synth_dir / "labels.csv"), "--out", uri, "--staging", str(staging),
                     "--min-frames", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{uri}: cannot list the objects under it" in err and "AWS_SECRET_ACCESS_KEY" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err  # one line, the hint in it
    assert not staging.exists()  # checked before the staging directory (and any encoding) exists
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["secret_key"])
    assert s3.keys_under(s3_env, "pack-denied/") == set()


def test_refuses_a_prefix_that_is_not_a_pack_or_has_other_options(s3_env, synth_dir, tmp_path):
    items, classes = inputs(synth_dir)
    storage.put_bytes(f"s3://{s3_env['bucket']}/not-a-pack/data.csv", b"x")
    with pytest.raises(PackError, match="not-a-pack: holds objects but is not a `tsn pack` output"):
        pack_dataset(items, classes, f"s3://{s3_env['bucket']}/not-a-pack", staging_dir=tmp_path / "a", **PACK_KW)
    uri = f"s3://{s3_env['bucket']}/other-options"
    storage.put_bytes(f"{uri}/_options.json", b'{"codec": "vp9"}\n')
    with pytest.raises(PackError, match="other-options: already holds a pack made with different options"):
        pack_dataset(items, classes, uri, staging_dir=tmp_path / "b", **PACK_KW)


def test_failed_upload_names_the_object_and_default_staging(s3_env, tmp_path, monkeypatch):
    src = tmp_path / "x.bin"
    src.write_bytes(b"0123456789")
    monkeypatch.setattr(storage, "UPLOAD_RETRY_BASE_SECONDS", 0.0)
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-here/p/x.bin: cannot upload the object"):
        storage.upload_file(src, "s3://no-such-bucket-here/p/x.bin", attempts=2)
    assert storage.upload_file(src, f"s3://{s3_env['bucket']}/up/x.bin") == 10
    assert storage.read_bytes(f"s3://{s3_env['bucket']}/up/x.bin") == b"0123456789"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a, b = remote.default_staging_dir("s3://b/p"), remote.default_staging_dir("s3://b/p/")
    assert a == b and a.parent == tmp_path / "cache" / "tsn" / "staging"
    assert remote.default_staging_dir("s3://b/q") != a


def test_pack_verify_repacks_an_object_changed_in_place_with_its_original_bytes(s3_env, synth_dir, packed_jpeg,
                                                                                tmp_path, capsys):
    """Issue 24: a shard object overwritten with bytes of the same size (a bad copy) passed
    every resume check; `--verify` finds it by its SHA-256 and re-packs it."""
    items, classes = inputs(synth_dir)
    uri = f"s3://{s3_env['bucket']}/pack-verify"
    pack_dataset(items, classes, uri, staging_dir=tmp_path / "staging", **PACK_KW)
    c, key = s3.client(s3_env), "pack-verify/train/train-000001.tar"
    body = bytearray(c.get_object(Bucket=s3_env["bucket"], Key=key)["Body"].read())
    body[2000:2016] = bytes(b ^ 0xFF for b in body[2000:2016])
    c.put_object(Bucket=s3_env["bucket"], Key=key, Body=bytes(body))
    stats: dict = {}
    pack_dataset(items, classes, uri, staging_dir=tmp_path / "staging", run_stats=stats, **PACK_KW)
    assert stats["skipped"] == len(items)  # sizes only: nothing noticed
    capsys.readouterr()
    stats = {}
    pack_dataset(items, classes, uri, staging_dir=tmp_path / "staging", run_stats=stats, verify=True, **PACK_KW)
    assert stats["verified"]["changed"] == 1 and stats["verified"]["checked"] == len(
        json.loads((packed_jpeg / "manifest.json").read_text())["shards"])
    assert f"{uri}/train/train-000001.tar: SHA-256" in capsys.readouterr().err
    assert 0 < stats["packed"] < len(items)  # that shard and the later ones of its split, not the rest
    assert_same_as_local(s3_env, "pack-verify", packed_jpeg)
