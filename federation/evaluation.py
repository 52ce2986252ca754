"""Global evaluation from per-BU score histograms.

Each BU scores its held-out customers with the global model and returns, per score bin, how many
churners and non-churners fall in it, plus its sums of log-loss and Brier terms. The coordinator adds
the BUs' contributions and computes AUC, log-loss and Brier score of the union without seeing a
single customer's score. With 1,000 equal-width bins the AUC is exact up to ties inside a bin
(counted as half, as for tied scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_BINS = 1000
_EPS = 1e-7
# Under SecAgg+, evaluation statistics travel on an integer grid of step 1 over
# [-EVALUATION_RANGE, EVALUATION_RANGE]: counts are exact, sums of log-loss and Brier terms are
# stochastically rounded to integers (an error below 1 per BU).
EVALUATION_RANGE = float(2**20)


@dataclass(frozen=True)
class ScoreSummary:
    """Additive sufficient statistics of a set of (score, label) pairs."""

    positives: np.ndarray  # counts per score bin among label 1
    negatives: np.ndarray  # counts per score bin among label 0
    log_loss_sum: float
    brier_sum: float

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray) -> ScoreSummary:
        scores = np.asarray(scores, dtype=np.float64)
        labels = np.asarray(labels).astype(bool)
        bins = np.minimum((scores * SCORE_BINS).astype(np.int64), SCORE_BINS - 1)
        clipped = np.clip(scores, _EPS, 1 - _EPS)
        log_loss = -(labels * np.log(clipped) + (~labels) * np.log(1 - clipped))
        return cls(
            positives=np.bincount(bins[labels], minlength=SCORE_BINS).astype(np.float64),
            negatives=np.bincount(bins[~labels], minlength=SCORE_BINS).astype(np.float64),
            log_loss_sum=float(log_loss.sum()),
            brier_sum=float(((scores - labels) ** 2).sum()),
        )

    def __add__(self, other: ScoreSummary) -> ScoreSummary:
        return ScoreSummary(
            self.positives + other.positives,
            self.negatives + other.negatives,
            self.log_loss_sum + other.log_loss_sum,
            self.brier_sum + other.brier_sum,
        )

    def to_arrays(self) -> list[np.ndarray]:
        """Wire form: one flat float64 vector (additive, so a secure sum of vectors is the sum)."""
        tail = np.array([self.log_loss_sum, self.brier_sum])
        return [np.concatenate([self.positives, self.negatives, tail])]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> ScoreSummary:
        (vector,) = arrays
        if vector.shape != (2 * SCORE_BINS + 2,) or not np.all(np.isfinite(vector)):
            raise ValueError(f"a score summary is {2 * SCORE_BINS + 2} finite numbers")
        return cls(
            vector[:SCORE_BINS],
            vector[SCORE_BINS : 2 * SCORE_BINS],
            float(vector[-2]),
            float(vector[-1]),
        )

    @property
    def count(self) -> int:
        return round(self.positives.sum() + self.negatives.sum())

    def metrics(self) -> dict[str, float]:
        pos, neg = self.positives.sum(), self.negatives.sum()
        n = pos + neg
        if pos == 0 or neg == 0:
            auc = float("nan")
        else:
            below = np.concatenate([[0.0], np.cumsum(self.negatives)[:-1]])
            auc = float((self.positives * (below + 0.5 * self.negatives)).sum() / (pos * neg))
        return {
            "auc": auc,
            "log_loss": float(self.log_loss_sum / n) if n else float("nan"),
            "brier": float(self.brier_sum / n) if n else float("nan"),
            "test_customers": float(n),
            "base_rate": float(pos / n) if n else float("nan"),
        }


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC by the rank-sum (Mann-Whitney) formula, ties counted half; for ceilings and tests."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    pos = labels.sum()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))
