"""The provisioned Grafana dashboard: generated as committed, wired to compose, and every query real.

No Grafana binary exists on the test machines, so Grafana's part is checked as files (the dashboard
is what docker/grafana/make_dashboard.py makes; the data source, the provider and the compose service
agree with each other). The queries are the point: every panel target's PromQL runs, with Grafana's
`$__rate_interval` and `$__interval` put in, through the HTTP API of a real Prometheus scraping a real
server (the `prometheus` fixture of tests/conftest.py, as in tests/test_prometheus.py) that was sent
real CIFAR-10 JPEGs and some bad requests; each must return data, name only metrics and labels the
service exports, and give the values that this traffic implies.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from tests.conftest import PROMETHEUS_WAIT_S, ROOT, Server, prometheus_query, service_values, wait_for_target_up

GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD_PATH = GRAFANA / "dashboards" / "instanas.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "instanas.yml"
# What Grafana would put in for its interval variables (1m covers every scrape of the test's traffic) and for
# the dashboard's model variable set to "All".
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$model": ".+"}
STAGES = {"decode", "queue", "controller", "backbone"}
# PromQL words that are neither metrics nor functions (functions are told by the "(" after them).
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
            "inf", "nan"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_dashboard", GRAFANA / "make_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DASHBOARD = json.loads(DASHBOARD_PATH.read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
TARGETS = [(panel, target) for panel in PANELS for target in panel["targets"]]
TARGET_IDS = [f"{panel['id']:02d}{target['refId']}-{re.sub(r'[^a-z0-9]+', '-', panel['title'].lower()).strip('-')}"
              for panel, target in TARGETS]


def promql(expr: str) -> str:
    """A target's expression as Grafana sends it to Prometheus."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    # No other Grafana variable ($name, ${name}, [[name]]) may be left; "$1" in label_replace is PromQL's.
    leftover = re.findall(r"\$\{|\$[A-Za-z_]\w*|\[\[", expr)
    assert not leftover, f"{expr}: Grafana variables the test does not know: {leftover}"
    return expr


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords or labels."""
    s = _strip_strings(expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        if s[match.end():].lstrip().startswith("(") or match.group().lower() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def label_names(expr: str) -> dict[str, set[str]]:
    """Labels an expression names: in matchers, per metric ({"": ...} for grouping clauses)."""
    s = _strip_strings(expr)
    out: dict[str, set[str]] = {}
    for metric, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", s):
        out.setdefault(metric, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", s):
        out.setdefault("", set()).update(x.strip() for x in labels.split(",") if x.strip())
    return out


def panel(title: str) -> dict:
    [found] = [p for p in PANELS if p["title"] == title]
    return found


# --- The files, without Grafana ---


def test_committed_dashboard_is_what_the_generator_makes():
    generator = _load_generator()
    assert generator.dashboard_json() == DASHBOARD_PATH.read_text(), "run docker/grafana/make_dashboard.py"
    assert generator.main(["--check"]) == 0


def test_dashboard_layout_and_data_source():
    assert DASHBOARD["uid"] == "instanas" and DASHBOARD["title"] == "instanas"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), ids
    # Panels tile the 24-column grid without overlapping.
    cells = set()
    for p in DASHBOARD["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"{p['title']} overlaps another panel"
        cells |= area
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    for p in PANELS:
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": source["uid"]}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"], (p["title"], t)


def test_dashboard_covers_the_metrics_it_should():
    read = set().union(*(metric_names(t["expr"]) for _, t in TARGETS))
    families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in read}
    assert families >= {
        "instanas_requests", "instanas_request_duration_seconds", "instanas_stage_duration_seconds",
        "instanas_architecture_estimated_latency_seconds", "instanas_architecture_mflops",
        "instanas_architecture_modules", "instanas_module_executions", "instanas_batch_size",
        "instanas_in_flight_requests", "instanas_queue_depth", "instanas_rejections", "instanas_model_info",
        "instanas_operating_point", "instanas_resolution", "instanas_escalations"}
    # The distributions asked for: heatmaps of the architecture histograms' buckets.
    for title, metric in [
            ("Estimated latency of chosen architectures", "instanas_architecture_estimated_latency_seconds"),
            ("MFLOPs of chosen architectures", "instanas_architecture_mflops")]:
        p = panel(title)
        assert p["type"] == "heatmap" and p["options"]["calculate"] is False
        [t] = p["targets"]
        assert t["format"] == "heatmap" and f"{metric}_bucket" in t["expr"] and "by (le)" in t["expr"]
    matrix = panel("Module executions by cell x module (images/s)")
    [t] = matrix["targets"]
    assert "by (cell, module)" in t["expr"] and t["instant"] and t["format"] == "table"
    assert matrix["transformations"][0]["id"] == "groupingToMatrix"
    assert {k: matrix["transformations"][0]["options"][k] for k in ("rowField", "columnField")} == {
        "rowField": "cell", "columnField": "module"}


def test_provisioning_and_compose_agree():
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    [provider] = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    # The data source's host and port are the prometheus service's.
    assert "9090:9090" in prometheus["ports"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"]), grafana["image"]
    assert "3000:3000" in grafana["ports"]
    assert "prometheus" in grafana["depends_on"]
    mounts = {}
    for volume in grafana["volumes"]:
        src, dst, mode = volume.split(":")
        assert mode == "ro", volume
        mounts[dst] = (ROOT / src).resolve()
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    # The provider reads the folder the dashboard is mounted at, and the home dashboard is in it.
    assert mounts[provider["options"]["path"]] == DASHBOARD_PATH.parent.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD_PATH.name}"


def test_promql_parsing_helpers():
    expr = ('sum by (cell, module) (label_replace(rate(instanas_module_executions_total{job="x"}[1m]), '
            '"cell", "0$1", "cell", "([0-9])")) / on (cell) group_left foo_bar or vector(0)')
    assert metric_names(expr) == {"instanas_module_executions_total", "foo_bar"}
    assert label_names(expr) == {"instanas_module_executions_total": {"job"}, "": {"cell", "module"}}
    assert promql("rate(x[$__rate_interval]) + increase(x[$__interval])") == "rate(x[1m]) + increase(x[1m])"
    with pytest.raises(AssertionError):
        promql("rate(x{job=\"$job\"}[5m])")


# --- The queries, on a real Prometheus ---


@pytest.fixture(scope="module")
def server(smoke_bundle, tmp_path_factory):
    """This module's own server (overriding the session's), so every count it exports comes from here."""
    srv = Server(smoke_bundle, tmp_path_factory.mktemp("grafana-server") / "server.log")
    yield srv
    srv.stop()


@dataclass
class Traffic:
    """What was sent to this module's server, what it answered, and the Prometheus that scraped it."""

    url: str
    server: Server
    statuses: Counter = field(default_factory=Counter)   # error responses by status code
    reasons: Counter = field(default_factory=Counter)    # rejections of POST /classify by error code
    latencies: list[float] = field(default_factory=list)  # estimated architecture latency, seconds
    mflops: list[float] = field(default_factory=list)
    modules: list[int] = field(default_factory=list)
    blocks: set[tuple[int, int]] = field(default_factory=set)  # (cell, module) that ran for some image
    exported: dict[str, set[str]] = field(default_factory=dict)  # sample name -> its label names

    def query(self, target: dict) -> list[dict]:
        return prometheus_query(self.url, promql(target["expr"]))

    def values(self, title: str, ref: str = "A", label: str | None = None) -> dict:
        [target] = [t for t in panel(title)["targets"] if t["refId"] == ref]
        return {(r["metric"][label] if label else None): float(r["value"][1]) for r in self.query(target)}


