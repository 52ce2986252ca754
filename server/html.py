"""`report.html`: the run's report for a person, rendered from `report.json` alone.

The page shows the facts `server.report.build_report` recorded, nothing from logs, and fetches
nothing when opened: no script, no stylesheet, font or image from elsewhere; charts are inline SVG
drawn with matplotlib's object API (no pyplot state, no GUI backend). What it shows follows the
job's kind:

- model: the metrics with their intervals; under the DP evaluation the ROC curve, the cumulative
  gain and lift charts and the calibration curve with its intervals (a regression: RMSE, MAE and
  the mean label with theirs); under the exact evaluation the metrics after every round;
- query: every answer with its interval, noise scale and granularity, and the chart its recipe
  asked for (`federation.queries.Chart`): bars with error bars, a funnel per group with the
  conversions between stages, a heat map of a two-key aggregate such as cohort retention, the top
  categories per segment; a query without a chart gets bars (points for quantiles) per grouped
  aggregate;
- segments: the segments' sizes and profiles (centroids on the scaled features) with their
  intervals, and the centroids in natural units when the run recorded them.

Every run adds the privacy spent, the figures per BU, the guarantees, what was disclosed without
differential privacy and what is out of scope. The report holds BU names, column names and
category labels taken from user files: every string is escaped for HTML, and in charts `$` is
escaped so that matplotlib never reads a label as mathtext.
"""

from __future__ import annotations

import html
import io
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np

