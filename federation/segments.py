"""Federated k-means customer segmentation on RFM features: the spec, the public initialisation,
the release layout of one iteration, and the coordinator's centroid update.

Lloyd's algorithm splits into an additive part and a division. Given the round's centroids (public:
the previous round's DP output), every BU assigns each of its customers to the nearest centroid and
sums, per cluster, the customers' features and their number; the coordinator adds the BUs' vectors
and divides. Only the per-cluster sums and counts leave a silo, as one discrete Gaussian release per
iteration (Su et al., "Differentially private k-means clustering", CODASPY 2016, for the
sums-and-counts form; `privacy.mechanisms` for the noise and its accounting).

Sensitivity. Features are the federation's RFM features, scaled to [0, 1] with the declared bounds
of the silos' schemas (never the data), clipped to [0, 1] and quantised to integers
`round(value x grid_steps)` on a public grid. A customer sits in exactly one cluster, so adding or
removing one changes one cluster's sums by a vector of L2 norm at most `grid_steps x sqrt(dim)` and
one count by 1: the two parts of the release and their sensitivities, whatever the centroids are.
The quantised grid is also what makes the federated step equal, exactly, to a pooled Lloyd step on
the union of the BUs' quantised features when the noise is off: integer sums are associative.

Initialisation spends no raw data and no extra release:
- `cells` (default): the first iteration is a Lloyd step whose "centroids" are the centres of a
  public grid of cells over [0, 1]^dim (at least 8k cells), so the BUs release noisy cell sums and
  counts, a coarse DP histogram with the cells' means; the coordinator reduces them to k seeds by a
  deterministic weighted k-means (post-processing, free). This is one of the `iterations`.
- `grid`: k well-spread public points, the k-means quantiser of the uniform distribution on the
  cube. Data-free, but Lloyd's algorithm then finds a poor local optimum more often (docs/segments.md
  has the measurements).

A cluster whose noisy count is below `min_cluster_count`, or whose centroid would carry noise of a
standard deviation above `max_centroid_noise` (from the public noise of the sum), keeps its previous
centroid: dividing noise by a handful of customers would throw a centroid anywhere.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from federation.features import Feature, FeatureSpec, Frequency, Monetary, Recency
from federation.release import Part, ReleaseLayout, layout_of
from privacy.errors import ConfigurationError
from privacy.mechanisms import NoiseInSum, ratio_interval
from privacy.schema import ColumnType
from privacy.unit_config import UnitConfig

SEGMENT_FEATURES = ("recency", "frequency", "monetary")
NATURAL_UNITS = {
    "recency": "days since the last purchase",
    "frequency": "purchases in the look-back window",
    "monetary": "mean purchase amount",
}
_CELLS_PER_CLUSTER = 8  # the cells initialisation's grid has at least 8k cells
_LATTICE_POINTS = 4096  # the uniform lattice whose k-means quantiser is the `grid` initialisation
_SEEDING_STARTS = 10  # deterministic restarts of the coordinator's weighted k-means
_MAX_LLOYD_STEPS = 100


class SegmentsSpec(BaseModel):
    """A segmentation job: the job TOML's `[segments]` table."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    purpose: str = Field("segmentation", min_length=1)
    k: int = Field(ge=2, le=20, description="number of segments")
    iterations: int = Field(
        5, ge=1, le=50, description="federated rounds; each is one DP release by every BU"
    )
    init: Literal["cells", "grid"] = "cells"
    features: tuple[str, ...] = SEGMENT_FEATURES
    grid_steps: int = Field(
        1000, ge=1, le=1_000_000, description="a feature in [0, 1] travels as round(value x steps)"
    )
    lookback_days: int = Field(365, ge=1)
    frequency_upper: float = Field(
        52.0, gt=0, description="purchases in the look-back window at which frequency saturates"
    )
    min_cluster_count: int = Field(
        10, ge=1, description="a cluster with a smaller noisy count keeps its previous centroid"
    )
    max_centroid_noise: float = Field(
        0.05,
        gt=0,
        description="a cluster whose centroid's noise would have a larger standard deviation "
        "(feature units, [0, 1]) keeps its previous centroid",
    )
    level: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")

    @model_validator(mode="after")
    def _features_and_init_fit(self) -> SegmentsSpec:
        unknown = [f for f in self.features if f not in SEGMENT_FEATURES]
        if not self.features or unknown:
            raise ValueError(
                f"segments.features: {list(unknown) or 'empty'}; choose among {SEGMENT_FEATURES}"
            )
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"segments.features names a feature twice: {self.features}")
        if self.init == "cells" and self.iterations < 2:
            raise ValueError(
                "segments.iterations: init = 'cells' spends the first iteration on the seeding "
                "step; use at least 2 iterations, or init = 'grid'"
            )
        return self

    @property
    def dim(self) -> int:
        return len(self.features)

    @property
    def releases(self) -> int:
        """DP releases per BU: one per iteration (the initialisation spends none of its own)."""
        return self.iterations

    @property
    def cells_per_feature(self) -> int:
        """Cells per axis of the `cells` initialisation: the fewest with at least 8k cells."""
        per_axis = 2
        while per_axis**self.dim < _CELLS_PER_CLUSTER * self.k:  # integers: no float root
            per_axis += 1
        return per_axis

    @property
    def round_clusters(self) -> tuple[int, ...]:
        """The numbers of centroids a round may carry: the cells of the seeding round, and k."""
        if self.init == "cells":
            return (self.cells_per_feature**self.dim, self.k)
        return (self.k,)


