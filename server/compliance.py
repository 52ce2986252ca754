"""A run's compliance record, derived from its audit log alone (`audit.jsonl`, `privacy.audit`).

Everything a data-protection officer reads about a run (who took part under which purpose and legal
basis, the records used and excluded by reason, the columns used and dropped, the epsilon each BU
spent after every round and what remains of its budget, secure aggregation, the artefacts with their
SHA-256) is taken from the log's entries, not from `report.json`: the log is hash-chained and signed,
so what is rendered from it is what was recorded as the run went. `report_mismatches` compares the
two, so that a report that says something the log does not is caught by `silofed audit verify`.

The record is rendered into `report.html` (as the run ends: the log is then intact but not yet
closed), and by `silofed audit report` into a page and a PDF of its own from the closed, verified
log (`server.html.render_compliance_page`, `server.pdf.pdf_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation.wire import AUDITED_FIELDS
from privacy.audit import Status, Verification, read_entries
from privacy.minimisation import DropReason

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LEGEND_SERIES = 12  # charts name their lines in a legend up to this many (server.html too)

# The threat model and its limits, as DESIGN.md states them, in a DPO's words.
THREAT_MODEL = (
    "Privacy unit: one customer of one business unit (all of that customer's rows in that BU); "
    "the guarantees hold for adding or removing any one customer.",
    "The coordinator is honest but curious: it follows the protocol and never receives a row of "
    "customer data. With secure aggregation it sees only the sum of the BUs' replies.",
    "Business units are honest but curious towards each other: nothing of one BU reaches another "
    "except through results that are differentially private.",
    "Readers of results see only differentially private outputs and the metadata listed as "
    "disclosed.",
    "The network is hostile: on a deployment every link is TLS and only enrolled BU nodes, "
    "authenticated by their keys, may connect.",
)
OUT_OF_SCOPE = (
    "a coordinator that deviates from the protocol (including SecAgg+)",
    "more BUs colluding with the coordinator than the secure-aggregation threshold allows",
    "side channels (timing, memory, power) on any machine",
    "a customer present in several BUs: their guarantee is the sum of those BUs' epsilons",
    "what people do with the results after the run",
)
NOISE_WORDS = {
    "local": (
        "each BU adds the full noise to everything it sends, calibrated and checked from its own "
        "policy, so the guarantee holds without trusting the coordinator"
    ),
    "distributed": (
        "each BU adds a share of the noise and the coordinator sees only the securely aggregated "
        "sum, which carries the full noise while enough BUs survive"
    ),
    "central": (
        "the BUs send clipped contributions under secure aggregation and the coordinator adds the "
        "noise: the coordinator saw the exact sum and is trusted to have noised it"
    ),
}


@dataclass(frozen=True)
class ComplianceRecord:
    """What a run's audit log records, ready to render. `units` are the `unit.released` entries
    (one per BU that answered), `rounds` the `round.finished` ones, `exchanges` the
    `exchange.aggregated` ones, `artefacts` the `artefact.written` ones; `status` and `message`
    are the log's verification when the record was read."""

    run_id: str
    job: dict[str, Any]
    opened: str
    last_time: str
    entries: int
    status: str
    message: str
    units: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    failed: str | None = None
    artefacts: list[dict[str, Any]] = field(default_factory=list)
    public_key: str | None = None

    @classmethod
    def from_entries(
        cls, entries: list[dict[str, Any]], verification: Verification
    ) -> ComplianceRecord:
        if not entries:
            raise ValueError("the audit log has no verified entry to render")
        by_event: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            by_event.setdefault(entry["event"], []).append(entry["data"])
        accepted = by_event.get("job.accepted", [])
        if not accepted:
            raise ValueError("the audit log records no accepted job")
        opened = by_event.get("log.opened", [{}])[0]
        failed = by_event.get("run.failed", [])
        return cls(
            run_id=accepted[0]["run_id"],
            job=accepted[0],
            opened=entries[0]["time"],
            last_time=entries[-1]["time"],
            entries=len(entries),
            status=str(verification.status),
            message=verification.message,
            units=sorted(by_event.get("unit.released", []), key=lambda u: u["unit"]),
            rounds=by_event.get("round.finished", []),
            exchanges=by_event.get("exchange.aggregated", []),
            refused=by_event.get("unit.refused", []),
            dropped=by_event.get("unit.dropped", []),
            failed=failed[-1]["error"] if failed else None,
            artefacts=by_event.get("artefact.written", []),
            public_key=opened.get("public_key"),
        )

    @classmethod
    def of_log(cls, log_file: Path, verification: Verification) -> ComplianceRecord:
        """The record of the verified part of `log_file` (`verification` from `privacy.audit`)."""
        return cls.from_entries(read_entries(log_file, verification.entries), verification)

    def epsilon_series(self) -> dict[str, list[tuple[int, float]]]:
        """Per BU, the epsilon it had spent in this run after each round, from `round.finished`."""
        series: dict[str, list[tuple[int, float]]] = {}
        for summary in self.rounds:
            for unit, epsilon in sorted(summary["epsilon"].items()):
                series.setdefault(unit, []).append((int(summary["round"]), float(epsilon)))
        return series

    def budgets(self) -> list[dict[str, Any]]:
        """Per BU: the ledger's epsilon for the purpose and for the BU as a whole after this run,
        the budgets (None: the BU set none) and what remains of each."""
        rows = []
        for unit in self.units:
            purpose_budget, unit_budget = unit.get("budget"), unit.get("budget_unit")
            rows.append(
                {
                    "unit": unit["unit"],
                    "spent_run": unit["epsilon"],
                    "spent_purpose": unit["epsilon_total"],
                    "budget_purpose": purpose_budget,
                    "remaining_purpose": _remaining(purpose_budget, unit["epsilon_total"]),
                    "spent_unit": unit["epsilon_unit_total"],
                    "budget_unit": unit_budget,
                    "remaining_unit": _remaining(unit_budget, unit["epsilon_unit_total"]),
                }
            )
        return rows

    @property
    def complete(self) -> bool:
        return self.status == str(Status.COMPLETE)

    def guarantees(self) -> list[str]:
        """The privacy guarantee per BU, in plain language, with the figures from the log."""
        job = self.job
        delta = job["delta"]
        sentences = []
        for unit in self.units:
            sentences.append(
                f"{unit['unit']}: for any one of its customers, everything this run released is "
                f"(ε = {unit['epsilon']:.3f}, δ = {delta:g})-differentially private: whether or "
                f"not that customer's data was used changes the probability of any result by a "
                f"factor of at most e^{unit['epsilon']:.3f} = {math.exp(unit['epsilon']):.2f}, "
                f"except with probability {delta:g}. Over all its runs for the purpose "
                f"'{unit['purpose']}' the BU has spent ε = {unit['epsilon_total']:.3f}, and "
                f"ε = {unit['epsilon_unit_total']:.3f} over all purposes."
            )
        noise = job.get("noise", "local")
        sentences.append(f"Noise placement '{noise}': {NOISE_WORDS.get(noise, noise)}.")
        return sentences

    def survivors(self) -> list[dict[str, Any]]:
        """Per exchange: the round, phase, BUs whose replies were aggregated and those dropped."""
        return [
            {
                "round": e["round"],
                "phase": e["phase"],
                "units": e["units"],
                "dropped": e.get("dropped", []),
                "secure_aggregation": e["secure_aggregation"],
            }
            for e in self.exchanges
        ]


