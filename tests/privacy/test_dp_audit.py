"""The one-run DP audit (Steinke, Nasr & Jagielski 2023): the bound itself, then silofed's query
release audited end to end: it passes with the calibrated noise and fails with the noise off."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from clients.queries import query_vector
from federation.exchanges import release_multiplier
from federation.job import Job
from federation.release import Part
from federation.wire import Phase
from privacy.accounting import composed_epsilon
from privacy.dp_audit import (
    GUESS_FRACTIONS,
    audit_release,
    audit_scores,
    epsilon_lower_bound,
    membership_guesses,
    p_value,
)
from privacy.mechanisms import Placement, gaussian_event_of, noise_multiplier
from privacy.samplers import SeededSource
from simulations.synthetic import unit_schema

CLAIMED_EPSILON, DELTA = 1.0, 1e-6
CANARIES = 2000


# --- the bound ------------------------------------------------------------------------------------


def all_right_bound(guesses: int, confidence: float) -> float:
    """By hand: r right of r rejects eps exactly where q^r < 1 - confidence, q = e^eps/(1+e^eps)."""
    q = (1 - confidence) ** (1 / guesses)
    return math.log(q / (1 - q))


def test_p_value_matches_a_hand_computation() -> None:
    # q = e^eps / (1 + e^eps) = 3/4 at eps = ln 3: three right of three has probability 27/64
    assert p_value(10, 3, 3, math.log(3)) == pytest.approx(27 / 64, rel=1e-12)
    # eps = 0, two right of two: f(2) = 1/4; (f(1) - f(2)) / 1 = 1/2 beats (f(0) - f(2)) / 2 = 3/8;
    # the delta term is 2 m delta x 1/2 = 0.1 for m = 10, delta = 0.01
    assert p_value(10, 2, 2, 0.0, delta=0.01) == pytest.approx(0.25 + 0.1, rel=1e-12)
    assert p_value(10, 5, 0, 2.0) == 1.0


def test_p_value_matches_scipy_on_the_theorem() -> None:
    stats = pytest.importorskip("scipy.stats")
    for canaries, guesses, correct, epsilon, delta in (
        (2000, 100, 70, 0.5, 0.0),
        (2000, 100, 70, 0.5, 1e-6),
        (2000, 1800, 1000, 0.1, 1e-6),
        (1000, 40, 35, 1.0, 1e-3),
    ):
        q = 1 / (1 + math.exp(-epsilon))
        beta = stats.binom.sf(correct - 1, guesses, q)
        alpha = max(
            (stats.binom.sf(correct - i - 1, guesses, q) - beta) / i for i in range(1, correct + 1)
        )
        expected = min(beta + 2 * canaries * delta * alpha, 1.0)
        assert p_value(canaries, guesses, correct, epsilon, delta) == pytest.approx(
            expected, rel=1e-9
        )


def test_all_guesses_right_give_a_finite_bound_that_grows_with_the_guesses() -> None:
    bounds = [epsilon_lower_bound(CANARIES, r, r) for r in (10, 100, 1000)]
    for r, bound in zip((10, 100, 1000), bounds, strict=True):
        assert bound == pytest.approx(all_right_bound(r, 0.95), abs=2e-6)
        assert bound <= all_right_bound(r, 0.95)  # rounded down: never above what is proven
    assert bounds == sorted(bounds) and bounds[0] < bounds[1] < bounds[2]
    assert bounds[0] == pytest.approx(1.0518732, abs=1e-6)


def test_half_the_guesses_right_prove_nothing() -> None:
    assert epsilon_lower_bound(CANARIES, 100, 50) == 0.0
    assert epsilon_lower_bound(CANARIES, 1000, 500, delta=DELTA) == 0.0


def test_the_bound_grows_with_the_correct_guesses() -> None:
    bounds = [epsilon_lower_bound(CANARIES, 100, v) for v in range(50, 101)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[0] == 0.0 and bounds[-1] > 3.4


def test_delta_and_a_higher_confidence_only_loosen_the_bound() -> None:
    pure = epsilon_lower_bound(CANARIES, 400, 300)
    assert 0 < epsilon_lower_bound(CANARIES, 400, 300, delta=DELTA) <= pure
    assert 0 < epsilon_lower_bound(CANARIES, 400, 300, confidence=0.99) < pure


def test_guesses_take_the_extremes_and_break_ties_by_index() -> None:
    scores = np.array([3, 0, 3, 1, 0, 2])
    assert membership_guesses(scores, 2, 2).tolist() == [1, -1, 1, 0, -1, 0]
    # ties at the edge: the earlier index goes first in the ascending order
    assert membership_guesses(scores, 1, 1).tolist() == [0, -1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="sum to at most the number of canaries"):
        membership_guesses(scores, 4, 3)


def test_the_best_try_is_tested_at_the_bonferroni_level() -> None:
    included = np.arange(CANARIES) % 2 == 0
    scores = included.astype(np.int64)  # perfectly separated: every guess right
    k = round(0.45 * CANARIES)
    alone = audit_scores(scores, included, fractions=(0.45,))
    corrected = audit_scores(scores, included)
    assert alone.epsilon == epsilon_lower_bound(CANARIES, 2 * k, 2 * k, confidence=0.95)
    assert (corrected.positive, corrected.tries) == (k, len(GUESS_FRACTIONS))
    assert corrected.epsilon == epsilon_lower_bound(
        CANARIES, 2 * k, 2 * k, confidence=1 - 0.05 / len(GUESS_FRACTIONS)
    )
    assert corrected.epsilon < alone.epsilon


def test_bad_inputs_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="correct <= guesses <= canaries"):
        epsilon_lower_bound(10, 20, 5)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, confidence=1.0)
    with pytest.raises(ValueError, match="included must be one bool per canary"):
        audit_scores(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="guess fraction"):
        audit_scores(np.zeros(4), np.zeros(4, dtype=bool), fractions=(0.6,))
    with pytest.raises(ValueError, match="one value per canary"):
        audit_release(lambda included: np.zeros(3), 4, np.random.default_rng(0))


# --- silofed's query release, audited -------------------------------------------------------------


CONFIG = unit_schema("retail_stores")  # a synthetic BU; its `analytics` purpose reads ages
# Canary i is the one customer of age i: alone in bin [i, i + 1) of a histogram of ages. With one
# row and one group per customer, adding a canary moves one count by 1: L2 sensitivity 1.
JOB = Job.model_validate(
    {
        "kind": "query",
        "epsilon": CLAIMED_EPSILON,
        "delta": DELTA,
        "query": {
            "purpose": "analytics",
            "aggregates": [
                {
                    "kind": "histogram",
                    "name": "canary",
                    "column": "customers.age",
                    "bins": list(range(CANARIES + 1)),
                }
            ],
        },
    }
)
LAYOUT = JOB.query_spec.layout()
CALIBRATED = release_multiplier(JOB, Phase.QUERY)


def canary_tables(included: np.ndarray) -> dict[str, pd.DataFrame]:
    """The BU's consented customers: the included canaries (excluded ones are simply absent)."""
    ages = np.flatnonzero(included)
    customers = pd.DataFrame(
        {
            "customer_id": [f"canary-{i}" for i in ages],
            "age": ages,
            "region": "north",
            "signup_date": pd.Timestamp("2024-01-15"),
            "churned": False,
        }
    )
    return {"customers": customers}


