"""The layout of a statistics release: the integer vector a BU sends for a query, a k-means
iteration or a DP evaluation, cut into parts of known sensitivity.

Both sides derive the same layout from the public job, so the BU knows how much noise to add to
each part and the coordinator knows how much noise each part of the sum carries. The vectors are
additive: the coordinator (or SecAgg+) only ever needs their sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privacy.mechanisms import NoiseInSum, Placement, add_noise, part_sigmas, unit_sigma
from privacy.samplers import RandomSource


@dataclass(frozen=True)
class Part:
    """`size` consecutive integers whose joint L2 sensitivity (a customer added or removed, in
    grid units) is `sensitivity`."""

    name: str
    size: int
    sensitivity: float


@dataclass(frozen=True)
class ReleaseLayout:
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for part in self.parts:
            out[part.name] = slice(start, start + part.size)
            start += part.size
        return out

    def sigmas(self, z: float) -> list[float]:
        """The calibrated noise of each part for a release at multiplier `z`."""
        return part_sigmas(z, [p.sensitivity for p in self.parts])

    def check(self, vector: np.ndarray) -> np.ndarray:
        values = np.asarray(vector)
        if values.shape != (self.size,) or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(
                f"a release of this layout is {self.size} integers, got {values.dtype} {values.shape}"
            )
        return values.astype(np.int64)

    def noisy(
        self,
        vector: np.ndarray,
        z: float | None,
        placement: Placement,
        source: RandomSource,
        *,
        threshold: int = 1,
        colluding: int = 0,
    ) -> np.ndarray:
        """A BU's vector with its own noise (none when `z` is None: an exact release)."""
        values = self.check(vector)
        if z is None:
            return values
        out = values.copy()
        for part, sigma in zip(self.parts, self.sigmas(z), strict=True):
            share = unit_sigma(sigma, placement, threshold=threshold, colluding=colluding)
            span = self.slices()[part.name]
            out[span] = add_noise(values[span], share, source)
        return out

    def noise_in_sum(
        self,
        z: float | None,
        placement: Placement,
        *,
        contributors: int,
        threshold: int = 1,
        colluding: int = 0,
    ) -> dict[str, NoiseInSum]:
        """The noise each part of the summed release carries (none when `z` is None)."""
        if z is None:
            return {p.name: NoiseInSum(()) for p in self.parts}
        return {
            part.name: NoiseInSum.of(
                sigma,
                placement,
                contributors=contributors,
                threshold=threshold,
                colluding=colluding,
            )
            for part, sigma in zip(self.parts, self.sigmas(z), strict=True)
        }

    def central_noise(self, total: np.ndarray, z: float, source: RandomSource) -> np.ndarray:
        """The coordinator's noise on the sum under the central placement."""
        values = self.check(total)
        out = values.copy()
        for part, sigma in zip(self.parts, self.sigmas(z), strict=True):
            span = self.slices()[part.name]
            out[span] = add_noise(values[span], sigma, source)
        return out


def layout_of(parts: Sequence[Part]) -> ReleaseLayout:
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"part names must be unique: {names}")
    if any(p.size < 1 or not p.sensitivity > 0 for p in parts):
        raise ValueError(f"every part needs a size >= 1 and a positive sensitivity: {parts}")
    return ReleaseLayout(tuple(parts))