# --- features ------------------------------------------------------------------------------------


def _unit_features(config: UnitConfig, spec: SegmentsSpec) -> FeatureSpec:
    def bounds(qualified: str, *types: ColumnType):
        column = config.column(qualified)
        if column.type not in types:
            raise ConfigurationError(
                f"unit '{config.unit}': segmentation needs '{qualified}' of type "
                f"{'/'.join(types)}, but the schema declares '{column.type}'."
            )
        if column.lower is None:
            raise ConfigurationError(
                f"unit '{config.unit}': segmentation scales '{qualified}' by its declared bounds; "
                "declare 'lower' and 'upper' for it in the schema."
            )
        return column.lower, column.upper

    ts_lower, ts_upper = bounds("transactions.timestamp", ColumnType.DATETIME, ColumnType.DATE)
    window = min(spec.lookback_days, (ts_upper - ts_lower).days)
    features: list[Feature] = []
    for name in spec.features:
        if name == "recency":
            features.append(Recency(name=name, upper_days=window))
        elif name == "frequency":
            features.append(Frequency(name=name, upper=spec.frequency_upper))
        else:
            _, amount_upper = bounds("transactions.amount", ColumnType.FLOAT, ColumnType.INTEGER)
            features.append(Monetary(name=name, upper=amount_upper))
    return FeatureSpec(
        observation_date=ts_upper, lookback_days=window, label=None, features=tuple(features)
    )


def segment_feature_spec(configs: Sequence[UnitConfig], spec: SegmentsSpec) -> FeatureSpec:
    """The segmentation features (RFM, in `spec.features` order) with bounds read from the BUs'
    declared schemas; every BU must declare the same bounds, or its features would not mean the
    same thing as the others'."""
    if not configs:
        raise ConfigurationError("no BU schema to resolve the segmentation features from")
    specs = {config.unit: _unit_features(config, spec) for config in configs}
    first_unit, first = next(iter(specs.items()))
    different = [unit for unit, unit_spec in specs.items() if unit_spec != first]
    if different:
        raise ConfigurationError(
            f"units {different} declare other bounds than unit '{first_unit}' for the "
            "segmentation columns (transactions.timestamp, transactions.amount); align their "
            "schemas' lower and upper bounds first."
        )
    return first


# --- public initialisation and layout ---------------------------------------------------------------