def _send(traffic: Traffic, jpegs: list[bytes]) -> None:
    """Classify each JPEG, one at a time; records the architecture each response reports."""
    for jpeg in jpegs:
        response = httpx.post(traffic.server.url + "/classify", content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30)
        assert response.status_code == 200, response.text
        arch = response.json()["architecture"]
        traffic.latencies.append(arch["estimated_latency_ms"] / 1e3)
        traffic.mflops.append(arch["mflops"])
        traffic.modules.append(arch["modules_executed"])
        # architecture.code: one base-32 digit (5 bits) per cell, bit m set when module m ran (docs/API.md).
        ran = {(c, m) for c, digit in enumerate(arch["code"]) for m in range(5) if int(digit, 32) >> m & 1}
        assert len(ran) == arch["modules_executed"]
        traffic.blocks |= ran


BAD_REQUESTS = [  # (method, path, body, content type, status, error code)
    ("POST", "/classify", b"", "image/jpeg", 400, "empty_body"),
    ("POST", "/classify", b"", "image/jpeg", 400, "empty_body"),
    ("POST", "/classify", b"", "image/jpeg", 400, "empty_body"),
    ("POST", "/classify", b"a cat, honestly", "text/plain", 415, "unsupported_media_type"),
    ("POST", "/classify", b"a cat, honestly", "text/plain", 415, "unsupported_media_type"),
    ("POST", "/classify", b"not an image at all", "image/png", 400, "not_an_image"),
    ("POST", "/classify", b"not an image at all", "image/png", 400, "not_an_image"),
    ("POST", "/classify?top_k=0", None, "image/jpeg", 422, "invalid_request"),
    ("GET", "/no-such-path", None, None, 404, "not_found"),
]


