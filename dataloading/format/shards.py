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
                Followed by the sample's checksums (see "Checksums" below; absent in shards
                packed before they were recorded).
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
``KEY.warped_flow.offsets``: grayscale JPEGs of the quantised flow planes (`dataloading.sources.flow`:
clip to +-bound, ``rint((f + bound) * 255 / (2 * bound))``, zero flow = 128), in the order
``x0, y0, x1, y1, ...``: flow frame ``i`` (0-based, ``i < num_frames - 1``) is the flow from
RGB frame ``i`` to ``i + 1``, its x plane is pack entry ``2i`` and its y plane ``2i + 1``; the
offset table has ``2 * (num_frames - 1) + 1`` entries. Planes have the RGB frames' size
(``height`` x ``width`` of ``KEY.info``). ``KEY.json`` then also holds ``modalities`` and, per
flow modality, ``{"algorithm", "bound", "num_frames" (= num_frames - 1), "order",
"jpeg_quality"}`` (+ ``homography_fallbacks`` for warped_flow).

Checksums (CRC-32, `zlib.crc32`, recorded at pack time; `add_checksums`) extend ``KEY.info``,
each value stored as the int32 with the same bits:

* ``[5]`` `CHECKSUM_MAGIC`; ``[6]`` the CRC of the info member's other bytes (words 0-5 and 7-);
* ``[7]`` M, then M CRCs: one per other member of the sample, in sorted extension order;
* then, per frame pack (members ``frames``, ``*.frames``, sorted): the CRC of its extension's
  name, the number E of its entries, and E CRCs, one per entry (frame / flow plane).

