"""Calibration: does a classifier's confidence match its accuracy?

Expected calibration error (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural
Networks"): each prediction's confidence (its largest class probability) falls into one of B equal-width
bins (lo, hi] of [0, 1]; with n_b predictions in bin b, their accuracy acc_b and mean confidence conf_b,

    ECE = Σ_b (n_b / n) · |acc_b − conf_b|  =  (1/n) Σ_b |correct_b − Σ_{i in b} confidence_i|
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BINS = 15


@dataclass
class ReliabilityBins:
    """Sums per equal-width confidence bin, accumulated over batches, for one or several classifiers (leading
    axes, e.g. [members, bins]): `count` predictions, `confidence_sum` of their confidences, `correct` of them
    right. Float64."""

    count: Tensor
    confidence_sum: Tensor
    correct: Tensor

    @classmethod
    def zeros(cls, *leading: int, bins: int = BINS, device: torch.device | str | None = None) -> "ReliabilityBins":
        def zero() -> Tensor:
            return torch.zeros(*leading, bins, dtype=torch.float64, device=device)
        return cls(zero(), zero(), zero())

    def __getitem__(self, index: int | slice) -> "ReliabilityBins":
        """The bins of one classifier (or several) along the first leading axis, e.g. one ensemble member."""
        return ReliabilityBins(self.count[index], self.confidence_sum[index], self.correct[index])

    @property
    def bins(self) -> int:
        return self.count.shape[-1]

    @property
    def edges(self) -> Tensor:
        """The bin edges [B + 1]: 0, 1/B, …, 1."""
        return torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)

    def add(self, probs: Tensor, targets: Tensor) -> None:
        """Add predictions: probs [..., N, C] (the leading axes as this object's), integer targets [N]."""
        confidence, predicted = probs.max(dim=-1)
        confidence = confidence.double()
        bin_index = (confidence * self.bins).ceil().long().clamp_(1, self.bins) - 1  # bins (lo, hi]
        right = (predicted == targets).double()
        for total, values in ((self.count, torch.ones_like(confidence)), (self.confidence_sum, confidence),
                              (self.correct, right)):
            total.scatter_add_(-1, bin_index, values)

    def accuracy(self) -> Tensor:
        """Accuracy per bin (NaN where a bin is empty)."""
        return self.correct / self.count

    def confidence(self) -> Tensor:
        """Mean confidence per bin (NaN where a bin is empty)."""
        return self.confidence_sum / self.count

    def ece(self) -> Tensor:
        """The expected calibration error, one value per classifier (the leading axes)."""
        return (self.correct - self.confidence_sum).abs().sum(dim=-1) / self.count.sum(dim=-1)
