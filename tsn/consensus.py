"""Segmental consensus: combine the K snippet scores of a video into one video score.

TSN (Wang et al., ECCV 2016) applies the consensus G to the *class scores* of the K snippets,
before the softmax.  The paper compares max, average and weighted average; average is the
default and the best on UCF101.

Every module here maps ``(B, K, C)`` snippet scores to ``(B, C)`` video scores.  ``avg`` and
``max`` accept any K (test time uses 25 snippets while training uses 3); ``weighted`` has one
learned weight per segment and therefore needs K == ``num_segments``.
"""

from __future__ import annotations

import torch
from torch import nn

CONSENSUS_KINDS = ("avg", "max", "weighted")


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 3:
        raise ValueError(
            f"consensus expects snippet scores of shape (B, K, C), got {tuple(scores.shape)}"
        )


class AvgConsensus(nn.Module):
    """Mean over segments: (B, K, C) -> (B, C).  The paper's default."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(scores)
        return scores.mean(dim=1)


class MaxConsensus(nn.Module):
    """Per-class max over segments: (B, K, C) -> (B, C).

    The gradient reaches only the snippet holding the max for each class.
    """

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(scores)
        return scores.amax(dim=1)


class WeightedConsensus(nn.Module):
    """Learned weighted average over segments: (B, K, C) -> (B, C).

    ``G = sum_k w_k * F_k`` with ``w = softmax(logits)``, one logit per segment position.

    Why softmax-normalised: the weights stay positive and sum to 1, so the output keeps the
    scale of the plain average (the classifier and the consensus cannot trade score scale
    against each other) and the module is a true weighted *average* as in the paper.  The
    logits start at 0, so the initial weights are uniform 1/K and the module starts out
    identical to ``avg``.
    """

    def __init__(self, num_segments: int):
        super().__init__()
        if num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        self.num_segments = num_segments
        self.logits = nn.Parameter(torch.zeros(num_segments))

    @property
    def weights(self) -> torch.Tensor:
        """The normalised per-segment weights, shape (K,), summing to 1."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(scores)
        if scores.shape[1] != self.num_segments:
            raise ValueError(
                f"weighted consensus was built for K={self.num_segments} segments, "
                f"got scores of shape {tuple(scores.shape)} (B, K, C)"
            )
        w = self.weights.to(scores.dtype)
        return torch.einsum("bkc,k->bc", scores, w)

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, normalisation=softmax"


def build_consensus(kind: str, num_segments: int) -> nn.Module:
    """Return the consensus module ``kind`` ('avg', 'max' or 'weighted').

    ``num_segments`` is only used by 'weighted' (one weight per segment).
    """
    if kind == "avg":
        return AvgConsensus()
    elif kind == "max":
        return MaxConsensus()
    elif kind == "weighted":
        return WeightedConsensus(num_segments)
    raise ValueError(f"unknown consensus {kind!r}; choose one of {', '.join(CONSENSUS_KINDS)}")