def _check_dim(spec: SegmentsSpec, dim: int) -> None:
    if dim != spec.dim:
        raise ValueError(f"segmentation on {spec.features} has dimension {spec.dim}, not {dim}")


def _cell_centres(per_axis: int, dim: int) -> np.ndarray:
    axis = (np.arange(per_axis, dtype=np.float64) + 0.5) / per_axis
    return np.array(list(itertools.product(axis, repeat=dim)), dtype=np.float64)


@functools.cache
def _spread_points(k: int, dim: int) -> np.ndarray:
    per_axis = max(2, round(_LATTICE_POINTS ** (1 / dim)))
    lattice = _cell_centres(per_axis, dim)
    return _weighted_kmeans(lattice, np.ones(len(lattice)), k)


def initial_centroids(spec: SegmentsSpec, dim: int) -> np.ndarray:
    """The first round's centroids, public and data-free: the cell centres of the seeding grid
    (`cells`, shape (cells, dim)) or k well-spread points (`grid`, shape (k, dim)), in [0, 1]."""
    _check_dim(spec, dim)
    if spec.init == "cells":
        return _cell_centres(spec.cells_per_feature, dim)
    return _spread_points(spec.k, dim).copy()


def segments_layout(spec: SegmentsSpec, dim: int, clusters: int | None = None) -> ReleaseLayout:
    """One iteration's release for a round with `clusters` centroids (k unless given): per-cluster
    sums of quantised features ("sums") and customer counts ("counts")."""
    _check_dim(spec, dim)
    clusters = spec.k if clusters is None else clusters
    if clusters not in spec.round_clusters:
        raise ValueError(
            f"a segmentation round carries {' or '.join(map(str, spec.round_clusters))} "
            f"centroids, not {clusters}"
        )
    return layout_of(
        [
            Part("sums", clusters * dim, spec.grid_steps * math.sqrt(dim)),
            Part("counts", clusters, 1.0),
        ]
    )


# --- shared by the BUs and the coordinator -------------------------------------------------------