def _send_bad(traffic: Traffic, requests: list[tuple], jpeg: bytes) -> None:
    """Each request of BAD_REQUESTS' form (a None body is `jpeg`); checks and counts the errors."""
    for method, path, body, content_type, status, code in requests:
        headers = {"content-type": content_type} if content_type else {}
        response = httpx.request(method, traffic.server.url + path, content=jpeg if body is None and method == "POST"
                                 else body, headers=headers, timeout=30)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
        traffic.statuses[str(status)] += 1
        if path.startswith("/classify"):
            traffic.reasons[code] += 1


def _wait_until_scraped(traffic: Traffic) -> None:
    """Until Prometheus holds every counter the service exports now (but /metrics' own, which moves)."""
    checks = [("instanas_requests_total", ("endpoint", "status"), 'endpoint!="/metrics"'),
              ("instanas_rejections_total", ("reason",), ""),
              ("instanas_module_executions_total", ("cell", "module"), ""),
              ("instanas_architecture_modules_count", (), "")]
    deadline = time.time() + PROMETHEUS_WAIT_S
    for name, labels, selector in checks:
        want = {k: v for k, v in service_values(traffic.server, name, labels).items() if k[:1] != ("/metrics",)}
        while True:
            query = f"{name}{{{selector}}}" if selector else name
            got = {tuple(r["metric"][k] for k in labels): float(r["value"][1])
                   for r in prometheus_query(traffic.url, query)}
            if got == want:
                break
            assert time.time() < deadline, f"{name}: Prometheus has {got}, the service {want}"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def traffic(server, prometheus, test_jpegs) -> Traffic:
    url, job = prometheus
    traffic = Traffic(url=url, server=server)
    wait_for_target_up(server, url, job)
    jpegs = [jpeg for _label, jpeg in test_jpegs]
    # A first round makes every series exist, and be scraped, before the round that rates then see:
    # a counter's first sample is where rate() starts, not an increase from 0.
    kinds = list({r[-1]: r for r in BAD_REQUESTS}.values())
    _send(traffic, jpegs[:1])
    _send_bad(traffic, kinds, jpegs[0])
    _wait_until_scraped(traffic)
    _send(traffic, jpegs)
    _send_bad(traffic, BAD_REQUESTS, jpegs[1])
    _wait_until_scraped(traffic)
    text = httpx.get(server.url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            traffic.exported.setdefault(sample.name, set()).update(sample.labels)
    return traffic


@pytest.mark.slow
@pytest.mark.parametrize("target", [t for _, t in TARGETS], ids=TARGET_IDS)
def test_panel_query_returns_data(traffic, target):
    result = traffic.query(target)
    assert result, f"no data: {promql(target['expr'])}"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), (target["expr"], result)
    assert all(v >= 0 or math.isnan(v) for v in values), (target["expr"], result)


