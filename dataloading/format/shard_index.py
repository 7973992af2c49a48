"""Where each member of each sample lies in its shard: the DALI index files, parsed.

A shard's DALI index (`shards.write_dali_index`, format v1.2) lists, per sample in tar order,
``<ext> <data offset> <size> <member name>`` for every member. The training path reads byte
ranges of members (`dataloading.pipeline.source`), so it needs these numbers rather than DALI's reader.

`ShardIndex` parses a split's index files lazily, one shard at a time, the first time a
reader asks for it (a rank reads its own chunk's shards, not the whole split), and keeps per
shard the sample keys and an int64 table of (offset, size) of the members a modality reads:
small (Kinetics-400: ~11 MB for three members of 240k samples), so nothing is evicted.
"""

from __future__ import annotations

import logging
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dataloading.format import shards
from dataloading.store import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTable:
    """One shard's samples: ``keys[i]`` (member name without extension) and ``spans[i, m]`` =
    (data offset, size) in bytes of member ``members[m]`` of sample ``i``; ``problems[i]``:
    why sample ``i`` cannot be read (a member it lacks), for the source to skip and count it."""

    keys: list[str]
    members: tuple[str, ...]
    spans: np.ndarray  # (num_samples, len(members), 2) int64
    problems: dict[int, str] = field(default_factory=dict)

    def span(self, sample: int, member: str) -> tuple[int, int]:
        """[start, end) of ``member`` of sample ``sample``."""
        offset, size = self.spans[sample, self.members.index(member)]
        return int(offset), int(offset + size)


def _table(rows: list[tuple[str, dict]], members: tuple[str, ...], where: str) -> ShardTable:
    """The table of ``rows`` (sample key, {ext: (offset, size)}) in tar order. A group of
    members without ``info`` is no sample the packer wrote (a member added to the shard, or
    renamed, e.g. ``../evil.jpg``): it is left out, with a warning; a sample lacking a member
    it needs is kept with its problem (`ShardTable.problems`), to be skipped and counted."""
    foreign = [(key, sorted(have)) for key, have in rows if "info" not in have]
    if foreign:
        log.warning("%s: ignoring %d member group(s) that belong to no sample (no info member): %s", where,
                    len(foreign), ", ".join(f"{k} ({', '.join(e)})" for k, e in foreign[:3]))
    rows = [(key, have) for key, have in rows if "info" in have]
    spans = np.zeros((len(rows), len(members), 2), np.int64)
    problems = {}
    for i, (key, have) in enumerate(rows):
        lacking = [ext for ext in members if ext not in have]
        if lacking:
            problems[i] = f"no member {lacking[0]!r} in the shard (has {sorted(have)})"
            continue
        for m, ext in enumerate(members):
            spans[i, m] = have[ext]
    return ShardTable([key for key, _ in rows], members, spans, problems)


def parse_index(text: str, members: Sequence[str], where: str) -> ShardTable:
    """A DALI index file's ``text`` -> `ShardTable` for ``members`` (`_table`). ValueError
    naming ``where`` (the index's location) when it is not an index."""
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[1].isdigit():
        raise ValueError(f"{where}: not a DALI index file (first line {lines[:1]!r}, expected 'VERSION COUNT')")
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != int(header[1]):
        raise ValueError(f"{where}: header says {header[1]} samples, the file lists {len(body)}")
    rows = []
    for i, line in enumerate(body):
        fields = line.split()
        if len(fields) % 4:
            raise ValueError(f"{where}: line {i + 2} is not 'ext offset size name' groups: {line[:80]!r}")
        have = {}
        for j in range(0, len(fields), 4):
            ext, offset, size, name = fields[j:j + 4]
            have[ext] = (int(offset), int(size))
        rows.append((shards.split_member_name(fields[3])[0], have))
    return _table(rows, tuple(members), where)


