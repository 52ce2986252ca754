"""Global evaluation of a model over all BUs' held-out customers, from additive per-BU statistics.

Two modes (the job's `evaluation.mode`):

- `exact` (`ScoreSummary`): each BU returns, per score bin of 1,000 equal-width bins, how many churners
  and non-churners fall in it, plus its sums of log-loss and Brier terms. The coordinator adds them
  and computes AUC, log-loss and Brier score of the union without seeing a single customer's score.
  Not DP: for development on synthetic data only.
- `dp` (the default): one discrete Gaussian release per BU of a coarse histogram of scores per label
  (`ScoreHistogram`, `score_layout`): a customer is one count in one bin, so the vector has L2
  sensitivity 1. The coordinator sums the noisy vectors and `dp_binary_metrics` derives, by
  post-processing alone, the AUC with an interval, the base rate, a calibration table, the gain and
  lift charts and the ROC curve. A regression task (`ltv`) releases, instead, four sums of clipped
  errors on a public grid (`RegressionSummary`, `regression_layout`) and gets RMSE and MAE with
  intervals (`dp_regression_metrics`).

The score bins are public: they depend on the job's bin count alone, never on data. Two open tail
bins hold the scores below sigmoid(-4) and above sigmoid(4) (1.8% and 98.2%); the bins between are
equally wide on the logit scale, where a logistic model's scores spread evenly. Few bins keep the
noise small (every bin, even an empty one, carries its own noise), and the AUC does not pay for
coarse bins with ties counted half: it integrates a monotone cubic (Fritsch & Carlson 1980)
through the ROC points at the bin edges, which resolves the ties inside a bin the way the
neighbouring bins suggest and still lies between the two extreme resolutions. docs/evaluation.md
gives the error this leaves and the number of customers the DP evaluation needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from federation.release import Part, ReleaseLayout, layout_of
from privacy.errors import ConfigurationError
from privacy.mechanisms import NoiseInSum, ratio_interval

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


# --- DP evaluation of a binary model --------------------------------------------------------------

DP_SCORE_BINS = 14
DP_SCORE_LOGIT_RANGE = 4.0  # the inner bin edges span logit -4..4, scores 0.018..0.982
INTERVAL_LEVEL = 0.95
_CALIBRATION_ROWS = 16  # at most this many calibration rows; adjacent bins merge beyond it
# The AUC interval is a parametric bootstrap over the noise: a function of the released sum alone,
# so its randomness needs no secrecy and a fixed seed makes the same release give the same interval.
_BOOTSTRAP_REPLICATES = 1000
_BOOTSTRAP_SEED = 20240605


def score_bin_edges(bins: int = DP_SCORE_BINS) -> np.ndarray:
    """The `bins - 1` public inner edges of the DP score bins, increasing, in (0, 1): bin 0 holds
    the scores below the first edge, bin `bins - 1` those at or above the last."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 3:
        raise ConfigurationError(
            f"evaluation.bins must be an integer of at least 3 (two tail bins and one between), "
            f"got {bins!r}; the default is {DP_SCORE_BINS}"
        )
    logits = np.linspace(-DP_SCORE_LOGIT_RANGE, DP_SCORE_LOGIT_RANGE, bins - 1)
    return 1.0 / (1.0 + np.exp(-logits))


def score_layout(bins: int = DP_SCORE_BINS) -> ReleaseLayout:
    """The DP evaluation release: counts per bin of the positives, then of the negatives. A customer
    is one count in one bin of one label: L2 sensitivity 1."""
    score_bin_edges(bins)
    return layout_of([Part("scores", 2 * bins, 1.0)])


