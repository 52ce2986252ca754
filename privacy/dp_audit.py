"""Empirical privacy audit: a lower bound on epsilon from one release, by one-run auditing.

Implements the auditing bound of Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run" (NeurIPS 2023; arXiv:2305.08846, Sec. 3, Theorem 3.1, and the bisection of their appendix
code). m canaries are each included in the input independently with probability 1/2 (S_i = +1 or
-1); the auditor sees the output only and guesses +1 on some canaries, -1 on others, and abstains
on the rest: r guesses, W of them right. If the mechanism is (epsilon, delta)-DP, then for every v

    P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v],

(the max over i > v adds nothing: f(v - i) = 1 there). With delta = 0 the second term vanishes:
the pure-epsilon bound, each guess no better than epsilon-DP randomised response. The audit's
lower bound is the largest epsilon whose p-value for the observed v is below 1 - confidence: with
that confidence the mechanism is not (epsilon, delta)-DP, hence not (epsilon', delta)-DP for any
epsilon' <= epsilon either, so any epsilon the bisection certifies is a valid bound even where the
p-value is not monotone in epsilon (the delta term need not be). Tails are summed exactly from
log-factorials: no normal approximation, and no scipy (not one of silofed's dependencies).

The guesses follow a fixed, public rule (`membership_guesses`): +1 on the k highest scores, -1 on
the k lowest, for each k in `GUESS_FRACTIONS` x m, chosen before any score is seen. Small k test
the extremes, where a Gaussian mechanism's evidence is strongest; large k reward a mechanism that
leaks on every canary (the bound grows with r when the guesses are right). The best of the tries is
reported, each try tested at (1 - confidence) / tries (Bonferroni), so the reported bound holds at
`confidence` overall: taking the best of several tries without that correction would overstate it.

What is audited (tests/privacy/test_dp_audit.py, run with the other tests): silofed's own query
release, end to end inside one BU. Canary i is a customer alone in bin i of a histogram query
(`max_groups` = `max_rows` = 1, so the layout's count part has L2 sensitivity 1, the sensitivity
one customer really has there); its score is the released count of its bin. The path is the one
`clients.app` takes: `Job` -> `release_multiplier` -> `noise_multiplier` -> the RDP calibration
(`calibrate_noise_multiplier`, Opacus) for the job's epsilon and delta -> `query_vector`
(contribution bounding on the BU's table) -> `ReleaseLayout.noisy` -> `part_sigmas` ->
`unit_sigma` -> `add_noise` -> the exact discrete Gaussian sampler; the central placement's
coordinator noise (`ReleaseLayout.central_noise`) and the distributed placement's sum of shares
are audited the same way. The broken configuration passes a noise multiplier of 0 to the same
path and must be caught.

What is not audited: DP-SGD (Opacus's per-sample clipping, Poisson sampling and noise) is not
audited at all here, nor the ranges, k-means and evaluation releases (the same `add_noise`, other
layouts and multipliers), composition over several releases and the ledger, SecAgg+ masking, or
the production `SecureSource` (the audit draws from `SeededSource`; the sampling algorithm is the
same). The bound is a lower bound: passing shows no gross failure, not that the calibration is
tight. One release of a Gaussian of multiplier z ~ 4.75 (epsilon 1 at delta 1e-6) leaks far less
than epsilon-DP randomised response with epsilon 1 would, so the bound sits well below the claim;
the audit's power is in catching noise that is missing or much too small.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# k = fraction x m guesses on each side, fixed before any score is seen (see the module docstring).
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.45)
_EPSILON_TOLERANCE = 1e-6
_EPSILON_CEILING = 1e3  # r right guesses prove about log(r / log(1/level)): 1e3 is out of reach


@dataclass(frozen=True)
class AuditOutcome:
    """The best try of one audit: `guesses` = k+ + k- guesses, `correct` right, and the lower
    bound `epsilon` it proves at `confidence` (Bonferroni-corrected over `tries`) for `delta`."""

    canaries: int
    included: int
    positive: int  # k+: canaries guessed included (the highest scores)
    negative: int  # k-: canaries guessed excluded (the lowest scores)
    guesses: int
    correct: int
    epsilon: float
    confidence: float
    delta: float
    tries: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.guesses if self.guesses else 0.0


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """P[at least `correct` of `guesses` right] if the mechanism were (epsilon, delta)-DP: the
    bound of Theorem 3.1 (Steinke, Nasr & Jagielski 2023) for `canaries` canaries, capped at 1."""
    _check_counts(canaries, guesses, correct)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must lie in [0, 1], got {delta!r}")
    if correct == 0:
        return 1.0
    pmf = _binomial_pmf(guesses, epsilon)
    beta = float(np.sum(pmf[correct:]))  # f(v)
    if delta == 0:
        return min(beta, 1.0)
    # f(v - i) - f(v) = P[v - i <= Binomial < v], for i = 1..v
    below = np.cumsum(pmf[correct - 1 :: -1])
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(beta + 2 * canaries * delta * alpha, 1.0)


def epsilon_lower_bound(
    canaries: int,
    guesses: int,
    correct: int,
    *,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> float:
    """The largest epsilon (to 1e-6, rounded down) that `correct` right out of `guesses` rejects
    at `confidence`: the mechanism is not (epsilon, delta)-DP, with that confidence. 0 when even
    epsilon = 0 cannot be rejected."""
    _check_counts(canaries, guesses, correct)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    level = 1 - confidence

    def rejected(epsilon: float) -> bool:
        return p_value(canaries, guesses, correct, epsilon, delta) < level

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2 * high
        if high > _EPSILON_CEILING:
            raise ValueError(
                f"{correct} right of {guesses} guesses rejects every epsilon up to "
                f"{_EPSILON_CEILING:g}: check the scores; the audit cannot resolve this"
            )
    while high - low > _EPSILON_TOLERANCE:
        middle = (low + high) / 2
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def membership_guesses(scores: np.ndarray, positive: int, negative: int) -> np.ndarray:
    """+1 on the `positive` highest scores, -1 on the `negative` lowest, 0 elsewhere (int8).

    Ties are broken by the canary's index (a stable sort), which does not depend on who was
    included, so the guesses remain a function of the output alone, as the theorem requires."""
    values = np.asarray(scores)
    if values.ndim != 1:
        raise ValueError(f"scores must be one score per canary (1-D), got shape {values.shape}")
    if positive < 0 or negative < 0 or positive + negative > values.size:
        raise ValueError(
            f"cannot guess {positive} included and {negative} excluded among {values.size} "
            "canaries: the two counts must be >= 0 and sum to at most the number of canaries"
        )
    order = np.argsort(values, kind="stable")
    guesses = np.zeros(values.size, dtype=np.int8)
    guesses[order[:negative]] = -1
    guesses[order[values.size - positive :]] = 1
    return guesses


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    confidence: float = 0.95,
    delta: float = 0.0,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditOutcome:
    """The guessing game on `scores` (higher: more likely included) against the true inclusion
    bits `included`: for each fraction, k = round(fraction x m) guesses on each side; the best
    bound over the tries, each tested at (1 - confidence) / tries."""
    values = np.asarray(scores)
    truth = np.asarray(included)
    if truth.dtype != np.bool_ or truth.shape != values.shape or values.ndim != 1:
        raise ValueError(
            f"included must be one bool per canary, shaped like scores {values.shape}; got "
            f"{truth.dtype} {truth.shape}"
        )
    if not fractions or any(not 0 < f <= 0.5 for f in fractions):
        raise ValueError(
            f"each guess fraction must lie in (0, 0.5] (k = fraction x m on each side), got "
            f"{tuple(fractions)}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    canaries = values.size
    tries = len(fractions)
    per_try = 1 - (1 - confidence) / tries
    sign = np.where(truth, 1, -1)
    best: AuditOutcome | None = None
    for fraction in fractions:
        k = min(max(1, round(fraction * canaries)), canaries // 2)
        guesses = membership_guesses(values, k, k)
        correct = int(np.sum(guesses == sign))
        epsilon = epsilon_lower_bound(canaries, 2 * k, correct, confidence=per_try, delta=delta)
        outcome = AuditOutcome(
            canaries=canaries,
            included=int(truth.sum()),
            positive=k,
            negative=k,
            guesses=2 * k,
            correct=correct,
            epsilon=epsilon,
            confidence=confidence,
            delta=delta,
            tries=tries,
        )
        if best is None or outcome.epsilon > best.epsilon:
            best = outcome
    assert best is not None
    return best


def audit_release(
    release: Callable[[np.ndarray], np.ndarray],
    canaries: int,
    rng: np.random.Generator,
    *,
    confidence: float = 0.95,
    delta: float = 0.0,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditOutcome:
    """One audit run: each canary is included with probability 1/2 (drawn from `rng`), and
    `release(included)` returns the released value of each canary's coordinate, its score."""
    if canaries < 1:
        raise ValueError(f"an audit needs at least one canary, got {canaries}")
    included = rng.random(canaries) < 0.5
    scores = np.asarray(release(included.copy()))
    if scores.shape != (canaries,):
        raise ValueError(
            f"the release under audit must return one value per canary, shape ({canaries},); "
            f"got {scores.shape}"
        )
    return audit_scores(scores, included, confidence=confidence, delta=delta, fractions=fractions)


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            f"need 0 <= correct <= guesses <= canaries, got correct={correct}, "
            f"guesses={guesses}, canaries={canaries}"
        )


@functools.lru_cache(maxsize=64)
def _log_factorials(n: int) -> np.ndarray:
    """log k! for k = 0..n."""
    out = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    out.setflags(write=False)
    return out


def _binomial_pmf(trials: int, epsilon: float) -> np.ndarray:
    """The pmf of Binomial(trials, e^eps / (1 + e^eps)) on 0..trials, from log-factorials."""
    log_factorial = _log_factorials(trials)
    k = np.arange(trials + 1, dtype=np.float64)
    # log q = -log(1 + e^-eps), log(1 - q) = -log(1 + e^eps): stable for every eps >= 0
    log_q, log_not_q = -np.logaddexp(0.0, -epsilon), -np.logaddexp(0.0, epsilon)
    log_pmf = (
        log_factorial[trials]
        - log_factorial
        - log_factorial[::-1]
        + k * log_q
        + (trials - k) * log_not_q
    )
    return np.exp(log_pmf)