def quantise(features: np.ndarray, spec: SegmentsSpec) -> np.ndarray:
    """Features clipped to [0, 1] and put on the public grid: int64 `round(value x grid_steps)`.
    The clipping is what bounds a customer's contribution, whatever the caller passed."""
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != spec.dim:
        raise ValueError(f"features must be (customers, {spec.dim}), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("features contain NaN or infinite values; compute_features never does")
    return np.rint(np.clip(values, 0.0, 1.0) * spec.grid_steps).astype(np.int64)


def assign(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of each row's nearest centroid (squared Euclidean distance), ties to the lowest."""
    points = np.asarray(features, dtype=np.float64)
    centres = np.asarray(centroids, dtype=np.float64)
    if points.ndim != 2 or centres.ndim != 2 or points.shape[1] != centres.shape[1]:
        raise ValueError(
            f"features {points.shape} and centroids {centres.shape} must be 2-D of equal width"
        )
    # One centroid at a time keeps memory at (rows, clusters), not (rows, clusters, dim).
    distances = np.stack([((points - centre) ** 2).sum(axis=1) for centre in centres], axis=1)
    return np.argmin(distances, axis=1)


def check_centroids(centroids: np.ndarray, spec: SegmentsSpec) -> np.ndarray:
    """The round's centroids as float64, refused unless finite and shaped as the spec allows."""
    centres = np.asarray(centroids, dtype=np.float64)
    if (
        centres.ndim != 2
        or centres.shape[1] != spec.dim
        or centres.shape[0] not in spec.round_clusters
    ):
        raise ValueError(
            f"a segmentation round's centroids are ({' or '.join(map(str, spec.round_clusters))}"
            f", {spec.dim}), got {centres.shape}"
        )
    if not np.isfinite(centres).all():
        raise ValueError("centroids contain NaN or infinite values")
    return centres


# --- the coordinator's update --------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentsUpdate:
    """The result of one iteration: the next centroids, and the noisy sizes of the clusters the
    iteration assigned customers to (with their intervals at `level`)."""

    centroids: np.ndarray  # (k, dim) float64 in [0, 1]
    sizes: np.ndarray  # (k,) int64, noisy counts clipped at 0
    size_intervals: np.ndarray  # (k, 2) int64
    updated: np.ndarray  # (k,) bool: False where the cluster kept its previous centroid
    centroid_intervals: np.ndarray  # (k, dim, 2) float64; NaN where no interval applies
    level: float

    def to_json(self, feature_names: Sequence[str], features: FeatureSpec | None = None) -> dict:
        """The segments for results.json; with the FeatureSpec, centroids in natural units too
        (the scaling inverted; for frequency and monetary, a mean on the log1p scale)."""
        names = tuple(feature_names)
        if len(names) != self.centroids.shape[1]:
            raise ValueError(f"{len(names)} feature names for {self.centroids.shape[1]} features")
        by_name = {f.name: f for f in features.features} if features is not None else {}
        segments = []
        for j in range(len(self.centroids)):
            entry: dict = {
                "segment": j,
                "size": int(self.sizes[j]),
                "size_interval": [int(v) for v in self.size_intervals[j]],
                "updated": bool(self.updated[j]),
                "centroid": {n: float(v) for n, v in zip(names, self.centroids[j], strict=True)},
                "centroid_interval": {
                    n: None if np.isnan(lo) else [float(lo), float(hi)]
                    for n, (lo, hi) in zip(names, self.centroid_intervals[j], strict=True)
                },
            }
            if by_name:
                entry["centroid_natural"] = {
                    n: _natural(by_name[n], float(v))
                    for n, v in zip(names, self.centroids[j], strict=True)
                }
            segments.append(entry)
        out: dict = {"level": self.level, "segments": segments}
        if by_name:
            out["natural_units"] = {n: NATURAL_UNITS[n] for n in names if n in NATURAL_UNITS}
        return out


def _natural(feature: Feature, value: float) -> float:
    """The inverse of `clients.features`' scaling of a segmentation feature."""
    if isinstance(feature, Recency):
        return value * feature.upper_days
    if isinstance(feature, Frequency | Monetary):
        return float(np.expm1(value * np.log1p(feature.upper)))
    raise ValueError(f"feature '{feature.name}' is not a segmentation feature")


def update_centroids(
    total: np.ndarray,
    noise: dict[str, NoiseInSum],
    centroids: np.ndarray,
    spec: SegmentsSpec,
) -> SegmentsUpdate:
    """The coordinator's step from the summed release of a round with `centroids`: the Lloyd
    update (k centroids), or, after the seeding round of `cells` (one centroid per cell), the
    reduction of the noisy cells to k seeds."""
    centres = check_centroids(centroids, spec)
    clusters, dim = centres.shape
    layout = segments_layout(spec, dim, clusters)
    missing = {"sums", "counts"} - set(noise)
    if missing:
        raise ValueError(f"the noise of parts {sorted(missing)} is missing")
    values = layout.check(total)
    spans = layout.slices()
    sums = values[spans["sums"]].reshape(clusters, dim)
    counts = values[spans["counts"]]
    means, usable = _noisy_means(sums, counts, noise["sums"], spec)
    if clusters != spec.k:
        return _seeds_from_cells(centres, means, usable, counts, noise["counts"], spec)

    new = centres.copy()
    new[usable] = means[usable]
    half = noise["counts"].quantile(spec.level)
    intervals = np.full((clusters, dim, 2), np.nan)
    for j in np.flatnonzero(usable):
        for i in range(dim):
            lo, hi = ratio_interval(
                sums[j, i] / spec.grid_steps,
                float(counts[j]),
                noise["sums"].scaled(1 / spec.grid_steps),
                noise["counts"],
                level=spec.level,
            )
            intervals[j, i] = (max(lo, 0.0), min(hi, 1.0))
    return SegmentsUpdate(
        centroids=new,
        sizes=np.maximum(counts, 0),
        size_intervals=np.stack([np.maximum(counts - half, 0), np.maximum(counts + half, 0)], 1),
        updated=usable,
        centroid_intervals=intervals,
        level=spec.level,
    )


def _noisy_means(
    sums: np.ndarray, counts: np.ndarray, sum_noise: NoiseInSum, spec: SegmentsSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster means in [0, 1], and which of them are usable: enough customers, and noise
    on the mean no larger than `max_centroid_noise` (judged from the public noise, not data)."""
    enough = counts >= spec.min_cluster_count
    safe = np.where(enough, counts, 1)
    mean_noise = sum_noise.std / (spec.grid_steps * safe)
    usable = enough & (mean_noise <= spec.max_centroid_noise)
    # Integer sums divided once: the pooled Lloyd step on the same quantised features gives the
    # very same floats.
    means = np.clip(sums / (spec.grid_steps * safe[:, None]), 0.0, 1.0)
    return means, usable


def _seeds_from_cells(
    cells: np.ndarray,
    means: np.ndarray,
    usable: np.ndarray,
    counts: np.ndarray,
    count_noise: NoiseInSum,
    spec: SegmentsSpec,
) -> SegmentsUpdate:
    """k seeds from the seeding round: each cell stands at its noisy mean (at its public centre
    where the mean is too noisy), weighted by its noisy count; a weighted k-means reduces them."""
    points = np.where(usable[:, None], means, cells)
    weights = np.maximum(counts, 0).astype(np.float64)
    seeds = _weighted_kmeans(points, weights, spec.k)
    members = assign(points, seeds)
    sizes = np.bincount(members, weights=counts, minlength=spec.k).astype(np.int64)
    cells_in = np.bincount(members, minlength=spec.k)
    # A sum of many independent discrete Gaussians: the normal quantile, as `ratio_interval` uses.
    scale = NormalDist().inv_cdf(0.5 + spec.level / 2)
    half = np.ceil(scale * count_noise.std * np.sqrt(cells_in)).astype(np.int64)
    return SegmentsUpdate(
        centroids=seeds,
        sizes=np.maximum(sizes, 0),
        size_intervals=np.stack([np.maximum(sizes - half, 0), np.maximum(sizes + half, 0)], 1),
        updated=np.bincount(members, weights=weights, minlength=spec.k) > 0,
        centroid_intervals=np.full((spec.k, cells.shape[1], 2), np.nan),
        level=spec.level,
    )


def _weighted_kmeans(points: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Deterministic weighted k-means: greedy k-means++ seeding (the next seed maximises weight x
    squared distance) from each of the heaviest points in turn, Lloyd steps to a fixed point, and
    the solution of least weighted squared error. No randomness: it post-processes public values."""
    n = len(points)
    order = np.argsort(-weights, kind="stable")
    tie_break = -np.arange(n)  # on equal scores, the lowest index
    best, best_error = points[:0], math.inf
    for first in order[: min(n, _SEEDING_STARTS)]:
        seeds = [points[first]]
        nearest = ((points - points[first]) ** 2).sum(axis=1)
        while len(seeds) < k:
            pick = np.lexsort((tie_break, nearest, weights * nearest))[-1]
            seeds.append(points[pick])
            nearest = np.minimum(nearest, ((points - points[pick]) ** 2).sum(axis=1))
        centres = np.array(seeds)
        for _ in range(_MAX_LLOYD_STEPS):
            labels = assign(points, centres)
            mass = np.bincount(labels, weights=weights, minlength=k)
            moved = centres.copy()
            for i in range(points.shape[1]):
                total = np.bincount(labels, weights=weights * points[:, i], minlength=k)
                moved[mass > 0, i] = total[mass > 0] / mass[mass > 0]
            if np.array_equal(moved, centres):
                break
            centres = moved
        labels = assign(points, centres)
        error = float((weights * ((points - centres[labels]) ** 2).sum(axis=1)).sum())
        if error < best_error:
            best, best_error = centres, error
    return best