@dataclass(frozen=True)
class ScoreHistogram:
    """Counts of held-out customers per public score bin, by label (exact on a BU, noisy once
    summed)."""

    positives: np.ndarray  # int64, one count per bin among label 1
    negatives: np.ndarray  # int64, one count per bin among label 0

    @classmethod
    def of(
        cls, scores: np.ndarray, labels: np.ndarray, bins: int = DP_SCORE_BINS
    ) -> ScoreHistogram:
        edges = score_bin_edges(bins)
        scores = np.asarray(scores, dtype=np.float64)
        labels = _binary_labels(labels, scores.shape)
        if scores.ndim != 1 or not np.all((scores >= 0.0) & (scores <= 1.0)):
            raise ValueError("scores must be a 1-D array of probabilities in [0, 1] (no NaN)")
        index = np.searchsorted(edges, scores, side="right")
        return cls(
            positives=np.bincount(index[labels], minlength=bins).astype(np.int64),
            negatives=np.bincount(index[~labels], minlength=bins).astype(np.int64),
        )

    def to_vector(self) -> np.ndarray:
        return np.concatenate([self.positives, self.negatives]).astype(np.int64)

    @classmethod
    def from_vector(cls, total: np.ndarray, bins: int = DP_SCORE_BINS) -> ScoreHistogram:
        """The histogram of a (summed, possibly noisy) release; counts may be negative."""
        values = np.asarray(total)
        if values.shape != (2 * bins,) or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(
                f"a score histogram of {bins} bins is a vector of {2 * bins} integers "
                f"(positives then negatives per bin), got {values.dtype} of shape {values.shape}; "
                "were both sides built with the same evaluation.bins?"
            )
        values = values.astype(np.int64)
        return cls(values[:bins], values[bins:])


def dp_binary_metrics(
    total: np.ndarray, noise: dict[str, NoiseInSum], bins: int = DP_SCORE_BINS
) -> dict:
    """Metrics of a binary model from the summed `score_layout` release and the noise it carries.

    `base_rate` and `test_customers` use the noisy counts as released (unbiased sums). The AUC
    and the curves use them post-processed: each label's counts projected onto non-negative
    counts with the same total (the least-squares projection, which keeps the sum and removes the
    negative counts that noise makes in empty bins). `auc_interval` covers the error the noise
    makes at `INTERVAL_LEVEL`, not the binning error nor the sampling of the held-out customers.
    With no noise (`NoiseInSum(())`) every value is exact for the binned counts.
    """
    histogram = ScoreHistogram.from_vector(total, bins)
    scores_noise = _part_noise(noise, "scores")
    edges = score_bin_edges(bins)
    positives, negatives = float(histogram.positives.sum()), float(histogram.negatives.sum())
    customers = positives + negatives
    pos = _nonnegative_with_total(histogram.positives[None, :].astype(np.float64))[0]
    neg = _nonnegative_with_total(histogram.negatives[None, :].astype(np.float64))[0]
    auc = float(_smoothed_auc(pos[None, :], neg[None, :])[0])
    targeted, found = _from_top_fractions(pos + neg), _from_top_fractions(pos)
    # The scores are not released: log-loss and Brier score from each bin's centre (approximate).
    centres = np.clip(_bin_centres(edges), _EPS, 1 - _EPS)
    counted = pos.sum() + neg.sum()
    log_loss = brier = float("nan")
    if counted > 0:
        log_loss = float((pos * -np.log(centres) + neg * -np.log(1 - centres)).sum() / counted)
        brier = float((pos * (1 - centres) ** 2 + neg * centres**2).sum() / counted)
    return {
        "auc": auc,
        "auc_interval": _auc_interval(auc, pos, neg, scores_noise),
        "log_loss": log_loss,
        "brier": brier,
        "losses_from": "bin centres (the scores themselves are not released)",
        "base_rate": positives / customers if customers > 0 else float("nan"),
        "test_customers": customers,
        "calibration": _calibration(pos, neg, edges, scores_noise),
        # targeting customers from the highest score down, bin by bin
        "gain": [
            {"fraction_targeted": float(t), "fraction_of_positives": float(p)}
            for t, p in zip(targeted, found, strict=True)
        ],
        "lift": [
            {"fraction_targeted": float(t), "lift": float(p / t)}
            for t, p in zip(targeted, found, strict=True)
            if t > 0
        ],
        "roc": [
            {"fpr": float(x), "tpr": float(y)}
            for x, y in zip(_from_top_fractions(neg), _from_top_fractions(pos), strict=True)
        ],
    }


