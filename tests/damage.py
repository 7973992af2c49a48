"""Damaging a copy of a packed dataset for the corrupt-sample tests."""

import shutil
from pathlib import Path

from dataloading.format import shards


def copy_with_wiped_frames(packed: Path, dest: Path) -> tuple[Path, dict]:
    """``packed`` copied to ``dest`` with the ``frames`` member of the first sample of the first
    train shard overwritten by zeros (the tar and its index stay intact, the JPEGs do not
    decode); returns ``dest`` and the damaged shard's manifest entry."""
    shutil.copytree(packed, dest)
    shard = shards.load_manifest(dest)["splits"]["train"]["shards"][0]
    line = (dest / shard["index_path"]).read_text().splitlines()[1].split()
    member = dict(zip(line[0::4], zip(line[1::4], line[2::4])))
    offset, size = (int(v) for v in member["frames"])
    with open(dest / shard["path"], "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    return dest, shard
