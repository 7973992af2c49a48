"""From shards to batches: `loader` (`TSNLoader`, the training loop's iterator), `source`
(`SampleSource`: reads only the sampled frames' bytes and feeds DALI), `dali_planner` (the
per-batch draws and plans), `dali_pipeline` (the DALI graph), `dali_flow` (its flow-specific
ops), `finish` (the CPU path's resize and normalise), `prefetch` (the bounded background
producer), `stage_times` (seconds per input stage).
"""
