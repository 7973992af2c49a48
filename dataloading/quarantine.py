"""Quarantine of corrupt samples: when the DALI graph fails on a sample at read time, find the
corrupt samples of a rank's shards by decoding them in Python, and cut them out of run-local
copies of the DALI index files so the pipeline can be rebuilt without them.

The checks compare every member the given modality reads with the checksums recorded at pack
time (`shards.checksum_problem`; the training graph raises `shards.ChecksumError` on a
mismatch) and decode it, with OpenCV (JPEG frame packs, flow planes) and PyAV
(`video_io.count_video_frames`): slow, but only run after a failure.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from dataloading import modality, shards, storage, video_io

log = logging.getLogger(__name__)


class UnreadableShard(Exception):
    """A shard whose tar structure cannot be read: no sample of it can be cut out."""


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
    """The corrupt samples found so far in one rank's shards, and the index files without them.

    ``tar_paths`` / ``index_paths``: the shards to read now (a shard whose samples are all
    corrupt is left out: DALI rejects empty indices); ``skipped``: one dict per corrupt sample,
    {shard, key, reason}. The rewritten indices live in a temporary directory as long as this
    object does.
    """

    def __init__(self, tar_paths: list[str], index_paths: list[str], layout: str, modality_name: str):
        self.tar_paths, self.index_paths = list(tar_paths), list(index_paths)
        self.layout, self.modality_name = layout, modality_name
        self.skipped: list[dict] = []
        self._dir: tempfile.TemporaryDirectory | None = None

    def scan(self) -> list[dict]:
        """Check every sample of the current shards; quarantine the corrupt ones not yet known
        and return them (empty: nothing new found). Raises `UnreadableShard`, or ValueError
        when every sample is corrupt."""
        bad = []
        for tar in self.tar_paths:
            try:
                for key, members in iter_samples(tar):
                    reason = check_sample(members, self.layout, self.modality_name)
                    if reason:
                        bad.append({"shard": tar, "key": key, "reason": reason})
            except Exception as e:
                raise UnreadableShard(f"shard {tar} is unreadable: {e}") from e
        known = {(b["shard"], b["key"]) for b in self.skipped}
        new = [b for b in bad if (b["shard"], b["key"]) not in known]
        if new:
            self._drop({(b["shard"], b["key"]) for b in bad})
            for b in new:
                log.warning("skipping corrupt sample %s in %s: %s", b["key"], b["shard"], b["reason"])
            self.skipped.extend(new)
        return new

    def _drop(self, drop: set[tuple[str, str]]) -> None:
        """Rewrite the current index files without the samples (shard, key) in ``drop``."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="tsn-quarantine-")
        new_tars, new_idx = [], []
        for i, (tar, idx) in enumerate(zip(self.tar_paths, self.index_paths)):
            lines = storage.read_text(idx).splitlines()  # local or s3:// (DALI reads both)
            kept = [ln for ln in lines[1:] if (tar, shards.split_member_name(ln.split()[3])[0]) not in drop]
            if not kept:  # DALI rejects empty indices: leave the shard out
                continue
            out = Path(self._dir.name) / f"{i:06d}.idx"
            out.write_text("\n".join([f"{shards.DALI_INDEX_VERSION} {len(kept)}", *kept]) + "\n")
            new_tars.append(tar)
            new_idx.append(str(out))
        if not new_tars:
            raise ValueError(f"every sample of this rank's shards is corrupt: {self.tar_paths}")
        self.tar_paths, self.index_paths = new_tars, new_idx
