"""Resuming a pack: the per-split journal, the state it gives back, the output directory's
preparation and its lock.

``<split>/_journal.jsonl`` gets one line per finished shard (after the shard was renamed to its
final name and indexed, fsync'ed) and one per rejected video, with the file's size and mtime
(`rejected_record`): a re-run tries a rejected video again once its file changed. On a re-run `load_split_state`
keeps the longest valid prefix of journaled shards and deletes everything else an interrupted
run left behind, so packing continues exactly where a complete run would have been.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (packing one directory twice at once is then on the user)
    fcntl = None

from dataloading.format import shards
from dataloading.pack.options import (
    JOURNAL_FILE,
    LEGACY_OPTIONS,
    LOCK_FILE,
    MANIFEST_FILE,
    OPTIONS_FILE,
    PackError,
    shard_name,
)
from dataloading.store import files


class Journal:
    """Append-only ``<split>/_journal.jsonl``; each line is flushed (and fsynced for shards)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a")

    def append(self, record: dict, sync: bool) -> None:
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
            if sync:
                os.fsync(self._f.fileno())
        except OSError as e:  # name the journal (a full disk's errors name no file)
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e

    def close(self) -> None:
        self._f.close()


def source_stamp(path: str) -> dict:
    """What identifies the version of a source file: {"size", "mtime_ns"} (None when unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"size": None, "mtime_ns": None}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def rejected_record(path: str, reason: str) -> dict:
    """The journal record of a rejected video, with its file's `source_stamp`: a re-run
    retries the video when the file changed since (`SplitState.changed_rejected`)."""
    return {"type": "rejected", "path": path, "reason": reason, "source": source_stamp(path)}


@dataclass
class SplitState:
    """What a split's journal says is done."""

    shards: list[dict]  # journal records of finished shards, in shard order
    rejected: dict[str, str]  # source path -> reason
    # source path -> `source_stamp` when it was rejected (absent: journaled before stamps)
    rejected_stamps: dict[str, dict] = field(default_factory=dict)

    @property
    def packed_sources(self) -> set[str]:
        return {src for s in self.shards for src in s["sources"]}

    def changed_rejected(self) -> set[str]:
        """Rejected videos whose file changed (size or mtime) since: to be tried again."""
        return {p for p, stamp in self.rejected_stamps.items() if stamp and stamp != source_stamp(p)}

    @property
    def num_samples(self) -> int:
        return sum(s["num_samples"] for s in self.shards)


def read_journal(path: Path) -> tuple[list[dict], bool]:
    """Journal records; the flag is True when a torn line (crash mid-write) was dropped."""
    records, torn = [], False
    if not path.is_file():
        return records, torn
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn = True
            continue
        if isinstance(rec, dict) and rec.get("type") in ("shard", "rejected"):
            records.append(rec)
        else:
            torn = True
    return records, torn


def load_split_state(out_dir: Path, split: str,
                     uploaded_size: Callable[[str], int | None] | None = None) -> SplitState:
    """Read a split's journal, keep the longest valid prefix of finished shards, and delete
    everything else an interrupted run may have left (partial or unjournaled shards).

    A journaled shard is valid when its tar is in ``out_dir`` with the journaled size or, for
    a pack uploaded to object storage (``out_dir`` is then the staging directory),
    ``uploaded_size(relative path)`` gives the journaled size for the tar and a size for its
    index (uploaded, local copy removed). A valid shard still in ``out_dir`` is not uploaded
    yet (the caller uploads it)."""
    split_dir = out_dir / split
    journal_path = split_dir / JOURNAL_FILE
    records, dirty = read_journal(journal_path)
    kept: list[dict] = []
    rejected: dict[str, str] = {}
    stamps: dict[str, dict] = {}
    next_index = 0
    valid = True
    for rec in records:
        if rec["type"] == "rejected":
            rejected[rec["path"]] = rec["reason"]  # a later record (a retry) replaces an earlier one
            stamps[rec["path"]] = rec.get("source")
            continue
        expected = f"{split}/{shard_name(split, len(kept))}.tar"
        tar_path = out_dir / rec["path"]
        staged = tar_path.is_file() and tar_path.stat().st_size == rec["num_bytes"]
        uploaded = (not staged and uploaded_size is not None and uploaded_size(rec["path"]) == rec["num_bytes"]
                    and uploaded_size(rec["index_path"]) is not None)
        valid = (
            valid
            and rec["path"] == expected
            and rec.get("first_sample_index") == next_index
            and (staged or uploaded)
        )
        if not valid:
            dirty = True  # this shard and every later one are re-packed
            continue
        if staged and not (out_dir / rec["index_path"]).is_file():
            shards.write_dali_index(tar_path, out_dir / rec["index_path"])
        kept.append(rec)
        next_index += rec["num_samples"]
    settle_journal(journal_path, split_dir, kept, rejected, stamps, rewrite=dirty)
    return SplitState(kept, rejected, {p: st for p, st in stamps.items() if st})


