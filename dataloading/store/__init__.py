"""Where the bytes live, and every read and write of them: `storage` (local paths vs
``s3://`` URIs: listing, reading, retries), `byteranges` (ranged reads of files and objects,
coalesced), `cache` (the node-local shard cache its ranks share), `streamer` (whole-shard
fetch-ahead into that cache in a rank's read order), `files` (atomic local writes).
"""
