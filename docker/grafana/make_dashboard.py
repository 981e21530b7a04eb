"""Generate the provisioned Grafana dashboard, docker/grafana/dashboards/instanas.json, with grafanalib.

    .venv/bin/python docker/grafana/make_dashboard.py          # rewrite the JSON
    .venv/bin/python docker/grafana/make_dashboard.py --check  # exit 1 if the committed JSON is stale

The JSON is committed (Grafana reads it as provisioned in provisioning/dashboards/instanas.yml);
tests/test_grafana.py checks that it is what this script makes, and runs every query below through a
real Prometheus scraping a real server. Every expression uses only metrics of service/metrics.py,
Grafana's own `$__rate_interval` / `$__interval` and the dashboard's `$model` (the served models,
a regular expression: ".+" for all), nothing else, so the test can run it as it stands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import attr
from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard,
    GridPos,
    Heatmap,
    RowPanel,
    Stat,
    Table,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards" / "instanas.json"
# The uid given to the data source in provisioning/datasources/prometheus.yml.
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
QUANTILES = (0.5, 0.95, 0.99)
STAGES = ("decode", "queue", "controller", "backbone")
WIDTH = 24
# Grafana's own form of "no thresholds": one base step (grafanalib's defaults are not valid for every panel).
BASE_THRESHOLDS = [{"color": "green", "value": None}]


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False, fmt: str = "time_series") -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, instant=instant, format=fmt, intervalFactor=1,
                  datasource=DATASOURCE)


def rate(metric: str, selector: str = "") -> str:
    return f"rate({metric}{{{selector}}}[$__rate_interval])" if selector else f"rate({metric}[$__rate_interval])"


def quantile_targets(histogram: str, by: str = "", selector: str = "", legend: str = "") -> list[Target]:
    """p50/p95/p99 of a histogram over all instances (and split `by` a label, when given)."""
    group = f"le, {by}" if by else "le"
    return [target(f"histogram_quantile({q}, sum by ({group}) ({rate(histogram + '_bucket', selector)}))",
                   f"{legend}p{round(q * 100)}", ref=chr(ord("A") + i))
            for i, q in enumerate(QUANTILES)]


def mean_expr(histogram: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} ({rate(histogram + '_sum')}) / sum{group} ({rate(histogram + '_count')})"


def timeseries(title: str, targets: list[Target], unit: str, description: str, **kw) -> TimeSeries:
    return TimeSeries(title=title, description=description, dataSource=DATASOURCE, targets=targets, unit=unit,
                      legendDisplayMode="table", legendPlacement="right", legendCalcs=["lastNotNull", "max"],
                      tooltipMode="multi", **kw)


def bucket_heatmap(title: str, histogram: str, unit: str, description: str) -> Heatmap:
    """A heatmap of a histogram's buckets: observations per interval, by bucket (Grafana 10+ heatmap)."""
    expr = f"sum by (le) (increase({histogram}_bucket[$__interval]))"
    return Heatmap(
        title=title, description=description, dataSource=DATASOURCE, dataFormat="tsbuckets",
        targets=[target(expr, "{{le}}", fmt="heatmap")],
        extraJson={"options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5,
                      "fill": "dark-orange", "reverse": False, "steps": 64},
            "filterValues": {"le": 1e-9},
            "rowsFrame": {"layout": "auto"},
            "yAxis": {"axisPlacement": "left", "unit": unit, "reverse": False},
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
            "legend": {"show": True},
            "cellValues": {"unit": "short"},
            "showValue": "never",
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
        }})


def totals(title: str, expr: str, legend: str, description: str) -> Stat:
    """Counters since the process started, one value per series (instant query)."""
    return Stat(title=title, description=description, dataSource=DATASOURCE,
                targets=[target(expr, legend, instant=True)], reduceCalc="lastNotNull", graphMode="none",
                textMode="value_and_name", colorMode="value", orientation="horizontal", noValue="0",
                format="short", decimals=0)


