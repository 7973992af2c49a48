"""The on-disk sample format of packed shards: the one contract shared by the packer,
the DALI pipeline, the reference loader and `tsn inspect`.

A packed dataset directory looks like::

    DIR/manifest.json            # see dataloading.pack (layout, classes, shards, counts)
    DIR/rejected.jsonl           # one JSON object per rejected input: {"path", "reason"}
    DIR/<split>/<split>-000000.tar   # WebDataset shards, POSIX tar
    DIR/<split>/<split>-000000.idx   # DALI webdataset index (format v1.2, see write_dali_index)

Every sample ``KEY`` (``KEY`` has no dots) holds these tar members:

``KEY.info``    int32 little-endian ``[num_frames, label, height, width, sample_index]``
                (`INFO_FIELDS`). DALI reads it with ``dtypes=INT32``; ``num_frames`` is the
                *decoded* frame count of the stored frames, never a container header value.
``KEY.json``    UTF-8 JSON metadata: at least ``num_frames, fps, width, height, label,
                class_name, source, layout, codec``.
``KEY.cls``     the label as ASCII decimal (the WebDataset convention, for other tools).

and, by layout (``manifest["layout"]``):

``jpeg``  ("frame pack", the fast CPU path): ``KEY.frames`` = the JPEG files of every frame,
          concatenated; ``KEY.offsets`` = int32 little-endian, ``num_frames + 1`` byte offsets
          into ``KEY.frames`` (``offsets[0] == 0``, ``offsets[-1] == len(frames)``), so frame
          ``i`` is ``frames[offsets[i]:offsets[i + 1]]``.
``video`` (codecs h264 / vp9 / mjpeg): ``KEY.video`` = a re-encoded video container with a
          fixed frame rate and a short keyframe interval.

Motion modalities (``manifest["modalities"]``, e.g. ``["rgb", "flow", "warped_flow"]``; a
manifest without the key holds ``rgb`` only), whatever the RGB layout, one frame pack each:

``KEY.flow.frames`` / ``KEY.flow.offsets`` and ``KEY.warped_flow.frames`` /
``KEY.warped_flow.offsets``: grayscale JPEGs of the quantised flow planes (`dataloading.flow`:
clip to +-bound, ``rint((f + bound) * 255 / (2 * bound))``, zero flow = 128), in the order
``x0, y0, x1, y1, ...``: flow frame ``i`` (0-based, ``i < num_frames - 1``) is the flow from
RGB frame ``i`` to ``i + 1``, its x plane is pack entry ``2i`` and its y plane ``2i + 1``; the
offset table has ``2 * (num_frames - 1) + 1`` entries. Planes have the RGB frames' size
(``height`` x ``width`` of ``KEY.info``). ``KEY.json`` then also holds ``modalities`` and, per
flow modality, ``{"algorithm", "bound", "num_frames" (= num_frames - 1), "order",
"jpeg_quality"}`` (+ ``homography_fallbacks`` for warped_flow).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataloading import files, storage
from dataloading.modality import FLOW_MODALITIES, RGB, get as get_modality

INFO_FIELDS = ("num_frames", "label", "height", "width", "sample_index")
INFO_NUM_FRAMES, INFO_LABEL, INFO_HEIGHT, INFO_WIDTH, INFO_SAMPLE_INDEX = range(len(INFO_FIELDS))

LAYOUT_JPEG = "jpeg"
LAYOUT_VIDEO = "video"
# codec name given to `tsn pack --codec` -> sample layout
CODEC_LAYOUT = {"jpeg": LAYOUT_JPEG, "h264": LAYOUT_VIDEO, "vp9": LAYOUT_VIDEO, "mjpeg": LAYOUT_VIDEO}
# Only these video codecs decode on DALI's CPU backend; h264 needs the `mixed` (NVDEC) backend.
CPU_DECODABLE_VIDEO_CODECS = frozenset({"vp9", "mjpeg"})

# The tar members DALI's reader must fetch for each layout (without the info member).
LAYOUT_MEMBERS = {LAYOUT_JPEG: ("frames", "offsets"), LAYOUT_VIDEO: ("video",)}

DALI_INDEX_VERSION = "v1.2"

FLOW_ORDER = "x0,y0,x1,y1,..."


def flow_members(modality: str) -> tuple[str, str]:
    """The tar member extensions (frames blob, offsets table) of a flow modality: its
    `dataloading.modality` row's ``shard_members``."""
    members = get_modality(modality).shard_members if modality in FLOW_MODALITIES else None
    if members is None:
        raise ValueError(f"{modality!r} is not a flow modality ({', '.join(FLOW_MODALITIES)})")
    return members


def manifest_modalities(manifest: dict) -> list[str]:
    """The modalities a packed dataset holds (packs made before motion modalities: rgb only)."""
    return list(manifest.get("modalities", [RGB]))


def require_modality(dataset_dir: str | Path, manifest: dict, modality: str) -> None:
    """Raise a clear ValueError when ``modality`` needs entries the dataset was not packed with."""
    needed = modality if modality in FLOW_MODALITIES else RGB
    have = manifest_modalities(manifest)
    if needed not in have:
        raise ValueError(
            f"{dataset_dir}: modality {modality!r} needs {needed!r} entries, but this dataset was packed "
            f"with modalities {have} only; repack with `tsn pack --modalities {','.join([*have, needed])} ...`")


