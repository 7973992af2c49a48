"""Run-local DALI index files that list chosen samples of a split's shards, in a chosen order:
how the training reader reads exactly a rank's chunk of the epoch's order (`dataloading.order`).

DALI 2.4's ``readers.webdataset`` honours an index file that lists a subset of a tar's samples
in any order (repeats included), and the same tar may appear several times in its ``paths``
with different index files. A listing turns a sequence of (shard, sample) entries into
(tars, indexes): consecutive entries of the same shard share one index file, in order.

The files live in a temporary directory (``tsn-listing-*``, next to the quarantine's copies)
owned by the `SplitIndex`; each `SplitIndex.write` replaces the previous listing's files (DALI
parses the indexes when the pipeline is built), and `close` removes the directory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dataloading import shards, storage


class SplitIndex:
    """The DALI index lines of a split's shards, read once (local paths or ``s3://``).

    ``lines[s][i]``: sample ``i`` of shard ``s`` (0-based, the index file's order), ``keys[s][i]``
    its key (the member name without extension), ``position_of_key[(tar, key)] = (s, i)``.
    """

    def __init__(self, tar_paths: Sequence[str], index_paths: Sequence[str]):
        if len(tar_paths) != len(index_paths):
            raise ValueError(f"need one index per shard, got {len(tar_paths)} tars and {len(index_paths)} indexes")
        self.tar_paths = list(tar_paths)
        self.version = shards.DALI_INDEX_VERSION
        self.lines: list[list[str]] = []
        self.keys: list[list[str]] = []
        for idx in index_paths:
            text = storage.read_text(idx).splitlines()
            header = text[0].split() if text else []
            if len(header) != 2 or not header[1].isdigit():
                raise ValueError(f"{idx}: not a DALI index file (first line {text[:1]!r}, expected 'VERSION COUNT')")
            n = int(header[1])
            body = [ln for ln in text[1:] if ln.strip()]
            if len(body) != n:
                raise ValueError(f"{idx}: header says {n} samples, the file lists {len(body)}")
            self.version = header[0]
            self.lines.append(body)
            self.keys.append([shards.split_member_name(ln.split()[3])[0] for ln in body])
        self.position_of_key = {(tar, key): (s, i) for s, tar in enumerate(self.tar_paths)
                                for i, key in enumerate(self.keys[s])}
        self._dir: tempfile.TemporaryDirectory | None = None
        self._written = 0

    @property
    def samples_per_shard(self) -> list[int]:
        return [len(body) for body in self.lines]

    def write(self, entries: Sequence[tuple[int, int]], tar_paths: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """(tars, indexes) for a reader that reads ``entries`` = [(shard, sample), ...] in order:
        one run-local index per run of consecutive entries of the same shard. ``tar_paths``:
        the paths to hand DALI for the shards (e.g. the shard cache's local copies); default
        the split's own. The previous listing's files are removed."""
        if not entries:
            raise ValueError("a listing needs at least one entry (DALI rejects empty indexes)")
        tars_for = self.tar_paths if tar_paths is None else list(tar_paths)
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="tsn-listing-")
        root = Path(self._dir.name)
        for old in root.iterdir():  # the previous listing: its pipeline has parsed it (or is gone)
            shutil.rmtree(old, ignore_errors=True)
        self._written += 1
        out_dir = root / f"{self._written:06d}"
        out_dir.mkdir()
        runs: list[tuple[int, list[str]]] = []
        for s, i in entries:
            if runs and runs[-1][0] == s:
                runs[-1][1].append(self.lines[s][i])
            else:
                runs.append((s, [self.lines[s][i]]))
        tars, idxs = [], []
        for j, (s, body) in enumerate(runs):
            path = out_dir / f"{j:06d}.idx"
            path.write_text("\n".join([f"{self.version} {len(body)}", *body]) + "\n")
            tars.append(tars_for[s])
            idxs.append(str(path))
        return tars, idxs

    def close(self) -> None:
        """Remove the listing directory; idempotent."""
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
