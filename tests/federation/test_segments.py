"""Segmentation's public side: the spec, the features from declared bounds, the data-free
initialisation, the release layout and the coordinator's centroid update."""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pytest
from pydantic import ValidationError

from federation.features import Frequency, Monetary, Recency
from federation.segments import (
    SegmentsSpec,
    SegmentsUpdate,
    assign,
    initial_centroids,
    quantise,
    segment_feature_spec,
    segments_layout,
    update_centroids,
)
from privacy.errors import ConfigurationError, PolicyViolation
from privacy.mechanisms import NoiseInSum, Placement
from privacy.samplers import SeededSource
from privacy.unit_config import UnitConfig
from simulations.synthetic import unit_schema

SPEC = SegmentsSpec(k=4)
EXACT = {"sums": NoiseInSum(()), "counts": NoiseInSum(())}


def _config(unit: str, **column_changes: dict) -> UnitConfig:
    """A synthetic BU's schema with `transactions` columns changed (None removes one, and the
    purposes that name it)."""
    data = unit_schema(unit).model_dump()
    columns = data["tables"]["transactions"]["columns"]
    for name, change in column_changes.items():
        if change is None:
            del columns[name]
            data["purposes"] = {}
        else:
            columns[name] = {**columns[name], **change}
    return UnitConfig.model_validate(data)


def _vector(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(sums, dtype=np.int64).ravel(), np.asarray(counts, np.int64)])


# --- the spec ------------------------------------------------------------------------------------


def test_the_spec_has_the_documented_defaults() -> None:
    assert SPEC.purpose == "segmentation"
    assert (SPEC.iterations, SPEC.init, SPEC.grid_steps) == (5, "cells", 1000)
    assert SPEC.features == ("recency", "frequency", "monetary")
    assert SPEC.dim == 3 and SPEC.releases == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"k": 1},
        {"k": 21},
        {"k": 4, "iterations": 0},
        {"k": 4, "features": ("recency", "age")},
        {"k": 4, "features": ()},
        {"k": 4, "features": ("recency", "recency")},
        {"k": 4, "init": "random"},
        {"k": 4, "grid_steps": 0},
        {"k": 4, "seed": 3},
    ],
)
def test_an_invalid_spec_is_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        SegmentsSpec.model_validate(bad)


def test_the_cells_initialisation_needs_a_second_iteration() -> None:
    with pytest.raises(ValidationError, match="at least 2 iterations"):
        SegmentsSpec(k=4, iterations=1)
    assert SegmentsSpec(k=4, iterations=1, init="grid").releases == 1


def test_the_spec_is_frozen() -> None:
    with pytest.raises(ValidationError):
        SPEC.k = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("k", "features", "per_axis"),
    [
        (4, ("recency", "frequency", "monetary"), 4),
        (20, ("recency", "frequency", "monetary"), 6),
        (4, ("recency", "monetary"), 6),
        (2, ("recency",), 16),
    ],
)
def test_the_seeding_grid_has_the_fewest_cells_that_make_eight_per_segment(
    k: int, features: tuple[str, ...], per_axis: int
) -> None:
    spec = SegmentsSpec(k=k, features=features)
    assert spec.cells_per_feature == per_axis
    assert per_axis ** len(features) >= 8 * k > (per_axis - 1) ** len(features)
    assert spec.round_clusters == (per_axis ** len(features), k)


# --- features from the declared bounds -----------------------------------------------------------


def test_the_features_are_rfm_with_the_declared_bounds_and_no_label() -> None:
    spec = segment_feature_spec([_config("a"), _config("b")], SPEC)
    assert spec.label is None
    assert spec.observation_date == datetime(2025, 12, 31)
    assert spec.lookback_days == 365
    assert spec.output_names == ("recency", "frequency", "monetary")
    recency, frequency, monetary = spec.features
    assert isinstance(recency, Recency) and recency.upper_days == 365
    assert isinstance(frequency, Frequency) and frequency.upper == 52.0
    assert isinstance(monetary, Monetary) and monetary.upper == 5000.0
    assert spec.columns == ("transactions.timestamp", "transactions.amount")


def test_the_features_follow_the_specs_order_and_subset() -> None:
    spec = SegmentsSpec(k=3, features=("monetary", "recency"), lookback_days=90)
    features = segment_feature_spec([_config("a")], spec)
    assert features.output_names == ("monetary", "recency")
    assert features.lookback_days == 90 and features.features[1].upper_days == 90


def test_units_declaring_other_bounds_are_named() -> None:
    configs = [_config("a"), _config("b", amount={"upper": 9000.0}), _config("c")]
    with pytest.raises(ConfigurationError, match=r"units \['b'\].*unit 'a'.*align"):
        segment_feature_spec(configs, SPEC)


