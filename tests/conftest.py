"""Shared fixtures: small synthetic silos, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.synthetic import synthesize


@pytest.fixture(scope="session")
def small_silos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic BUs of about 400 customers each (Parquet), seed 7."""
    out = tmp_path_factory.mktemp("silos") / "silos"
    synthesize(out, units=3, customers=400, seed=7)
    return out
