"""Purpose-bound data minimisation (GDPR Art. 5(1)(c), 9 and 25).

Before any computation, a silo's tables are cut down to the columns the job's purpose allows.
Special categories are dropped whatever a policy says (a policy that allows one is refused earlier,
when the schema is loaded); columns the schema does not declare are dropped and reported, never passed
through. The result names every column kept and every column dropped with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from privacy.schema import SiloSchema


class DropReason:
    SPECIAL_CATEGORY = "special_category"
    NOT_ALLOWED = "not_allowed_for_purpose"
    UNDECLARED = "undeclared_in_schema"


@dataclass(frozen=True)
class ColumnDrop:
    column: str
    reason: str


@dataclass(frozen=True)
class Minimised:
    tables: dict[str, pd.DataFrame]
    used: tuple[str, ...]
    dropped: tuple[ColumnDrop, ...]


def minimise(tables: dict[str, pd.DataFrame], schema: SiloSchema, purpose: str) -> Minimised:
    """Keep only the columns `purpose` allows, qualified as `table.column` in the result lists."""
    allowed = set(schema.policy(purpose).allowed)
    kept: dict[str, pd.DataFrame] = {}
    used: list[str] = []
    dropped: list[ColumnDrop] = []
    for table, frame in tables.items():
        declared = schema.tables[table].columns
        keep = []
        for name in frame.columns:
            qualified = f"{table}.{name}"
            if name not in declared:
                dropped.append(ColumnDrop(qualified, DropReason.UNDECLARED))
            elif declared[name].is_special(schema.jurisdictions):
                dropped.append(ColumnDrop(qualified, DropReason.SPECIAL_CATEGORY))
            elif qualified not in allowed:
                dropped.append(ColumnDrop(qualified, DropReason.NOT_ALLOWED))
            else:
                keep.append(name)
                used.append(qualified)
        kept[table] = frame.loc[:, keep]
    return Minimised(tables=kept, used=tuple(used), dropped=tuple(dropped))
