"""Multi-stream score fusion: the maths behind `tsn fuse` (files and printing: `app.evaluate`,
`cli.evaluate`).

A stream's scores are a dict as `app.run_store.load_scores` reads them: ``sample_index`` (N,),
``label`` (N,), ``scores`` (N, C) pre-softmax video scores, ``class_names``, ``meta``.

Fusion (TSN.md section 6): the fused score of a video is the weighted average of the streams'
scores, ``sum_i w_i * s_i / sum_i w_i``, matched by ``sample_index``. The authors fuse the raw
(pre-softmax) class scores, the default here; ``--softmax`` fuses probabilities instead.
Default weights: two streams 1 : 1.5 (RGB : flow, pass RGB first), three 1 : 1 : 0.5
(RGB : flow : warped flow); otherwise equal weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tsn.evaluation import EvalResult, result_from_predictions

DEFAULT_FUSION_WEIGHTS = {2: (1.0, 1.5), 3: (1.0, 1.0, 0.5)}


def default_weights(num_streams: int) -> tuple[float, ...]:
    return DEFAULT_FUSION_WEIGHTS.get(num_streams, (1.0,) * num_streams)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fuse_scores(streams: Sequence[dict], weights: Sequence[float], *, softmax: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted average of several streams' scores on the videos they share.

    ``streams``: scores dicts (same classes). Returns (sample_index (M,), label (M,),
    fused scores (M, C)) over the M videos present in every stream, sorted by sample_index.
    Raises ValueError when class counts or a video's labels disagree, or no video is shared.
    """
    if len(streams) != len(weights):
        raise ValueError(f"{len(streams)} score files but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    num_classes = {s["scores"].shape[1] for s in streams}
    if len(num_classes) != 1:
        raise ValueError(f"score files have different class counts: {sorted(num_classes)}")
    common = streams[0]["sample_index"]
    for s in streams[1:]:
        common = np.intersect1d(common, s["sample_index"])
    if common.size == 0:
        raise ValueError("the score files share no video (sample_index)")
    fused, label = None, None
    for s, w in zip(streams, weights):
        order = np.argsort(s["sample_index"])
        pos = order[np.searchsorted(s["sample_index"], common, sorter=order)]
        sc = s["scores"][pos].astype(np.float64)
        sc = _softmax(sc) if softmax else sc
        lb = s["label"][pos]
        if label is not None and not np.array_equal(label, lb):
            bad = common[label != lb][:5].tolist()
            raise ValueError(f"labels disagree between score files for sample_index {bad}: "
                             f"not the same split / dataset")
        label = lb
        fused = w * sc if fused is None else fused + w * sc
    return common, label, fused / float(sum(weights))


def scores_result(d: dict) -> EvalResult:
    """The metrics of one stream's scores dict."""
    return result_from_predictions(d["sample_index"], d["scores"], d["label"], d["scores"].shape[1])