def test_a_column_without_bounds_or_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"unit 'a'.*declare 'lower' and 'upper'"):
        segment_feature_spec([_config("a", amount={"lower": None, "upper": None})], SPEC)
    with pytest.raises(ConfigurationError, match=r"'transactions\.amount' of type float/integer"):
        segment_feature_spec(
            [_config("a", amount={"type": "string", "lower": None, "upper": None})], SPEC
        )
    with pytest.raises(PolicyViolation, match="does not declare"):
        segment_feature_spec([_config("a", amount=None)], SPEC)
    # without monetary, the amount column is not needed at all
    recency_only = SegmentsSpec(k=2, features=("recency",))
    assert segment_feature_spec([_config("a", amount=None)], recency_only).dim == 1


def test_no_unit_no_features() -> None:
    with pytest.raises(ConfigurationError, match="no BU schema"):
        segment_feature_spec([], SPEC)


# --- initialisation, layout, quantisation, assignment ---------------------------------------------


def test_the_cells_initialisation_is_the_public_grid_of_cell_centres() -> None:
    cells = initial_centroids(SPEC, 3)
    assert cells.shape == (64, 3)
    assert set(np.unique(cells)) == {0.125, 0.375, 0.625, 0.875}
    assert len(np.unique(cells, axis=0)) == 64


def test_the_grid_initialisation_is_k_public_well_spread_points() -> None:
    spec = SegmentsSpec(k=6, init="grid")
    points = initial_centroids(spec, 3)
    assert points.shape == (6, 3)
    assert ((points > 0) & (points < 1)).all()
    gaps = np.linalg.norm(points[:, None] - points[None], axis=2)[np.triu_indices(6, 1)]
    assert gaps.min() > 0.4  # the uniform cube's 6-point quantiser, not a cluster of points
    points[0] = 0.0  # callers get a copy
    assert (initial_centroids(spec, 3)[0] > 0).all()


def test_the_dimension_must_match_the_features() -> None:
    with pytest.raises(ValueError, match="dimension 3, not 2"):
        initial_centroids(SPEC, 2)
    with pytest.raises(ValueError, match="dimension 3"):
        segments_layout(SPEC, 4)


def test_the_layout_has_sums_and_counts_with_a_customers_sensitivity() -> None:
    layout = segments_layout(SPEC, 3)
    sums, counts = layout.parts
    assert (sums.name, sums.size, sums.sensitivity) == ("sums", 12, 1000 * math.sqrt(3))
    assert (counts.name, counts.size, counts.sensitivity) == ("counts", 4, 1.0)
    assert layout.size == 16
    seeding = segments_layout(SPEC, 3, clusters=64)
    assert [p.size for p in seeding.parts] == [192, 64]
    assert [p.sensitivity for p in seeding.parts] == [sums.sensitivity, 1.0]
    with pytest.raises(ValueError, match="64 or 4 centroids, not 5"):
        segments_layout(SPEC, 3, clusters=5)


def test_quantisation_clips_and_rounds_on_the_public_grid() -> None:
    spec = SegmentsSpec(k=2, features=("recency", "monetary"), grid_steps=10)
    values = np.array([[0.04, 0.06], [-0.3, 1.7], [0.25, 0.36]], dtype=np.float32)
    assert quantise(values, spec).tolist() == [[0, 1], [0, 10], [2, 4]]  # 2.5: half to even
    assert quantise(values, spec).dtype == np.int64
    with pytest.raises(ValueError, match="NaN"):
        quantise(np.array([[np.nan, 0.1]]), spec)
    with pytest.raises(ValueError, match=r"\(customers, 2\)"):
        quantise(np.zeros((3, 3)), spec)


def test_assignment_goes_to_the_nearest_centroid_ties_to_the_lowest_index() -> None:
    points = np.array([[0.5], [0.1], [0.9], [0.5]])
    assert assign(points, np.array([[0.0], [1.0]])).tolist() == [0, 0, 1, 0]
    assert assign(points, np.array([[1.0], [0.0]])).tolist() == [0, 1, 0, 0]
    assert assign(points, np.array([[0.2], [0.2], [0.8]])).tolist() == [0, 0, 2, 0]
    with pytest.raises(ValueError, match="equal width"):
        assign(points, np.zeros((2, 2)))


# --- the coordinator's update --------------------------------------------------------------------