def _remaining(budget: float | None, spent: float) -> float | None:
    return None if budget is None else max(budget - spent, 0.0)


def report_mismatches(report: dict[str, Any], record: ComplianceRecord) -> list[str]:
    """Where `report` (a run's `report.json`) says something other than its audit log: the run,
    the BUs that answered or refused, each BU's figures, and the epsilon after every round."""
    problems = []
    if report.get("run_id") != record.run_id:
        problems.append(
            f"run_id: the report says {report.get('run_id')!r}, the log {record.run_id!r}"
        )
    job = report.get("job", {})
    for key in ("purpose", "rounds", "epsilon", "delta"):
        if job.get(key) != record.job.get(key):
            problems.append(
                f"job.{key}: the report says {job.get(key)!r}, the log {record.job.get(key)!r}"
            )
    stated = {
        u["unit"]: u for u in report.get("privacy", {}).get("per_unit", []) if not u.get("refused")
    }
    logged = {u["unit"]: u for u in record.units}
    if sorted(stated) != sorted(logged):
        problems.append(
            f"BUs that released: the report says {sorted(stated)}, the log {sorted(logged)}"
        )
    for unit in sorted(set(stated) & set(logged)):
        for key in AUDITED_FIELDS:
            if stated[unit].get(key) != logged[unit].get(key):
                problems.append(
                    f"{unit}.{key}: the report says {stated[unit].get(key)!r}, the log "
                    f"{logged[unit].get(key)!r}"
                )
    refused = sorted(report.get("federation", {}).get("refused_units", []))
    if refused != sorted(r["unit"] for r in record.refused):
        problems.append(
            f"refused BUs: the report says {refused}, the log "
            f"{sorted(r['unit'] for r in record.refused)}"
        )
    stated_rounds = [(r["round"], r["epsilon"]) for r in report.get("rounds", [])]
    logged_rounds = [(r["round"], r["epsilon"]) for r in record.rounds]
    if stated_rounds != logged_rounds:
        problems.append("rounds: the epsilon after each round differs between report and log")
    return problems