def encode_info(num_frames: int, label: int, height: int, width: int, sample_index: int) -> bytes:
    """The ``KEY.info`` member: 5 little-endian int32 values in `INFO_FIELDS` order."""
    return np.asarray([num_frames, label, height, width, sample_index], dtype="<i4").tobytes()


def decode_info(raw: bytes) -> dict[str, int]:
    values = np.frombuffer(raw, dtype="<i4")
    if values.shape != (len(INFO_FIELDS),):
        raise ValueError(f"info member has {len(raw)} bytes, expected {4 * len(INFO_FIELDS)}")
    return {name: int(v) for name, v in zip(INFO_FIELDS, values)}


def encode_frame_pack(jpegs: list[bytes]) -> tuple[bytes, bytes]:
    """Concatenate encoded frames; returns (``frames`` blob, ``offsets`` int32 LE table)."""
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    np.cumsum([len(j) for j in jpegs], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"frame pack of {offsets[-1]} bytes exceeds the int32 offset table")
    return b"".join(jpegs), offsets.astype("<i4").tobytes()


def frame_from_pack(frames, offsets: np.ndarray, index: int):
    """The encoded bytes of entry ``index`` (0-based) of a frame pack: a slice of ``frames``
    (bytes, or a view of a memoryview / numpy array, which the DALI graph's planner relies on
    to cut without copying). ValueError if the offsets point outside the pack (a slice would
    silently come back short, and a truncated JPEG can still decode)."""
    begin, end = int(offsets[index]), int(offsets[index + 1])
    if not 0 <= begin < end <= len(frames):
        raise ValueError(f"frame pack entry {index} spans bytes [{begin}, {end}) of a {len(frames)}-byte pack")
    return frames[begin:end]


def decode_offsets(raw: bytes) -> np.ndarray:
    offsets = np.frombuffer(raw, dtype="<i4")
    if offsets.size < 2 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
        raise ValueError("offsets member is not a strictly increasing table starting at 0")
    return offsets


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``), as DALI and webdataset split names."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def write_dali_index(tar_path: str | Path, idx_path: str | Path) -> int:
    """Write DALI's webdataset index (the format of DALI's ``wds2idx`` tool) for ``tar_path``.

    Format: a first line ``v1.2 <num_samples>``, then one line per sample listing, for every
    member, ``<ext> <data_offset> <size> <member_name>``. Writes atomically and durably
    (`dataloading.files`: a journaled shard never has a torn index); returns the number of samples.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if not key or key.endswith("/"):
                continue
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext, member.offset_data, member.size, member.name))
    if not samples:
        raise ValueError(f"{tar_path}: no samples in shard")
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in members) for members in samples]
    files.atomic_write_text(idx_path, "\n".join(lines) + "\n")
    return len(samples)


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in the manifest."""

    path: str  # relative to the dataset directory
    index_path: str
    num_samples: int
    num_bytes: int


def load_manifest(dataset_dir: str | Path) -> dict:
    """Read ``DIR/manifest.json`` (a local directory or an ``s3://bucket/prefix``,
    `dataloading.storage`) with a clear error when it is not a packed dataset."""
    storage.check_supported(dataset_dir)
    path = storage.join(dataset_dir, "manifest.json")
    try:
        text = storage.read_text(path) if storage.exists(path) else None
    except FileNotFoundError:
        text = None
    if text is None:
        raise FileNotFoundError(f"{dataset_dir}: not a packed dataset (no manifest.json); run `tsn pack` first")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def split_shards(dataset_dir: str | Path, split: str) -> tuple[list[str], list[str], int]:
    """(tar locations, index locations, num_samples) of one split of a packed dataset:
    absolute local paths, or ``s3://`` URIs beside the manifest (DALI reads both).

    In object storage every tar and index object of the split is checked to exist (the tars
    with the manifest's size) in one listing before anything reads them: a missing object
    or wrong credentials fail here, naming the object, rather than deep inside DALI (whose
    reader reports a denied request as "object not found").
    """
    manifest = load_manifest(dataset_dir)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise KeyError(f"{dataset_dir}: split {split!r} not packed (have: {sorted(splits)})")
    shards = splits[split]["shards"]
    if not shards:
        raise ValueError(f"{dataset_dir}: split {split!r} has no shards")
    tars = [storage.join(dataset_dir, s["path"]) for s in shards]
    idxs = [storage.join(dataset_dir, s["index_path"]) for s in shards]
    if storage.is_uri(dataset_dir):
        expected = {t: int(s["num_bytes"]) for t, s in zip(tars, shards)} | dict.fromkeys(idxs)
        for folder in sorted({loc.rsplit("/", 1)[0] for loc in expected}):  # one listing per folder
            storage.check_objects({loc: n for loc, n in expected.items() if loc.rsplit("/", 1)[0] == folder}, folder)
    return tars, idxs, int(splits[split]["num_samples"])