`tsn inspect --verify` and the quarantine check every member (`checksum_problem`); the
training graph checks cheaply only the bytes it uses: the info member and each JPEG it cuts
out of a pack (`cut_checksum_problem`, in `dali_planner.SamplePlanner`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from dataloading.modality import FLOW_MODALITIES, RGB, get as get_modality
from dataloading.store import files, storage

log = logging.getLogger(__name__)

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
    """The `INFO_FIELDS` of an info member (with or without its checksums)."""
    values = np.frombuffer(raw, dtype="<i4") if len(raw) % 4 == 0 else np.zeros(0, "<i4")
    n = len(INFO_FIELDS)
    if values.shape != (n,) and not (values.size > _CHECKSUM_FIRST and values[n] == CHECKSUM_MAGIC):
        raise ValueError(f"info member has {len(raw)} bytes, expected {4 * n} (+ checksums)")
    return {name: int(v) for name, v in zip(INFO_FIELDS, values)}


# --- checksums (see the module docstring) ---------------------------------------------------

CHECKSUM_MAGIC = int(np.frombuffer(b"CRC1", "<i4")[0])
_SELF_CRC = len(INFO_FIELDS) + 1  # word 6: the info member's own CRC
_CHECKSUM_FIRST = len(INFO_FIELDS) + 2  # word 7: M, the number of member CRCs
NO_CHECKSUMS = "no checksums (packed before per-sample checksums were recorded)"


class ChecksumError(ValueError):
    """A sample's bytes differ from the checksums recorded when it was packed."""


def _crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _as_int32(crc: int) -> int:
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def is_frame_pack(ext: str) -> bool:
    """Whether member ``ext`` is a frame pack (JPEGs cut by an offsets table)."""
    return ext == "frames" or ext.endswith(".frames")


def offsets_member(pack_ext: str) -> str:
    """The offsets table of frame pack ``pack_ext`` (``frames`` -> ``offsets``)."""
    return pack_ext[: -len("frames")] + "offsets"


def add_checksums(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``members`` (ext, data) of one sample with its checksums appended to the ``info``
    member (which must hold just the `INFO_FIELDS`)."""
    by_ext = dict(members)
    fields = np.frombuffer(by_ext["info"], "<i4")
    if fields.shape != (len(INFO_FIELDS),):
        raise ValueError("add_checksums: the info member already has more than its fields")
    others = sorted(e for e in by_ext if e != "info")
    words = [*fields.tolist(), CHECKSUM_MAGIC, 0, len(others), *(_as_int32(_crc(by_ext[e])) for e in others)]
    for ext in (e for e in others if is_frame_pack(e)):
        blob, offsets = by_ext[ext], np.frombuffer(by_ext[offsets_member(ext)], "<i4")
        words += [_as_int32(_crc(ext.encode())), len(offsets) - 1]
        words += [_as_int32(_crc(blob[offsets[i]:offsets[i + 1]])) for i in range(len(offsets) - 1)]
    info = np.asarray(words, "<i4")
    info[_SELF_CRC] = _as_int32(_info_crc(info))
    return [(e, info.tobytes() if e == "info" else d) for e, d in members]


def _info_crc(info: np.ndarray) -> int:
    """CRC of an info member's int32 words but the self-CRC word."""
    return zlib.crc32(info[_SELF_CRC + 1:], zlib.crc32(info[:_SELF_CRC])) & 0xFFFFFFFF


def has_checksums(info: np.ndarray | bytes) -> bool:
    """Whether an info member (raw bytes or its int32 words) carries checksums."""
    words = np.frombuffer(info, "<i4") if isinstance(info, bytes) else info
    return words.size > _CHECKSUM_FIRST and int(words[len(INFO_FIELDS)]) == CHECKSUM_MAGIC


def _info_problem(words: np.ndarray) -> str | None:
    if (_info_crc(words) & 0xFFFFFFFF) != (int(words[_SELF_CRC]) & 0xFFFFFFFF):
        return "member info: bytes differ from the checksum recorded at pack time"
    return None


def _entry_tables(words: np.ndarray) -> dict[int, np.ndarray]:
    """crc32(pack ext name) -> the pack's per-entry CRCs (uint32 view)."""
    pos = _CHECKSUM_FIRST + 1 + int(words[_CHECKSUM_FIRST])
    tables = {}
    while pos + 2 <= words.size:
        code, count = int(words[pos]) & 0xFFFFFFFF, int(words[pos + 1])
        tables[code] = words[pos + 2:pos + 2 + count].view(np.uint32)
        pos += 2 + count
    return tables


def checksum_problem(members: dict[str, bytes], only: set[str] | None = None) -> str | None:
    """Why a sample's bytes differ from its recorded checksums (naming the member, and the
    entry of a frame pack), `NO_CHECKSUMS` when it has none, or None when they match.
    ``only``: check just these members (and always ``info``)."""
    raw = members.get("info", b"")
    words = np.frombuffer(raw, "<i4") if len(raw) % 4 == 0 else np.zeros(0, "<i4")
    if not has_checksums(words):
        return NO_CHECKSUMS
    problem = _info_problem(words)
    if problem:
        return problem
    m = int(words[_CHECKSUM_FIRST])
    recorded = sorted(e for e in members if e != "info")
    if m != len(recorded):
        return f"{m} member checksums recorded at pack time, the sample has {len(recorded)} other members"
    crcs = words[_CHECKSUM_FIRST + 1:_CHECKSUM_FIRST + 1 + m].view(np.uint32)
    tables = _entry_tables(words)
    for ext, want in zip(recorded, crcs):
        if only is not None and ext not in only:
            continue
        got = _crc(members[ext])
        if got == int(want):
            continue
        where = ""
        table = tables.get(_crc(ext.encode()))
        if is_frame_pack(ext) and table is not None and offsets_member(ext) in members:
            try:
                offsets = decode_offsets(members[offsets_member(ext)])
                bad = [i for i in range(min(len(table), len(offsets) - 1))
                       if _crc(frame_from_pack(members[ext], offsets, i)) != int(table[i])]
                where = f" (entries {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})" if bad else ""
            except ValueError:
                pass
        return f"member {ext}{where}: crc32 {got:08x}, {int(want):08x} recorded at pack time (corrupted since packing)"
    return None


def cut_checksum_problem(info: np.ndarray, pack_ext: str | None = None, entries=(), jpegs=()) -> str | None:
    """The loader's cheap check of one sample (`dali_planner.SamplePlanner`): the info member
    (its int32 words) and ``jpegs``, the bytes of entries ``entries`` of frame pack
    ``pack_ext`` as cut for the sample, against the checksums recorded at pack time. Why they
    differ, or None (also for a sample without checksums: nothing to check)."""
    if not has_checksums(info):
        return None
    problem = _info_problem(info)
    if problem or pack_ext is None:
        return problem
    table = _entry_tables(info).get(_pack_code(pack_ext))
    entries = np.asarray(entries, np.int64)
    if table is None or (entries.size and int(entries.max()) >= len(table)):
        return f"member {pack_ext}: no checksum recorded for entry {int(entries.max()) if entries.size else 0}"
    for e, jpeg, want in zip(entries.tolist(), jpegs, table[entries].tolist()):
        if zlib.crc32(jpeg) != want:
            return f"member {pack_ext} entry {e}: bytes differ from the checksum recorded at pack time"
    return None


_PACK_CODES: dict[str, int] = {}


def _pack_code(pack_ext: str) -> int:
    """crc32 of a frame pack's extension: how its entry table is found in the info member."""
    code = _PACK_CODES.get(pack_ext)
    if code is None:
        code = _PACK_CODES[pack_ext] = _crc(pack_ext.encode())
    return code


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
    (`dataloading.store.files`: a journaled shard never has a torn index); returns the number of samples.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    with storage.open_tar(tar_path) as tar:  # a local file, or an s3:// object streamed
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            # no sample member the packer writes lacks an extension or holds whitespace (the
            # index's fields are space-separated: such a name would make a line no reader parses)
            if not key or key.endswith("/") or not ext or any(c.isspace() for c in member.name):
                continue
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext, member.offset_data, member.size, member.name))
    # a group without `info` is no packed sample (a member added or renamed): the readers skip
    # it too (`shard_index._table`), so the index's count stays the manifest's
    foreign = [members for members in samples if not any(e == "info" for e, _, _, _ in members)]
    if foreign:
        log.warning("%s: ignoring %d member group(s) that belong to no sample (no info member): %s", tar_path,
                    len(foreign), ", ".join(members[0][3] for members in foreign[:3]))
    samples = [members for members in samples if any(e == "info" for e, _, _, _ in members)]
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