# --- the record as a document: sections of paragraphs, lists, tables and charts ------------------
# One structure, rendered to HTML (server.html) and to PDF (server.pdf), so both say the same.


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Any]]
    numeric: tuple[int, ...] = ()


@dataclass(frozen=True)
class Chart:
    caption: str
    size: tuple[float, float]
    draw: Callable[[Figure], None]


Block = Paragraph | Bullets | Table | Chart


@dataclass(frozen=True)
class Section:
    title: str
    blocks: list[Block]


def sections(record: ComplianceRecord) -> list[Section]:
    """The compliance record as the sections a DPO reads, in order."""
    return [
        _summary(record),
        _purposes(record),
        _records(record),
        _columns(record),
        _privacy(record),
        _protection(record),
        _artefacts(record),
        Section(
            "Threat model and what is out of scope",
            [
                Bullets(list(THREAT_MODEL)),
                Paragraph("Out of scope (no guarantee is claimed against):"),
                Bullets(list(OUT_OF_SCOPE)),
            ],
        ),
        _verification(record),
    ]


def _summary(record: ComplianceRecord) -> Section:
    job = record.job
    asked = f"{job['kind']} job, task {job['task']}" if job["kind"] == "model" else job["kind"]
    rows = [
        ["run", record.run_id],
        ["mode", job["mode"]],
        ["job", f"{asked}; purpose {job['purpose']}"],
        ["SHA-256 of the resolved job", job["job_sha256"]],
        ["rounds", f"{len(record.rounds)} completed of {job['rounds']} planned"],
        ["privacy target", f"ε ≤ {job['epsilon']:g} per BU at δ = {job['delta']:g}"],
        ["noise placement", job["noise"]],
        ["secure aggregation", "on (SecAgg+)" if job["secure_aggregation"] else "off"],
        [
            "business units",
            f"{job['units_expected']} expected; {len(record.units)} released results; "
            f"{len(record.refused)} refused; {len({d.get('unit') for d in record.dropped})} "
            "dropped out",
        ],
        ["outcome", f"failed: {record.failed}" if record.failed else "completed"],
        ["recorded", f"{record.opened} to {record.last_time} (UTC)"],
    ]
    blocks: list[Block] = [Table(["", ""], rows)]
    if record.refused:
        blocks.append(Paragraph("Refused the job (nothing read, nothing spent):"))
        blocks.append(Table(["BU", "reason"], [[r["unit"], r["reason"]] for r in record.refused]))
    if record.dropped:
        blocks.append(Paragraph("Dropped out during the run:"))
        blocks.append(
            Table(
                ["round", "phase", "BU", "reason"],
                [
                    [d["round"], d["phase"], d.get("unit") or "unidentified", d["reason"]]
                    for d in record.dropped
                ],
            )
        )
    return Section("Run summary", blocks)


def _purposes(record: ComplianceRecord) -> Section:
    rows = [
        [
            u["unit"],
            u["purpose"],
            u.get("legal_basis") or "not stated",
            ", ".join(u.get("jurisdictions") or []) or "not stated",
        ]
        for u in record.units
    ]
    return Section(
        "Purposes and legal basis",
        [
            Paragraph(
                "Each BU checked the job's purpose against its own declared purposes and its "
                "consent registry before reading any data; the legal basis is the one the BU "
                "declared for the purpose."
            ),
            Table(["BU", "purpose", "legal basis", "jurisdictions"], rows),
        ],
    )


