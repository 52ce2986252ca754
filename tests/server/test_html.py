"""`report.html` for each kind of job, from report dicts that `build_report` makes out of the real
outputs (DP evaluation, query answers of the recipes on synthetic silos, k-means updates): the page
is well formed, self-contained, escapes what came from user files, and carries the charts and
numbers its kind calls for."""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.queries import query_vector
from clients.silo import load_silo
from federation import recipes
from federation.evaluation import (
    RegressionSummary,
    ScoreHistogram,
    ScoreSummary,
    dp_binary_metrics,
    dp_regression_metrics,
    regression_layout,
    score_layout,
)
from federation.features import resolve_feature_spec
from federation.job import Job
from federation.queries import QuerySpec, query_answers
from federation.segments import (
    SegmentsSpec,
    assign,
    initial_centroids,
    quantise,
    segment_feature_spec,
    update_centroids,
)
from federation.tasks import adapter
from federation.wire import DroppedColumn, UnitReport
from privacy.mechanisms import NoiseInSum, Placement
from privacy.minimisation import minimise
from privacy.samplers import SeededSource
from privacy.unit_config import UnitConfig
from server.html import render_html
from server.report import build_report
from server.run import RunPlan, RunRecord
from simulations.synthetic import unit_schema

HOSTILE = '<script>alert("x")</script>'
UNITS = (HOSTILE, "retail")
Z = 1.5  # noise multiplier of the releases below