def settle_journal(journal_path: Path, split_dir: Path, kept: list[dict], rejected: dict[str, str],
                   stamps: dict[str, dict], *, rewrite: bool) -> None:
    """The resume rule shared by the local and the cluster pack, after their own validation of
    the journal's shard records: a rejected source that a kept shard now holds (it was fixed)
    is no longer rejected; with ``rewrite`` the journal is replaced by ``kept`` + ``rejected``
    (one atomic write); every file of ``split_dir`` that no kept record names (``*.partial``,
    ``*.tmp``, shards a killed run never journaled) is removed."""
    for src in {src for r in kept for src in r["sources"]} & rejected.keys():
        del rejected[src]
        stamps.pop(src, None)
    if rewrite:
        lines = [json.dumps(r) for r in kept]
        lines += [json.dumps({"type": "rejected", "path": p, "reason": r,
                              **({"source": stamps[p]} if stamps.get(p) else {})}) for p, r in rejected.items()]
        files.atomic_write_text(journal_path, "".join(line + "\n" for line in lines))
    keep_files = {JOURNAL_FILE} | {Path(r[k]).name for r in kept for k in ("path", "index_path")}
    if split_dir.is_dir():
        for entry in split_dir.iterdir():
            if entry.name not in keep_files and entry.is_file():
                entry.unlink()


def prepare_out_dir(out_dir: Path, options: dict, overwrite: bool):
    """Create ``out_dir`` or validate it for resuming, and lock it against a second packer.

    ``overwrite`` wipes a previous pack first. Returns the open lock file, to be closed
    (releasing the lock) when packing ends.
    """
    options_path = out_dir / OPTIONS_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise PackError(f"{out_dir}: exists and is not a directory")
    ours = {OPTIONS_FILE, MANIFEST_FILE, LOCK_FILE}
    entries = {e.name for e in out_dir.iterdir()} if out_dir.is_dir() else set()
    if entries and not entries & ours:
        # never resume into, or wipe, a directory this tool did not create
        raise PackError(
            f"{out_dir}: exists, is not empty and is not a `tsn pack` output (no {OPTIONS_FILE}); pick a new --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_out_dir(out_dir)
    try:
        if overwrite:
            for entry in out_dir.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        elif options_path.is_file():
            try:
                previous = json.loads(options_path.read_text())
            except json.JSONDecodeError:
                previous = {}
            if isinstance(previous, dict):  # packs made before motion modalities: rgb only
                previous = {**LEGACY_OPTIONS, **previous}
            if previous != options:
                diffs = [
                    f"{k}: {previous.get(k)!r} -> {options.get(k)!r}"
                    for k in options.keys() | previous.keys()
                    if previous.get(k) != options.get(k) and k != "classes"
                ]
                if previous.get("classes") != options.get("classes"):
                    diffs.append("classes differ")
                raise PackError(
                    f"{out_dir}: already holds a pack made with different options "
                    f"({'; '.join(sorted(diffs))}); pick a new --out, or pass --overwrite to delete it and start over"
                )
        if not options_path.is_file():
            files.atomic_write_text(options_path, json.dumps(options, indent=1) + "\n")
    except BaseException:
        lock.close()
        raise
    return lock


def lock_out_dir(out_dir: Path):
    """An exclusive advisory lock on ``out_dir/_lock`` (the open file; closing it releases the
    lock): two packers writing the same shards would corrupt each other's output."""
    f = open(out_dir / LOCK_FILE, "a")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise PackError(f"{out_dir}: another `tsn pack` is writing to this directory right now") from None
    return f