def module_matrix() -> Table:
    """Cells (rows) x modules (columns): images per second that ran each block, coloured as a heatmap."""
    # label_replace pads single-digit cells ("3" -> "03") so that the rows sort in cell order.
    expr = ('sum by (cell, module) (label_replace(rate(instanas_module_executions_total{model=~"$model"}'
            '[$__rate_interval]), "cell", "0$1", "cell", "([0-9])"))')
    return Table(
        title="Module executions by cell x module (images/s)",
        description="Each cell of the table is one block of the meta-graph: cell (row) and module index (column, "
                    "the order of the bundle's search space; GET /model names them). The value is how many "
                    "images per second ran that block, over all instances, for the models chosen above (pick "
                    "one: models of other search spaces would add up); an empty row is a cell the controller "
                    "skips.",
        dataSource=DATASOURCE, targets=[target(expr, instant=True, fmt="table")], unit="short",
        transformations=[
            {"id": "groupingToMatrix", "options": {"rowField": "cell", "columnField": "module", "valueField": "Value",
                                                   "emptyValue": "zero"}},
            {"id": "sortBy", "options": {"sort": [{"field": "cell\\module", "desc": False}]}},
        ],
        extraJson={"fieldConfig": {"defaults": {
            "color": {"mode": "continuous-YlRd"},
            "decimals": 2,
            "custom": {"cellOptions": {"type": "color-background", "mode": "gradient"}, "align": "center"},
        }}})


def model_info() -> Table:
    expr = "max by (name, version, sha256, instance) (instanas_model_info)"
    return Table(
        title="Model", description="The bundle each instance serves (instanas_model_info).",
        dataSource=DATASOURCE, targets=[target(expr, instant=True, fmt="table")],
        transformations=[{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True},
            "indexByName": {"instance": 0, "name": 1, "version": 2, "sha256": 3}}}])


def rows() -> list[tuple[str, list[tuple[object, int, int]]]]:
    """(row title, [(panel, width, height)]) in the order they are laid out."""
    errors = 'status=~"4..|5.."'
    classify = 'endpoint="/classify"'
    # `or vector(0)`: no 4xx/5xx series yet is a ratio of 0, not "no data".
    error_ratio = (f"(sum({rate('instanas_requests_total', classify + ', ' + errors)}) or vector(0)) "
                   f"/ sum({rate('instanas_requests_total', classify)})")
    return [
        ("Traffic", [
            (model_info(), 12, 4),
            (Stat(title="Images classified/s", dataSource=DATASOURCE, format="reqps", reduceCalc="lastNotNull",
                  description="Classifications that ran to the end, over all instances.",
                  targets=[target(f"sum({rate('instanas_architecture_modules_count')})", "images/s")]), 6, 4),
            (Stat(title="Error ratio", dataSource=DATASOURCE, format="percentunit", reduceCalc="lastNotNull",
                  description="4xx and 5xx responses over all responses of POST /classify.",
                  targets=[target(error_ratio, "errors")]), 6, 4),
            (timeseries("Request rate by endpoint",
                        [target("sum by (endpoint) (" + rate("instanas_requests_total") + ")", "{{endpoint}}")],
                        "reqps", "HTTP requests per second, by route ('unmatched' for unknown paths)."), 12, 8),
            (timeseries("Errors by status code",
                        [target("sum by (status) (" + rate("instanas_requests_total", errors) + ")", "{{status}}")],
                        "reqps", "4xx and 5xx responses per second, by status code, all endpoints."), 12, 8),
            (timeseries("Rejections by reason",
                        [target("sum by (reason) (" + rate("instanas_rejections_total") + ")", "{{reason}}")],
                        "reqps", "Refused classifications per second, by error code (docs/API.md: Errors)."), 12, 8),
            (totals("Errors since start, by status", f"sum by (status) (instanas_requests_total{{{errors}}})",
                    "{{status}}", "4xx and 5xx responses counted since each instance started, summed."), 6, 8),
            (totals("Rejections since start, by reason", "sum by (reason) (instanas_rejections_total)",
                    "{{reason}}", "Refused classifications since each instance started, summed."), 6, 8),
        ]),
        ("Latency", [
            (timeseries("POST /classify latency",
                        quantile_targets("instanas_request_duration_seconds", selector=classify),
                        "s", "Whole-request handling time of POST /classify: p50, p95, p99 over all instances."),
             12, 8),
            (timeseries("Request latency p95 by endpoint",
                        [target("histogram_quantile(0.95, sum by (le, endpoint) ("
                                + rate("instanas_request_duration_seconds_bucket") + "))", "{{endpoint}}")],
                        "s", "p95 of request handling time, by route."), 12, 8),
            (timeseries("Stage latency, mean (stacked)",
                        [target(mean_expr("instanas_stage_duration_seconds", "stage"), "{{stage}}")],
                        "s", "Where a classification's time goes: " + ", ".join(STAGES) + ". Stacked, so the top "
                        "line is the mean of their sum.", stacking={"mode": "normal", "group": "A"},
                        fillOpacity=30), 12, 8),
            (timeseries("Stage latency p95",
                        [target("histogram_quantile(0.95, sum by (le, stage) ("
                                + rate("instanas_stage_duration_seconds_bucket") + "))", "{{stage}}")],
                        "s", "p95 of each stage: " + ", ".join(STAGES) + "."), 12, 8),
        ]),
        ("Architectures", [
            (bucket_heatmap("Estimated latency of chosen architectures",
                            "instanas_architecture_estimated_latency_seconds", "s",
                            "Per image, the latency estimated at export for the modules its controller chose: "
                            "images per interval in each histogram bucket."), 12, 8),
            (timeseries("Estimated architecture latency percentiles",
                        quantile_targets("instanas_architecture_estimated_latency_seconds"), "s",
                        "p50, p95, p99 of the estimated latency of the architectures that ran."), 12, 8),
            (bucket_heatmap("MFLOPs of chosen architectures", "instanas_architecture_mflops", "none",
                            "Per image, the MFLOPs of the architecture that ran: images per interval in each "
                            "histogram bucket."), 12, 8),
            (timeseries("Architecture MFLOPs percentiles", quantile_targets("instanas_architecture_mflops"),
                        "none", "p50, p95, p99 of the MFLOPs of the architectures that ran."), 12, 8),
            (module_matrix(), 16, 12),
            (timeseries("Modules executed per image",
                        [*quantile_targets("instanas_architecture_modules"),
                         target(mean_expr("instanas_architecture_modules"), "mean", ref="D")],
                        "none", "How many blocks ran per image: p50, p95, p99 and the mean."), 8, 12),
            (timeseries("Images by operating point",
                        [target("sum by (operating_point, reason) (" + rate("instanas_operating_point_total") + ")",
                                "{{operating_point}} ({{reason}})")],
                        "reqps", "Classified images per second by the operating point (a controller or a "
                        "cascade) that chose their architecture, and why it was chosen (default, requested, budget, "
                        "...)."),
             24, 8),
            (timeseries("Images by resolution",
                        [target("sum by (resolution) (" + rate("instanas_resolution_total") + ")", "{{resolution}}x{{resolution}}")],
                        "reqps", "Classified images per second by the input resolution of the network that answered "
                        "them (a cascade's first stage runs at a lower one)."), 12, 8),
            (timeseries("Cascade escalations",
                        [target("sum by (operating_point) (" + rate("instanas_escalations_total") + ")",
                                "{{operating_point}}")],
                        "reqps", "Images per second a cascade operating point sent past its first stage (not "
                        "confident enough there), by point."), 12, 8),
        ]),
        ("Executor", [
            (timeseries("Batch size",
                        [*quantile_targets("instanas_batch_size"),
                         target(mean_expr("instanas_batch_size"), "mean", ref="D")],
                        "none", "Images per executor run (p50, p95, p99, mean)."), 8, 8),
            (timeseries("Queue depth",
                        [target("sum(instanas_queue_depth)", "waiting"),
                         target("sum(max_over_time(instanas_queue_depth[$__interval]))", "peak", ref="B")],
                        "none", "Classifications waiting for an executor slot, over all instances: now, and the "
                        "peak within each interval."), 8, 8),
            (timeseries("In flight",
                        [target("sum(instanas_in_flight_requests)", "in flight"),
                         target("sum(max_over_time(instanas_in_flight_requests[$__interval]))", "peak", ref="B")],
                        "none", "Classifications executing now (at most INSTANAS_MAX_CONCURRENCY per instance), "
                        "and the peak within each interval."), 8, 8),
        ]),
    ]


