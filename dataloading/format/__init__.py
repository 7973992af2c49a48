"""The packed dataset's contract: `shards` (members, the manifest, shard listing),
`shard_index` (a shard's member offsets, parsed once per shard), `quarantine` (what makes a
sample undecodable, the skipped-sample log). The modality table is `dataloading.modality`.
"""
