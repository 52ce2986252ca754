"""Feature ranges from DP statistics: where the customers' values lie, so that DP-SGD sees them.

A scalar feature (a numeric attribute, tenure, recency, frequency, monetary value) is scaled to
[0, 1] by the bounds its schema declares. Declared bounds are public and wide: a balance declared
in [-8,100, 110,000] puts nearly every customer in a sliver of the unit interval, and plain SGD,
which moves every weight at the same rate, needs many more steps for such a feature than DP-SGD's
budget allows. On UCI bank marketing this alone kept DP-FedAvg about 0.01 AUC below a centralised
logistic regression (docs/benchmarks.md).

The fix costs a small share of the budget and no trust. Before the first training round (the
`ranges` exchange, `federation.exchanges`), every BU releases, for each scalar feature, a histogram
of its training customers' values over `RANGE_BINS` equal bins of the unit interval, with Gaussian
noise (one customer adds one count to each feature's histogram: L2 sensitivity
sqrt(scalar features)). The coordinator sums the histograms, zeroes every bin whose sum is not
clearly above the noise (`NOISE_FLOOR` standard deviations), and reads the `RANGE_QUANTILES` off
the rest, widened by a margin (the floor trims thin tails). A window that could clip more than
`CLIPPED_SHARE` of the BUs' training customers is not taken (the floor can drop customers spread
thinly over many bins as well). Each feature is then clipped to its window and rescaled to [0, 1]
(`FeatureSpec.ranges`): a public, DP-derived transformation, applied the same way in every BU and
in the saved model.

One pass of fine bins resolves the narrow features as well as a coarse pass followed by a fine
pass within its window, at the same budget (on bank marketing, every window within 1.4x of the
true 1%-99% range at epsilon 3), and needs one exchange instead of two.
"""

from __future__ import annotations

import math

import numpy as np

from federation.features import FeatureSpec, Frequency, Monetary, Numeric, Recency, Tenure
from federation.release import Part, ReleaseLayout, layout_of

RANGE_BINS = 128
RANGE_QUANTILES = (0.02, 0.98)
NOISE_FLOOR = 4.0  # a bin counts only when its noisy sum exceeds this many noise deviations
# The floor trims thin tails (on 36,000 normal values in 12 BUs to about +-1.3 standard
# deviations); each window is widened by this share of its width on both sides, back to about the
# 1% and 99% quantiles, so that clipping keeps the tails' order without letting them dominate.
MARGIN = 0.5
# A window is kept only when the customers it would clip are, with the noise allowed for, at most
# this share of all: the floor can also drop real customers spread thinly over many bins (a spike
# at zero purchases and the rest spread out), and a window around the spike alone would clip them.
CLIPPED_SHARE = 0.1
CONFIDENCE = 2.0  # noise deviations added to the clipped count before it is compared
UNIT = (0.0, 1.0)

Window = tuple[float, float]


def sensitivity(spec: FeatureSpec) -> float:
    """L2 sensitivity of the histogram vector: one count per scalar feature per customer."""
    return math.sqrt(len(spec.scalar_outputs))


def ranges_layout(spec: FeatureSpec, bins: int = RANGE_BINS) -> ReleaseLayout:
    """The release of the `ranges` exchange: every scalar feature's histogram, one part."""
    return layout_of([Part("histograms", len(spec.scalar_outputs) * bins, sensitivity(spec))])


def histogram_vector(features: np.ndarray, spec: FeatureSpec, bins: int = RANGE_BINS) -> np.ndarray:
    """Per scalar feature (in `spec.scalar_outputs` order), the counts of customers whose value
    on the declared [0, 1] scale falls in each of `bins` equal bins: one integer vector of
    `len(scalar_outputs) * bins` counts. `features` must be on the declared scale (a spec without
    `ranges`)."""
    if spec.ranges:
        raise ValueError("the histograms are taken on the declared scale, before any range")
    names = spec.output_names
    edges = np.linspace(*UNIT, bins + 1)
    counts = [
        np.histogram(np.clip(features[:, names.index(name)].astype(np.float64), *UNIT), edges)[0]
        for name in spec.scalar_outputs
    ]
    if not counts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(counts).astype(np.int64)