def _records(record: ComplianceRecord) -> Section:
    reasons = sorted({r for u in record.units for r in u["excluded"]})
    rows = [
        [
            u["unit"],
            u["records_used"],
            u["records_test"],
            *(u["excluded"].get(r, 0) for r in reasons),
        ]
        for u in record.units
    ]
    total = [
        "all BUs",
        sum(u["records_used"] for u in record.units),
        sum(u["records_test"] for u in record.units),
        *(sum(u["excluded"].get(r, 0) for u in record.units) for r in reasons),
    ]
    return Section(
        "Records used and excluded",
        [
            Paragraph(
                "Customers each BU used (for a model: to train, and held out to evaluate), and "
                "those it left out before any computation, by reason: no consent for the purpose, "
                "consent revoked, a minor without a guardian's consent, erased, failed the data "
                "quality rules. Counts only; no customer is named."
            ),
            Table(
                ["BU", "used", "held out", *(f"excluded: {r}" for r in reasons)],
                [*rows, total] if len(rows) > 1 else rows,
                numeric=tuple(range(1, 3 + len(reasons))),
            ),
        ],
    )


def _columns(record: ComplianceRecord) -> Section:
    rows = []
    for u in record.units:
        rows.append([u["unit"], "used", "allowed for the purpose", ", ".join(u["columns_used"])])
        by_reason: dict[str, list[str]] = {}
        for dropped in u["columns_dropped"]:
            by_reason.setdefault(dropped["reason"], []).append(dropped["column"])
        for reason, columns in by_reason.items():
            rows.append(
                [u["unit"], "dropped", _DROP_REASONS.get(reason, reason), ", ".join(columns)]
            )
    return Section(
        "Columns used and dropped",
        [
            Paragraph(
                "Data minimisation, per BU: the columns the job read, and those removed before "
                "any computation with the reason. Identifier columns that were used travel only as "
                "keyed pseudonyms inside the BU and never leave it."
            ),
            Table(["BU", "", "reason", "columns (table.column)"], rows),
        ],
    )


_DROP_REASONS = {
    DropReason.SPECIAL_CATEGORY: (
        "special category of personal data (GDPR Art. 9; PIPL Art. 28 where it applies): never used"
    ),
    DropReason.NOT_ALLOWED: "not allowed for the purpose",
    DropReason.UNDECLARED: "not declared in the BU's schema: never passed through",
}


def _privacy(record: ComplianceRecord) -> Section:
    delta = record.job["delta"]
    rows = [
        [
            b["unit"],
            f"{b['spent_run']:.3f}",
            f"{delta:g}",
            f"{b['spent_purpose']:.3f}",
            "no budget" if b["budget_purpose"] is None else f"{b['budget_purpose']:g}",
            "" if b["remaining_purpose"] is None else f"{b['remaining_purpose']:.3f}",
            f"{b['spent_unit']:.3f}",
            "no budget" if b["budget_unit"] is None else f"{b['budget_unit']:g}",
            "" if b["remaining_unit"] is None else f"{b['remaining_unit']:.3f}",
        ]
        for b in record.budgets()
    ]
    blocks: list[Block] = [
        Bullets(record.guarantees()),
        Table(
            [
                "BU",
                "ε this run",
                "δ",
                "ε purpose (ledger)",
                "purpose budget",
                "remaining",
                "ε all purposes",
                "BU budget",
                "remaining",
            ],
            rows,
            numeric=tuple(range(1, 9)),
        ),
    ]
    if record.rounds:
        blocks.append(_epsilon_chart(record))
    if record.units:
        blocks.append(_budget_chart(record))
    return Section("Privacy guarantees and budget", blocks)


def _epsilon_chart(record: ComplianceRecord) -> Chart:
    series = record.epsilon_series()
    target = float(record.job["epsilon"])

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for unit, points in series.items():
            rounds, values = zip(*points, strict=True)
            ax.plot(rounds, values, marker="o", markersize=3, label=unit.replace("$", r"\$"))
        ax.axhline(target, linestyle="--", color="grey", label="target")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel("ε spent in the run (cumulative)")
        ax.set_ylim(bottom=0)
        if len(series) <= LEGEND_SERIES:  # more would squeeze the axes away; the table has them
            ax.legend(fontsize="small")

    return Chart("Epsilon spent per BU after each round, from the audit log", (5.5, 3.4), draw)