@pytest.mark.slow
@pytest.mark.parametrize("target", [t for _, t in TARGETS], ids=TARGET_IDS)
def test_panel_query_names_only_exported_metrics_and_labels(traffic, target):
    names = metric_names(target["expr"])
    assert names, target["expr"]
    unknown = names - traffic.exported.keys()
    assert not unknown, f"{target['expr']}: not exported by the service: {sorted(unknown)}"
    labels = label_names(target["expr"])
    for metric, used in labels.items():
        known = set().union(*(traffic.exported[n] for n in names)) if metric == "" else traffic.exported[metric]
        known |= {"job", "instance"}  # what Prometheus attaches to every series it scrapes
        assert used <= known, f"{target['expr']}: labels {sorted(used - known)} not on {metric or sorted(names)}"


def _buckets(traffic: Traffic, histogram: str) -> list[float]:
    return sorted(float(le) for (le,) in service_values(traffic.server, histogram + "_bucket", ("le",)))


def _check_distribution(traffic: Traffic, heatmap: str, quantiles: str, histogram: str, observed: list[float],
                        tolerance: float) -> None:
    """Bucket heatmap and percentiles of an architecture histogram against the values the responses gave."""
    low, high = min(observed), max(observed)
    increases = traffic.values(heatmap, label="le")
    bounds = _buckets(traffic, histogram)
    assert sorted(float(le) for le in increases) == bounds
    total = increases["+Inf"]
    assert total > 0
    for le, value in increases.items():
        if float(le) < low - tolerance:
            assert value == 0, f"{heatmap}: {value} images at or below {le}, but none was below {low}"
        elif float(le) >= high + tolerance:
            assert value == total, f"{heatmap}: bucket {le} should hold every image (the largest is {high})"
    floor = max([b for b in bounds if b < low - tolerance], default=0.0)
    ceiling = min(b for b in bounds if b >= high + tolerance)
    ceiling = max(b for b in bounds if math.isfinite(b)) if math.isinf(ceiling) else ceiling
    got = [traffic.values(quantiles, ref)[None] for ref in "ABC"]
    assert got == sorted(got), got
    for q in got:
        assert floor <= q <= ceiling, f"{quantiles}: {q} outside the buckets of {low}..{high}"


