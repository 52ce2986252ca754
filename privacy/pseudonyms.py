"""Pseudonymised identifiers and generalised quasi-identifiers (GDPR Art. 4(5), 25 and recital 26;
PIPL Art. 73(3)).

Identifiers never reach a computation in the clear. Each is replaced by HMAC-SHA256 under a key the
BU holds (RFC 2104; NIST SP 800-107 §5.3.4 for the key length): without the key a pseudonym cannot be
linked back to the customer, which is what Art. 4(5) asks of the "additional information". One BU key
gives the same pseudonym in every table, so joins still work; another key gives unrelated pseudonyms,
so nothing links customers across BUs. A purpose that declares cross-BU linkage pseudonymises its
linkage columns (a person id) under a key the BUs share for that purpose instead, and only those.

Quasi-identifiers (age, postcode, dates) are generalised by public rules, so that the combination of
them singles out fewer people (recital 26): `band:N` (numbers to the lower edge of an N-wide band),
`prefix:N` (text to its first N characters), `month` and `year` (dates to the first day of their
month or year).

Key files hold the key as base64 text, like the key ring's files, so that the same key can be moved
to an environment variable (`key_from_environment`) without conversion.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
import secrets
from pathlib import Path

import numpy as np
import pandas as pd

from privacy.atomic import fsync_directory
from privacy.encryption import check_private_key_file, decode_key, read_key_file
from privacy.errors import ConfigurationError
from privacy.schema import ColumnRole, SiloSchema

KEY_BYTES = 32  # HMAC-SHA256 keys shorter than the hash output weaken it (SP 800-107 §5.3.4)

GENERALISATION_RULE_PATTERN = r"^(?:band:[1-9][0-9]*|prefix:[1-9][0-9]*|month|year)$"
_VALID_RULES = "band:N (numbers), prefix:N (text), month or year (dates), N a positive integer"


# --- pseudonyms ------------------------------------------------------------------------------


def customer_digest(key: bytes, customer_id: str) -> str:
    """The pseudonym of one customer id: hex HMAC-SHA256 of its UTF-8 text under the BU's key.
    The one way silofed refers to a customer where ids must not appear in clear (pseudonymised
    tables, lineage, erasure tombstones); customer ids are guessable, so a plain hash would not do."""
    _require_key(key, "pseudonym key")
    return hmac.digest(key, str(customer_id).encode("utf-8"), "sha256").hex()


def pseudonymise(values: pd.Series, key: bytes) -> pd.Series:
    """Each value replaced by the hex HMAC-SHA256 of its text under `key`; missing stays missing.

    Values are hashed as `str(value)` in UTF-8, the form `clients.silo.load_silo` gives ids in.
    """
    _require_key(key, "pseudonym key")
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    # Hash each distinct id once: a transactions table repeats every customer id many times.
    digests = np.array([customer_digest(key, value) for value in uniques.tolist()], dtype=object)
    out = values.to_numpy(dtype=object, copy=True)  # keeps each missing value's own marker
    present = codes >= 0
    out[present] = digests[codes[present]]
    dtype = values.dtype if isinstance(values.dtype, pd.StringDtype) else object
    return pd.Series(out, index=values.index, name=values.name, dtype=dtype)


def pseudonymise_tables(
    tables: dict[str, pd.DataFrame],
    schema: SiloSchema,
    key: bytes,
    *,
    linkage_key: bytes | None = None,
    linkage_columns: frozenset[str] = frozenset(),
) -> dict[str, pd.DataFrame]:
    """New frames in which every declared identifier column is pseudonymised: under `key` (the
    BU's own), or under `linkage_key` for the qualified columns in `linkage_columns`.

    Columns the schema does not declare are left as they are; minimisation drops them.
    """
    _require_key(key, "pseudonym key")
    for qualified in sorted(linkage_columns):
        if schema.column(qualified).role is not ColumnRole.IDENTIFIER:
            raise ConfigurationError(
                f"unit '{schema.unit}': linkage column '{qualified}' is not declared as an "
                "identifier; only identifiers are linked across BUs. Declare its role as "
                "'identifier' or remove it from the purpose's linkage."
            )
    out: dict[str, pd.DataFrame] = {}
    for table, frame in tables.items():
        declared = schema.tables[table].columns if table in schema.tables else {}
        replaced: dict[str, pd.Series] = {}
        for name in frame.columns:
            spec = declared.get(name)
            if spec is None or spec.role is not ColumnRole.IDENTIFIER:
                continue
            qualified = f"{table}.{name}"
            if qualified in linkage_columns:
                replaced[name] = pseudonymise(frame[name], _linkage_key(schema, key, linkage_key))
            else:
                replaced[name] = pseudonymise(frame[name], key)
        out[table] = frame.assign(**replaced) if replaced else frame.copy()
    return out


def _linkage_key(schema: SiloSchema, key: bytes, linkage_key: bytes | None) -> bytes:
    if linkage_key is None:
        raise ConfigurationError(
            f"unit '{schema.unit}': the purpose declares cross-BU linkage but the BU has no "
            "linkage key; install the key the BUs share for that purpose (keys/linkage.key in "
            "the BU's home, or the variable named by keys.linkage_env in bu.toml)."
        )
    _require_key(linkage_key, "linkage key")
    if hmac.compare_digest(linkage_key, key):
        # The BU's own key would then be shared, and every customer id linkable across BUs.
        raise ConfigurationError(
            f"unit '{schema.unit}': the linkage key is the BU's own pseudonym key; the linkage "
            "key must be a separate key, shared only for linkage."
        )
    return linkage_key


def _require_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) < KEY_BYTES:
        raise ConfigurationError(
            f"the {what} must be at least {KEY_BYTES} random bytes; use load_or_create_key or "
            "key_from_environment to obtain one."
        )


# --- key material ----------------------------------------------------------------------------


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, or a new random one written there (file 0600, directory 0700).

    An existing file that group or others can access is refused: the key may be exposed.
    """
    path = Path(path)
    if path.exists():
        check_private_key_file(path)
        return read_key_file(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask; be explicit
    except PermissionError:
        raise ConfigurationError(
            f"cannot make {parent} private (mode 0700) for key file {path.name}; keep key "
            "files in a directory of their own, owned by the BU's service account."
        ) from None
    key = secrets.token_bytes(KEY_BYTES)
    try:
        # O_EXCL with mode 0600: the file never exists with wider permissions, and a key that
        # appeared meanwhile is never overwritten.
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        check_private_key_file(path)
        return read_key_file(path)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(base64.b64encode(key) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_directory(parent)
    return key


def key_from_environment(var: str) -> bytes:
    """A key given as base64 in the environment variable `var`."""
    value = os.environ.get(var, "").strip()
    if not value:
        raise ConfigurationError(
            f"environment variable {var} is not set; set it to a base64-encoded 256-bit key "
            "(e.g. from `openssl rand -base64 32`)"
        )
    key = decode_key(value)
    if key is None:
        raise ConfigurationError(
            f"environment variable {var} does not hold a base64-encoded 256-bit key; set it to "
            "the output of `openssl rand -base64 32`"
        )
    return key


# --- generalisation of quasi-identifiers ------------------------------------------------------


def generalise(values: pd.Series, rule: str) -> pd.Series:
    """`values` coarsened by `rule`: `band:N`, `prefix:N`, `month` or `year`."""
    if not isinstance(rule, str) or not re.fullmatch(GENERALISATION_RULE_PATTERN, rule):
        raise ConfigurationError(f"'{rule}' is not a generalisation rule; use {_VALID_RULES}.")
    name, _, argument = rule.partition(":")
    if name == "band":
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise _wrong_kind(values, rule, "a numeric")
        width = int(argument)
        return (values // width) * width
    if name == "prefix":
        if not (pd.api.types.is_string_dtype(values) or values.dtype == object):
            raise _wrong_kind(values, rule, "a text")
        return values.str[: int(argument)]
    if not pd.api.types.is_datetime64_any_dtype(values):
        raise _wrong_kind(values, rule, "a date or datetime")
    timezone = values.dt.tz
    naive = values.dt.tz_localize(None) if timezone is not None else values
    start = naive.dt.to_period("M" if name == "month" else "Y").dt.to_timestamp()
    if timezone is not None:
        start = start.dt.tz_localize(timezone)
    return start.astype(values.dtype)


def _wrong_kind(values: pd.Series, rule: str, kind: str) -> ConfigurationError:
    column = "the column" if values.name is None else f"column '{values.name}'"
    return ConfigurationError(
        f"rule '{rule}' needs {kind} column, but {column} holds {values.dtype}; choose a rule "
        f"for its type ({_VALID_RULES})."
    )
