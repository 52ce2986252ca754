"""A silo's declared schema and its purpose policies (GDPR Art. 5(1)(b)-(c), 9 and 25).

The schema is the BU's public declaration of what its silo holds: per table, each column's type,
its role (identifier, quasi-identifier, special category, label, ordinary attribute), its categorical
domain or numeric/date bounds. Everything that shapes features (scaling, one-hot domains) is read from
these declarations, never from the data, so that DP-SGD's per-customer bound is not voided by
data-dependent preprocessing.

A purpose policy lists, per purpose, the columns a job for that purpose may use. A policy that names an
undeclared column, or allows a special-category column, is rejected when the schema is loaded.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from privacy.errors import ConfigurationError, PolicyViolation


class ColumnType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    CATEGORY = "category"
    DATE = "date"
    DATETIME = "datetime"


class Jurisdiction(StrEnum):
    GDPR = "gdpr"
    PIPL = "pipl"


class Sensitive(StrEnum):
    """Sensitive categories of personal data. GDPR Art. 9(1) lists the first eight ("special
    categories"); PIPL Art. 28 adds the rest (and counts health, biometrics, religion too)."""

    RACIAL_OR_ETHNIC_ORIGIN = "racial_or_ethnic_origin"
    POLITICAL_OPINIONS = "political_opinions"
    RELIGIOUS_BELIEFS = "religious_beliefs"
    TRADE_UNION_MEMBERSHIP = "trade_union_membership"
    GENETIC = "genetic"
    BIOMETRIC = "biometric"
    HEALTH = "health"
    SEX_LIFE_OR_ORIENTATION = "sex_life_or_orientation"
    FINANCIAL_ACCOUNT = "financial_account"
    PRECISE_LOCATION = "precise_location"
    MINORS = "minors"
    SPECIFIC_IDENTITY = "specific_identity"


GDPR_SPECIAL = frozenset(list(Sensitive)[:8])
PIPL_SENSITIVE = GDPR_SPECIAL | {
    Sensitive.FINANCIAL_ACCOUNT,
    Sensitive.PRECISE_LOCATION,
    Sensitive.MINORS,
    Sensitive.SPECIFIC_IDENTITY,
}

# Column-name hints used to propose a tag when a schema is first written; a steward reviews them.
_SENSITIVE_HINTS: tuple[tuple[str, Sensitive], ...] = (
    (r"relig|faith|church|mosque", Sensitive.RELIGIOUS_BELIEFS),
    (r"health|medical|diagnos|disease|condition|disabilit|pregnan", Sensitive.HEALTH),
    (r"ethnic|race|racial", Sensitive.RACIAL_OR_ETHNIC_ORIGIN),
    (r"politic|party_member", Sensitive.POLITICAL_OPINIONS),
    (r"union", Sensitive.TRADE_UNION_MEMBERSHIP),
    (r"genetic|dna|genom", Sensitive.GENETIC),
    (r"biometric|fingerprint|face_?id|iris|voiceprint", Sensitive.BIOMETRIC),
    (r"sexual|orientation|sex_life", Sensitive.SEX_LIFE_OR_ORIENTATION),
    (r"iban|account_?(no|number)|card_?(no|number)|bank_?account", Sensitive.FINANCIAL_ACCOUNT),
    (r"gps|latitude|longitude|geo_?loc|precise_loc", Sensitive.PRECISE_LOCATION),
    (r"national_?id|passport|id_?card", Sensitive.SPECIFIC_IDENTITY),
)


def propose_sensitive(column_name: str) -> Sensitive | None:
    """A proposed sensitive-category tag for a column, from its name alone."""
    lowered = column_name.lower()
    for pattern, tag in _SENSITIVE_HINTS:
        if re.search(pattern, lowered):
            return tag
    return None


class ColumnRole(StrEnum):
    IDENTIFIER = "identifier"
    QUASI_IDENTIFIER = "quasi_identifier"
    SPECIAL_CATEGORY = "special_category"
    LABEL = "label"
    ATTRIBUTE = "attribute"


NUMERIC_TYPES = frozenset({ColumnType.INTEGER, ColumnType.FLOAT})
TEMPORAL_TYPES = frozenset({ColumnType.DATE, ColumnType.DATETIME})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColumnSpec(_Frozen):
    type: ColumnType
    role: ColumnRole = ColumnRole.ATTRIBUTE
    domain: tuple[str, ...] | None = None
    lower: float | datetime | None = None
    upper: float | datetime | None = None
    nullable: bool = False
    sensitive: Sensitive | None = None
    description: str = ""

    @model_validator(mode="after")
    def _declarations_fit_type(self) -> ColumnSpec:
        if self.type is ColumnType.CATEGORY and not self.domain:
            raise ValueError("a 'category' column must declare its 'domain' (the list of values)")
        if self.domain is not None and self.type is not ColumnType.CATEGORY:
            raise ValueError(f"'domain' is only for 'category' columns, not '{self.type}'")
        if (self.lower is None) != (self.upper is None):
            raise ValueError("declare both 'lower' and 'upper', or neither")
        if self.lower is not None:
            if self.type in NUMERIC_TYPES and not (
                isinstance(self.lower, float) and isinstance(self.upper, float)
            ):
                raise ValueError("numeric bounds must be numbers")
            if self.type in TEMPORAL_TYPES and not (
                isinstance(self.lower, datetime) and isinstance(self.upper, datetime)
            ):
                raise ValueError("date bounds must be ISO dates, e.g. '2020-01-01'")
            if self.type not in NUMERIC_TYPES | TEMPORAL_TYPES:
                raise ValueError(f"bounds are only for numeric or date columns, not '{self.type}'")
            if not self.lower < self.upper:  # type: ignore[operator]
                raise ValueError("'lower' must be below 'upper'")
        return self

    def is_special(self, jurisdictions: tuple[Jurisdiction, ...] = (Jurisdiction.GDPR,)) -> bool:
        """Whether no purpose may ever use this column under `jurisdictions`."""
        if self.role is ColumnRole.SPECIAL_CATEGORY or self.sensitive in GDPR_SPECIAL:
            return True
        return Jurisdiction.PIPL in jurisdictions and self.sensitive in PIPL_SENSITIVE


class TableSpec(_Frozen):
    """A table of the silo: its `file` in a files source, or the `query` (one SELECT) that reads it
    from a SQL source; exactly one of the two."""

    file: str | None = None
    query: str | None = Field(None, min_length=1)
    columns: dict[str, ColumnSpec]
    key: str = Field(description="the column holding the customer id")

    @model_validator(mode="after")
    def _key_is_declared(self) -> TableSpec:
        if self.key not in self.columns:
            raise ValueError(f"key column '{self.key}' is not among the declared columns")
        if (self.file is None) == (self.query is None):
            raise ValueError(
                "declare the table's 'file' (a files source) or its 'query' (a SQL source), "
                "exactly one of them"
            )
        return self


class PurposePolicy(_Frozen):
    """The columns a purpose may use, qualified as `table.column`, by the use made of them."""

    features: tuple[str, ...] = ()
    label: str | None = None
    join_keys: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    legal_basis: str = "consent"
    linkage: bool = Field(
        False, description="identifier columns are pseudonymised under a key shared across BUs"
    )
    generalise: dict[str, str] = Field(
        default_factory=dict, description="quasi-identifier -> rule (band:N, prefix:N, month, year)"
    )

    @property
    def allowed(self) -> tuple[str, ...]:
        label = (self.label,) if self.label else ()
        return tuple(dict.fromkeys((*self.join_keys, *self.features, *self.group_by, *label)))


class SiloSchema(_Frozen):
    schema_version: Literal[1] = 1
    unit: str = Field(min_length=1, pattern=r"^[a-z][a-z0-9_\-]*$")
    jurisdictions: tuple[Jurisdiction, ...] = (Jurisdiction.GDPR,)
    tables: dict[str, TableSpec]
    purposes: dict[str, PurposePolicy] = {}
    max_customers: int | None = Field(
        None,
        ge=1,
        description="the most customers the silo holds: public, and the largest weight the "
        "coordinator accepts in this BU's replies",
    )

    @model_validator(mode="after")
    def _policies_are_allowed(self) -> SiloSchema:
        if Jurisdiction.GDPR not in self.jurisdictions:
            raise ValueError("jurisdictions must include 'gdpr' (it always applies)")
        for purpose, policy in self.purposes.items():
            for qualified in (*policy.allowed, *policy.generalise):
                column = self.column(qualified, purpose=purpose)
                if column.is_special(self.jurisdictions):
                    raise PolicyViolation(
                        f"unit '{self.unit}': purpose '{purpose}' allows '{qualified}', a special "
                        "category of personal data (GDPR Art. 9; PIPL Art. 28 under 'pipl'); no "
                        f"purpose may use it. Remove it from purposes.{purpose}."
                    )
        return self

    def column(self, qualified: str, *, purpose: str | None = None) -> ColumnSpec:
        """The declaration of `table.column`; an undeclared name is a configuration error."""
        table, _, name = qualified.partition(".")
        where = f"purposes.{purpose}" if purpose else "the job"
        if table not in self.tables or name not in self.tables[table].columns:
            raise PolicyViolation(
                f"unit '{self.unit}': {where} names '{qualified}', which the schema does not "
                "declare. Declare it under tables.<table>.columns, or remove it from the policy."
            )
        return self.tables[table].columns[name]

    def is_special(self, qualified: str) -> bool:
        return self.column(qualified).is_special(self.jurisdictions)

    def policy(self, purpose: str) -> PurposePolicy:
        if purpose not in self.purposes:
            declared = ", ".join(sorted(self.purposes)) or "none"
            raise ConfigurationError(
                f"unit '{self.unit}' has not declared purpose '{purpose}' (declared: {declared}); "
                f"add a [purposes.{purpose}] policy to its schema or choose a declared purpose."
            )
        return self.purposes[purpose]
