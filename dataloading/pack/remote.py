"""`tsn pack --out s3://bucket/prefix`: stage shards locally, upload each once complete.

The packer writes exactly what it writes for a local ``--out`` (same writer, same journal,
same shard bytes) into a local staging directory, and this module moves the results to the
object-storage prefix:

* each finished shard (tar, then its DALI ``.idx``) is uploaded right after it was journaled,
  checked by the object's size, and only then its local copy is removed, so the staging
  directory holds at most one shard per split plus the small bookkeeping files;
* ``rejected.jsonl`` and then ``manifest.json`` are uploaded LAST: a reader (training, `tsn
  inspect`) never sees a manifest naming a shard that is not there yet. Any manifest of an
  earlier run is deleted before the first upload of this one, for the same reason (pyarrow
  then leaves an empty ``prefix/`` directory marker object; readers list files only);
* ``_options.json`` is uploaded at the start (a write-permission check before any encoding, and
  what a later run compares its options with).

The journal is written in the staging directory (appended and fsync'ed per shard, as for a
local pack) and mirrored to ``<prefix>/<split>/_journal.jsonl`` after every shard it records
(object storage has no append: the whole split journal is PUT again, ~300 bytes a shard; for
Kinetics-400's ~4,300 shards of 256 MB that is ~0.3 % of the pack's bytes over the whole pack).
So a re-run on another machine or pod, with an empty staging directory (a Kubernetes RayJob's
retry: its staging is an emptyDir), takes the journal from the prefix and redoes nothing that
was uploaded: each journaled shard is checked by the object's existence and the size the
journal recorded (one listing of the prefix); a journaled shard still in staging is uploaded;
anything else is re-packed. The default staging directory is derived from the ``--out`` URI
(`default_staging_dir`), so re-running the same command on the same machine finds it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from dataloading.pack.options import JOURNAL_FILE, MANIFEST_FILE, OPTIONS_FILE, REJECTED_FILE, PackError
from dataloading.store import files, storage


def default_staging_dir(uri: str) -> Path:
    """``$XDG_CACHE_HOME/tsn/staging/<sha256(uri)[:16]>`` (``~/.cache`` by default; the
    system temp directory when there is no home): one per output prefix, stable across runs."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.path.expanduser("~"), ".cache") if os.path.expanduser("~") != "~" else tempfile.gettempdir())
    return Path(cache, "tsn", "staging", digest)


