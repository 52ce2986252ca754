"""A BU's k-means vector, and federated k-means driven in process: exact against the pooled Lloyd
step without noise, and recovering planted segments at epsilon 3 per BU with noise."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from clients.features import compute_features
from clients.segments import segment_vector
from clients.silo import load_silo
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
from privacy.mechanisms import Placement, noise_multiplier
from privacy.samplers import SeededSource
from privacy.unit_config import UnitConfig
from simulations.synthetic import unit_schema

SPEC = SegmentsSpec(k=4)


@cache
def _z(iterations: int) -> float:
    return noise_multiplier(3.0, 1e-6, releases=iterations)


def _planted(seed: int, *, k: int = 4, units: int = 5, customers: int = 2000):
    """`units` BUs of `customers` each, drawn around k planted centres in [0.15, 0.85]^3 (pairwise
    at least 0.3 apart, spread 0.06 per coordinate), in proportions that differ by BU
    (Dirichlet(1)): non-IID. Returns the BUs' features (float32, as computed) and true labels."""
    rng = np.random.default_rng(seed)
    while True:
        centres = rng.uniform(0.15, 0.85, size=(k, 3))
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=2)[np.triu_indices(k, 1)]
        if gaps.min() >= 0.3:
            break
    features, labels = [], []
    for _ in range(units):
        label = rng.choice(k, size=customers, p=rng.dirichlet(np.ones(k)))
        values = centres[label] + rng.normal(0.0, 0.06, size=(customers, 3))
        features.append(np.clip(values, 0.0, 1.0).astype(np.float32))
        labels.append(label)
    return features, np.concatenate(labels)


def _federated_kmeans(
    units: list[np.ndarray],
    spec: SegmentsSpec,
    z: float | None,
    placement: Placement,
    source: SeededSource,
) -> list[SegmentsUpdate]:
    """The coordinator's loop in process: centroids out (as float32, as they travel), each BU's
    vector back with its noise, the sum (plus the coordinator's noise under `central`), update."""
    centroids = initial_centroids(spec, spec.dim)
    updates = []
    for _ in range(spec.iterations):
        layout = segments_layout(spec, spec.dim, len(centroids))
        sent = centroids.astype(np.float32)
        total = np.sum(
            [
                layout.noisy(segment_vector(features, sent, spec), z, placement, source)
                for features in units
            ],
            axis=0,
        )
        if placement is Placement.CENTRAL and z is not None:
            total = layout.central_noise(total, z, source)
        noise = layout.noise_in_sum(z, placement, contributors=len(units))
        updates.append(update_centroids(total, noise, sent, spec))
        centroids = updates[-1].centroids
    return updates


def _ari(units: list[np.ndarray], labels: np.ndarray, update: SegmentsUpdate) -> float:
    found = assign(np.concatenate(units), update.centroids)
    return adjusted_rand_score(labels, found)


# --- the BU's vector -----------------------------------------------------------------------------


def test_the_vector_holds_exact_per_cluster_sums_of_quantised_features_and_counts() -> None:
    spec = SegmentsSpec(k=2, features=("recency", "monetary"), grid_steps=10)
    features = np.array([[0.1, 0.2], [0.15, 0.0], [0.9, 0.8], [2.0, 0.7]], dtype=np.float32)
    centroids = np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    vector = segment_vector(features, centroids, spec)
    assert vector.dtype == np.int64
    assert vector.shape == (segments_layout(spec, 2).size,)
    # row 2 rounds to (2, 0) (1.5 rounds half to even); row 4 is clipped to (1.0, 0.7)
    assert vector.tolist() == [1 + 2, 2 + 0, 9 + 10, 8 + 7, 2, 2]