def _budget_chart(record: ComplianceRecord) -> Chart:
    rows = record.budgets()

    def draw(fig: Figure) -> None:
        import numpy as np

        ax = fig.subplots()
        x = np.arange(len(rows), dtype=np.float64)
        earlier = [r["spent_purpose"] - r["spent_run"] for r in rows]
        run = [r["spent_run"] for r in rows]
        left = [r["remaining_purpose"] or 0.0 for r in rows]
        ax.bar(x, earlier, 0.6, label="spent before this run", color="#9aa5b1")
        ax.bar(x, run, 0.6, bottom=earlier, label="spent in this run", color="#3b6ea5")
        ax.bar(
            x,
            left,
            0.6,
            bottom=[a + b for a, b in zip(earlier, run, strict=True)],
            label="remaining budget",
            color="#b8dfb8",
        )
        for i, r in enumerate(rows):
            if r["budget_purpose"] is None:
                ax.annotate(
                    "no budget set",
                    (x[i], r["spent_purpose"]),
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    fontsize="small",
                )
        ax.set_xticks(x, [r["unit"].replace("$", r"\$") for r in rows])
        if len(rows) > 6 or max(len(r["unit"]) for r in rows) > 10:
            for text in ax.get_xticklabels():
                text.set_rotation(40)
                text.set_horizontalalignment("right")
        tops = [a + b + c for a, b, c in zip(earlier, run, left, strict=True)]
        ax.set_ylim(0, max(max(tops), 1e-9) * 1.35)  # room for the labels and the legend
        ax.set_ylabel("ε for the purpose (ledger)")
        ax.legend(fontsize="small", loc="upper left", ncols=3)

    return Chart(
        f"Epsilon per BU for the purpose '{record.job['purpose']}': spent before, spent in this "
        "run, and what remains of the BU's budget",
        (max(5.5, 1.0 + 0.7 * len(rows)), 3.6),
        draw,
    )


def _protection(record: ComplianceRecord) -> Section:
    job = record.job
    blocks: list[Block] = []
    if job["secure_aggregation"]:
        blocks.append(
            Paragraph(
                "Secure aggregation (SecAgg+) was on: in every exchange the coordinator received "
                "only the sum of the surviving BUs' masked replies."
            )
        )
    else:
        blocks.append(
            Paragraph(
                "Secure aggregation was off: the coordinator received each BU's reply, which the "
                "BU had made differentially private itself."
            )
        )
    survivors = record.survivors()
    if survivors:
        blocks.append(
            Table(
                ["round", "phase", "replies aggregated", "BUs", "dropped"],
                [
                    [
                        s["round"],
                        s["phase"],
                        len(s["units"]),
                        ", ".join(s["units"]),
                        ", ".join(s["dropped"]) or "none",
                    ]
                    for s in survivors
                ],
                numeric=(0, 2),
            )
        )
    transit = (
        "TLS on every link between BU nodes and the coordinator, and node authentication: only "
        "enrolled BU keys may connect"
        if job["mode"] == "deployment"
        else "a simulation on one machine: BUs and coordinator exchange messages in process, "
        "without a network"
    )
    blocks.append(
        Table(
            ["BU", "silo encrypted at rest", "identifiers", "in transit"],
            [
                [
                    u["unit"],
                    "yes (AES-GCM)" if u["encrypted_at_rest"] else "no",
                    "pseudonymised with a key the BU keeps",
                    transit,
                ]
                for u in record.units
            ],
        )
    )
    return Section("Secure aggregation and encryption", blocks)


def _artefacts(record: ComplianceRecord) -> Section:
    if not record.artefacts:
        return Section(
            "Artefacts", [Paragraph("The log lists no artefact (yet): the run had not ended.")]
        )
    return Section(
        "Artefacts",
        [
            Paragraph(
                "Every file of the run directory, with its SHA-256 as logged when it was written; "
                "`silofed audit verify` recomputes each."
            ),
            Table(
                ["file", "bytes", "SHA-256"],
                [[a["name"], a["bytes"], a["sha256"]] for a in record.artefacts],
                numeric=(1,),
            ),
        ],
    )


def _verification(record: ComplianceRecord) -> Section:
    if record.complete:
        state = (
            f"The audit log verified as {record.message}, against the public key "
            f"{record.public_key}."
        )
    else:
        state = (
            f"When this was rendered, the audit log was {record.message}. A run writes its final "
            "signed checkpoint after its last artefact, so a report rendered during the run sees "
            "the log still open."
        )
    return Section(
        "Verification",
        [
            Paragraph(state),
            Paragraph(
                "To check the run independently: `silofed audit verify RUN_DIR --public-key KEY` "
                "with the coordinator's published key; it checks the hash chain, every signature, "
                "every artefact's SHA-256, and that report.json agrees with the log."
            ),
        ],
    )