def tar_table(path: str, members: Sequence[str]) -> ShardTable:
    """The `ShardTable` of a local shard file read from its tar headers (what its DALI index
    says, without fetching the index: a node-cache copy is on local disk already). Only the
    512-byte headers are read (tarfile seeks over the members' data)."""
    rows: list[tuple[str, dict]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = shards.split_member_name(info.name)
                if not rows or rows[-1][0] != key:
                    rows.append((key, {}))
                rows[-1][1][ext] = (info.offset_data, info.size)
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar shard: {e}") from e
    return _table(rows, tuple(members), path)


class ShardIndex:
    """The index tables of a split's shards, parsed on first use (`table`).

    ``index_paths[s]``: shard ``s``'s index (a local path or ``s3://``: one GET); ``members``:
    the extensions to keep; ``samples_per_shard``: the manifest's counts, checked against each
    index as it is parsed. Thread-safe: the reading threads of a source ask concurrently."""

    def __init__(self, index_paths: Sequence[str], members: Sequence[str],
                 samples_per_shard: Sequence[int] | None = None, read_text=storage.read_text, local_copy=None,
                 sample_ranges: Sequence[tuple[int, float]] | None = None):
        # ``local_copy(shard)``: a local copy of the shard's tar, or None: its table then comes
        # from the tar's headers (`tar_table`), saving the index's requests to object storage
        self._local_copy = local_copy
        self.index_paths = list(index_paths)
        self.members = tuple(members)
        self.samples_per_shard = None if samples_per_shard is None else [int(n) for n in samples_per_shard]
        # ``sample_ranges[s]``: the sample numbers shard s may hold (`shards.sample_ranges`)
        self.sample_ranges = None if sample_ranges is None else list(sample_ranges)
        self._read_text = read_text
        self._tables: dict[int, ShardTable] = {}
        self._locks = [threading.Lock() for _ in self.index_paths]

    def table(self, shard: int) -> ShardTable:
        table = self._tables.get(shard)
        if table is not None:
            return table
        with self._locks[shard]:
            table = self._tables.get(shard)
            if table is None:
                where = self.index_paths[shard]
                copy = self._local_copy(shard) if self._local_copy is not None else None
                if copy is not None:
                    table, where = tar_table(copy, self.members), copy
                else:
                    table = parse_index(self._read_text(where), self.members, where)
                if self.samples_per_shard is not None and len(table.keys) != self.samples_per_shard[shard]:
                    raise ValueError(f"{where}: the index lists {len(table.keys)} samples, manifest.json says "
                                     f"{self.samples_per_shard[shard]}")
                if self.sample_ranges is not None:
                    table = self._foreign_samples(shard, table, where)
                self._tables[shard] = table
        return table

    def _foreign_samples(self, shard: int, table: ShardTable, where: str) -> ShardTable:
        """``table`` with a problem for each sample that belongs to another shard. The packer
        names each sample by its number (``%08d``), in shard order (`shards.sample_ranges`):
        keys outside the shard's range are a shard replaced after packing by another one of
        the same size (another position: a copy or upload gone wrong), which passes every size
        and checksum check. Its samples are skipped and counted, not trained on."""
        foreign = shards.foreign_samples(table.keys, self.sample_ranges[shard])
        if not foreign:
            return table
        here = shards.describe_range(self.sample_ranges[shard])
        log.warning("%s: holds samples the manifest places in other shards (%d of %d, e.g. %08d; it lists %s here): "
                    "the shard was replaced after packing; its samples are skipped. Re-pack it: the same "
                    "`tsn pack` command with --verify", where, len(foreign), len(table.keys),
                    next(iter(foreign.values())), here)
        problems = {**table.problems, **{i: f"sample {n:08d} belongs to another shard (this one holds {here}): "
                                            f"the shard was replaced after packing" for i, n in foreign.items()}}
        return ShardTable(table.keys, table.members, table.spans, problems)

    def key(self, shard: int, sample: int) -> str:
        return self.table(shard).keys[sample]