def test_the_update_divides_the_summed_sums_by_the_counts() -> None:
    spec = SegmentsSpec(k=2, features=("recency", "monetary"), grid_steps=10, min_cluster_count=1)
    centroids = np.array([[0.2, 0.2], [0.8, 0.8]])
    total = _vector([[3, 6], [45, 50]], [10, 50])
    update = update_centroids(total, EXACT, centroids, spec)
    assert np.array_equal(update.centroids, [[0.03, 0.06], [0.09, 0.1]])
    assert update.sizes.tolist() == [10, 50]
    assert update.size_intervals.tolist() == [[10, 10], [50, 50]]
    assert update.updated.tolist() == [True, True]


def test_a_cluster_with_too_few_customers_keeps_its_centroid() -> None:
    spec = SegmentsSpec(k=3, features=("recency",), grid_steps=10, min_cluster_count=5)
    centroids = np.array([[0.1], [0.5], [0.9]])
    update = update_centroids(_vector([[8], [2], [-40]], [10, 4, -3]), EXACT, centroids, spec)
    assert np.array_equal(update.centroids, [[0.08], [0.5], [0.9]])
    assert update.updated.tolist() == [True, False, False]
    assert update.sizes.tolist() == [10, 4, 0]  # a negative noisy count reads as an empty cluster
    assert np.isnan(update.centroid_intervals[1:]).all()


def test_a_centroid_too_noisy_for_its_count_keeps_its_place() -> None:
    # sum noise of std 1,000 grid steps = 1 feature unit; / 30 customers = 0.033, / 10 = 0.1
    spec = SegmentsSpec(k=2, features=("recency",), grid_steps=1000, max_centroid_noise=0.05)
    noise = {"sums": NoiseInSum((1000.0,)), "counts": NoiseInSum((1.0,))}
    update = update_centroids(_vector([[9000], [3000]], [30, 10]), noise, [[0.2], [0.8]], spec)
    assert update.updated.tolist() == [True, False]
    assert update.centroids[:, 0].tolist() == [0.3, 0.8]


def test_centroids_stay_in_the_unit_cube_whatever_the_noise() -> None:
    spec = SegmentsSpec(k=2, features=("recency",), grid_steps=10, min_cluster_count=1)
    update = update_centroids(_vector([[-50], [900]], [20, 20]), EXACT, [[0.5], [0.5]], spec)
    assert update.centroids[:, 0].tolist() == [0.0, 1.0]


def test_the_update_refuses_a_malformed_round() -> None:
    centroids = initial_centroids(SegmentsSpec(k=4, init="grid"), 3)
    with pytest.raises(ValueError, match="16 integers"):
        update_centroids(np.zeros(15, dtype=np.int64), EXACT, centroids, SPEC)
    with pytest.raises(ValueError, match="16 integers"):
        update_centroids(np.zeros(16), EXACT, centroids, SPEC)
    with pytest.raises(ValueError, match="noise of parts"):
        update_centroids(np.zeros(16, dtype=np.int64), {"sums": NoiseInSum(())}, centroids, SPEC)
    with pytest.raises(ValueError, match=r"\(64 or 4, 3\)"):
        update_centroids(np.zeros(16, dtype=np.int64), EXACT, centroids[:3], SPEC)
    with pytest.raises(ValueError, match="NaN"):
        update_centroids(np.zeros(16, dtype=np.int64), EXACT, centroids * np.nan, SPEC)


def _noisy_release(spec, true_sums, true_counts, z, units, seed):
    """The sum of `units` BUs' releases under the local placement; the first BU holds all data."""
    layout = segments_layout(spec, spec.dim, len(true_counts))
    source = SeededSource(seed)
    exact = _vector(true_sums, true_counts)
    zero = np.zeros_like(exact)
    total = sum(
        layout.noisy(exact if i == 0 else zero, z, Placement.LOCAL, source) for i in range(units)
    )
    return total, layout.noise_in_sum(z, Placement.LOCAL, contributors=units)


def test_size_and_centroid_intervals_cover_the_truth_at_their_level() -> None:
    spec = SegmentsSpec(
        k=2, features=("recency", "monetary"), min_cluster_count=1, max_centroid_noise=1.0
    )
    counts = np.array([400, 150])
    truth = np.array([[0.3, 0.6], [0.7, 0.1]])
    sums = np.rint(truth * counts[:, None] * spec.grid_steps).astype(np.int64)
    centroids = np.array([[0.25, 0.5], [0.75, 0.25]])
    size_hits = centroid_hits = 0
    trials = 300
    for seed in range(trials):
        total, noise = _noisy_release(spec, sums, counts, 3.0, 5, seed)
        update = update_centroids(total, noise, centroids, spec)
        low, high = update.size_intervals.T
        size_hits += int(((low <= counts) & (counts <= high)).sum())
        low, high = update.centroid_intervals[..., 0], update.centroid_intervals[..., 1]
        centroid_hits += int(((low <= truth) & (truth <= high)).sum())
    # 95% intervals: 600 sizes and 1,200 coordinates; a binomial 4-sigma margin
    assert size_hits / (2 * trials) > 0.95 - 4 * math.sqrt(0.95 * 0.05 / 600)
    assert centroid_hits / (4 * trials) > 0.95 - 4 * math.sqrt(0.95 * 0.05 / 1200)
    assert size_hits / (2 * trials) < 1.0  # the intervals are not vacuous
    assert centroid_hits / (4 * trials) < 1.0