def _binary_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    values = np.asarray(labels)
    if values.shape != shape:
        raise ValueError(
            f"labels have shape {values.shape}, the predictions {shape}: one per customer"
        )
    if not np.all((values == 0) | (values == 1)):
        raise ValueError("labels of a binary task must be 0 or 1")
    return values.astype(bool)


def _part_noise(noise: dict[str, NoiseInSum], name: str) -> NoiseInSum:
    if name not in noise:
        raise ValueError(
            f"no noise description for part {name!r} of the release (got {sorted(noise)}); pass "
            "layout.noise_in_sum(...), or NoiseInSum(()) per part for an exact release"
        )
    return noise[name]


def _nonnegative_with_total(counts: np.ndarray) -> np.ndarray:
    """Row by row, the closest (least squares) non-negative vector with the row's total (0 when
    the total is negative): a shifted clip, by the sort-based simplex projection of Duchi et al.
    (ICML 2008). Counts that are already non-negative are returned unchanged."""
    target = np.clip(counts.sum(axis=1), 0.0, None)
    ordered = -np.sort(-counts, axis=1)
    excess = np.cumsum(ordered, axis=1) - target[:, None]
    ranks = np.arange(1, counts.shape[1] + 1)
    kept = ordered - excess / ranks > 0  # true on a prefix of the sorted row
    size = np.maximum(kept.sum(axis=1), 1)
    shift = np.take_along_axis(excess, (size - 1)[:, None], axis=1)[:, 0] / size
    shift = np.where(kept.any(axis=1), shift, np.inf)  # an all-zero target: every count to 0
    return np.clip(counts - shift[:, None], 0.0, None)