def index_sample_count(idx_path: str | Path) -> int:
    """The sample count in the header line (``v1.2 <num_samples>``) of a local DALI index;
    ValueError naming the file when the header is not that (OSError when unreadable)."""
    with open(idx_path) as f:
        parts = f.readline().split()
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{idx_path}: not a DALI index header: {' '.join(parts)!r}")
    return int(parts[1])


def load_manifest(dataset_dir: str | Path) -> dict:
    """Read ``DIR/manifest.json`` (a local directory or an ``s3://bucket/prefix``,
    `dataloading.store.storage`) with a clear error when it is not a packed dataset."""
    storage.check_supported(dataset_dir)
    path = storage.join(dataset_dir, "manifest.json")
    try:
        text = storage.read_text(path) if storage.exists(path) else None
    except FileNotFoundError:
        text = None
    if text is None:
        if storage.is_uri(dataset_dir) and not storage.bucket_exists(str(dataset_dir)):
            bucket = str(dataset_dir)[len(storage.S3_SCHEME):].split("/", 1)[0]
            raise FileNotFoundError(f"{dataset_dir}: the bucket {bucket!r} does not exist (or these credentials "
                                    f"cannot see it); check the bucket name, AWS_ENDPOINT_URL and AWS_REGION")
        raise FileNotFoundError(f"{dataset_dir}: not a packed dataset (no manifest.json); run `tsn pack` first")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    _check_manifest_paths(manifest, path)
    return manifest


