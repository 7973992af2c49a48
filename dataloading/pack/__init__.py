"""`tsn pack`: decode source videos once and pack them into WebDataset tar shards.

One module per concern: `options` (what a pack is made with, file names, sizes), `encode` (one
video -> the members of one sample, run in worker processes), `writer` (the tar shard writer),
`journal` (resuming: journal, split state, output directory and its lock), `manifest` (the
manifest and rejection log), `remote` (``--out s3://...``: staging and uploads), `packer`
(orchestration: `pack_dataset`). The CLI is `cli.pack`.
"""

from dataloading.pack.options import (
    DEFAULT_SHARD_SIZE_BYTES,
    MANIFEST_FILE,
    REJECTED_FILE,
    PackError,
    PackOptions,
    format_size,
    parse_size,
)
from dataloading.pack.packer import pack_dataset, split_order

__all__ = [
    "DEFAULT_SHARD_SIZE_BYTES",
    "MANIFEST_FILE",
    "REJECTED_FILE",
    "PackError",
    "PackOptions",
    "format_size",
    "pack_dataset",
    "parse_size",
    "split_order",
]
