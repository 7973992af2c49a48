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

from dataloading import shards, storage
from dataloading.inputs import SPLITS
from dataloading.pack.journal import read_journal
from dataloading.pack.options import JOURNAL_FILE
from dataloading.pack.remote import RemoteOut


def shard_content_problem(record: dict, location: str, end: float = float("inf")) -> str | None:
    """Why the shard at ``location`` (a local path or ``s3://``) is not the one the journal
    ``record`` describes, or None when it is. Reads the whole shard. ``end``: the next shard's
    first sample number (`shards.sample_ranges`)."""
    if record.get("sha256"):
        digest = storage.sha256(location)
        if digest != record["sha256"]:
            return (f"SHA-256 {digest[:12]}... differs from the {record['sha256'][:12]}... recorded at pack time "
                    f"(changed or replaced since)")
        return None
    first = int(record["first_sample_index"])
    samples: dict[str, dict[str, bytes]] = {}
    with storage.open_tar(location) as tar:
        for member in tar:
            if member.isfile():
                key, ext = shards.split_member_name(member.name)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key, members in samples.items():
        number = key.rsplit("/", 1)[-1]
        if number.isdigit() and not first <= int(number) < end:
            return f"holds sample {number} of another shard (replaced since packing)"
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
        ends = [r["first_sample_index"] for r in records[1:]] + [float("inf")]
        for rec, end in zip(records, ends):
            local = out_dir / rec["path"]
            if local.is_file():
                todo.append((rec, end, str(local), local.stat().st_size))
            elif remote is not None and remote.uploaded_size(rec["path"]) is not None:
                todo.append((rec, end, remote.location(rec["path"]), remote.uploaded_size(rec["path"])))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(n for *_, n in todo), unit="B", unit_scale=True, file=sys.stderr,
                   dynamic_ncols=True, desc="verify packed shards")
    stats = {"checked": 0, "changed": 0, "bytes_read": 0}
    try:
        for rec, end, location, num_bytes in todo:
            problem = shard_content_problem(rec, location, end)
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