@pytest.mark.slow
def test_panel_values_match_the_traffic(traffic):
    # Totals since start: exactly what was sent (this module's server saw nothing else).
    assert traffic.values("Errors since start, by status", label="status") == dict(traffic.statuses)
    assert traffic.values("Rejections since start, by reason", label="reason") == dict(traffic.reasons)
    assert dict(traffic.statuses) == {"400": 7, "415": 3, "422": 2, "404": 2}
    # Rates: every status and reason sent moves, and nothing else.
    rates = traffic.values("Errors by status code", label="status")
    assert {k for k, v in rates.items() if v > 0} == set(traffic.statuses)
    rates = traffic.values("Rejections by reason", label="reason")
    assert {k for k, v in rates.items() if v > 0} == set(traffic.reasons)
    rates = traffic.values("Request rate by endpoint", label="endpoint")
    assert {"/classify", "/metrics", "unmatched"} <= {k for k, v in rates.items() if v > 0}
    ratio = traffic.values("Error ratio")[None]
    assert 0 < ratio < 1
    assert traffic.values("Images classified/s")[None] > 0

    # The model table shows the bundle the server says it serves.
    model = httpx.get(traffic.server.url + "/healthz/ready", timeout=5).json()["model"]
    [row] = traffic.query(panel("Model")["targets"][0])
    assert {k: row["metric"][k] for k in ("name", "version", "sha256")} == model
    assert row["metric"]["instance"] == f"127.0.0.1:{traffic.server.port}"

    # Latency: ordered percentiles inside the histogram's range; every stage present.
    classify = [traffic.values("POST /classify latency", ref)[None] for ref in "ABC"]
    assert classify == sorted(classify) and 0 < classify[0] and classify[-1] <= 2.5, classify
    assert "/classify" in traffic.values("Request latency p95 by endpoint", label="endpoint")
    means = traffic.values("Stage latency, mean (stacked)", label="stage")
    assert set(means) == STAGES and all(math.isfinite(v) and v >= 0 for v in means.values()), means
    p95 = traffic.values("Stage latency p95", label="stage")
    assert set(p95) == STAGES and all(0 <= v <= 2.5 for v in p95.values()), p95

    # Architectures: the distributions hold the values the responses reported, and only those.
    _check_distribution(traffic, "Estimated latency of chosen architectures",
                        "Estimated architecture latency percentiles", "instanas_architecture_estimated_latency_seconds",
                        traffic.latencies, tolerance=1e-6)
    _check_distribution(traffic, "MFLOPs of chosen architectures", "Architecture MFLOPs percentiles",
                        "instanas_architecture_mflops", traffic.mflops, tolerance=1e-3)
    mean_modules = traffic.values("Modules executed per image", "D")[None]
    # A ratio of two extrapolated rates: exact up to rounding.
    assert min(traffic.modules) - 1e-9 <= mean_modules <= max(traffic.modules) + 1e-9, mean_modules
    labels = ("operating_point", "reason")
    moved = {(r["metric"]["operating_point"], r["metric"]["reason"]) for r in
             traffic.query(panel("Images by operating point")["targets"][0]) if float(r["value"][1]) > 0}
    counted = service_values(traffic.server, "instanas_operating_point_total", labels)
    assert moved and moved == {k for k, v in counted.items() if v > 0}
    assert sum(counted.values()) == len(traffic.modules), "one operating point per classified image"
    by_resolution = traffic.values("Images by resolution", label="resolution")
    exported = service_values(traffic.server, "instanas_resolution_total", ("resolution",))
    assert {k for (k,) in exported} == set(by_resolution)
    assert {k for k, v in by_resolution.items() if v > 0} == {k for (k,), v in exported.items() if v > 0}
    assert sum(exported.values()) == len(traffic.modules), "one resolution per classified image"
    escalations = traffic.values("Cascade escalations", label="operating_point")
    assert set(escalations) == {k for (k,) in service_values(traffic.server, "instanas_escalations_total",
                                                               ("operating_point",))}

    # Cells x modules: every (cell, module) pair, cells zero-padded to sort; the blocks that ran move.
    matrix = {(row["metric"]["cell"], row["metric"]["module"]): float(row["value"][1])
              for row in traffic.query(panel("Module executions by cell x module (images/s)")["targets"][0])}
    exported = service_values(traffic.server, "instanas_module_executions_total", ("cell", "module"))
    assert {(int(c), int(m)) for c, m in matrix} == {(int(c), int(m)) for c, m in exported}
    assert all(len(c) >= 2 for c, _ in matrix), "cell labels are padded so that they sort"
    assert {(int(c), int(m)) for (c, m), v in matrix.items() if v > 0} == traffic.blocks

    # Executor: one image per run; nothing waiting or running once the traffic is over.
    assert traffic.values("Batch size", "D")[None] == pytest.approx(1.0)
    assert all(0 < traffic.values("Batch size", ref)[None] <= 1 for ref in "ABC")
    settings = Settings()
    assert traffic.values("Queue depth", "A")[None] == 0
    assert 0 <= traffic.values("Queue depth", "B")[None] <= settings.max_queue
    assert traffic.values("In flight", "A")[None] == 0
    assert 0 <= traffic.values("In flight", "B")[None] <= settings.max_concurrency