class StrictParser(HTMLParser):
    """Records what a lenient browser would silently repair (an end tag that closes another
    element, an element left open) and every start tag's name."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.tags: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1] if self.open else ''}>")
        else:
            self.open.pop()


def check_page(page: str, svgs: int) -> None:
    """Well formed, self-contained, the hostile BU name escaped, and `svgs` inline charts."""
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == []
    assert parser.open == []
    assert parser.tags.count("svg") == page.count("<svg") == svgs
    # nothing to run or fetch: no script, no external reference of any kind
    assert "script" not in parser.tags
    for tag in ("iframe", "img", "link", "object", "embed"):
        assert tag not in parser.tags
    assert re.search(r"https?:", page) is None
    assert HOSTILE not in page
    assert html.escape(HOSTILE) in page


def unit_report(unit: str, epsilon: float, *, steps: int = 0) -> UnitReport:
    return UnitReport(
        unit=unit,
        records_used=400,
        records_test=100,
        excluded={"no_consent": 3, "revoked": 1},
        columns_used=["customers.age", "customers.<b>notes</b>"],
        columns_dropped=[DroppedColumn(column="customers.religion", reason="special_category")],
        epsilon=epsilon,
        noise_multiplier=Z,
        sample_rate=0.1 if steps else 1.0,
        steps=steps,
    )


def new_record(
    tmp_path: Path,
    job: Job,
    *,
    privacy_unit: str = "customer",
    auc_ceiling: float | None = None,
    expected_units: int = len(UNITS),
) -> RunRecord:
    return RunRecord(
        RunPlan(
            run_id="r1",
            job=job,
            expected_units=expected_units,
            mode="simulation",
            out=tmp_path,
            started_at=datetime(2026, 6, 1, tzinfo=UTC),
            seed=0,
            auc_ceiling=auc_ceiling,
            privacy_unit=privacy_unit,  # type: ignore[arg-type]
        )
    )


def cells(page: str, *headers: str) -> list[list[str]]:
    """The text of each row of the first table whose headers start with `headers`."""
    start = page.index("<table><tr><th>" + "</th><th>".join(headers) + "</th>")
    table = page[start : page.index("</table>", start)]
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.DOTALL)[1:]
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)] for row in rows]


# --- model jobs ------------------------------------------------------------------------------------


def scored_customers(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 1.5, n)
    scores = 1 / (1 + np.exp(-logits))
    return scores, rng.random(n) < scores


def test_a_dp_churn_model_shows_its_curves_and_intervals(tmp_path: Path) -> None:
    job = Job(rounds=2, features=resolve_feature_spec("churn", [unit_schema("x")]))
    record = new_record(tmp_path, job, auc_ceiling=0.83)
    for server_round in (1, 2):
        record.record_training([unit_report(u, 0.8 * server_round, steps=10) for u in UNITS])
        if server_round == 2:
            scores, labels = scored_customers()
            noise = score_layout().noise_in_sum(Z, Placement.LOCAL, contributors=2)
            evaluation = dp_binary_metrics(ScoreHistogram.of(scores, labels).to_vector(), noise)
            record.record_evaluation_release([unit_report(u, 2.0) for u in UNITS], evaluation)
        record.finish_round(server_round)
    report = build_report(record)
    page = render_html(report)

    check_page(page, svgs=5)  # ROC, gain, lift, calibration, epsilon per round
    for title in ("ROC curve", "Cumulative gain", "Lift", "Calibration", "Epsilon spent per BU"):
        assert f"<figcaption>{title}" in page
    low, high = evaluation["auc_interval"]
    assert 0 < high - low < 0.2
    summary = {row[0]: row for row in cells(page, "metric")}
    assert summary["AUC"][1:3] == [f"{evaluation['auc']:.4g}", f"[{low:.4g}, {high:.4g}]"]
    assert f"(AUC {evaluation['auc']:.3f} [{low:.3f}, {high:.3f}])</figcaption>" in page
    assert "ceiling (the true model): 0.83" in summary["AUC"][3]
    assert summary["log-loss"][1] == f"{evaluation['log_loss']:.4g}"
    assert summary["log-loss"][3] == f"from {evaluation['losses_from']}"
    assert summary["held-out customers"][1] == "2,000"
    assert summary["base rate"][1] == f"{evaluation['base_rate']:.4g}"
    calibration = cells(page, "score bins")
    assert len(calibration) == len(evaluation["calibration"])
    assert sum(float(row[4].replace(",", "")) for row in calibration) == 2000
    # the BU table: DP-SGD figures for a model job, user strings escaped
    units = {row[0]: row for row in cells(page, "unit")}
    assert set(units) == set(UNITS)
    assert units["retail"][1:3] == ["2.000", "0.000 / no budget"]
    assert "customers.<b>notes</b>" in units["retail"][9]
    assert "<b>notes</b>" not in page


def test_an_exact_churn_model_draws_its_metrics_per_round(tmp_path: Path) -> None:
    job = Job(
        rounds=3,
        evaluation={"mode": "exact"},
        features=resolve_feature_spec("churn", [unit_schema("x")]),
    )
    record = new_record(tmp_path, job, auc_ceiling=0.83)
    scores, labels = scored_customers(400)
    for server_round in (1, 2, 3):
        record.record_training([unit_report(u, 0.5 * server_round, steps=10) for u in UNITS])
        record.record_evaluation(server_round, ScoreSummary.of(scores, labels).metrics())
    page = render_html(build_report(record))

    check_page(page, svgs=2)  # metrics per round, epsilon per round
    assert "<figcaption>Held-out metrics after each round (exact evaluation)" in page
    summary = {row[0]: row for row in cells(page, "metric")}
    assert set(summary) == {"AUC", "log-loss", "Brier score", "held-out customers"}
    assert summary["AUC"][2] == ""  # exact: no interval
    assert "not differentially private" in page


def test_a_dp_ltv_model_gives_rmse_and_mae_with_intervals(tmp_path: Path) -> None:
    features = resolve_feature_spec("ltv", [unit_schema("x")])
    job = Job(task="ltv", rounds=1, features=features)
    upper = adapter("ltv").upper_of(features)
    rng = np.random.default_rng(5)
    labels = rng.uniform(0, upper, 1000)
    predictions = labels + rng.normal(0, upper / 10, 1000)
    total = RegressionSummary.of(predictions, labels, upper=upper).to_vector()
    noise = regression_layout(upper).noise_in_sum(Z, Placement.LOCAL, contributors=2)
    evaluation = dp_regression_metrics(total, noise, upper=upper)
    record = new_record(tmp_path, job)
    record.record_training([unit_report(u, 1.0, steps=10) for u in UNITS])
    record.record_evaluation_release([unit_report(u, 2.5) for u in UNITS], evaluation)
    record.finish_round(1)
    page = render_html(build_report(record))

    check_page(page, svgs=2)  # RMSE / MAE / mean label with intervals, epsilon per BU
    summary = {row[0]: row for row in cells(page, "metric")}
    for name, key in (("RMSE", "rmse"), ("MAE", "mae"), ("mean label", "mean_label")):
        low, high = evaluation[f"{key}_interval"]
        assert summary[name][1:3] == [f"{evaluation[key]:.4g}", f"[{low:.4g}, {high:.4g}]"]
        assert low < evaluation[key] < high
    assert "AUC" not in summary


# --- query jobs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def silos(small_silos: Path) -> tuple[list[UnitConfig], list[dict[str, pd.DataFrame]]]:
    configs = [UnitConfig.load(path) for path in sorted(small_silos.glob("*/bu.toml"))]
    return configs, [minimise(load_silo(c).tables, c, "analytics").tables for c in configs]


def query_report(tmp_path: Path, spec: QuerySpec, silos, *, privacy_unit="customer") -> dict:
    """The report of a query job whose BUs each added their own noise (local placement)."""
    configs, tables = silos
    layout = spec.layout()
    source = SeededSource(11)
    total = sum(
        layout.noisy(query_vector(t, c, spec), Z, Placement.LOCAL, source)
        for t, c in zip(tables, configs, strict=True)
    )
    noise = layout.noise_in_sum(Z, Placement.LOCAL, contributors=len(configs))
    record = new_record(tmp_path, Job(kind="query", query=spec), privacy_unit=privacy_unit)
    record.record_release([unit_report(u, 0.9) for u in UNITS])
    record.results = query_answers(spec, total, noise).to_json()
    record.finish_round(1)
    return build_report(record)


def answers_table(page: str, report: dict) -> list[list[str]]:
    answers = report["results"]["answers"]
    assert f"All {len(answers)} answers, with their noise" in page
    return cells(page, "aggregate", "kind", "group")


def test_a_funnel_query_draws_one_funnel_per_channel_with_conversions(tmp_path, silos) -> None:
    report = query_report(tmp_path, recipes.funnel(silos[0]), silos)
    page = render_html(report)

    check_page(page, svgs=2)  # the funnel, epsilon per BU
    assert "<figcaption>Funnel: customers reaching each stage per main channel" in page
    chart = report["results"]["chart"]
    for group, counts, conversion, low, high in zip(
        chart["groups"],
        chart["counts"],
        chart["conversion"],
        chart["conversion_lower"],
        chart["conversion_upper"],
        strict=True,
    ):
        assert f">{group}</text>" in page  # each channel's panel is titled
        # the second stage's bar reads its count and the conversion from the first
        assert f"{counts[1]:,}  {conversion[0]:.0%} [{low[0]:.0%}, {high[0]:.0%}]</text>" in page
    rows = answers_table(page, report)
    assert len(rows) == len(report["results"]["answers"]) == 4 * 4 + 3 * 4
    first = report["results"]["answers"][0]
    lo, hi = first["interval"]
    assert rows[0][:8] == [
        "purchased",
        "count",
        f"derived.main_channel = {first['group']['derived.main_channel']}",
        "",
        f"{first['value']:,}",
        f"[{lo:,}, {hi:,}]",
        f"{first['noise_std']:.4g}",
        "1",
    ]
    rates = [r for r in rows if r[1] == "ratio"]
    assert all(r[8] == "a rate: value and interval clipped to [0, 1]" for r in rates)


def test_a_funnel_without_groups_is_one_funnel_of_all_customers(tmp_path, silos) -> None:
    report = query_report(tmp_path, recipes.funnel(silos[0], by=()), silos)
    page = render_html(report)

    check_page(page, svgs=2)
    assert "<figcaption>Funnel: customers reaching each stage; percentages" in page
    assert ">all customers</text>" in page
    assert len(answers_table(page, report)) == 4 + 3


def test_a_query_that_released_nothing_says_so_and_lists_the_dropouts(tmp_path) -> None:
    spec = recipes.churn_rate_by_segment([unit_schema("x")])
    job = Job(kind="query", query=spec, secure_aggregation={"enabled": True}, noise="distributed")
    record = new_record(tmp_path, job, expected_units=3)
    record.record_release([unit_report(u, 0.0) for u in UNITS])
    record.dropouts.append(
        {"round": 1, "phase": "query", "unit": HOSTILE, "reason": f"{HOSTILE} timed out"}
    )
    record.finish_round(1)
    page = render_html(build_report(record))

    check_page(page, svgs=1)  # epsilon per BU only
    assert "<h2>Answers</h2><p>No answers were released.</p>" in page
    assert cells(page, "round", "phase", "BU", "reason") == [
        ["1", "query", HOSTILE, f"{HOSTILE} timed out"]
    ]
    assert "secure aggregation on (SecAgg+, threshold" in page
    assert "With SecAgg+ the coordinator sees" in page  # its guarantee is listed


def test_rfm_segments_are_one_bar_chart_per_histogram(tmp_path, silos) -> None:
    report = query_report(tmp_path, recipes.rfm_segments(silos[0]), silos)
    page = render_html(report)

    check_page(page, svgs=4)
    assert re.findall(r"<figcaption>([^<]*)", page) == [
        "recency (histogram) per recency days; error bars: 95% intervals",
        "frequency (histogram) per frequency; error bars: 95% intervals",
        "monetary (histogram) per monetary; error bars: 95% intervals",
        "Epsilon spent per BU over the run",
    ]
    # five declared bins per histogram
    assert len(answers_table(page, report)) == 3 * 5


def test_a_cohort_query_draws_a_retention_heat_map(tmp_path, silos) -> None:
    spec = recipes.cohort_retention(silos[0], cohorts=6, months=6)
    report = query_report(tmp_path, spec, silos)
    page = render_html(report)

    check_page(page, svgs=2)  # the heat map, epsilon per BU
    chart = report["results"]["chart"]
    assert chart["kind"] == "matrix" and chart["rows"][0] in page
    assert "<figcaption>retention per signup month and months since signup" in page
    shown = sum(v is not None for row in chart["values"] for v in row)
    assert len(re.findall(r">\d+%</text>", page)) == shown == 36  # every cell printed
    totals = chart["row_totals"]
    assert f"{chart['rows'][0]} (n={totals[0]:,})</text>" in page
    assert len(answers_table(page, report)) == 6 + 36 + 36
    assert "<details><summary>All 78 answers" in page  # a long table starts folded


def test_top_categories_per_segment_are_grouped_bars(tmp_path, silos) -> None:
    report = query_report(tmp_path, recipes.top_categories(silos[0], k=2), silos)
    page = render_html(report)

    check_page(page, svgs=2)
    chart = report["results"]["chart"]
    assert "<figcaption>buyers: the top 2 categories per segment, ranked on the noisy" in page
    for segment in chart["segments"]:
        assert f">{segment['segment']}</text>" in page
        for top in segment["top"]:
            assert f">{top['category']}</text>" in page  # in the legend


def test_churn_rate_by_segment_is_bars_with_error_bars(tmp_path, silos) -> None:
    report = query_report(
        tmp_path, recipes.churn_rate_by_segment(silos[0]), silos, privacy_unit="record"
    )
    page = render_html(report)

    check_page(page, svgs=2)
    assert "<figcaption>churn_rate (ratio) per customers.region; error bars: 95% intervals" in page
    assert "each row was treated as its own customer" in page
    # the BU table of a query has no DP-SGD columns
    header = re.search(r"<table><tr><th>unit</th>(.*?)</tr>", page).group(1)
    assert "steps" not in header and "sample rate" not in header


def test_a_query_without_a_chart_gets_one_per_grouped_aggregate(tmp_path) -> None:
    """Hand-made releases: categories from a user's file with markup and mathtext in them."""
    categories = ("<i>north</i>", "$south$", "_east")
    spec = QuerySpec.model_validate(
        {
            "purpose": "analytics",
            "group_by": [{"column": "customers.region", "domain": categories}],
            "aggregates": [
                {"kind": "count", "name": "customers"},
                {"kind": "count", "name": "everyone", "group_by": []},
                {
                    "kind": "mean",
                    "name": "age",
                    "column": "customers.age",
                    "lower": 14,
                    "upper": 100,
                },
                {
                    "kind": "sum",
                    "name": "years",
                    "column": "customers.age",
                    "lower": 14,
                    "upper": 100,
                    "granularity": 0.5,
                    "group_by": [],
                },
                {
                    "kind": "quantiles",
                    "name": "age_quartiles",
                    "column": "customers.age",
                    "bins": [14, 30, 50, 70, 100],
                },
            ],
        }
    )
    layout = spec.layout()
    total = np.arange(1, layout.size + 1, dtype=np.int64) * 7
    record = new_record(tmp_path, Job(kind="query", query=spec))
    record.record_release([unit_report(u, 0.4) for u in UNITS])
    record.results = query_answers(
        spec, total, layout.noise_in_sum(Z, Placement.CENTRAL, contributors=2)
    ).to_json()
    record.finish_round(1)
    report = build_report(record)
    page = render_html(report)

    check_page(page, svgs=4)  # customers, age, quartiles (not the ungrouped total), epsilon
    assert "<i>" not in page and "&lt;i&gt;north&lt;/i&gt;" in page
    assert ">$south$</text>" in page  # drawn as text, not read as mathtext
    assert "> _east</text>" in page  # a leading underscore would hide a legend entry
    assert "<figcaption>age_quartiles (quantiles) per customers.region × probability" in page
    rows = answers_table(page, report)
    assert len(rows) == 3 + 1 + 3 + 1 + 3 * 3
    (years,) = [r for r in rows if r[0] == "years"]
    answer = next(a for a in report["results"]["answers"] if a["name"] == "years")
    low, high = answer["interval"]
    assert years[4:8] == [  # a sum to its granularity's decimals
        f"{answer['value']:,.1f}",
        f"[{low:,.1f}, {high:,.1f}]",
        f"{answer['noise_std']:.4g}",
        "0.5",
    ]


