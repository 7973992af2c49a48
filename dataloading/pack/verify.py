"""``tsn pack --verify``: before resuming, check every shard already packed against what was
recorded when it was written, and drop those that changed so the resume re-packs them.

A resume trusts a journaled shard whose tar has the journaled size (`journal.load_split_state`,
`tasks.load_cluster_state`). A shard changed in place (bit rot, a bad copy) or replaced by
another shard of the same size passes that check; `tsn inspect --verify` finds it, and this is
the repair: a changed shard's tar is deleted (the local file, or the object of an ``s3://``
output), so the resume's own rules re-pack it from its source videos (a local pack: it and
every later shard of its split, its "longest valid prefix"; a cluster pack: just its videos).

What identifies a shard: its SHA-256 (journaled since it was recorded); for shards journaled
before, the per-sample checksums in each ``KEY.info`` (`shards.checksum_problem`), and for
both that its samples are the numbers the journal gives it (``first_sample_index`` on).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dataloading.format import shards
from dataloading.format.quarantine import iter_samples
from dataloading.pack.journal import read_journal
from dataloading.pack.options import JOURNAL_FILE
from dataloading.pack.remote import RemoteOut
from dataloading.sources.items import SPLITS
from dataloading.store import storage


def shard_content_problem(record: dict, location: str, sample_range: tuple[int, float]) -> str | None:
    """Why the shard at ``location`` (a local path or ``s3://``) is not the one the journal
    ``record`` describes, or None when it is. Reads the whole shard. ``sample_range``: the
    numbers its samples may have (`shards.sample_ranges` of the split's records)."""
    if record.get("sha256"):
        return shards.sha256_problem(location, record["sha256"])
    for key, members in iter_samples(location):
        if shards.foreign_samples([key], sample_range):
            return f"holds sample {key} of another shard (replaced since packing)"
        problem = shards.checksum_problem(members)
        if problem and problem != shards.NO_CHECKSUMS:
            return f"sample {key}: {problem}"
    return None


def drop_changed_shards(out_dir: Path, remote: RemoteOut | None = None, progress: bool = False) -> dict:
    """Check every journaled shard of ``out_dir`` (a pack's directory, or the staging directory
    of an ``s3://`` output ``remote``) that is present (`shard_content_problem`) and delete the
    tar of each that changed, naming it on stderr. Missing shards are left to the resume.
    Returns {"checked", "changed", "bytes_read"}."""
    todo = []
    for split in SPLITS:
        records, _ = read_journal(out_dir / split / JOURNAL_FILE)
        records = sorted((r for r in records if r["type"] == "shard"), key=lambda r: r["first_sample_index"])
        for rec, sample_range in zip(records, shards.sample_ranges(records) or []):
            local = out_dir / rec["path"]
            if local.is_file():
                todo.append((rec, sample_range, str(local), local.stat().st_size))
            elif remote is not None and remote.uploaded_size(rec["path"]) is not None:
                todo.append((rec, sample_range, remote.location(rec["path"]), remote.uploaded_size(rec["path"])))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(n for *_, n in todo), unit="B", unit_scale=True, file=sys.stderr,
                   dynamic_ncols=True, desc="verify packed shards")
    stats = {"checked": 0, "changed": 0, "bytes_read": 0}
    try:
        for rec, sample_range, location, num_bytes in todo:
            problem = shard_content_problem(rec, location, sample_range)
            stats["checked"] += 1
            stats["bytes_read"] += num_bytes
            if bar is not None:
                bar.update(num_bytes)
            if problem is None:
                continue
            print(f"{storage.display(location)}: {problem}; re-packing it", file=sys.stderr)
            if storage.is_uri(location):
                remote.delete_object(rec["path"])
            else:
                Path(location).unlink()
            stats["changed"] += 1
    finally:
        if bar is not None:
            bar.close()
    return stats