def layout() -> list:
    """Rows and their panels with grid positions: each row's panels flow left to right, then wrap."""
    panels, y = [], 0
    for title, members in rows():
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=WIDTH, x=0, y=y)))
        y += 1
        x, line_height = 0, 0
        for panel, w, h in members:
            if x + w > WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(attr.evolve(panel, gridPos=GridPos(h=h, w=w, x=x, y=y), thresholds=BASE_THRESHOLDS))
            x, line_height = x + w, max(line_height, h)
        y += line_height
    return panels


def dashboard() -> Dashboard:
    return Dashboard(
        title="instanas", uid="instanas", tags=["instanas"], timezone="browser", refresh="10s",
        description="InstaNAS image classification service: traffic, latency, architectures chosen per image.",
        time=Time("now-1h", "now"), schemaVersion=39, editable=False, graphTooltip=1,
        templating=Templating(list=[Template(
            name="model", label="Model", query="label_values(instanas_model_info, name)", dataSource=DATASOURCE,
            includeAll=True, allValue=".+", default="$__all", refresh=2)]),
        panels=layout()).auto_panel_ids()


def dashboard_json() -> str:
    return json.dumps(dashboard().to_json_data(), sort_keys=True, indent=2, cls=DashboardEncoder) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed JSON")
    args = parser.parse_args(argv)
    text = dashboard_json()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
