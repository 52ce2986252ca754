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

import json
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privacy.errors import ConfigurationError, PolicyViolation

SCHEMA_FILE = "schema.json"


class ColumnType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    CATEGORY = "category"
    DATE = "date"
    DATETIME = "datetime"


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

    @property
    def is_special(self) -> bool:
        return self.role is ColumnRole.SPECIAL_CATEGORY


class TableSpec(_Frozen):
    file: str
    columns: dict[str, ColumnSpec]
    key: str = Field(description="the column holding the customer id")

    @model_validator(mode="after")
    def _key_is_declared(self) -> TableSpec:
        if self.key not in self.columns:
            raise ValueError(f"key column '{self.key}' is not among the declared columns")
        return self


class PurposePolicy(_Frozen):
    """The columns a purpose may use, qualified as `table.column`, by the use made of them."""

    features: tuple[str, ...] = ()
    label: str | None = None
    join_keys: tuple[str, ...] = ()
    legal_basis: str = "consent"

    @property
    def allowed(self) -> tuple[str, ...]:
        label = (self.label,) if self.label else ()
        return (*self.join_keys, *self.features, *label)


class SiloSchema(_Frozen):
    schema_version: Literal[1] = 1
    unit: str = Field(min_length=1, pattern=r"^[a-z][a-z0-9_\-]*$")
    tables: dict[str, TableSpec]
    purposes: dict[str, PurposePolicy] = {}

    @model_validator(mode="after")
    def _policies_are_allowed(self) -> SiloSchema:
        for purpose, policy in self.purposes.items():
            for qualified in policy.allowed:
                column = self.column(qualified, purpose=purpose)
                if column.is_special:
                    raise PolicyViolation(
                        f"unit '{self.unit}': purpose '{purpose}' allows '{qualified}', a special "
                        "category of personal data (GDPR Art. 9); no purpose may use it. Remove it "
                        f"from purposes.{purpose}."
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

    def policy(self, purpose: str) -> PurposePolicy:
        if purpose not in self.purposes:
            declared = ", ".join(sorted(self.purposes)) or "none"
            raise ConfigurationError(
                f"unit '{self.unit}' has not declared purpose '{purpose}' (declared: {declared}); "
                f"add a [purposes.{purpose}] policy to its schema or choose a declared purpose."
            )
        return self.purposes[purpose]

    @classmethod
    def load(cls, path: Path) -> SiloSchema:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigurationError(
                f"{path}: no schema file; every silo directory needs a {SCHEMA_FILE} that declares "
                "its tables (`silofed data synth` writes one as an example)."
            ) from None
        try:
            return cls.model_validate(json.loads(text))
        except json.JSONDecodeError as err:
            raise ConfigurationError(f"{path}: not valid JSON ({err}); fix the file.") from None
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                for e in err.errors()
            )
            raise ConfigurationError(f"{path}: invalid schema: {problems}") from None
        except PolicyViolation as err:
            raise PolicyViolation(f"{path}: {err}") from None

    def dump(self) -> str:
        return self.model_dump_json(indent=2, exclude_defaults=False)