def _check_manifest_paths(manifest: dict, where: str) -> None:
    """Every file a manifest names is a relative path inside its dataset (no absolute path, no
    ``..``): readers join them to the dataset's location and may write a missing index there,
    so an edited or hostile manifest must not point them elsewhere."""
    lists = [(split, entry.get("shards") or []) for split, entry in (manifest.get("splits") or {}).items()]
    for split, shards in lists + [("(all)", manifest.get("shards") or [])]:
        for i, shard in enumerate(shards):
            for key in ("path", "index_path"):
                value = shard.get(key)
                parts = PurePosixPath(value).parts if isinstance(value, str) else ()
                # a Windows drive ("C:") or separator would escape too where the dataset is read
                if not parts or value.startswith("/") or ".." in parts or "\\" in value or ":" in parts[0]:
                    raise ValueError(f"{where}: split {split!r} shard {i}: {key} {value!r} is not a relative path "
                                     f"inside the dataset (the manifest was edited or damaged); re-run the `tsn "
                                     f"pack` command that made it")


def sample_ranges(shard_list: list[dict]) -> list[tuple[int, float]] | None:
    """[first, end) of the sample numbers each shard of one split's ``shard_list`` (in order)
    may hold, or None when the manifest predates ``first_sample_index``. The packer numbers a
    split's samples in shard order (the cluster pack by position in the split's order, so
    rejected videos leave gaps): shard ``i`` holds numbers from its own first up to the next
    shard's first; the last has no upper bound. A shard replaced by another of the same split
    holds numbers outside its range (`shard_index.ShardIndex`, `inspect.verify_dataset`)."""
    firsts = [s.get("first_sample_index") for s in shard_list]
    if None in firsts:
        return None
    return [(int(a), float(b)) for a, b in zip(firsts, [*firsts[1:], float("inf")])]


def sample_number(key: str) -> int | None:
    """The number a sample key carries (the packer names samples ``%08d``), or None."""
    name = key.rsplit("/", 1)[-1]
    return int(name) if name.isdigit() else None


def foreign_samples(keys: list[str], sample_range: tuple[int, float]) -> dict[int, int]:
    """{position: number} of the ``keys`` whose number lies outside ``sample_range``
    (`sample_ranges`): samples of another shard."""
    first, end = sample_range
    numbers = {i: sample_number(k) for i, k in enumerate(keys)}
    return {i: n for i, n in numbers.items() if n is not None and not first <= n < end}


def describe_range(sample_range: tuple[int, float]) -> str:
    """``from 00000008 below 00000016`` (the last shard: ``from 00000008``)."""
    first, end = sample_range
    return f"from {first:08d}" + (f" below {int(end):08d}" if end != float("inf") else "")


def sha256_problem(location: str, recorded: str) -> str | None:
    """Why the shard at ``location`` is not the one packed, by the SHA-256 ``recorded`` at pack
    time (reads it whole), or None when it is."""
    digest = storage.sha256(location)
    if digest == recorded:
        return None
    return (f"SHA-256 {digest[:12]}... differs from the {recorded[:12]}... recorded at pack time: the shard "
            f"changed or was replaced after packing")


class DamagedShardError(ValueError):
    """A shard of a packed dataset is missing or not the size the manifest lists."""


def shard_file_problems(root: str, shard: dict, size_of=storage.object_size, absolute: bool = False) -> list[str]:
    """What is wrong with the files of one manifest ``shard`` entry (tar missing or of another
    size than listed, index missing), as lines naming the file (relative to ``root``, or its
    full location with ``absolute``); empty when nothing is. ``size_of``: location -> bytes or
    None (`storage.object_size`, or a listing's lookup)."""
    problems = []
    where = "on disk" if not storage.is_uri(root) else "in object storage"
    tar, idx = storage.join(root, shard["path"]), storage.join(root, shard["index_path"])
    tar_name, idx_name = (tar, idx) if absolute else (shard["path"], shard["index_path"])
    size = size_of(tar)
    if size is None:
        problems.append(f"{tar_name}: shard missing")
    elif size != shard["num_bytes"]:
        problems.append(f"{tar_name}: {size} bytes {where}, manifest lists {shard['num_bytes']}")
    if size_of(idx) is None:
        problems.append(f"{idx_name}: index missing")
    return problems


