"""`tsn inspect DIR`: summarise a packed dataset, check its files, optionally verify every sample.

* `inspect_dataset` -- summary from ``manifest.json`` and ``rejected.jsonl`` plus a quick check
  that every listed shard and index file exists and every shard has the listed size.
* `verify_dataset` -- opens every sample of every shard (Python's tarfile): members present,
  info/json/cls agree, the DALI index matches the tar, offsets valid and every JPEG decodes
  (jpeg layout) or the video decodes to ``num_frames`` frames of the right size (video layout);
  flow entries (``manifest["modalities"]``): ``2 * (num_frames - 1)`` grayscale planes; then
  every member against the checksums recorded at pack time (`shards.checksum_problem`: bytes
  changed since packing that still decode), naming shard, sample and member. Packs made before
  checksums were recorded verify by decoding only, with a note.

The command is `cli.pack` (``tsn inspect``): exit code 0 all good, 1 problems found (missing
files, size mismatches, bad samples), 2 not a packed dataset / unreadable manifest.

(The module name shadows the standard library's ``inspect`` only for code that puts the
``dataloading`` directory itself on ``sys.path``; it is always imported as
``dataloading.pack.inspect``.)
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from dataloading import modality
from dataloading.format import shards
from dataloading.pack.journal import read_journal
from dataloading.pack.options import JOURNAL_FILE, format_size
from dataloading.store import storage

REJECTED_EXAMPLES = 5  # rejected videos listed in the summary
PACK_OPTION_KEYS = ("format_version", "layout", "codec", "short_side", "jpeg_quality", "gop", "fps", "min_frames")


def inspect_dataset(dataset_dir: str | Path) -> dict:
    """Summary of a packed dataset (JSON-ready).

    Keys: ``dir``, ``layout``, ``codec``, packing options, ``classes``, ``num_classes``,
    ``num_samples``, ``num_bytes``, ``splits`` (per split: ``num_samples``, ``num_frames``,
    ``num_bytes``, ``duration_seconds``, ``num_shards``, ``class_counts``),
    ``bytes_per_video``, ``bytes_per_hour_of_video``, ``num_rejected``,
    ``rejected_examples`` (first few ``{path, reason, split}``), ``rejected_reasons``
    (count per reason, numbers in reasons folded so similar reasons group), ``problems``
    (human-readable list; empty when every listed shard and index exists with the listed
    size) and ``ok``.

    Storage cost: ``bytes_per_video`` (all shard bytes / samples), ``source_bytes`` (the
    packed source videos' bytes) and ``pack_to_source_ratio`` (shard bytes / source bytes),
    overall and per split. ``source_bytes`` comes from the manifest (recorded at pack time, so
    it needs no access to the sources) or, for a local pack made before it was recorded, from
    the sizes of the source files its journals name when all are readable; otherwise it and the
    ratio are None.

    ``dataset_dir``: a local directory or an ``s3://bucket/prefix`` (`dataloading.store.storage`;
    objects are checked with one listing of the prefix). Raises ``FileNotFoundError`` /
    ``ValueError`` when ``dataset_dir`` is not a packed dataset.
    """
    root = str(dataset_dir)
    manifest = shards.load_manifest(root)
    size_of = _size_lookup(root)
    problems: list[str] = []
    splits = {}
    for split, info in manifest.get("splits", {}).items():
        for shard in info.get("shards", []):
            problems += shards.shard_file_problems(root, shard, size_of)
        num_samples, num_bytes = info.get("num_samples", 0), info.get("num_bytes", 0)
        source_bytes = info.get("source_bytes")
        if source_bytes is None:
            source_bytes = _source_bytes_from_journal(root, split, info.get("shards", []))
        splits[split] = {
            "num_samples": num_samples,
            "num_frames": info.get("num_frames", 0),
            "num_bytes": num_bytes,
            "duration_seconds": info.get("duration_seconds", 0.0),
            "num_shards": len(info.get("shards", [])),
            "class_counts": info.get("class_counts", {}),
            **_storage_cost(num_bytes, num_samples, source_bytes),
        }
        listed = sum(s.get("num_samples", 0) for s in info.get("shards", []))
        if listed != info.get("num_samples", 0):
            problems.append(f"split {split}: shards list {listed} samples, manifest says {info.get('num_samples')}")
    rejected = _read_rejected(root)
    reasons = Counter(_reason_kind(r.get("reason", "")) for r in rejected)
    split_sources = [v["source_bytes"] for v in splits.values()]
    total_cost = _storage_cost(sum(s["num_bytes"] for s in splits.values()),
                               sum(s["num_samples"] for s in splits.values()),
                               None if None in split_sources or not splits else sum(split_sources))
    return {
        "dir": storage.display(root),
        **{k: manifest.get(k) for k in PACK_OPTION_KEYS},
        "modalities": shards.manifest_modalities(manifest),
        "flow": manifest.get("flow"),
        "classes": manifest.get("classes", []),
        "num_classes": manifest.get("num_classes", len(manifest.get("classes", []))),
        "num_samples": manifest.get("num_samples", 0),
        "num_bytes": sum(s["num_bytes"] for s in splits.values()),
        "splits": splits,
        "bytes_per_video": manifest.get("bytes_per_video"),
        "bytes_per_hour_of_video": manifest.get("bytes_per_hour_of_video"),
        "source_bytes": total_cost["source_bytes"],
        "pack_to_source_ratio": total_cost["pack_to_source_ratio"],
        "num_rejected": manifest.get("num_rejected", len(rejected)),
        "rejected_examples": rejected[:REJECTED_EXAMPLES],
        "rejected_reasons": dict(reasons.most_common()),
        "problems": problems,
        "ok": not problems,
    }


def _storage_cost(num_bytes: int, num_samples: int, source_bytes: int | None) -> dict:
    """{bytes_per_video, source_bytes, pack_to_source_ratio} (None where undefined)."""
    return {
        "bytes_per_video": num_bytes / num_samples if num_samples else None,
        "source_bytes": source_bytes,
        "pack_to_source_ratio": num_bytes / source_bytes if source_bytes else None,
    }


def _source_bytes_from_journal(root: str, split: str, shard_list: list[dict]) -> int | None:
    """Bytes of the source videos of ``shard_list``, from the sources a local pack's journal
    names (a pack made before ``source_bytes`` was recorded); None unless every one is readable."""
    if storage.is_uri(root) or not shard_list:
        return None
    records, _ = read_journal(Path(root, split, JOURNAL_FILE))
    by_path = {r["path"]: r for r in records if r["type"] == "shard"}
    total = 0
    for shard in shard_list:
        rec = by_path.get(shard["path"])
        if rec is None or len(rec.get("sources", [])) != shard.get("num_samples"):
            return None
        for src in rec["sources"]:
            try:
                total += Path(src).stat().st_size
            except OSError:
                return None
    return total


def _size_lookup(root: str):
    """location -> size in bytes or None: a stat per file locally, one listing of an object
    storage prefix (rather than a HEAD per object)."""
    if not storage.is_uri(root):
        return storage.object_size
    sizes = storage.list_sizes(root)
    return sizes.get


def _read_rejected(root: str) -> list[dict]:
    path = storage.join(root, "rejected.jsonl")
    if not storage.exists(path):
        return []
    out = []
    for line in storage.read_text(path).splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _reason_kind(reason: str) -> str:
    # "only 7 decoded frames, need >= 16" and "only 3 ..." are the same kind of problem.
    return re.sub(r"\d+", "N", reason.split(" (")[0])


# ---------------------------------------------------------------------------------------------
# --verify


def verify_dataset(dataset_dir: str | Path, progress: bool = False) -> dict:
    """Open and check every sample of every shard listed in the manifest.

    Returns ``{"num_samples_checked", "num_shards_checked", "bad_samples": [{"shard",
    "key", "reason"}], "num_samples_without_checksums", "ok"}``; shard-level problems
    (unreadable tar, index mismatch, sample count) appear with ``key`` None. Each sample that
    decodes is checked against the checksums recorded at pack time (`shards.checksum_problem`:
    the reason names the member, and the frame-pack entries, that changed);
    samples packed before checksums existed are counted in ``num_samples_without_checksums``
    and checked by decoding only.
    """
    root = str(dataset_dir)
    manifest = shards.load_manifest(root)
    layout = manifest["layout"]
    bad: list[dict] = []
    checked = 0
    shard_list = manifest.get("shards", [])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=manifest.get("num_samples", 0), unit="sample", file=sys.stderr, desc="verify")
    flow_modalities = [m for m in shards.manifest_modalities(manifest) if m in modality.FLOW_MODALITIES]
    counts = {"without_checksums": 0}
    ranges: dict[str, tuple[int, float]] = {}  # shard path -> the sample numbers it may hold
    for entry in (manifest.get("splits") or {}).values():
        ranges |= dict(zip((s["path"] for s in entry["shards"]), shards.sample_ranges(entry["shards"]) or []))
    for shard in shard_list:
        n = _verify_shard(root, shard, layout, manifest.get("classes", []), bad, bar, flow_modalities, counts,
                          sample_range=ranges.get(shard["path"]))
        checked += n
    if bar is not None:
        bar.close()
    return {"num_shards_checked": len(shard_list), "num_samples_checked": checked, "bad_samples": bad,
            "num_samples_without_checksums": counts["without_checksums"], "ok": not bad}


def _verify_shard(root: str, shard: dict, layout: str, classes: list[str], bad: list[dict], bar,
                  flow_modalities: list[str] = (), counts: dict | None = None,
                  sample_range: tuple[int, float] | None = None) -> int:
    """Check one manifest ``shard`` entry (`verify_dataset`), appending to ``bad``; the samples
    read. ``sample_range``: the numbers its samples may have (`shards.sample_ranges`), to find
    a shard replaced by another of the same size."""
    rel = shard["path"]
    if shard.get("sha256"):  # recorded at pack time: the whole shard, byte for byte
        try:
            changed = shards.sha256_problem(storage.join(root, rel), shard["sha256"])
        except OSError as e:
            changed = f"cannot read tar: {e}"
        if changed:
            bad.append({"shard": rel, "key": None, "reason": changed})
    expected_members = {"info", "json", "cls", *shards.LAYOUT_MEMBERS[layout],
                        *(ext for m in flow_modalities for ext in modality.get(m).shard_members)}
    samples: list[tuple[str, dict[str, bytes]]] = []
    index_lines: list[str] = []
    try:
        with storage.open_tar(storage.join(root, rel)) as tar:  # local, or streamed from object storage
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = shards.split_member_name(member.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                    index_lines.append("")
                samples[-1][1][ext] = tar.extractfile(member).read()
                entry = f"{ext} {member.offset_data} {member.size} {member.name}"
                index_lines[-1] = f"{index_lines[-1]} {entry}" if index_lines[-1] else entry
    except (OSError, tarfile.TarError) as e:
        bad.append({"shard": rel, "key": None, "reason": f"cannot read tar: {e}"})
        return 0
    if len(samples) != shard["num_samples"]:
        reason = f"{len(samples)} samples, manifest lists {shard['num_samples']}"
        bad.append({"shard": rel, "key": None, "reason": reason})
    foreign = shards.foreign_samples([key for key, _ in samples], sample_range) if sample_range else {}
    if foreign:
        bad.append({"shard": rel, "key": None, "reason": f"holds samples of other shards ({len(foreign)} of "
                    f"{len(samples)}, e.g. {next(iter(foreign.values())):08d}; the manifest puts "
                    f"{shards.describe_range(sample_range)} here): the shard was replaced after packing"})
    try:
        idx = storage.read_text(storage.join(root, shard["index_path"])).splitlines()
    except OSError as e:
        idx = None
        bad.append({"shard": rel, "key": None, "reason": f"cannot read index: {e}"})
    if idx is not None and idx != [f"{shards.DALI_INDEX_VERSION} {len(samples)}", *index_lines]:
        reason = "DALI index does not match the tar (re-create it with shards.write_dali_index)"
        bad.append({"shard": rel, "key": None, "reason": reason})
    for key, members in samples:
        reason = _check_sample(key, members, expected_members, layout, classes)
        # then the bytes against the checksums of the pack: decoders let most changes pass
        changed = shards.checksum_problem(members)
        if changed == shards.NO_CHECKSUMS:
            changed = None
            if counts is not None and "info" in members:  # (a foreign member group is no sample: bad above)
                counts["without_checksums"] += 1
        reason = reason or changed
        for m in flow_modalities:
            reason = reason or _check_flow_pack(members, shards.decode_info(members["info"]), m)
        if reason:
            bad.append({"shard": rel, "key": key, "reason": reason})
        if bar is not None:
            bar.update(1)
    return len(samples)


def _check_sample(
    key: str, members: dict[str, bytes], expected: set[str], layout: str, classes: list[str]
) -> str | None:
    """Why the sample is bad, or None."""
    missing, extra = expected - members.keys(), members.keys() - expected
    if missing or extra:
        return f"members: missing {sorted(missing)}, unexpected {sorted(extra)}"
    try:
        info = shards.decode_info(members["info"])
        meta = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as e:
        return f"bad info/json: {e}"
    for field in ("num_frames", "label", "height", "width"):
        if meta.get(field) != info[field]:
            return f"info {field}={info[field]} but json {field}={meta.get(field)!r}"
    if members["cls"].decode(errors="replace").strip() != str(info["label"]):
        return f"cls {members['cls']!r} != label {info['label']}"
    if key.rsplit("/", 1)[-1] != f"{info['sample_index']:08d}":
        return f"key does not match sample_index {info['sample_index']}"
    if not 0 <= info["label"] < max(len(classes), 1) or (classes and meta.get("class_name") != classes[info["label"]]):
        return f"label {info['label']} / class {meta.get('class_name')!r} not in the manifest's classes"
    if info["num_frames"] < 1:
        return f"num_frames {info['num_frames']}"
    if layout == shards.LAYOUT_JPEG:
        return _check_frame_pack(members, info)
    return _check_video(members, info)


def _check_frame_pack(members: dict[str, bytes], info: dict[str, int]) -> str | None:
    import cv2

    try:
        offsets = shards.decode_offsets(members["offsets"])
    except ValueError as e:
        return str(e)
    blob = members["frames"]
    if len(offsets) != info["num_frames"] + 1:
        return f"offsets table has {len(offsets)} entries, expected num_frames + 1 = {info['num_frames'] + 1}"
    if offsets[-1] != len(blob):
        return f"offsets end at {offsets[-1]}, frames member has {len(blob)} bytes"
    for i in range(info["num_frames"]):
        img = cv2.imdecode(np.frombuffer(shards.frame_from_pack(blob, offsets, i), np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            return f"frame {i} is not a decodable JPEG"
        if img.shape[:2] != (info["height"], info["width"]):
            return f"frame {i} is {img.shape[1]}x{img.shape[0]}, info says {info['width']}x{info['height']}"
    return None


def _check_flow_pack(members: dict[str, bytes], info: dict[str, int], name: str) -> str | None:
    import cv2

    frames_ext, offsets_ext = modality.get(name).shard_members
    try:
        offsets = shards.decode_offsets(members[offsets_ext])
    except ValueError as e:
        return f"{name}: {e}"
    planes = 2 * (info["num_frames"] - 1)
    if len(offsets) != planes + 1 or offsets[-1] != len(members[frames_ext]):
        return f"{name}: offsets table has {len(offsets)} entries ending at {offsets[-1]}, expected " \
               f"2 * (num_frames - 1) + 1 = {planes + 1} ending at {len(members[frames_ext])}"
    for j in range(planes):
        raw = np.frombuffer(shards.frame_from_pack(members[frames_ext], offsets, j), np.uint8)
        img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
        if img is None or img.shape != (info["height"], info["width"]):
            return f"{name}: plane {j} is not a {info['width']}x{info['height']} grayscale JPEG"
    return None


def _check_video(members: dict[str, bytes], info: dict[str, int]) -> str | None:
    import av

    n = 0
    try:
        with av.open(io.BytesIO(members["video"]), "r") as container:
            if not container.streams.video:
                return "video member has no video stream"
            for frame in container.decode(video=0):
                if (frame.height, frame.width) != (info["height"], info["width"]):
                    return f"frame {n} is {frame.width}x{frame.height}, info says {info['width']}x{info['height']}"
                n += 1
    except av.FFmpegError as e:
        return f"video does not decode after {n} frames: {e}"
    if n != info["num_frames"]:
        return f"video decodes to {n} frames, info says {info['num_frames']}"
    return None


# ---------------------------------------------------------------------------------------------
# CLI


def _format_cost(s: dict) -> str:
    """The storage-cost line: bytes per video (overall and per split) and the ratio to the sources."""
    per_split = ", ".join(f"{name} {format_size(v['bytes_per_video'])}" for name, v in s["splits"].items()
                          if v.get("bytes_per_video") is not None)
    line = f"  storage cost: {format_size(s.get('bytes_per_video') or 0)} per video ({per_split})"
    if s.get("pack_to_source_ratio") is not None:
        per_source = f", {format_size(s['source_bytes'] / s['num_samples'])} per video" if s.get("num_samples") else ""
        return (f"{line}; source videos {format_size(s['source_bytes'])} in all{per_source}: pack / source = "
                f"{s['pack_to_source_ratio']:.3f}x")
    return f"{line}; source videos' bytes unknown (not recorded in the manifest, sources not readable)"


def format_summary(summary: dict) -> str:
    """The human-readable `tsn inspect` output."""
    s = summary
    opts = f"short side {s['short_side']}" if s.get("short_side") else "source size"
    if s.get("fps"):
        opts += f", {s['fps']:g} fps"
    opts += f", JPEG quality {s['jpeg_quality']}" if s["layout"] == shards.LAYOUT_JPEG else f", gop {s['gop']}"
    lines = [
        f"{s['dir']}",
        f"  layout {s['layout']}, codec {s['codec']} ({opts}); {s['num_classes']} classes, {s['num_samples']} samples",
        f"  modalities {', '.join(s.get('modalities') or ['rgb'])}"
        + (f" (flow: {s['flow']['algorithm']}, bound {s['flow']['bound']:g} px)" if s.get("flow") else ""),
        f"  {format_size(s['num_bytes'])}: {format_size(s['bytes_per_video'] or 0)} per video, "
        f"{format_size(s['bytes_per_hour_of_video'] or 0)} per hour of video",
        _format_cost(s),
        "",
        f"  {'split':<8}{'samples':>9}{'frames':>10}{'hours':>8}{'shards':>8}{'size':>12}",
    ]
    for split, v in s["splits"].items():
        lines.append(
            f"  {split:<8}{v['num_samples']:>9}{v['num_frames']:>10}{v['duration_seconds'] / 3600:>8.2f}"
            f"{v['num_shards']:>8}{format_size(v['num_bytes']):>12}"
        )
    split_names = list(s["splits"])
    width = max([len(c) for c in s["classes"]] + [5])
    lines += ["", "  " + f"{'class':<{width}}" + "".join(f"{n:>8}" for n in split_names)]
    for c in s["classes"]:
        counts = "".join(f"{s['splits'][n]['class_counts'].get(c, 0):>8}" for n in split_names)
        lines.append(f"  {c:<{width}}{counts}")
    lines.append("")
    if s["num_rejected"]:
        lines.append(f"  rejected {s['num_rejected']} input videos (rejected.jsonl), e.g.:")
        lines += [f"    {r.get('path')}: {r.get('reason')}" for r in s["rejected_examples"]]
    else:
        lines.append("  rejected: none")
    if s["problems"]:
        lines.append(f"  PROBLEMS ({len(s['problems'])}):")
        lines += [f"    {p}" for p in s["problems"]]
    else:
        lines.append("  files: every listed shard and index present with the listed size")
    if "verify" in s:
        v = s["verify"]
        lines.append(
            f"  verify: {v['num_samples_checked']} samples in {v['num_shards_checked']} shards, "
            f"{len(v['bad_samples'])} bad"
        )
        lines += [f"    {b['shard']} {b['key'] or ''}: {b['reason']}" for b in v["bad_samples"][:20]]
        if len(v["bad_samples"]) > 20:
            lines.append(f"    ... and {len(v['bad_samples']) - 20} more (use --json for all)")
        if v["bad_samples"]:
            lines.append("    repair: run the `tsn pack` command that made this dataset again, with --verify: it "
                         "re-packs the shards that changed since packing (a local pack: with the later shards of "
                         "their split), from the source videos, which must still be there")
        if v.get("num_samples_without_checksums"):
            lines.append(f"    note: {v['num_samples_without_checksums']} samples have {shards.NO_CHECKSUMS}: "
                         f"checked by decoding only, so bytes changed since packing can go unnoticed; re-pack to "
                         f"add checksums")
    return "\n".join(lines)
