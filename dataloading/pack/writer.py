"""The shard writer: samples of one split -> size-bounded POSIX tar shards with DALI indexes.

A shard is written to ``<name>.tar.partial`` and renamed to ``<name>.tar`` only once complete
(closed, fsync'ed), then indexed and recorded in the split's journal: a shard under its final
name is always whole. Tar member metadata is fixed (mtime 0, mode 0644, uid/gid 0), so the
same samples give byte-identical shards on every run.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from dataloading.format import shards
from dataloading.pack.options import shard_name
from dataloading.store import files, storage

if TYPE_CHECKING:
    from dataloading.pack.journal import Journal

PARTIAL_SUFFIX = ".partial"
TAR_BLOCK_BYTES = tarfile.BLOCKSIZE  # 512: header and data granularity
TAR_RECORD_BYTES = tarfile.RECORDSIZE  # 10240: Python's tarfile pads the archive to this
TAR_END_BYTES = 2 * TAR_BLOCK_BYTES  # two zero blocks end an archive


def tar_member_bytes(size: int) -> int:
    """Bytes a member of ``size`` data bytes takes in a tar: header block + padded data."""
    return TAR_BLOCK_BYTES + -(-size // TAR_BLOCK_BYTES) * TAR_BLOCK_BYTES


def tar_file_bytes(content_bytes: int) -> int:
    """Final size of a tar (as Python's tarfile writes it) whose members take ``content_bytes``."""
    return -(-(content_bytes + TAR_END_BYTES) // TAR_RECORD_BYTES) * TAR_RECORD_BYTES


@contextmanager
def naming_path(path):
    """Re-raise an ``OSError`` without a file name (a full disk: ``write`` / ``fsync`` errors
    name no file) with ``path`` as its ``filename``, so the error can say where it happened."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


class ShardWriter:
    """Writes samples of one split into size-bounded shards, numbering shards and samples."""

    def __init__(
        self, out_dir: Path, split: str, shard_size_bytes: int, journal: Journal, next_shard: int, next_index: int,
        on_shard_done: Callable[[dict], None] | None = None,
    ):
        """``on_shard_done(record)``: called with each shard's journal record once the shard is
        complete, indexed and journaled (`tsn pack --out s3://...` uploads it there)."""
        self.out_dir, self.split = out_dir, split
        self.on_shard_done = on_shard_done
        self.shard_size_bytes = shard_size_bytes
        self.journal = journal
        self.next_shard = next_shard
        self.next_index = next_index
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._content_bytes = 0
        self._samples: list[dict] = []  # per-sample stats of the open shard

    def add(self, members: list[tuple[str, bytes]], stats: dict) -> None:
        """Append one sample (``members`` = (extension, data) in tar order) with its stats.
        The open shard is finished first when the sample would take it over the size bound."""
        sample_bytes = sum(tar_member_bytes(len(data)) for _, data in members)
        projected_bytes = tar_file_bytes(self._content_bytes + sample_bytes)
        if self._tar is not None and projected_bytes > self.shard_size_bytes:
            self.finish_shard()
        if self._tar is None:
            self._open_shard()
        key = stats["key"]
        with naming_path(self._file.name):
            for ext, data in members:
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                ti.mtime = 0  # fixed metadata: shards are byte-identical across runs
                ti.mode = 0o644
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                self._tar.addfile(ti, io.BytesIO(data))
        self._content_bytes += sample_bytes
        self._samples.append(stats)
        self.next_index += 1

    def _paths(self) -> tuple[Path, Path]:
        name = shard_name(self.split, self.next_shard)
        d = self.out_dir / self.split
        return d / f"{name}.tar", d / f"{name}.idx"

    def _open_shard(self) -> None:
        tar_path, _ = self._paths()
        self._file = open(str(tar_path) + PARTIAL_SUFFIX, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._content_bytes = 0
        self._samples = []

    def finish_shard(self) -> None:
        """Complete the open shard: close, fsync, rename into place, index, journal."""
        if self._tar is None:
            return
        tar_path, idx_path = self._paths()
        partial = Path(str(tar_path) + PARTIAL_SUFFIX)
        with naming_path(partial):
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        # A streamed write, not a whole-file one (files.atomic_write): the shard appears under
        # its final name only when complete. (Failing after this, e.g. on a full disk, leaves
        # it unjournaled: the next run deletes and re-packs it.)
        os.replace(partial, tar_path)
        files.fsync_dir(tar_path.parent)
        with naming_path(idx_path):
            shards.write_dali_index(tar_path, idx_path)
        samples = self._samples
        record = {
            "type": "shard",
            "path": f"{self.split}/{tar_path.name}",
            "index_path": f"{self.split}/{idx_path.name}",
            "num_samples": len(samples),
            "num_bytes": tar_path.stat().st_size,
            # the shard's identity: `tsn inspect --verify` and `tsn pack --verify` find a shard
            # replaced or changed after packing by it, even one of the same size and valid itself
            "sha256": storage.sha256(tar_path),
            "first_sample_index": samples[0]["sample_index"],
            "num_frames": sum(s["num_frames"] for s in samples),
            "duration_seconds": sum(s["duration_seconds"] for s in samples),
            "class_counts": dict(Counter(s["class_name"] for s in samples)),
            "sources": [s["source"] for s in samples],
        }
        # The source videos' bytes (storage cost in `tsn inspect`); None when one is unknown.
        source_bytes = [s.get("source_bytes") for s in samples]
        record["source_bytes"] = None if None in source_bytes else sum(source_bytes)
        self.journal.append(record, sync=True)
        self._tar = self._file = None
        self.next_shard += 1
        if self.on_shard_done is not None:
            self.on_shard_done(record)

    def abort(self) -> None:
        """Drop the open shard (interrupted run); its .partial file is removed too."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # e.g. the disk is full: flushing what is buffered fails again
                pass
            tar_path, _ = self._paths()
            Path(str(tar_path) + PARTIAL_SUFFIX).unlink(missing_ok=True)
        self._tar = self._file = None