def test_the_vector_accepts_the_seeding_rounds_cells_and_refuses_other_shapes() -> None:
    features = np.full((5, 3), 0.3, dtype=np.float32)
    cells = initial_centroids(SPEC, 3)
    vector = segment_vector(features, cells, SPEC)
    assert vector.shape == (segments_layout(SPEC, 3, len(cells)).size,)
    assert vector[-64:].sum() == 5
    for bad in (cells[:5], cells[:4, :2], cells[:4].ravel()):
        with pytest.raises(ValueError, match="centroids are"):
            segment_vector(features, bad, SPEC)
    with pytest.raises(ValueError, match="NaN"):
        segment_vector(features, np.full((4, 3), np.inf), SPEC)
    with pytest.raises(ValueError, match="NaN"):
        segment_vector(np.full((2, 3), np.nan), cells, SPEC)


def test_one_customer_moves_the_vector_by_at_most_the_layouts_sensitivities() -> None:
    rng = np.random.default_rng(1)
    features = rng.random((300, 3))
    layout = segments_layout(SPEC, 3)
    spans = layout.slices()
    centroids = rng.random((4, 3))
    worst = np.ones((1, 3))  # the largest contribution a customer can make
    for extra in (worst, rng.random((1, 3)), np.array([[7.0, -3.0, 0.5]])):
        change = segment_vector(np.vstack([features, extra]), centroids, SPEC) - segment_vector(
            features, centroids, SPEC
        )
        sums, counts = layout.parts
        assert np.linalg.norm(change[spans["sums"]]) <= sums.sensitivity
        assert np.linalg.norm(change[spans["counts"]]) == counts.sensitivity
    alone = segment_vector(worst, centroids, SPEC)
    assert np.linalg.norm(alone[spans["sums"]]) == pytest.approx(1000 * math.sqrt(3))


# --- federated against pooled, noise off ---------------------------------------------------------


def _pooled_lloyd_step(features: np.ndarray, centroids: np.ndarray, spec: SegmentsSpec):
    """A single-machine Lloyd step on the union's quantised features (empty clusters stay)."""
    grid = quantise(features, spec)
    labels = assign(grid / spec.grid_steps, centroids)
    new = np.array(centroids, dtype=np.float64)
    sizes = np.bincount(labels, minlength=len(centroids))
    for j in range(len(centroids)):
        members = grid[labels == j]
        if len(members):
            new[j] = members.sum(axis=0) / (spec.grid_steps * len(members))
    return new, sizes


def test_without_noise_every_iteration_equals_the_pooled_lloyd_step_exactly() -> None:
    spec = SegmentsSpec(k=5, iterations=6, init="grid", min_cluster_count=1)
    units, _ = _planted(3, units=4, customers=700)
    updates = _federated_kmeans(units, spec, None, Placement.LOCAL, SeededSource(0))
    pooled = np.concatenate(units)
    centroids = initial_centroids(spec, 3).astype(np.float32)
    moved = False
    for update in updates:
        expected, sizes = _pooled_lloyd_step(pooled, centroids, spec)
        assert np.array_equal(update.centroids, expected)  # bit for bit
        assert np.array_equal(update.sizes, sizes)
        assert np.array_equal(update.size_intervals, np.stack([sizes, sizes], axis=1))
        moved |= not np.array_equal(expected, centroids)
        centroids = expected.astype(np.float32)
    assert moved


def test_without_noise_the_seeding_round_equals_the_pooled_cell_means() -> None:
    spec = SegmentsSpec(k=4, iterations=2, min_cluster_count=1)
    units, _ = _planted(4, units=3, customers=500)
    (seeding, _) = _federated_kmeans(units, spec, None, Placement.LOCAL, SeededSource(0))
    cells = initial_centroids(spec, 3)
    means, sizes = _pooled_lloyd_step(np.concatenate(units), cells, spec)
    # the seeds are the size-weighted means of the pooled cell means, grouped by nearest seed
    group = assign(np.where(sizes[:, None] > 0, means, cells), seeding.centroids)
    for j in range(4):
        inside = (group == j) & (sizes > 0)
        weighted = (sizes[inside, None] * means[inside]).sum(axis=0) / sizes[inside].sum()
        assert np.allclose(seeding.centroids[j], weighted, rtol=0, atol=1e-12)
        assert seeding.sizes[j] == sizes[group == j].sum()
    assert seeding.sizes.sum() == 1500