from federation.evaluation import INTERVAL_LEVEL
from server.compliance import (
    LEGEND_SERIES,
    Bullets,
    ComplianceRecord,
    Paragraph,
    Section,
    Table,
    sections,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CHART_STYLE = {
    "svg.fonttype": "none",  # text stays text: small, selectable, drawn by the reader's fonts
    "svg.hashsalt": "silofed-report",  # ids from content alone: one report, one page, byte for byte
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
# Removed from matplotlib's SVG: its metadata (links to vocabularies) and the XML namespace
# declarations, which HTML's parser supplies itself for inline SVG.
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_SVG_NAMESPACES = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
_ANNOTATED_CELLS = 300  # a heat map prints its values in the cells up to this many cells
_FOLDED_ROWS = 60  # a longer table of answers starts folded
_SERIES_AS_BARS = 8  # a table's last dimension up to this size becomes grouped bars
_LABEL_CHARS = 32  # chart labels are cut to this many characters (tables keep them whole)


def render_html(report: dict, compliance: ComplianceRecord | None = None) -> str:
    """The run's page; with `compliance`, the record rendered from the run's audit log follows."""
    kind = report["job"].get("kind", "model")
    body = {"model": _model_part, "query": _query_part, "segments": _segments_part}[kind](report)
    record = ""
    if compliance is not None:
        record = (
            '<h1>Compliance record</h1><p class="note">Rendered from the run\'s audit log '
            f"(<code>audit.jsonl</code>, entries 0 to {compliance.entries - 1}), not from "
            "report.json.</p>" + _sections(sections(compliance))
        )
    return _page(
        f"silofed run {report['run_id']}",
        f"""<h1>silofed run <code>{_e(report["run_id"])}</code></h1>
{_overview(report)}
{body}
{_privacy_part(report)}
{record}""",
    )


def render_compliance_page(record: ComplianceRecord) -> str:
    """A page of its own for the compliance record (`silofed audit report`)."""
    return _page(
        f"silofed compliance record {record.run_id}",
        f"<h1>Compliance record of run <code>{_e(record.run_id)}</code></h1>"
        + _sections(sections(record)),
    )


def _sections(parts: Sequence[Section]) -> str:
    out = []
    for section in parts:
        out.append(f"<h2>{_e(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out.append(f"<p>{_code(block.text)}</p>")
            elif isinstance(block, Bullets):
                out.append("<ul>" + "".join(f"<li>{_code(i)}</li>" for i in block.items) + "</ul>")
            elif isinstance(block, Table):
                out.append(_table(block.header, block.rows, numeric=block.numeric))
            else:
                out.append(
                    f'<div class="charts">{_chart(block.caption, block.size, block.draw)}</div>'
                )
    return "\n".join(out)


def _code(text: str) -> str:
    """Escaped text with `backquoted` spans as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:.85em;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}}
th{{background:#f3f3f3}}td.n{{text-align:right;font-variant-numeric:tabular-nums}}
.kv td:first-child{{font-weight:600}}.note{{color:#555;font-size:.9em}}
.charts{{display:flex;flex-wrap:wrap;gap:1em}}figure{{margin:0;flex:1 1 500px}}
figure svg{{max-width:100%;height:auto}}figcaption{{font-size:.85em;color:#555}}
.warn{{background:#fff4e5;border-left:4px solid #e69500;padding:.5em .8em}}
</style></head><body>
{body}
</body></html>
"""


# --- the run at a glance ---------------------------------------------------------------------------


def _overview(report: dict) -> str:
    job, federation, privacy = report["job"], report["federation"], report["privacy"]
    kind = job.get("kind", "model")
    if kind == "query":
        query = job.get("query") or {}
        recipe = (report.get("results") or {}).get("recipe") or query.get("recipe")
        asked = "analytics query" + (f" (recipe {recipe})" if recipe else "")
    elif kind == "segments":
        segments = job.get("segments") or {}
        asked = f"k-means segmentation into {segments.get('k', '?')} segments"
    else:
        asked = f"{job['task']} model"
    refused = federation.get("refused_units") or []
    units = ", ".join(federation["units"]) or "none"
    if refused:
        units += f"; refused: {', '.join(refused)}"
    secure = federation.get("secure_aggregation_threshold")
    secure_words = (
        f"on (SecAgg+, threshold {secure['threshold']} of {secure['units']} BUs)"
        if secure
        else "off"
    )
    rows = [
        ("job", f"{asked}; purpose {job['purpose']}"),
        ("started", report.get("started_at", "")),
        ("mode", f"{federation['mode']} (seed: {federation['seed']})"),
        ("business units", units),
        ("rounds completed", f"{federation['rounds_completed']} of {job['rounds']}"),
        ("noise", f"{privacy.get('noise_placement', 'local')}; secure aggregation {secure_words}"),
        ("aggregation", federation.get("strategy", "")),
        (
            "privacy target",
            f"epsilon ≤ {job['epsilon']:g} per BU at delta = {privacy['delta']:g}",
        ),
    ]
    table = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    table += f"<tr><td>privacy unit</td><td>{_privacy_unit(privacy['unit'])}</td></tr>"
    rejected = federation.get("rejected")
    dropouts = federation.get("dropouts") or []
    dropped = ""
    if rejected:
        dropped = "<h3>Rejected or missing replies</h3>" + _table(
            ["round", "phase", "BU", "reason"],
            [[e["round"], e.get("phase", ""), e["unit"], e["reason"]] for e in rejected],
        )
    elif dropouts:  # reports written before replies were validated
        dropped = "<h3>Dropouts</h3>" + _table(
            ["round", "phase", "BU", "reason"],
            [
                [d.get("round", ""), d.get("phase", ""), d.get("unit") or "", d.get("reason", "")]
                for d in dropouts
            ],
        )
    failed = ""
    if report.get("status") == "failed":
        failed = (
            '<p class="warn"><b>This run failed</b> after '
            f"{federation.get('rounds_completed', 0)} completed round(s): "
            f"{_e(report.get('error') or '')}. What the BUs released before the failure is "
            "below and in their ledgers; there is no model and no result.</p>"
        )
    return f'{failed}<table class="kv">{table}</table>{dropped}'


def _privacy_unit(unit: str) -> str:
    if unit == "record":
        return (
            '<div class="warn"><b>record</b>: the data named no customer id, so each row was '
            "treated as its own customer. A person behind several rows is protected row by row "
            "only: their guarantee weakens with the number of their rows.</div>"
        )
    if unit == "customer":
        return "<b>customer</b>: one customer of one BU, with all of that customer's rows"
    return _e(unit)


# --- model jobs ------------------------------------------------------------------------------------


def _model_part(report: dict) -> str:
    model = report["model"] or {}
    metrics = model.get("metrics") or {}
    curves = model.get("curves") or {}
    names = model.get("metric_names") or ["auc", "log_loss", "brier"]
    regression = "rmse" in names
    rows = []
    for name in names:
        value = metrics.get(name)
        if value is None and name not in ("auc", "rmse", "mae"):
            continue  # a metric the evaluation did not release
        note = ""
        if name == "auc" and metrics.get("auc_ceiling") is not None:
            note = f"ceiling (the true model): {_num(metrics['auc_ceiling'])}"
        if name in ("log_loss", "brier") and curves.get("losses_from"):
            note = f"from {curves['losses_from']}"
        rows.append([_METRIC_NAMES.get(name, name), value, metrics.get(f"{name}_interval"), note])
    if curves.get("base_rate") is not None:
        rows.append(["base rate", curves["base_rate"], None, "noisy positives / noisy customers"])
    if curves.get("mean_label") is not None:
        rows.append(["mean label", curves["mean_label"], curves.get("mean_label_interval"), ""])
    customers = curves.get("test_customers", metrics.get("test_customers"))
    rows.append(
        [
            "held-out customers",
            customers,
            curves.get("test_customers_interval"),
            "all BUs" + (", noisy" if curves else ""),
        ]
    )
    level = _level_words(INTERVAL_LEVEL)
    summary = _table(
        ["metric", "value", f"{level} interval", "note"],
        [[name, _num(v), _interval(i), note] for name, v, i, note in rows],
        numeric=(1, 2),
    )
    evaluation = model.get("evaluation", "")
    spent = model.get("evaluation_epsilon")
    details = (
        f"<p>{_e(model.get('type', ''))} on {len(model.get('features') or [])} features "
        f"({_e(', '.join(model.get('features') or []))}); evaluation: {_e(evaluation)}"
        + (f", spending epsilon {spent:g}" if spent is not None else "")
        + f'.</p><p class="note">{_e(model.get("evaluation_note", ""))}</p>'
    )
    charts = []
    if evaluation == "exact":
        charts.extend(_per_round_charts(report, regression))
    if curves and not regression:
        charts.extend(_binary_curves(curves))
    elif curves:
        charts.append(_regression_chart(curves))
    calibration = ""
    if curves.get("calibration"):
        calibration = _calibration_table(curves["calibration"])
    return (
        f"<h2>Model quality</h2>{summary}{details}"
        + (f'<div class="charts">{"".join(charts)}</div>' if charts else "")
        + calibration
    )


_METRIC_NAMES = {
    "auc": "AUC",
    "log_loss": "log-loss",
    "brier": "Brier score",
    "rmse": "RMSE",
    "mae": "MAE",
}


def _per_round_charts(report: dict, regression: bool) -> list[str]:
    rounds = report["rounds"]
    names = ("rmse", "mae") if regression else ("auc",)
    series = {
        _METRIC_NAMES[name]: [
            (r["round"], r["metrics"][name]) for r in rounds if _finite(r["metrics"].get(name))
        ]
        for name in names
    }
    if not any(series.values()):
        return []
    ceiling = (report["model"].get("metrics") or {}).get("auc_ceiling")
    return [
        _line_chart(
            "Held-out metrics after each round (exact evaluation)",
            series,
            xlabel="round",
            ylabel=" / ".join(series),
            hline=("ceiling (true model)", ceiling) if not regression and ceiling else None,
            integer_x=True,
        )
    ]


def _binary_curves(curves: dict) -> list[str]:
    auc, interval = curves.get("auc"), curves.get("auc_interval") or [None, None]
    auc_words = "AUC " + " ".join(filter(None, (_fixed(auc), _interval(interval, fixed=True))))
    charts = []
    roc = [(p["fpr"], p["tpr"]) for p in curves.get("roc") or []]
    if roc:
        charts.append(
            _line_chart(
                f"ROC curve from the noisy score histograms ({auc_words})",
                {"model": roc},
                xlabel="false positive rate",
                ylabel="true positive rate",
                diagonal="random",
                unit_square=True,
            )
        )
    gain = [(p["fraction_targeted"], p["fraction_of_positives"]) for p in curves.get("gain") or []]
    if gain:
        charts.append(
            _line_chart(
                "Cumulative gain: share of all positives among the customers targeted, highest "
                "scores first",
                {"model": gain},
                xlabel="share of customers targeted",
                ylabel="share of positives found",
                diagonal="random targeting",
                unit_square=True,
            )
        )
    lift = [(p["fraction_targeted"], p["lift"]) for p in curves.get("lift") or []]
    if lift:
        charts.append(
            _line_chart(
                "Lift: positive rate among the customers targeted over the base rate",
                {"model": lift},
                xlabel="share of customers targeted",
                ylabel="lift",
                hline=("random targeting", 1.0),
            )
        )
    if curves.get("calibration"):
        charts.append(_calibration_chart(curves["calibration"]))
    return charts


def _regression_chart(curves: dict) -> str:
    names = [("rmse", "RMSE"), ("mae", "MAE"), ("mean_label", "mean label")]
    present = [(key, label) for key, label in names if curves.get(key) is not None]
    return _bar_chart(
        f"Errors and the mean label in the label's units, with {_level_words(INTERVAL_LEVEL)} intervals "
        "for the noise",
        [label for _, label in present],
        [
            _Series(
                "",
                [curves[key] for key, _ in present],
                [(curves.get(f"{key}_interval") or [None, None])[0] for key, _ in present],
                [(curves.get(f"{key}_interval") or [None, None])[1] for key, _ in present],
            )
        ],
        ylabel="label units",
    )


def _calibration_chart(rows: list[dict]) -> str:
    observed = [r for r in rows if _finite(r.get("observed_rate"))]

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
        scores = _floats([r["mean_score"] for r in observed])
        rates = _floats([r["observed_rate"] for r in observed])
        intervals = [r.get("observed_rate_interval") or [None, None] for r in observed]
        ax.errorbar(
            scores,
            rates,
            yerr=_error_bars(rates, [i[0] for i in intervals], [i[1] for i in intervals]),
            marker="o",
            capsize=3,
            label="observed rate (noisy)",
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("mean predicted score of the bin group")
        ax.set_ylabel("observed positive rate")
        ax.legend(fontsize="small")

    return _chart(
        "Calibration: observed positive rate per group of score bins, with "
        f"{_level_words(INTERVAL_LEVEL)} intervals for the noise",
        (5.5, 3.6),
        draw,
    )


def _calibration_table(rows: list[dict]) -> str:
    body = [
        [
            f"[{_num(r['bin_low'], 3)}, {_num(r['bin_high'], 3)})",
            _num(r["mean_score"], 3),
            _num(r.get("observed_rate"), 3),
            _interval(r.get("observed_rate_interval"), 3),
            _num(r.get("count"), 6),
        ]
        for r in rows
    ]
    table = _table(
        ["score bins", "mean score", "observed rate", "interval", "customers (noisy)"],
        body,
        numeric=(1, 2, 3, 4),
    )
    return f"<details><summary>Calibration table</summary>{table}</details>"


# --- query jobs ------------------------------------------------------------------------------------


def _query_part(report: dict) -> str:
    question = _question(report["job"].get("query") or {})
    results = report.get("results")
    if not results:
        return f"<h2>Question</h2>{question}<h2>Answers</h2><p>No answers were released.</p>"
    charts = _query_charts(results)
    answers = results.get("answers") or []
    level = _level_words(results["level"])
    rows = [
        [
            a["name"],
            a["aggregate"],
            "; ".join(f"{k} = {v}" for k, v in (a.get("group") or {}).items()),
            a.get("bin", a.get("probability", "")),
            _answer_value(a),
            _answer_interval(a),
            _num(a.get("noise_std")),
            _num(a.get("granularity")),
            "; ".join(str(a[k]) for k in ("post_processing", "note") if a.get(k)),
        ]
        for a in answers
    ]
    table = _table(
        [
            "aggregate",
            "kind",
            "group",
            "bin / probability",
            "value",
            f"{level} interval",
            "noise std",
            "granularity",
            "note",
        ],
        rows,
        numeric=(4, 5, 6, 7),
    )
    opened = " open" if len(rows) <= _FOLDED_ROWS else ""
    return (
        f"<h2>Question</h2>{question}<h2>Answers</h2>"
        + (f'<div class="charts">{"".join(charts)}</div>' if charts else "")
        + f"<details{opened}><summary>All {len(rows)} answers, with their noise</summary>"
        f"{table}</details>"
        + '<p class="note">Values are the noisy releases as summed (a count may be negative); '
        "intervals cover the noise at the stated level, not the sampling of the customers.</p>"
    )


def _question(query: dict) -> str:
    if "aggregates" not in query:  # a recipe the coordinator had not expanded
        parameters = ", ".join(f"{k} = {v}" for k, v in query.items() if k != "purpose")
        return f"<p>{_e(parameters)}</p>"
    defaults = {
        "rows": query.get("rows"),
        "group_by": query.get("group_by") or [],
        "max_groups": query.get("max_groups"),
        "max_rows": query.get("max_rows"),
    }
    rows = []
    for aggregate in query["aggregates"]:
        if aggregate["kind"] == "ratio":
            what = f"{aggregate['numerator']} / {aggregate['denominator']}" + (
                " (a rate, clipped to [0, 1])" if aggregate.get("rate") else ""
            )
            rows.append([aggregate["name"], "ratio", what, "", "", "", ""])
            continue
        keys = aggregate.get("group_by")
        keys = defaults["group_by"] if keys is None else keys
        bounds = ""
        if aggregate.get("lower") is not None:
            bounds = f"[{_num(aggregate['lower'])}, {_num(aggregate['upper'])}]"
        where = [*(query.get("where") or []), *(aggregate.get("where") or [])]
        rows.append(
            [
                aggregate["name"],
                aggregate["kind"],
                " over ".join(
                    filter(
                        None, (aggregate.get("column"), aggregate.get("rows") or defaults["rows"])
                    )
                ),
                ", ".join(k["column"] for k in keys),
                "; ".join(_condition(c) for c in where),
                bounds,
                f"{aggregate.get('max_groups') or defaults['max_groups']} group(s), "
                f"{aggregate.get('max_rows') or defaults['max_rows']} row(s) per group",
            ]
        )
    window = ""
    if query.get("observation_date"):
        window = (
            f"<p>Observation date {_e(query['observation_date'])}, look-back "
            f"{_e(query.get('lookback_days'))} days.</p>"
        )
    table = _table(
        [
            "aggregate",
            "kind",
            "of",
            "grouped by",
            "filter",
            "clipped to",
            "contribution bound per customer",
        ],
        rows,
    )
    return table + window


def _condition(condition: dict) -> str:
    value = condition.get("values") or condition.get("value")
    if condition["op"] == "present":
        return f"{condition['column']} present"
    return f"{condition['column']} {condition['op']} {value}"


def _answer_value(answer: dict) -> str:
    return _num(answer.get("value"), granularity=answer.get("granularity"))


def _answer_interval(answer: dict) -> str:
    interval = answer.get("interval")
    if not interval:
        return "n/a"
    low, high = (_num(end, granularity=answer.get("granularity")) for end in interval)
    return f"[{low}, {high}]"


def _query_charts(results: dict) -> list[str]:
    chart, tables = results.get("chart"), results.get("tables") or {}
    level = _level_words(results["level"])
    if chart is None or chart["kind"] not in ("bars", "funnel", "matrix", "top"):
        return [c for name, table in tables.items() if (c := _table_chart(name, table, level))]
    if chart["kind"] == "funnel":
        first = tables.get(chart["stages"][0], {})
        by = " × ".join(_axis_name(d["column"]) for d in first.get("dims", []))
        return [_funnel_chart(chart, by, level)]
    if chart["kind"] == "matrix":
        return [_heat_map(chart)]
    if chart["kind"] == "top":
        return [_top_chart(chart, level)]
    return [
        _bar_chart(
            f"{series['name']} ({tables.get(series['name'], {}).get('aggregate', '')}) per "
            f"{_dims_words(tables.get(series['name']))}; error bars: {level} intervals",
            series["labels"],
            [_Series("", series["values"], series["lower"], series["upper"])],
            ylabel=series["name"],
        )
        for series in chart["series"]
    ]


def _dims_words(table: dict | None) -> str:
    if not table or not table.get("dims"):
        return "group"
    return " × ".join(_axis_name(d["column"]) for d in table["dims"])


def _table_chart(name: str, table: dict, level: str) -> str | None:
    """A chart for one aggregate of a query without a chart: bars over its groups (points for
    quantiles); a short last dimension (bins, probabilities, a small domain) becomes the series."""
    dims = table.get("dims") or []
    if not dims:
        return None
    values, lower, upper = (_flat(table[f]) for f in ("values", "lower", "upper"))
    if len(dims) > 1 and len(dims[-1]["labels"]) <= _SERIES_AS_BARS:
        groups = [" / ".join(p) for p in itertools.product(*(d["labels"] for d in dims[:-1]))]
        width = len(dims[-1]["labels"])
        series = [
            _Series(label, values[j::width], lower[j::width], upper[j::width])
            for j, label in enumerate(dims[-1]["labels"])
        ]
        xlabel = " × ".join(_axis_name(d["column"]) for d in dims[:-1])
    else:
        groups = [" / ".join(p) for p in itertools.product(*(d["labels"] for d in dims))]
        series = [_Series("", values, lower, upper)]
        xlabel = " × ".join(_axis_name(d["column"]) for d in dims)
    return _bar_chart(
        f"{name} ({table['aggregate']}) per {_dims_words(table)}; error bars: {level} intervals",
        groups,
        series,
        ylabel=name,
        xlabel=xlabel,
        points=table["aggregate"] == "quantiles",
    )


def _funnel_chart(chart: dict, by: str, level: str) -> str:
    groups, stages = chart["groups"], chart["stages"]
    columns = min(len(groups), 2)
    rows = math.ceil(len(groups) / columns)

    def draw(fig: Figure) -> None:
        axes = list(fig.subplots(rows, columns, squeeze=False).flat)
        for ax in axes[len(groups) :]:
            ax.set_visible(False)  # the empty cell of an odd number of groups
        for ax, group, counts, conversion, lower, upper in zip(
            axes[: len(groups)],
            groups,
            chart["counts"],
            chart["conversion"],
            chart["conversion_lower"],
            chart["conversion_upper"],
            strict=True,
        ):
            widths = np.nan_to_num(np.clip(_floats(counts), 0.0, None))
            widest = max(float(widths.max()), 1.0)
            y = np.arange(len(stages))
            ax.barh(y, widths, left=-widths / 2, height=0.7, color="#4c72b0")
            ax.set_yticks(y, [_tick(s) for s in stages])
            ax.invert_yaxis()
            ax.set_xlim(-0.55 * widest, 1.6 * widest)
            ax.set_xticks([])
            ax.grid(False)
            ax.spines[["left", "bottom"]].set_visible(False)
            for i, count in enumerate(counts):
                text = _num(count)
                if i > 0:
                    text += (
                        f"  {_percent(conversion[i - 1])} "
                        f"[{_percent(lower[i - 1])}, {_percent(upper[i - 1])}]"
                    )
                ax.text(0.55 * widest, i, _plain(text), va="center", fontsize=8)
            ax.set_title(_tick(group) if group else "all customers", fontsize=9)

    caption = (
        "Funnel: customers reaching each stage"
        + (f" per {by}" if by else "")
        + f"; percentages: conversion from the stage above, with {level} intervals"
    )
    return _chart(caption, (10.0, 0.4 + rows * (0.45 * len(stages) + 0.6)), draw)


def _heat_map(chart: dict) -> str:
    values = np.array([_floats(row) for row in chart["values"]], dtype=np.float64)
    finite = values[np.isfinite(values)]
    rate = finite.size > 0 and bool(np.all((finite >= 0) & (finite <= 1)))
    totals = chart.get("row_totals")
    row_labels = [
        _tick(row) + (f" (n={_num(totals[i])})" if totals else "")
        for i, row in enumerate(chart["rows"])
    ]
    n_rows, n_columns = values.shape

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        image = ax.imshow(
            np.ma.masked_invalid(values),
            aspect="auto",
            cmap="Blues",
            vmin=0.0 if rate else None,
            vmax=1.0 if rate else None,
        )
        ax.set_xticks(range(n_columns), [_tick(c) for c in chart["columns"]])
        ax.set_yticks(range(n_rows), row_labels)
        ax.set_xlabel(_axis_name(chart["column_column"]))
        ax.set_ylabel(_axis_name(chart["row_column"]))
        ax.grid(False)
        fig.colorbar(image, ax=ax, label=_tick(chart["name"]))
        if n_rows * n_columns <= _ANNOTATED_CELLS:
            dark = (image.norm.vmax or 1.0) * 0.6
            for (i, j), value in np.ndenumerate(values):
                if math.isfinite(value):
                    ax.text(
                        j,
                        i,
                        _plain(f"{value:.0%}" if rate else _num(value, 3)),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > dark else "black",
                    )

    caption = (
        f"{chart['name']} per {_axis_name(chart['row_column'])} and "
        f"{_axis_name(chart['column_column'])} (noisy; intervals in the table of answers; "
        "blank: no value)"
    )
    size = (min(max(2.5 + 0.6 * n_columns, 6.0), 14.0), min(max(1.2 + 0.32 * n_rows, 3.0), 12.0))
    return _chart(caption, size, draw)


def _top_chart(chart: dict, level: str) -> str:
    segments = chart["segments"]
    k = max((len(s["top"]) for s in segments), default=1)
    categories = list(dict.fromkeys(t["category"] for s in segments for t in s["top"]))

    def draw(fig: Figure) -> None:
        import matplotlib

        ax = fig.subplots()
        palette = matplotlib.colormaps["tab20" if len(categories) > 10 else "tab10"]
        width = 0.8 / k
        shown: set[str] = set()
        for s, segment in enumerate(segments):
            for j, top in enumerate(segment["top"]):
                value = _floats([top["value"]])
                category = top["category"]
                ax.bar(
                    s + (j - (k - 1) / 2) * width,
                    value,
                    width,
                    yerr=_error_bars(value, [top["interval"][0]], [top["interval"][1]]),
                    capsize=2,
                    color=palette(categories.index(category) % palette.N),
                    label=_tick(category) if category not in shown else None,
                )
                shown.add(category)
        ax.set_xticks(range(len(segments)), [_tick(s["segment"]) or "all" for s in segments])
        _tilt(ax, [s["segment"] for s in segments])
        ax.set_ylabel(_tick(chart["name"]))
        ax.legend(
            fontsize="small",
            title="category",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            ncols=2 if len(categories) > 12 else 1,
        )

    caption = f"{chart['name']}: {chart['post_processing']}; error bars: {level} intervals"
    return _chart(caption, (min(max(3.0 + 0.5 * len(segments) * k, 6.0), 14.0), 3.8), draw)


# --- segments jobs ---------------------------------------------------------------------------------


def _segments_part(report: dict) -> str:
    results = report.get("results")
    if not results or not results.get("segments"):
        return "<h2>Segments</h2><p>No segments were released.</p>"
    segments = results["segments"]
    level = _level_words(results["level"])
    names = list(segments[0]["centroid"])
    units = results.get("natural_units") or {}
    labels = [f"segment {s['segment']}" for s in segments]
    sizes = _bar_chart(
        f"Customers per segment (noisy), error bars: {level} intervals",
        labels,
        [
            _Series(
                "",
                [s["size"] for s in segments],
                [s["size_interval"][0] for s in segments],
                [s["size_interval"][1] for s in segments],
            )
        ],
        ylabel="customers",
    )
    profiles = _bar_chart(
        f"Segment profiles: centroids on the features scaled to [0, 1], error bars: {level} "
        "intervals (none for a centroid that was not updated)",
        names,
        [
            _Series(
                label,
                [s["centroid"][n] for n in names],
                *(
                    [
                        ((s.get("centroid_interval") or {}).get(n) or [None, None])[end]
                        for n in names
                    ]
                    for end in (0, 1)
                ),
            )
            for label, s in zip(labels, segments, strict=True)
        ],
        ylabel="scaled value",
    )
    header = ["segment", "customers", f"{level} interval", "centroid updated"] + [
        f"{n} ({units[n]})" if n in units else n for n in names
    ]
    rows = []
    for s in segments:
        cells = [
            s["segment"],
            _num(s["size"]),
            _interval(s.get("size_interval")),
            "yes" if s.get("updated", True) else "no: kept the previous one",
        ]
        natural = s.get("centroid_natural") or {}
        for n in names:
            interval = _interval((s.get("centroid_interval") or {}).get(n), 3)
            scaled = f"{_num(s['centroid'][n], 3)} {interval}".strip()
            cells.append(f"{_num(natural[n], 4)} (scaled {scaled})" if n in natural else scaled)
        rows.append(cells)
    features = (report.get("model") or {}).get("features") or names
    return (
        f"<h2>Segments</h2><p>{len(segments)} segments of the customers on "
        f"{_e(', '.join(features))}; centroids in natural units, with the scaled value in [0, 1] "
        f"and its {level} interval.</p>"
        f'<div class="charts">{sizes}{profiles}</div>{_table(header, rows, numeric=(1, 2))}'
        '<p class="note">A centroid not updated kept its previous value: its noisy count was too '
        "small, or the noise of its mean too large, to move it.</p>"
    )


# --- privacy ---------------------------------------------------------------------------------------


def _privacy_part(report: dict) -> str:
    privacy, job = report["privacy"], report["job"]
    model = job.get("kind", "model") == "model"
    header = [
        "unit",
        "epsilon (this run)",
        "epsilon (purpose, ledger) / budget",
        "noise multiplier",
    ]
    if model:
        header += ["sample rate", "steps", "held-out customers"]
    header += ["records used", "excluded", "columns used", "columns dropped"]
    rows = []
    for u in privacy["per_unit"]:
        if u.get("refused"):
            rows.append([u["unit"], f"refused: {u.get('refusal', '')}", *[""] * (len(header) - 2)])
            continue
        budget = u.get("budget")
        cells = [
            u["unit"],
            f"{u['epsilon']:.3f}",
            f"{u.get('epsilon_total', 0.0):.3f}"
            + (f" / {budget:g}" if budget is not None else " / no budget"),
            _num(u.get("noise_multiplier"), 4),
        ]
        if model:
            cells += [_num(u.get("sample_rate"), 4), u.get("steps", ""), u.get("records_test", "")]
        cells += [
            u.get("records_used", ""),
            ", ".join(f"{k}: {n}" for k, n in (u.get("excluded") or {}).items()),
            ", ".join(u.get("columns_used") or []),
            ", ".join(f"{d['column']} ({d['reason']})" for d in u.get("columns_dropped") or []),
        ]
        rows.append(cells)
    guarantees = [*privacy["guarantees"], *privacy.get("guarantees_secure_aggregation", [])]
    disclosed = "".join(
        f"<li><b>{_e(d['item'])}</b>: {_e(d['description'])}{_disclosed_values(d)}</li>"
        for d in privacy["disclosed"]
    )
    footer = [
        privacy["mechanism"],
        f"accountant {privacy['accountant']}",
        f"randomness: {privacy['randomness']}",
    ]
    return (
        f"<h2>Privacy spent</h2>{_epsilon_chart(report)}"
        f"<h2>Per business unit</h2>{_table(header, rows, numeric=(1, 2, 3))}"
        f"{_feature_ranges(privacy.get('feature_ranges'))}"
        f"<h2>Guarantees</h2>{_list(guarantees)}"
        f"<h2>Disclosed without differential privacy</h2><ul>{disclosed}</ul>"
        f"<h2>Out of scope</h2>{_list(privacy['out_of_scope'])}"
        f"<p><small>{_e('; '.join(footer))}.</small></p>"
    )


def _feature_ranges(ranges: dict | None) -> str:
    """The feature windows of the ranges exchange: DP outputs, shown with their noise."""
    if not ranges or not ranges.get("windows"):
        return ""
    rows = [
        [name, _num(w["natural"][0], 4), _num(w["natural"][1], 4), _interval(w["scaled"], 3)]
        for name, w in ranges["windows"].items()
    ]
    return (
        "<h2>Feature windows (differentially private)</h2>"
        f"<p>{_e(ranges['description'])}. Histograms of {ranges['bins']} bins per feature, "
        f"noise multiplier {_num(ranges['noise_multiplier'], 4)} (a share of "
        f"{_num(ranges['share'], 3)} of one release at the run's epsilon, included in every "
        "BU's epsilon).</p>"
        + _table(["feature", "from", "to", "on the declared [0, 1] scale"], rows, numeric=(1, 2))
    )


def _disclosed_values(item: dict) -> str:
    """The per-BU values of a disclosed item, when they are flat (counts, or counts by reason)."""
    values = item.get("values")
    if not isinstance(values, dict) or not values:
        return ""
    shown = []
    for unit, value in values.items():
        if isinstance(value, dict):
            if not all(isinstance(v, int | float | str) for v in value.values()):
                return ""  # nested (data quality): in report.json
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
        shown.append(f"{unit}: {value}")
    return " (" + _e("; ".join(shown)) + ")"


def _epsilon_chart(report: dict) -> str:
    units = report["federation"]["units"]
    target = report["job"]["epsilon"]
    if not units:
        return "<p>No BU released anything.</p>"
    rounds = report["rounds"]
    if len(rounds) > 1:
        return _line_chart(
            "Epsilon spent per BU, cumulative over the run's rounds",
            {
                u: [(r["round"], r["epsilon"][u]) for r in rounds if u in r["epsilon"]]
                for u in units
            },
            xlabel="round",
            ylabel="epsilon (cumulative)",
            hline=("target", target),
            integer_x=True,
        )
    spent = {u["unit"]: u["epsilon"] for u in report["privacy"]["per_unit"] if not u.get("refused")}
    return _bar_chart(
        "Epsilon spent per BU over the run",
        units,
        [_Series("", [spent.get(u) for u in units], None, None)],
        ylabel="epsilon",
        hline=("target", target),
    )


# --- charts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Series:
    """One series of bars: a value per group, with interval ends (None: no error bar)."""

    name: str
    values: Sequence[Any]
    lower: Sequence[Any] | None
    upper: Sequence[Any] | None


def _chart(caption: str, size: tuple[float, float], draw: Callable[[Figure], None]) -> str:
    """A figure drawn by `draw`, as inline SVG with its caption."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(CHART_STYLE):
        fig = Figure(figsize=size, layout="constrained")
        draw(fig)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = _SVG_NAMESPACES.sub("", _SVG_METADATA.sub("", svg[svg.index("<svg") :]))
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _line_chart(
    caption: str,
    series: dict[str, list[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    hline: tuple[str, float] | None = None,
    diagonal: str | None = None,
    unit_square: bool = False,
    integer_x: bool = False,
) -> str:
    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for label, points in series.items():
            kept = [(x, y) for x, y in points if _finite(x) and _finite(y)]
            if kept:
                xs, ys = zip(*kept, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=_tick(label))
        if hline is not None:
            ax.axhline(hline[1], linestyle="--", color="grey", label=_tick(hline[0]))
        if diagonal is not None:
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label=_tick(diagonal))
        if unit_square:
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
        if integer_x:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_tick(ylabel))
        if len(series) <= LEGEND_SERIES:  # more would squeeze the axes away; the table has them
            ax.legend(fontsize="small")

    return _chart(caption, (5.5, 3.4), draw)


def _bar_chart(
    caption: str,
    labels: Sequence[str],
    series: Sequence[_Series],
    *,
    ylabel: str,
    xlabel: str = "",
    hline: tuple[str, float] | None = None,
    points: bool = False,
) -> str:
    """Grouped bars (or points) per label, with error bars from each series' interval ends."""
    n, m = len(labels), len(series)

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        x = np.arange(n, dtype=np.float64)
        width = 0.8 / m
        for j, s in enumerate(series):
            values = _floats(s.values)
            errors = None
            if s.lower is not None and s.upper is not None:
                errors = _error_bars(values, s.lower, s.upper)
            offset = x + (j - (m - 1) / 2) * width
            label = _tick(s.name) if s.name else None
            if points:
                ax.errorbar(offset, values, yerr=errors, fmt="o", capsize=3, label=label)
            else:
                ax.bar(offset, np.nan_to_num(values), width, yerr=errors, capsize=2, label=label)
        if hline is not None:
            ax.axhline(hline[1], linestyle="--", color="grey", label=_tick(hline[0]))
        ax.set_xticks(x, [_tick(label) for label in labels])
        _tilt(ax, labels)
        ax.set_ylabel(_tick(ylabel))
        if xlabel:
            ax.set_xlabel(_tick(xlabel))
        if m > 1 or hline is not None:
            ax.legend(fontsize="small")

    return _chart(caption, (min(max(2.5 + 0.3 * n * m, 5.5), 14.0), 3.6), draw)


def _tilt(ax: Axes, labels: Sequence[str]) -> None:
    """Long or many tick labels are set at an angle so that they do not overlap."""
    if len(labels) > 6 or max((len(str(label)) for label in labels), default=0) > 10:
        for text in ax.get_xticklabels():
            text.set_rotation(40)
            text.set_horizontalalignment("right")


def _error_bars(values: np.ndarray, lower: Sequence[Any], upper: Sequence[Any]) -> np.ndarray:
    """matplotlib's (2, n) error lengths below and above each value; none where an end is
    missing, and never negative (post-processing may leave a value outside its interval)."""
    below = np.nan_to_num(np.clip(values - _floats(lower), 0.0, None))
    above = np.nan_to_num(np.clip(_floats(upper) - values, 0.0, None))
    return np.stack([below, above])


# --- formatting ------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()
) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _list(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul>"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([float(v) if _finite(v) else np.nan for v in values], dtype=np.float64)


def _flat(nested: Any) -> list:
    if isinstance(nested, list):
        return [v for item in nested for v in _flat(item)]
    return [nested]


def _num(value: Any, digits: int = 4, *, granularity: Any = None) -> str:
    """A released number as a person reads it: counts whole, sums to their granularity's
    decimals, other values to `digits` significant digits; "n/a" for none."""
    if isinstance(value, bool) or not _finite(value):
        return "n/a" if not isinstance(value, bool) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if _finite(granularity) and granularity > 0:
        exponent = Decimal(repr(float(granularity))).normalize().as_tuple().exponent
        decimals = max(0, -exponent) if isinstance(exponent, int) else 0
        return f"{value:,.{decimals}f}"
    if float(value).is_integer():
        return f"{int(value):,}"
    if value == 0:
        return "0"
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _interval(interval: Any, digits: int = 4, *, fixed: bool = False) -> str:
    if not interval or len(interval) != 2 or not all(_finite(v) for v in interval):
        return ""
    if fixed:
        return f"[{_fixed(interval[0])}, {_fixed(interval[1])}]"
    return f"[{_num(interval[0], digits)}, {_num(interval[1], digits)}]"


def _fixed(value: Any) -> str:
    """A share such as an AUC, to three decimals ("" for none)."""
    return f"{value:.3f}" if _finite(value) else ""


def _percent(value: Any) -> str:
    return f"{value:.0%}" if _finite(value) else "n/a"


def _level_words(level: float) -> str:
    return f"{level:.0%}"


def _axis_name(column: str) -> str:
    """A column as a chart's axis names it: derived columns by their plain name."""
    return column.removeprefix("derived.").replace("_", " ")


def _plain(text: str) -> str:
    """Text matplotlib draws as it is: `$` would start mathtext."""
    return text.replace("$", r"\$")


def _tick(label: Any) -> str:
    """A label for a chart: plain text, cut to `_LABEL_CHARS`; a leading underscore, which
    matplotlib's legend reads as "hide me", is kept visible by a leading space."""
    text = str(label)
    if len(text) > _LABEL_CHARS:
        text = text[: _LABEL_CHARS - 1] + "…"
    if text.startswith("_"):
        text = " " + text
    return _plain(text)