def test_the_seeding_round_reduces_the_cells_to_k_seeds_at_the_planted_centres() -> None:
    spec = SegmentsSpec(k=3, features=("recency", "monetary"), min_cluster_count=1)
    cells = initial_centroids(spec, 2)  # 5 x 5 cells for k = 3 in 2-D
    assert cells.shape == (25, 2)
    planted = np.array([[0.1, 0.1], [0.5, 0.9], [0.9, 0.3]])
    sizes = np.array([300, 200, 100])
    points = np.repeat(planted, sizes, axis=0)
    labels = assign(points, cells)
    counts = np.bincount(labels, minlength=25)
    sums = np.zeros((25, 2), dtype=np.int64)
    np.add.at(sums, labels, quantise(points, spec))
    update = update_centroids(_vector(sums, counts), EXACT, cells, spec)
    order = np.argsort(update.centroids[:, 0])
    assert np.array_equal(update.centroids[order], planted)
    assert update.sizes[order].tolist() == [300, 200, 100]
    assert update.updated.all()
    assert np.isnan(update.centroid_intervals).all()


def test_the_seeding_round_ignores_noisy_empty_cells() -> None:
    spec = SegmentsSpec(k=2, features=("recency", "monetary"), min_cluster_count=5)
    cells = initial_centroids(spec, 2)  # 4 x 4 cells
    counts = np.zeros(16, dtype=np.int64)
    sums = np.zeros((16, 2), dtype=np.int64)
    counts[0], sums[0] = 500, (50_000, 60_000)  # (0.1, 0.12) in the cell at (0.125, 0.125)
    counts[15], sums[15] = 400, (360_000, 380_000)  # (0.9, 0.95)
    counts[5], sums[5] = 3, (3000, 0)  # 3 customers' noise: a wild mean, too few to use
    counts[9] = -2  # noise below zero weighs nothing
    update = update_centroids(_vector(sums, counts), EXACT, cells, spec)
    # the 3 customers weigh in at their cell's public centre (0.375, 0.375), not at (1.0, 0.0)
    expected = (500 * np.array([0.1, 0.12]) + 3 * np.array([0.375, 0.375])) / 503
    assert np.allclose(update.centroids, [expected, [0.9, 0.95]], rtol=0, atol=1e-12)
    assert update.sizes.tolist() == [501, 400]


def test_the_segments_read_as_json_in_feature_and_natural_units() -> None:
    features = segment_feature_spec([_config("a")], SPEC)
    update = SegmentsUpdate(
        centroids=np.array([[0.5, 0.0, 1.0], [0.0, 1.0, 0.5]]),
        sizes=np.array([120, 0]),
        size_intervals=np.array([[100, 140], [0, 20]]),
        updated=np.array([True, False]),
        centroid_intervals=np.array([[[0.4, 0.6], [0.0, 0.1], [0.9, 1.0]], [[np.nan, np.nan]] * 3]),
        level=0.95,
    )
    out = update.to_json(features.output_names, features)
    first, second = out["segments"]
    assert first["size"] == 120 and first["size_interval"] == [100, 140]
    assert first["centroid"] == {"recency": 0.5, "frequency": 0.0, "monetary": 1.0}
    assert first["centroid_interval"]["recency"] == [0.4, 0.6]
    assert second["centroid_interval"] == {"recency": None, "frequency": None, "monetary": None}
    assert second["updated"] is False
    assert first["centroid_natural"]["recency"] == 182.5  # days
    assert first["centroid_natural"]["monetary"] == pytest.approx(5000.0)
    assert second["centroid_natural"]["frequency"] == pytest.approx(52.0)
    assert second["centroid_natural"]["monetary"] == pytest.approx(math.sqrt(5001) - 1)
    assert out["natural_units"]["recency"] == "days since the last purchase"
    assert "centroid_natural" not in update.to_json(features.output_names)["segments"][0]
    with pytest.raises(ValueError, match="2 feature names for 3"):
        update.to_json(("recency", "frequency"))