def windows_from_histograms(
    summed: np.ndarray,
    spec: FeatureSpec,
    noise_std: float,
    customers: int,
    *,
    bins: int = RANGE_BINS,
    quantiles: tuple[float, float] = RANGE_QUANTILES,
) -> dict[str, Window]:
    """The window of each scalar feature read off the noisy summed histograms
    (`histogram_vector`): bins below `NOISE_FLOOR` x `noise_std` (the std of one summed bin) are
    set to zero, then the lower and upper `quantiles` of what is left bound the window (the lower
    edge of the bin holding the lower quantile, the upper edge of the bin holding the upper one),
    widened by `MARGIN` of its width on each side within [0, 1]. A feature keeps the whole unit
    interval when nothing is above the floor, or when the customers outside its window may exceed
    `CLIPPED_SHARE` of all: `customers` (the BUs' training customers, disclosed with every reply)
    less the noisy sum of the bins wholly inside, plus `CONFIDENCE` deviations of that sum's
    noise."""
    names = spec.scalar_outputs
    if summed.shape != (len(names) * bins,):
        raise ValueError(
            f"the summed histograms have {summed.shape[0]} values; {len(names)} scalar features "
            f"of {bins} bins need {len(names) * bins}"
        )
    edges = np.linspace(*UNIT, bins + 1)
    found: dict[str, Window] = {}
    for i, name in enumerate(names):
        noisy = np.asarray(summed[i * bins : (i + 1) * bins], dtype=np.float64)
        counts = np.where(noisy > NOISE_FLOOR * noise_std, noisy, 0.0)
        total = counts.sum()
        if total <= 0:
            found[name] = UNIT
            continue
        cumulative = np.cumsum(counts) / total
        first = int(np.searchsorted(cumulative, quantiles[0], side="right"))
        last = int(np.searchsorted(cumulative, quantiles[1], side="left"))
        lower, upper = float(edges[first]), float(edges[min(last + 1, bins)])
        margin = MARGIN * (upper - lower)
        window = (max(UNIT[0], lower - margin), min(UNIT[1], upper + margin))
        inside = slice(math.ceil(window[0] * bins - 1e-9), math.floor(window[1] * bins + 1e-9))
        clipped = customers - noisy[inside].sum()
        bound = clipped + CONFIDENCE * math.sqrt(inside.stop - inside.start) * noise_std
        found[name] = window if bound <= CLIPPED_SHARE * customers else UNIT
    return found


def apply_ranges(features: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """`features` on the declared scale with each windowed feature clipped to its window and
    rescaled to [0, 1]; the spec's other features as they are."""
    out = np.array(features, dtype=np.float32, copy=True)
    names = spec.output_names
    for name, (low, high) in spec.ranges.items():
        j = names.index(name)
        out[:, j] = (np.clip(out[:, j], low, high) - low) / (high - low)
    return out


def natural_window(spec: FeatureSpec, name: str, window: Window) -> Window:
    """A window in the feature's own units (the inverse of its declared scaling)."""
    feature = next(f for f in spec.features if f.name == name)
    if isinstance(feature, Numeric):
        lower, upper, log = feature.lower, feature.upper, feature.log_scale
    elif isinstance(feature, Recency | Tenure):
        lower, upper, log = 0.0, feature.upper_days, False
    elif isinstance(feature, Frequency | Monetary):
        lower, upper, log = 0.0, feature.upper, True
    else:
        raise ValueError(f"'{name}' is not a scalar feature")

    def back(u: float) -> float:
        if log:
            return lower + math.expm1(u * math.log1p(upper - lower))
        return lower + u * (upper - lower)

    return back(window[0]), back(window[1])
