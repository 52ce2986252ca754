"""Hypothesis strategies the fuzz tests share."""

from __future__ import annotations

from hypothesis import strategies as st


def nested_values(*, integer_bits: int) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """Scalars (None, booleans, integers of `integer_bits` bits, any float, short text), and
    values nested a little from them: what a TOML section or a JSON message could hold."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2 ** (integer_bits - 1)), max_value=2 ** (integer_bits - 1) - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
    return scalars, values