# --- segments jobs ---------------------------------------------------------------------------------


def test_segments_show_sizes_and_centroids_in_natural_units(tmp_path: Path) -> None:
    spec = SegmentsSpec(k=3, iterations=2, init="grid")
    features = segment_feature_spec([unit_schema("x")], spec)
    job = Job(kind="segments", segments=spec, features=features)
    centroids = initial_centroids(spec, spec.dim)
    rng = np.random.default_rng(2)
    grid = quantise(rng.random((600, spec.dim)), spec)
    members = assign(grid / spec.grid_steps, centroids)
    sums = np.stack([grid[members == j].sum(axis=0) for j in range(spec.k)])
    counts = np.bincount(members, minlength=spec.k)
    total = np.concatenate([sums.ravel(), counts]).astype(np.int64)
    noise = {"sums": NoiseInSum((30.0, 30.0)), "counts": NoiseInSum((Z, Z))}
    update = update_centroids(total, noise, centroids, spec)
    record = new_record(tmp_path, job)
    for server_round in (1, 2):
        record.record_release([unit_report(u, 0.6 * server_round) for u in UNITS])
        record.results = update.to_json(features.output_names, features)
        record.finish_round(server_round)
    record.refused["late"] = "budget exhausted for purpose 'segmentation'"
    report = build_report(record)
    page = render_html(report)

    check_page(page, svgs=3)  # sizes and profiles with intervals, epsilon per round
    assert "<figcaption>Customers per segment (noisy), error bars: 95% intervals" in page
    assert "<figcaption>Segment profiles: centroids on the features scaled to [0, 1]" in page
    rows = cells(page, "segment")
    assert [row[1] for row in rows] == [f"{n:,}" for n in update.sizes]
    assert "recency (days since the last purchase)" in page
    first = report["results"]["segments"][0]
    low, high = first["centroid_interval"]["recency"]
    assert rows[0][4] == (
        f"{first['centroid_natural']['recency']:.4g} "
        f"(scaled {first['centroid']['recency']:.3g} [{low:.3g}, {high:.3g}])"
    )
    units = {row[0]: row for row in cells(page, "unit")}
    assert units["late"][1] == "refused: budget exhausted for purpose 'segmentation'"
    # report.html reads as well from report.json, and the same report gives the same page
    assert render_html(json.loads(json.dumps(report))) == page