def _from_top_fractions(counts: np.ndarray) -> np.ndarray:
    """The share of a label at or above each bin edge, from the top: 0 first, 1 last (rows)."""
    cumulative = np.cumsum(counts[..., ::-1], axis=-1)
    total = cumulative[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(total > 0, cumulative / total, np.nan)
    zero = np.zeros((*counts.shape[:-1], 1))
    return np.concatenate([zero, shares], axis=-1)


# 3-point Gauss-Legendre on [0, 1]: exact for the degree-5 integrand of one ROC segment.
_GAUSS_NODES = (1.0 + np.array([-math.sqrt(0.6), 0.0, math.sqrt(0.6)])) / 2.0
_GAUSS_WEIGHTS = np.array([5.0, 8.0, 5.0]) / 18.0


def _monotone_slopes(knots: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson slopes at unit-spaced knots: the harmonic mean of the two neighbouring
    secants inside (0 where one is 0, so a flat stretch stays flat), the secant at the ends. Each
    cubic segment is then monotone and stays between its end values."""
    secants = np.diff(knots, axis=-1)
    left, right = secants[..., :-1], secants[..., 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        inner = np.where((left > 0) & (right > 0), 2 * left * right / (left + right), 0.0)
    return np.concatenate([secants[..., :1], inner, secants[..., -1:]], axis=-1)


def _smoothed_auc(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """AUC of each row of non-negative bin counts: the area under the ROC curve traced by monotone
    cubics through its points at the bin edges (the bin index as the curve's parameter). A bin
    holding one label only adds no tie; within a mixed bin, the curve leans the way the
    neighbouring bins' ratio of positives to negatives does, instead of the straight chord
    (ties counted half), which underestimates the AUC of a coarse histogram."""
    y = _from_top_fractions(positives)
    x = _from_top_fractions(negatives)
    slope_y, slope_x = _monotone_slopes(y), _monotone_slopes(x)
    area = np.zeros(y.shape[:-1])
    for u, weight in zip(_GAUSS_NODES, _GAUSS_WEIGHTS, strict=True):
        # cubic Hermite basis for the value of y and the derivative of x at u in each segment
        y_at = (
            (2 * u**3 - 3 * u**2 + 1) * y[..., :-1]
            + (u**3 - 2 * u**2 + u) * slope_y[..., :-1]
            + (3 * u**2 - 2 * u**3) * y[..., 1:]
            + (u**3 - u**2) * slope_y[..., 1:]
        )
        dx_at = (
            (6 * u**2 - 6 * u) * x[..., :-1]
            + (3 * u**2 - 4 * u + 1) * slope_x[..., :-1]
            + (6 * u - 6 * u**2) * x[..., 1:]
            + (3 * u**2 - 2 * u) * slope_x[..., 1:]
        )
        area += weight * (y_at * dx_at).sum(axis=-1)
    return area


def _auc_interval(
    auc: float, positives: np.ndarray, negatives: np.ndarray, noise: NoiseInSum
) -> list[float]:
    """A normal interval whose spread is a parametric bootstrap of the noise: redraw noise of the
    released variance on the post-processed counts, post-process, recompute the AUC; the standard
    deviation of the redrawn AUCs stands for the released one's. The 95% interval covers the
    exact pooled AUC in 91-98% of releases in the settings of docs/evaluation.md; intervals from
    the quantiles of the redrawn AUCs (basic or percentile bootstrap) strayed further from 95%."""
    if noise.variance == 0 or not math.isfinite(auc):
        return [auc, auc]
    rng = np.random.default_rng(_BOOTSTRAP_SEED)
    shape = (_BOOTSTRAP_REPLICATES, positives.size)
    redrawn = _smoothed_auc(
        _nonnegative_with_total(positives + rng.normal(0.0, noise.std, shape)),
        _nonnegative_with_total(negatives + rng.normal(0.0, noise.std, shape)),
    )
    finite = redrawn[np.isfinite(redrawn)]
    spread = float(np.std(finite))
    # Clipping noisy counts at zero pulls the AUC towards 1/2 when counts are small next to the
    # noise; the redrawn AUCs are pulled again by about as much, so the interval is shifted back
    # by that amount (a first-order bias correction; zero when the counts dwarf the noise).
    bias = float(np.mean(finite)) - auc
    half = NormalDist().inv_cdf(0.5 + INTERVAL_LEVEL / 2) * spread
    centre = auc - bias
    return [max(centre - half, 0.0), min(centre + half, 1.0)]


def _bin_centres(edges: np.ndarray) -> np.ndarray:
    """Each bin's centre: the logit midpoint inside, the midpoint of [0, edge] or [edge, 1] for
    the two tails."""
    logits = np.log(edges / (1.0 - edges))
    return np.concatenate(
        [
            [edges[0] / 2],
            1.0 / (1.0 + np.exp(-(logits[:-1] + logits[1:]) / 2)),
            [(1 + edges[-1]) / 2],
        ]
    )


def _calibration(
    positives: np.ndarray, negatives: np.ndarray, edges: np.ndarray, noise: NoiseInSum
) -> list[dict]:
    """Observed positive rate per group of adjacent bins, against the group's score. The scores
    themselves are not released: `mean_score` is the count-weighted mean of the bins' centres
    (the logit midpoint inside, the midpoint of [0, edge] or [edge, 1] for the tails)."""
    bounds = np.concatenate([[0.0], edges, [1.0]])
    centres = _bin_centres(edges)
    rows = []
    groups = np.array_split(np.arange(positives.size), min(positives.size, _CALIBRATION_ROWS))
    for group in groups:
        pos, neg = float(positives[group].sum()), float(negatives[group].sum())
        count = pos + neg
        rate, interval = None, None
        if count > 0:
            rate = pos / count
            # delta method for P / (P + N), P and N with independent noise of k bins each
            spread = len(group) * noise.variance * (pos * pos + neg * neg) / count**4
            half = NormalDist().inv_cdf(0.5 + INTERVAL_LEVEL / 2) * math.sqrt(spread)
            interval = [max(rate - half, 0.0), min(rate + half, 1.0)]
        weights = positives[group] + negatives[group]
        centre = centres[group]
        rows.append(
            {
                "bin_low": float(bounds[group[0]]),
                "bin_high": float(bounds[group[-1] + 1]),
                "mean_score": float(
                    (weights * centre).sum() / weights.sum() if weights.sum() > 0 else centre.mean()
                ),
                "observed_rate": rate,
                "observed_rate_interval": interval,
                "count": count,
            }
        )
    return rows


# --- DP evaluation of a regression model (ltv) ----------------------------------------------------

# Each customer's absolute error, squared error and label, as fractions of the public bound `upper`
# (of its square for the squared error), are rounded to this many grid steps. The noise scales with
# the grid (each part's sensitivity is `grid_steps`), so a fine grid costs no accuracy; it only makes
# the rounding (at most half a step per customer, and unbiased on average) negligible.
REGRESSION_GRID_STEPS = 10_000


def regression_layout(upper: float, grid_steps: int = REGRESSION_GRID_STEPS) -> ReleaseLayout:
    """The regression evaluation release: the number of held-out customers (sensitivity 1), then
    the sums of their absolute errors, squared errors and labels on the grid (each between 0 and
    `grid_steps` per customer: sensitivity `grid_steps`)."""
    _check_regression_grid(upper, grid_steps)
    steps = float(grid_steps)
    return layout_of(
        [
            Part("count", 1, 1.0),
            Part("abs_error", 1, steps),
            Part("squared_error", 1, steps),
            Part("label", 1, steps),
        ]
    )


@dataclass(frozen=True)
class RegressionSummary:
    """Additive statistics of (prediction, label) pairs clipped to [0, upper], on a public grid."""

    count: int
    abs_error: int  # sum of round(|prediction - label| / upper * grid_steps)
    squared_error: int  # sum of round(((prediction - label) / upper)^2 * grid_steps)
    label: int  # sum of round(label / upper * grid_steps)
    upper: float
    grid_steps: int

    @classmethod
    def of(
        cls,
        predictions: np.ndarray,
        labels: np.ndarray,
        *,
        upper: float,
        grid_steps: int = REGRESSION_GRID_STEPS,
    ) -> RegressionSummary:
        _check_regression_grid(upper, grid_steps)
        predicted, actual = _clipped_pairs(predictions, labels, upper)
        error = (predicted - actual) / upper
        return cls(
            count=int(actual.size),
            abs_error=int(np.rint(np.abs(error) * grid_steps).astype(np.int64).sum()),
            squared_error=int(np.rint(error * error * grid_steps).astype(np.int64).sum()),
            label=int(np.rint(actual / upper * grid_steps).astype(np.int64).sum()),
            upper=float(upper),
            grid_steps=grid_steps,
        )

    def to_vector(self) -> np.ndarray:
        return np.array(
            [self.count, self.abs_error, self.squared_error, self.label], dtype=np.int64
        )

    @classmethod
    def from_vector(
        cls, total: np.ndarray, *, upper: float, grid_steps: int = REGRESSION_GRID_STEPS
    ) -> RegressionSummary:
        """The summary of a (summed, possibly noisy) release; values may be negative."""
        _check_regression_grid(upper, grid_steps)
        values = np.asarray(total)
        if values.shape != (4,) or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(
                "a regression summary is a vector of 4 integers (count, absolute-error sum, "
                f"squared-error sum, label sum), got {values.dtype} of shape {values.shape}"
            )
        count, abs_error, squared_error, label = (int(v) for v in values)
        return cls(count, abs_error, squared_error, label, float(upper), grid_steps)


def dp_regression_metrics(
    total: np.ndarray,
    noise: dict[str, NoiseInSum],
    *,
    upper: float,
    grid_steps: int = REGRESSION_GRID_STEPS,
) -> dict:
    """RMSE, MAE and mean label (natural units, of the clipped values) from the summed
    `regression_layout` release, each with an interval at `INTERVAL_LEVEL` for the noise (delta
    method for a ratio of two noisy sums); exact, with zero-width intervals, under no noise."""
    summary = RegressionSummary.from_vector(total, upper=upper, grid_steps=grid_steps)
    count_noise = _part_noise(noise, "count")

    def share_of_bound(part: str, value: int) -> tuple[float, list[float]]:
        """The mean per customer of a part, as a share of its bound per customer (`grid_steps`),
        with its interval; a share lies in [0, 1], so do the estimate and the interval."""
        if summary.count <= 0:
            return float("nan"), [0.0, 1.0]
        low, high = ratio_interval(
            value, summary.count, _part_noise(noise, part), count_noise, level=INTERVAL_LEVEL
        )
        share = [min(max(v / grid_steps, 0.0), 1.0) for v in (value / summary.count, low, high)]
        return share[0], share[1:]

    mae, mae_interval = share_of_bound("abs_error", summary.abs_error)
    mse, mse_interval = share_of_bound("squared_error", summary.squared_error)
    mean_label, label_interval = share_of_bound("label", summary.label)
    spread = count_noise.quantile(INTERVAL_LEVEL)
    return {
        "rmse": upper * math.sqrt(mse),
        "rmse_interval": [upper * math.sqrt(v) for v in mse_interval],
        "mae": upper * mae,
        "mae_interval": [upper * v for v in mae_interval],
        "mean_label": upper * mean_label,
        "mean_label_interval": [upper * v for v in label_interval],
        "test_customers": float(summary.count),
        "test_customers_interval": [float(summary.count - spread), float(summary.count + spread)],
    }


def exact_regression_metrics(predictions: np.ndarray, labels: np.ndarray, *, upper: float) -> dict:
    """The same metrics, exactly, from the (clipped) values themselves: for tests and the exact
    mode."""
    _check_regression_grid(upper, REGRESSION_GRID_STEPS)
    predicted, actual = _clipped_pairs(predictions, labels, upper)
    if actual.size == 0:
        nan = float("nan")
        return {"rmse": nan, "mae": nan, "mean_label": nan, "test_customers": 0.0}
    error = predicted - actual
    return {
        "rmse": float(np.sqrt(np.mean(error * error))),
        "mae": float(np.mean(np.abs(error))),
        "mean_label": float(np.mean(actual)),
        "test_customers": float(actual.size),
    }


def _check_regression_grid(upper: float, grid_steps: int) -> None:
    if not (isinstance(upper, int | float) and math.isfinite(upper) and upper > 0):
        raise ConfigurationError(
            f"the evaluation bound `upper` of a regression task must be a positive finite number "
            f"(the label column's declared upper bound in bu.toml), got {upper!r}"
        )
    if isinstance(grid_steps, bool) or not isinstance(grid_steps, int) or grid_steps < 1:
        raise ConfigurationError(
            f"grid_steps must be a positive integer, got {grid_steps!r}; "
            f"the default is {REGRESSION_GRID_STEPS}"
        )


def _clipped_pairs(
    predictions: np.ndarray, labels: np.ndarray, upper: float
) -> tuple[np.ndarray, np.ndarray]:
    predicted = np.asarray(predictions, dtype=np.float64)
    actual = np.asarray(labels, dtype=np.float64)
    if predicted.ndim != 1 or actual.shape != predicted.shape:
        raise ValueError(
            f"predictions {predicted.shape} and labels {actual.shape} must be 1-D and of equal "
            "length: one of each per held-out customer"
        )
    if not (np.all(np.isfinite(predicted)) and np.all(np.isfinite(actual))):
        raise ValueError("predictions and labels must be finite numbers (no NaN or infinity)")
    return np.clip(predicted, 0.0, upper), np.clip(actual, 0.0, upper)
