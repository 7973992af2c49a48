"""The input side: which videos make a dataset and how a source video is decoded.

`inputs` (`read_inputs`, the one entry point: labels CSV, UCF101, HMDB51), `folder_tree`,
`kinetics`, `ssv2` (the other list formats), `items` (what they all give: `VideoItem`, and
the helpers they share), `video_io` (decoding and resizing a source video), `flow` (optical
flow from decoded frames, its 8-bit quantisation). Used by packing, never by training.
"""
