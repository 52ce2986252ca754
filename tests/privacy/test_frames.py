"""`among` and `present_values` answer exactly as the pandas expressions they replace."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.frames import among
from privacy.quality import present_values

IDS = st.text(alphabet="ab 1", max_size=3)
DTYPES = ("str", "string", "object")


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.none() | IDS, max_size=30),
    members=st.lists(st.none() | IDS, max_size=10),
    dtype=st.sampled_from(DTYPES),
)
def test_among_answers_as_isin_for_text(values, members, dtype):
    series = pd.Series(values, dtype=dtype, index=np.arange(len(values)) * 3)
    expected = series.isin(members)
    found = among(series, members)
    pd.testing.assert_series_equal(found, expected)


@given(
    values=st.lists(st.integers(-3, 3), max_size=20),
    members=st.sets(st.integers(-3, 3), max_size=5),
)
def test_among_answers_as_isin_for_numbers_and_an_index(values, members):
    series = pd.Series(values, dtype="int64")
    pd.testing.assert_series_equal(among(series, members), series.isin(members))
    index = pd.Index([str(v) for v in values])
    assert among(index, pd.Index([str(m) for m in members])).tolist() == (
        index.isin([str(m) for m in members]).tolist()
    )


def _present_as_before(raw: pd.Series) -> pd.Series:
    return raw.notna() & (raw.astype(str).str.strip() != "")


@pytest.mark.parametrize(
    "raw",
    [
        pd.Series([1.5, np.nan, 0.0]),
        pd.Series([1, 2, 3]),
        pd.Series([1, None, 3], dtype="Int64"),
        pd.Series([True, False]),
        pd.Series([True, None], dtype="boolean"),
        pd.Series(pd.to_datetime(["2024-01-01", None])),
        pd.Series(pd.to_datetime(["2024-01-01", None], utc=True)),
        pd.Series(["a", " ", "", None, "  b "], dtype="str"),
        pd.Series(["a", " ", "", None], dtype="string"),
        pd.Series(["a", " ", 3, None, 2.5], dtype=object),
        pd.Series(["x", None, " "], dtype="category"),
    ],
    ids=lambda raw: str(raw.dtype),
)
def test_present_values_as_the_text_test_gave(raw):
    assert present_values(raw).tolist() == _present_as_before(raw).tolist()