# --- recovery of planted segments at epsilon 3 per BU ---------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_local_noise_recovers_planted_non_iid_segments(seed: int) -> None:
    units, labels = _planted(seed)
    z = _z(SPEC.releases)
    updates = _federated_kmeans(units, SPEC, z, Placement.LOCAL, SeededSource(seed))
    assert len(updates) == SPEC.iterations
    assert _ari(units, labels, updates[-1]) >= 0.95  # measured: >= 0.988 over 20 seeds
    final = updates[-1]
    assert final.updated.all()
    low, high = final.size_intervals.T
    assert (high - low).max() < 60  # 5 BUs' count noise at z = 3.75: about +-23
    assert abs(int(final.sizes.sum()) - 10_000) < 100


@pytest.mark.parametrize("seed", range(3))
def test_central_noise_recovers_planted_non_iid_segments(seed: int) -> None:
    units, labels = _planted(10 + seed)
    z = _z(SPEC.releases)
    updates = _federated_kmeans(units, SPEC, z, Placement.CENTRAL, SeededSource(seed))
    assert _ari(units, labels, updates[-1]) >= 0.95
    low, high = updates[-1].size_intervals.T
    assert (high - low).max() < 30  # one draw of the noise, not five


# --- plumbing: a synthetic silo's features ---------------------------------------------------------


def test_a_synthetic_silos_rfm_features_make_a_vector(small_silos: Path) -> None:
    configs = [
        UnitConfig.load(small_silos / unit / "bu.toml") for unit in ("retail_stores", "ecommerce")
    ]
    spec = segment_feature_spec(configs, SPEC)
    silo = load_silo(configs[0])
    matrix = compute_features(silo.tables, spec)
    assert matrix.features.shape == (len(silo.tables["customers"]), 3)
    assert ((matrix.features >= 0) & (matrix.features <= 1)).all()
    vector = segment_vector(matrix.features, initial_centroids(SPEC, 3), SPEC)
    layout = segments_layout(SPEC, 3, 64)
    counts = vector[layout.slices()["counts"]]
    assert counts.sum() == len(silo.tables["customers"])
    sums = vector[layout.slices()["sums"]].reshape(64, 3).sum(axis=0)
    assert np.array_equal(sums, quantise(matrix.features, SPEC).sum(axis=0))


def test_natural_units_invert_the_feature_scaling() -> None:
    spec = segment_feature_spec([unit_schema("retail_stores")], SegmentsSpec(k=2))
    observed = pd.Timestamp(spec.observation_date)
    transactions = pd.DataFrame(
        {
            "customer_id": ["a", "a", "a", "b"],
            "timestamp": [observed - pd.Timedelta(days=d) for d in (30, 90, 200, 10)],
            "amount": [20.0, 40.0, 60.0, 1000.0],
        }
    )
    customers = pd.DataFrame({"customer_id": ["a", "b"]})
    matrix = compute_features({"customers": customers, "transactions": transactions}, spec)
    update = SegmentsUpdate(
        centroids=matrix.features.astype(np.float64),
        sizes=np.array([1, 1]),
        size_intervals=np.array([[0, 2], [0, 2]]),
        updated=np.array([True, True]),
        centroid_intervals=np.full((2, 3, 2), np.nan),
        level=0.95,
    )
    natural = [s["centroid_natural"] for s in update.to_json(spec.output_names, spec)["segments"]]
    assert natural[0] == pytest.approx({"recency": 30, "frequency": 3, "monetary": 40}, rel=1e-5)
    assert natural[1] == pytest.approx({"recency": 10, "frequency": 1, "monetary": 1000}, rel=1e-5)
