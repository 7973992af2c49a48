"""Corrupt samples: the registry a loader keeps of the samples it skips (`Quarantine`), and
the checks that tell why a sample cannot be used.

The sample source (`dataloading.pipeline.source`) checks each sample's bytes against the checksums
recorded at pack time as it reads them and records a mismatch here; when the graph itself
fails on a batch (a pack without checksums), the loader decodes the batch's payloads in Python
(`undecodable`) to find the culprit. `check_sample` checks a whole sample (every member the
modality reads decodes and matches its checksums): `tsn inspect --verify`'s rule, with OpenCV
(JPEG frame packs, flow planes) and PyAV (`video_io.count_video_frames`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import cv2
import numpy as np

from dataloading import modality
from dataloading.format import shards
from dataloading.sources import video_io
from dataloading.store import storage

log = logging.getLogger(__name__)


def iter_samples(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member extension: bytes}) of each sample of a shard (a local path or an
    ``s3://`` object, streamed), in tar order."""
    with storage.open_tar(tar_path) as tar:
        key, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            k, ext = shards.split_member_name(m.name)
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(m).read()
        if key is not None:
            yield key, members


def _decodes(jpeg, flags: int) -> bool:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), flags) is not None


def check_sample(members: dict[str, bytes], layout: str, modality_name: str = modality.RGB) -> str | None:
    """Why a sample (its members by extension) is unusable for ``modality_name``, or None when
    every member that modality reads decodes and matches its checksum (when recorded)."""
    reason = _decode_problem(members, layout, modality_name)
    if reason:
        return reason
    # bytes that decode may still have changed since packing (decoders hide most of that)
    try:
        row = modality.get(modality_name)
        reads = set(row.shard_members if row.is_flow else shards.LAYOUT_MEMBERS[layout])
        changed = shards.checksum_problem(members, only=reads)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None if changed == shards.NO_CHECKSUMS else changed


def _decode_problem(members: dict[str, bytes], layout: str, modality_name: str) -> str | None:
    """Why a sample is unusable for ``modality_name`` by its structure and decoding, or None."""
    try:
        n = shards.decode_info(members["info"])["num_frames"]
        row = modality.get(modality_name)
        if row.is_flow:
            frames_ext, offsets_ext = row.shard_members
            offsets = shards.decode_offsets(members[offsets_ext])
            blob = members[frames_ext]
            if len(offsets) != 2 * row.frame_count(n) + 1 or offsets[-1] != len(blob):
                return f"{modality_name} offset table does not match its frame pack"
            for j in range(2 * row.frame_count(n)):
                if not _decodes(shards.frame_from_pack(blob, offsets, j), cv2.IMREAD_GRAYSCALE):
                    return f"{modality_name} plane {j} (flow frame {j // 2}) does not decode as JPEG"
            return None
        if layout == shards.LAYOUT_JPEG:
            offsets = shards.decode_offsets(members["offsets"])
            if len(offsets) != n + 1 or offsets[-1] != len(members["frames"]):
                return "offset table does not match the frame pack"
            for i in range(n):
                if not _decodes(shards.frame_from_pack(members["frames"], offsets, i), cv2.IMREAD_COLOR):
                    return f"frame {i} does not decode as JPEG"
            return None
        decoded = video_io.count_video_frames(members["video"])
        if decoded < n:
            return f"video decodes to {decoded} frames, info says {n}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


class Quarantine:
    """The corrupt samples found so far (a loader's, kept across its epochs): ``skipped`` has
    one dict per sample, {shard, key, reason}, in the order they were found. The sample
    source (`dataloading.pipeline.source`) asks `reason` before reading a sample and `add`s the ones it
    finds corrupt; each is named once in a warning. Thread-safe."""

    def __init__(self):
        self.skipped: list[dict] = []
        self._reasons: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def add(self, shard: str, key: str, reason: str) -> bool:
        """Record sample ``key`` of ``shard`` as corrupt; False when it already was."""
        with self._lock:
            if (shard, key) in self._reasons:
                return False
            self._reasons[(shard, key)] = reason
            self.skipped.append({"shard": shard, "key": key, "reason": reason})
        log.warning("skipping corrupt sample %s in %s: %s", key, shard, reason)
        return True

    def reason(self, shard: str, key: str) -> str | None:
        """Why sample ``key`` of ``shard`` was found corrupt, or None."""
        return self._reasons.get((shard, key))

    def __len__(self) -> int:
        return len(self.skipped)


def undecodable(payload: list, cut: str | None) -> str | None:
    """Why a sample's payload as cut by the source (its sampled JPEGs, or the whole video)
    does not decode, or None: what is checked when the graph fails on a batch of a pack
    without checksums (with checksums the source finds changed bytes before the graph)."""
    try:
        if cut is None:
            frames = video_io.count_video_frames(bytes(payload[0]))
            return None if frames > 0 else "video does not decode"
        flags = cv2.IMREAD_GRAYSCALE if cut == "flow" else cv2.IMREAD_COLOR
        for j, jpeg in enumerate(payload):
            if not _decodes(np.asarray(jpeg), flags):
                return f"sampled frame {j} does not decode as JPEG"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None