def test_a_failed_run_says_so_before_anything_else(tmp_path) -> None:
    job = Job(kind="query", query=recipes.churn_rate_by_segment([unit_schema("x")]))
    record = new_record(tmp_path, job, expected_units=2)
    record.record_release([unit_report(u, 0.5) for u in UNITS[:2]])
    record.finish_round(1)
    record.dropouts.append({"round": 2, "phase": "query", "unit": UNITS[1], "reason": "gone"})
    record.error = f"round 2 (query): 1 BU(s) failed: {UNITS[1]}: gone"
    report = build_report(record)
    assert (report["status"], report["error"]) == ("failed", record.error)
    page = render_html(report)
    check_page(page, svgs=1)
    assert page.index("This run failed") < page.index("<table")
    assert html.escape(record.error) in page


def test_a_line_chart_of_many_bus_has_no_legend_that_would_squeeze_it() -> None:
    from server.compliance import LEGEND_SERIES
    from server.html import _line_chart

    def chart(lines: int) -> str:
        series = {f"bu_{i}": [(1, 0.5 * i), (2, 1.0 * i)] for i in range(lines)}
        return _line_chart("epsilon", series, xlabel="round", ylabel="epsilon")

    assert 'id="legend_1"' in chart(2)
    assert 'id="legend_1"' not in chart(LEGEND_SERIES + 1)