class RemoteOut:
    """The object-storage side of one `pack_dataset` run into ``uri`` via ``staging_dir``."""

    def __init__(self, uri: str, staging_dir: str | os.PathLike | None):
        storage.check_supported(uri)
        self.uri = uri.rstrip("/")
        self.staging = Path(staging_dir) if staging_dir is not None else default_staging_dir(self.uri)
        self._sizes: dict[str, int] = {}  # relative path -> bytes of the objects under uri
        self.uploaded_objects = 0
        self.uploaded_bytes = 0

    def check_access(self) -> None:
        """List the prefix (before any local or encoding work): wrong credentials, an unknown
        bucket or an unreachable endpoint fail here with a `StorageError` naming the prefix,
        and nothing is written. A non-empty prefix that is not a pack is refused."""
        listing = storage.list_sizes(self.uri)
        base = self.uri + "/"
        self._sizes = {loc[len(base):]: n for loc, n in listing.items() if loc.startswith(base)}
        if self._sizes and not self._sizes.keys() & {OPTIONS_FILE, MANIFEST_FILE}:
            # never write into, or wipe, a prefix this tool did not create
            raise PackError(f"{self.uri}: holds objects but is not a `tsn pack` output (no {OPTIONS_FILE}); "
                            f"pick a new --out")

    def prepare(self, options: dict, overwrite: bool) -> None:
        """With the staging directory locked: wipe the prefix (``overwrite``) or check the
        options of the pack already there, upload ``_options.json`` and take down an earlier
        manifest (it is uploaded again last)."""
        if overwrite and self._sizes:
            storage.delete_prefix(self.uri)
            self._sizes = {}
        elif OPTIONS_FILE in self._sizes:
            try:
                previous = json.loads(storage.read_text(self.location(OPTIONS_FILE)))
            except json.JSONDecodeError:
                previous = None
            if previous != options:
                raise PackError(f"{self.uri}: already holds a pack made with different options (its "
                                f"{OPTIONS_FILE}); pick a new --out, or pass --overwrite to delete it and start over")
        data = (json.dumps(options, indent=1) + "\n").encode()
        storage.put_bytes(self.location(OPTIONS_FILE), data)
        self._sizes[OPTIONS_FILE] = len(data)
        if MANIFEST_FILE in self._sizes:
            storage.delete(self.location(MANIFEST_FILE))
            del self._sizes[MANIFEST_FILE]
        self._restore_journals()

    def _restore_journals(self) -> None:
        """Each split journal mirrored under the prefix that staging lacks (a new machine or
        pod) is copied into staging, where the resume reads it (module docstring)."""
        for rel in sorted(self._sizes):
            if rel.endswith("/" + JOURNAL_FILE) and not (self.staging / rel).is_file():
                (self.staging / rel).parent.mkdir(parents=True, exist_ok=True)
                files.atomic_write_bytes(self.staging / rel, storage.read_bytes(self.location(rel)))

    def mirror_journal(self, split: str) -> None:
        """PUT the split's journal from staging to ``<prefix>/<split>/_journal.jsonl``."""
        rel = f"{split}/{JOURNAL_FILE}"
        if (self.staging / rel).is_file():
            data = (self.staging / rel).read_bytes()
            storage.put_bytes(self.location(rel), data)
            self._sizes[rel] = len(data)

    def uploaded_size(self, rel: str) -> int | None:
        """Bytes of the object ``rel`` under the prefix (listed at the start, then tracked), or None."""
        return self._sizes.get(rel)

    def objects_under(self, folder: str) -> list[str]:
        """Relative paths of the objects under ``folder/`` (listed at the start, then tracked)."""
        return [rel for rel in self._sizes if rel.startswith(folder.rstrip("/") + "/")]

    def record_upload(self, rel: str, num_bytes: int) -> None:
        """Count an object another process uploaded under the prefix (a cluster pack's task)."""
        self._sizes[rel] = num_bytes
        self.uploaded_objects += 1
        self.uploaded_bytes += num_bytes

    def delete_object(self, rel: str) -> None:
        """Delete the object ``rel`` under the prefix (a cluster pack's unjournaled shard)."""
        storage.delete(self.location(rel))
        self._sizes.pop(rel, None)

    def upload_shard(self, record: dict) -> None:
        """Upload a journaled shard's tar and index from staging, then remove the local copies."""
        for key in ("path", "index_path"):
            self._upload(record[key])
        for key in ("path", "index_path"):
            (self.staging / record[key]).unlink()
        self.mirror_journal(record["path"].split("/", 1)[0])  # it names this shard: done for any re-run

    def upload_staged(self, shard_records: list[dict]) -> None:
        """Upload the journaled shards an interrupted run left in staging (not uploaded yet)."""
        for rec in shard_records:
            if (self.staging / rec["path"]).is_file():
                self.upload_shard(rec)

    def finish(self, manifest: dict) -> None:
        """The split journals (rejections journaled since their last shard), ``rejected.jsonl``
        and, when it lists samples, ``manifest.json`` (last)."""
        for journal in sorted(self.staging.glob(f"*/{JOURNAL_FILE}")):
            self.mirror_journal(journal.parent.name)
        self._upload(REJECTED_FILE)
        if manifest["num_samples"]:
            self._upload(MANIFEST_FILE)

    def _upload(self, rel: str) -> None:
        n = storage.upload_file(self.staging / rel, self.location(rel))
        self._sizes[rel] = n
        self.uploaded_objects += 1
        self.uploaded_bytes += n

    def location(self, rel: str) -> str:
        """The ``s3://`` URI of ``rel`` under the prefix."""
        return storage.join(self.uri, rel)