def rebuilt_index_dir() -> Path:
    """Where `split_shards` writes indexes it rebuilt for a dataset it cannot write to: a
    directory of this machine's temp space, shared by runs (files named by the shard)."""
    return Path(tempfile.gettempdir()) / "tsn-rebuilt-indexes"


def _rebuild_index(root: str, tar: str, idx: str, num_bytes: int) -> str:
    """An index for ``tar`` whose index ``idx`` is missing: written in place when the dataset
    directory is writable, else into a run-local copy (`rebuilt_index_dir`; also for
    ``s3://`` datasets); returns where it is."""
    if not storage.is_uri(root) and os.access(Path(idx).parent, os.W_OK):
        try:
            write_dali_index(tar, idx)
            return idx
        except PermissionError:  # e.g. root squashed on a network mount: fall back to a local copy
            pass
    # Named by the tar's location and size; rebuilt every time (a re-packed shard of the same
    # size must not get a stale index), atomically (ranks of one node may race).
    name = hashlib.sha256(f"{tar}\0{num_bytes}".encode()).hexdigest()[:24] + ".idx"
    local = rebuilt_index_dir() / name
    local.parent.mkdir(parents=True, exist_ok=True)
    write_dali_index(tar, local)
    return str(local)


def split_shards(dataset_dir: str | Path, split: str,
                 manifest: dict | None = None) -> tuple[list[str], list[str], int]:
    """(tar locations, index locations, num_samples) of one split of a packed dataset:
    absolute local paths, or ``s3://`` URIs beside the manifest (DALI reads both).

    Every tar of the split is checked to exist with the manifest's size before anything
    reads it (a stat each, or one listing per folder in object storage): a truncated,
    missing or replaced shard raises `DamagedShardError` (a ValueError) naming it and the fix,
    rather than failing deep inside DALI ("Malformed index file"); wrong credentials raise
    `storage.StorageError` naming the prefix. A missing index is rebuilt from its tar
    (`write_dali_index`): in place, or where the dataset cannot be written to (read-only,
    object storage) into a run-local copy (`rebuilt_index_dir`), whose path is returned.
    ``manifest``: the dataset's manifest when the caller has read it (a GET saved on s3://).
    """
    manifest = manifest if manifest is not None else load_manifest(dataset_dir)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise KeyError(f"{dataset_dir}: split {split!r} not packed (have: {sorted(splits)})")
    shards = splits[split]["shards"]
    if not shards:
        raise ValueError(f"{dataset_dir}: split {split!r} has no shards")
    tars = [storage.join(dataset_dir, s["path"]) for s in shards]
    idxs = [storage.join(dataset_dir, s["index_path"]) for s in shards]
    root = str(dataset_dir)
    if storage.is_uri(root):
        sizes: dict[str, int] = {}
        for folder in sorted({loc.rsplit("/", 1)[0] for loc in tars + idxs}):  # one listing per folder
            sizes |= storage.list_sizes(folder)
        size_of = sizes.get
    else:
        size_of = storage.object_size
    damaged = [p for s in shards for p in shard_file_problems(root, s, size_of, absolute=True)
               if not p.endswith("index missing")]
    if damaged:
        more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
        raise DamagedShardError(
            f"damaged shards: {'; '.join(damaged[:3])}{more}; re-run the `tsn pack` command that made "
            f"{storage.display(root)} (it resumes, re-packing damaged shards), then check with "
            f"`tsn inspect --verify {root}`")
    for i, (tar, idx, s) in enumerate(zip(tars, idxs, shards)):
        if size_of(idx) is None:
            idxs[i] = _rebuild_index(root, tar, idx, int(s["num_bytes"]))
    return tars, idxs, int(splits[split]["num_samples"])
