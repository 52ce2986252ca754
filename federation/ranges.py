"""Feature ranges from DP statistics: where the customers' values lie, so that DP-SGD sees them.

A scalar feature (a numeric attribute, tenure, recency, frequency, monetary value) is scaled to
[0, 1] by the bounds its schema declares. Declared bounds are public and wide: a balance declared
in [-8,100, 110,000] puts nearly every customer in a sliver of the unit interval, and plain SGD,
which moves every weight at the same rate, needs many more steps for such a feature than DP-SGD's
budget allows. On UCI bank marketing this alone kept DP-FedAvg about 0.01 AUC below a centralised
logistic regression (docs/benchmarks.md).

The fix costs a small share of the budget and no trust: before training, every BU releases, for
each scalar feature, a histogram of its training customers' values over `RANGE_BINS` equal bins,
with Gaussian noise (one customer adds one count to each histogram: L2 sensitivity
sqrt(features)). The coordinator sums the histograms, zeroes every bin whose sum is not clearly
above the noise (`NOISE_FLOOR` standard deviations), and reads the `RANGE_QUANTILES` off the
rest, widened by a margin (the floor trims thin tails). A second pass does the same within the
first pass's window, one bin wider on each side, to resolve a feature whose customers share one
coarse bin. Each feature is then clipped to its
window and rescaled to [0, 1] (`FeatureSpec.ranges`): a public, DP-derived transformation,
applied the same way in every BU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from federation.features import FeatureSpec

RANGE_BINS = 32
RANGE_QUANTILES = (0.02, 0.98)
NOISE_FLOOR = 4.0  # a bin counts only when its noisy sum exceeds this many noise deviations
# The floor trims thin tails (on 36,000 normal values in 12 BUs to about +-1.3 standard
# deviations); each window is widened by this share of its width on both sides, back to about the
# 1% and 99% quantiles, so that clipping keeps the tails' order without letting them dominate.
MARGIN = 0.5
UNIT = (0.0, 1.0)

Window = tuple[float, float]


def sensitivity(spec: FeatureSpec) -> float:
    """L2 sensitivity of the histogram vector: one count per scalar feature per customer."""
    return math.sqrt(len(spec.scalar_outputs))


def histogram_vector(
    features: np.ndarray,
    spec: FeatureSpec,
    windows: Mapping[str, Window] | None = None,
    bins: int = RANGE_BINS,
) -> np.ndarray:
    """Per scalar feature (in `spec.scalar_outputs` order), the counts of customers whose value,
    clipped to the feature's window (the unit interval by default), falls in each of `bins`
    equal bins of the window: one integer vector of `len(scalar_outputs) * bins` counts."""
    names = spec.output_names
    counts = []
    for name in spec.scalar_outputs:
        low, high = (windows or {}).get(name, UNIT)
        values = np.clip(features[:, names.index(name)].astype(np.float64), low, high)
        edges = np.linspace(low, high, bins + 1)
        counts.append(np.histogram(values, bins=edges)[0])
    if not counts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(counts).astype(np.int64)


def windows_from_histograms(
    summed: np.ndarray,
    spec: FeatureSpec,
    noise_std: float,
    windows: Mapping[str, Window] | None = None,
    *,
    bins: int = RANGE_BINS,
    quantiles: tuple[float, float] = RANGE_QUANTILES,
) -> dict[str, Window]:
    """The window of each scalar feature read off the noisy summed histograms (`histogram_vector`
    over the same `windows`): bins below `NOISE_FLOOR` x `noise_std` (the std of one summed bin)
    are set to zero, then the lower and upper `quantiles` of what is left bound the window (the
    lower edge of the bin holding the lower quantile, the upper edge of the bin holding the upper
    one), widened by `MARGIN` of its width on each side within the previous window. A feature
    with nothing above the floor keeps its window."""
    names = spec.scalar_outputs
    if summed.shape != (len(names) * bins,):
        raise ValueError(
            f"the summed histograms have {summed.shape[0]} values; {len(names)} scalar features "
            f"of {bins} bins need {len(names) * bins}"
        )
    found: dict[str, Window] = {}
    for i, name in enumerate(names):
        low, high = (windows or {}).get(name, UNIT)
        counts = np.asarray(summed[i * bins : (i + 1) * bins], dtype=np.float64)
        counts = np.where(counts > NOISE_FLOOR * noise_std, counts, 0.0)
        total = counts.sum()
        if total <= 0:
            found[name] = (low, high)
            continue
        edges = np.linspace(low, high, bins + 1)
        cumulative = np.cumsum(counts) / total
        first = int(np.searchsorted(cumulative, quantiles[0], side="right"))
        last = int(np.searchsorted(cumulative, quantiles[1], side="left"))
        lower, upper = float(edges[first]), float(edges[min(last + 1, bins)])
        if upper <= lower:
            found[name] = (low, high)
            continue
        margin = MARGIN * (upper - lower)
        found[name] = (max(low, lower - margin), min(high, upper + margin))
    return found


def widened(
    windows: Mapping[str, Window],
    previous: Mapping[str, Window] | None = None,
    bins: int = RANGE_BINS,
) -> dict[str, Window]:
    """Each window one bin of the `previous` pass (the unit interval by default) wider on both
    sides, within the unit interval: the next pass's windows, so that a quantile the previous
    pass's noise moved by a bin is still inside."""
    out = {}
    for name, (low, high) in windows.items():
        before_low, before_high = (previous or {}).get(name, UNIT)
        step = (before_high - before_low) / bins
        out[name] = (max(UNIT[0], low - step), min(UNIT[1], high + step))
    return out