def exact_vector(included: np.ndarray) -> np.ndarray:
    return query_vector(canary_tables(included), CONFIG, JOB.query_spec)


def local_release(z: float, rng: np.random.Generator):
    """What one BU sends under the local placement: `clients.app`'s `_release` path."""

    def release(included: np.ndarray) -> np.ndarray:
        source = SeededSource(int(rng.integers(2**62)))
        return LAYOUT.noisy(exact_vector(included), z, Placement.LOCAL, source)

    return release


def central_release(rng: np.random.Generator):
    """Central placement: the BU's exact reply, then the coordinator's noise on the sum."""

    def release(included: np.ndarray) -> np.ndarray:
        exact = LAYOUT.noisy(exact_vector(included), CALIBRATED, Placement.CENTRAL, SeededSource(0))
        return LAYOUT.central_noise(exact, CALIBRATED, SeededSource(int(rng.integers(2**62))))

    return release


def distributed_release(rng: np.random.Generator, threshold: int = 3):
    """Distributed placement: the canaries' BU and `threshold - 1` others (no canary) each add a
    share; the coordinator sees the sum, whose noise is the calibrated one."""

    def release(included: np.ndarray) -> np.ndarray:
        vectors = [exact_vector(included)] + [
            np.zeros(CANARIES, dtype=np.int64) for _ in range(threshold - 1)
        ]
        return sum(
            LAYOUT.noisy(
                v,
                CALIBRATED,
                Placement.DISTRIBUTED,
                SeededSource(int(rng.integers(2**62))),
                threshold=threshold,
            )
            for v in vectors
        )

    return release


def test_the_audit_calibrates_through_silofed_for_the_sensitivity_the_release_has() -> None:
    assert noise_multiplier(CLAIMED_EPSILON, DELTA) == CALIBRATED
    # the claim under audit: one release at this multiplier spends at most epsilon 1 at delta
    spent = composed_epsilon([gaussian_event_of(CALIBRATED).as_dp_sgd()], DELTA)
    assert 0.95 * CLAIMED_EPSILON <= spent <= CLAIMED_EPSILON
    assert LAYOUT.parts == (Part("canary", CANARIES, 1.0),)
    included = np.random.default_rng(0).random(CANARIES) < 0.5
    assert exact_vector(included).tolist() == included.astype(int).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_the_local_release_passes_the_audit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    outcome = audit_release(local_release(CALIBRATED, rng), CANARIES, rng, delta=DELTA)
    assert outcome.canaries == CANARIES
    # Not luck: by the theorem the bound passes the release's true epsilon (0.95 at this delta) in
    # at most 5% of runs, and the release leaks far less than a worst case at that epsilon: over
    # 200 seeds the bound's mean is 0.20, its 95th percentile 0.42, its maximum 0.69.
    assert outcome.epsilon < CLAIMED_EPSILON


@pytest.mark.parametrize("placement", ["central", "distributed"])
def test_the_coordinators_view_passes_the_audit_under_the_other_placements(placement) -> None:
    rng = np.random.default_rng(7)
    release = central_release(rng) if placement == "central" else distributed_release(rng)
    assert audit_release(release, CANARIES, rng, delta=DELTA).epsilon < CLAIMED_EPSILON


def test_the_release_with_the_noise_off_fails_the_audit() -> None:
    rng = np.random.default_rng(0)
    outcome = audit_release(local_release(0.0, rng), CANARIES, rng, delta=DELTA)
    # every guess right on the largest try (900 each side): the bound is that of r right of r
    assert (outcome.positive, outcome.correct) == (900, 1800)
    assert outcome.epsilon == epsilon_lower_bound(
        CANARIES, 1800, 1800, confidence=1 - 0.05 / len(GUESS_FRACTIONS), delta=DELTA
    )
    assert outcome.epsilon > 3 * CLAIMED_EPSILON


def test_noise_ten_times_too_small_fails_the_audit() -> None:
    rng = np.random.default_rng(0)
    outcome = audit_release(local_release(CALIBRATED / 10, rng), CANARIES, rng, delta=DELTA)
    assert outcome.epsilon > CLAIMED_EPSILON
