"""Pure, seeded per-sample maths: no I/O, no DALI (checked by tests/test_architecture.py).

`sampling` (segment frame indices), `augment` (crop geometry, scale jitter, flips), `plan`
(one sample's frames, crop and test views), `order` (an epoch's sample order and its split
over ranks), `preprocessing` (channel order, mean and std), `spec` (`PipelineSpec`: what a
pipeline is asked for).
"""
