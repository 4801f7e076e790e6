"""Shipped Prometheus rules, scrape config and Grafana dashboard: valid, tested, on contract.

The rules and the dashboard may only query the metrics the exporter promises (METRICS);
promtool, where installed, parses every expression and runs the rules' unit tests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

PROMETHEUS = ROOT / "contrib" / "prometheus"
RULES = PROMETHEUS / "mailtally.rules.yml"
RULE_TESTS = PROMETHEUS / "mailtally.rules.test.yml"
SCRAPE_EXAMPLE = PROMETHEUS / "prometheus.yml.example"
DASHBOARD = ROOT / "contrib" / "grafana" / "mailtally.json"

# The exporter's contract (daemon/mailtally/metrics.py): every sample name it may serve,
# as PromQL selects it, so the histogram appears as its _bucket, _sum and _count series.
# The rules and the dashboard may use nothing else, apart from PROMETHEUS_SERIES.
METRICS = (
    # log history, restored from the database on restart
    "mailtally_deliveries_total",
    "mailtally_messages_total",
    "mailtally_messages_auth_total",
    "mailtally_sasl_failures_total",
    "mailtally_rejects_total",
    "mailtally_evicted_messages_total",
    # reading activity since the process started
    "mailtally_lines_read_total",
    "mailtally_lines_parsed_total",
    "mailtally_lines_unparsed_total",
    "mailtally_ingest_lag_seconds",
    "mailtally_last_log_timestamp_seconds",
    "mailtally_last_commit_timestamp_seconds",
    "mailtally_open_messages",
    "mailtally_config_reloads_total",
    "mailtally_config_last_reload_successful",
    "mailtally_policy_requests_total",
    "mailtally_policy_decision_seconds_bucket",
    "mailtally_policy_decision_seconds_sum",
    "mailtally_policy_decision_seconds_count",
    "mailtally_policy_failopen_total",
    "mailtally_build_info",
    # prometheus-client's process and platform collectors
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "python_info",
    # read from the database at scrape time
    "mailtally_senders_over_threshold",
    "mailtally_notifications_total",
    "mailtally_notifications_queued",
    "mailtally_top_sender_messages",
)

# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = frozenset({"up"})

# Contract metrics that neither the dashboard nor the rules need, and why.
UNUSED = {
    "mailtally_lines_parsed_total": "read minus unparsed; the panels show those two",
    "mailtally_config_reloads_total": "the Config stat shows the last reload's outcome",
    "python_info": "mailtally_build_info carries the Python version",
}

# Values for Grafana's variables when an expression is checked without Grafana.
GRAFANA_VARIABLES = {
    "__rate_interval": "2m",
    "__interval": "1m",
    "__range": "1d",
    "instance": "relay.example.edu:9154",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing (Debian: apt-get install prometheus)"
)

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<number>\.?\d[\w.]*)
    | (?P<name>[A-Za-z_:][\w:]*)
    | (?P<open>[({\[])
    | (?P<close>[)}\]])
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE,
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _GROUPING | {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_AGGREGATORS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile"}
)
_CLOSING = {"(": ")", "{": "}", "[": "]"}


def _tokens(expr: str) -> list[tuple[str, str]]:
    return [
        (m.lastgroup or "", m.group())
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("space", "string")
    ]


def metric_names(expr: str) -> set[str]:
    """Return the metric names an expression selects: not functions, labels or keywords."""
    tokens = _tokens(expr)
    names: set[str] = set()
    stack: list[tuple[str, bool]] = []  # open brackets, and whether names inside are labels
    for i, (kind, text) in enumerate(tokens):
        if kind == "open":
            label_list = text == "(" and i > 0 and tokens[i - 1][1].lower() in _GROUPING
            stack.append((text, text in "{[" or label_list))
        elif kind == "close":
            assert stack, f"unbalanced {text!r} in {expr!r}"
            opened, _ = stack.pop()
            assert _CLOSING[opened] == text, f"{opened!r} closed by {text!r} in {expr!r}"
        elif kind == "name" and not any(labels for _, labels in stack):
            following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
            lowered = text.lower()
            if lowered in _KEYWORDS or lowered in _AGGREGATORS or following == "(":
                continue
            names.add(text)
    assert not stack, f"unclosed {stack} in {expr!r}"
    return names


def fill_variables(expr: str) -> str:
    """Replace Grafana's ``$var``/``${var}`` with values PromQL can parse."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))", value, expr)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """Yield (where, expr) for every PromQL expression in the dashboard."""
    data = dashboard()
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for annotation in data["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"]


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=cwd,
    )


def assert_clean_check(proc: subprocess.CompletedProcess[str]) -> None:
    """Assert a ``promtool check`` succeeded and printed nothing but its progress."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert proc.stderr.strip() == "", output
    for line in proc.stdout.splitlines():
        assert line.strip().startswith(("Checking ", "SUCCESS: ")) or not line.strip(), output


# --- the extraction the contract checks rely on ----------------------------------------


def test_metric_names_skip_functions_labels_keywords_and_durations() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{le="+Inf", x=~"y|z"}[5m])))'
        " / on (job) group_left (version) b offset 1h30m"
        " and sum without (instance) (c:rule:rate5m) > bool 1e3 or time() - d @ end()"
        " unless topk(5, max_over_time(e[1h:5m]))"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c:rule:rate5m", "d", "e"}


def test_metric_names_see_through_grafana_variables() -> None:
    expr = 'sum(rate(a{instance=~"$instance"}[$__rate_interval])) / b{instance="${instance}"}'
    filled = fill_variables(expr)
    assert "$" not in filled
    assert metric_names(filled) == {"a", "b"}
    with pytest.raises(AssertionError, match="unknown Grafana variable"):
        fill_variables("rate(a[$nope])")


# --- alerting and recording rules ------------------------------------------------------


@needs_promtool
def test_rules_check_without_warnings() -> None:
    assert_clean_check(promtool("check", "rules", "--lint=all", "--lint-fatal", RULES))


@needs_promtool
def test_rules_unit_tests_pass() -> None:
    proc = promtool("test", "rules", RULE_TESTS.name, cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alerts_are_named_graded_and_annotated() -> None:
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), names
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"Mailtally[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, name
        assert all(annotations.values()), name
        text = annotations["summary"] + annotations["description"]
        assert "{{ $labels." in text or "{{ $value" in text, name


def test_the_wanted_alerts_exist() -> None:
    expressions = {rule["alert"]: rule["expr"] for rule in alerts()}
    wanted = {
        "MailtallyDown": 'up{job="mailtally"} == 0',
        "MailtallySenderOverAlert": 'level="alert"',
        "MailtallySenderOverWarn": 'level="warn"',
        "MailtallyBounceRatioHigh": "bounce_ratio",
        "MailtallyDeferralsHigh": "deferral_ratio",
        "MailtallyIngestStalled": "time() - mailtally_last_commit_timestamp_seconds",
        "MailtallyIngestLagging": "mailtally_ingest_lag_seconds > 300",
        "MailtallyUnparsedLines": "unparsed",
        "MailtallyNotificationsFailing": 'state="failed"',
        "MailtallyNotificationsPilingUp": "mailtally_notifications_queued > 100",
        "MailtallySaslFailuresBurst": "mailtally_sasl_failures_total",
        "MailtallyConfigReloadFailed": "mailtally_config_last_reload_successful == 0",
    }
    for name, fragment in wanted.items():
        assert name in expressions, name
        assert fragment in expressions[name], (name, expressions[name])


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases: dict[str, set[bool]] = {}
    for group in load_yaml(RULE_TESTS)["tests"]:
        assert group.get("interval"), f"{group['name']}: promtool 2.42 needs interval:"
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for rule in alerts():
        assert cases.get(rule["alert"]) == {True, False}, rule["alert"]
    assert set(cases) <= {rule["alert"] for rule in alerts()}


def test_every_recording_rule_is_tested_and_used() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    tested = {
        case["expr"]
        for group in load_yaml(RULE_TESTS)["tests"]
        for case in group.get("promql_expr_test", [])
    }
    used = set().union(*(metric_names(rule["expr"]) for rule in alerts()))
    for name in recorded:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name
        assert name in used, f"{name} is recorded but no alert uses it"
        assert name in tested, f"{name} has no promql_expr_test"


def test_rule_expressions_use_only_contract_metrics() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    allowed = set(METRICS) | PROMETHEUS_SERIES | recorded
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, rule
        assert names <= allowed, (rule.get("alert") or rule["record"], names - allowed)


# --- scrape configuration --------------------------------------------------------------


def test_scrape_example_scrapes_the_relay_and_loads_the_rules() -> None:
    config = load_yaml(SCRAPE_EXAMPLE)
    assert config["rule_files"] == [RULES.name]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "mailtally"
    assert job["scrape_interval"] == "30s"
    assert job["static_configs"] == [{"targets": ["relay.example.edu:9154"]}]


@needs_promtool
def test_scrape_example_checks() -> None:
    # check config also checks the rule files it names, relative to the example
    assert_clean_check(promtool("check", "config", SCRAPE_EXAMPLE))


# --- Grafana dashboard -----------------------------------------------------------------


def test_dashboard_is_import_ready() -> None:
    data = dashboard()
    (source,) = data["__inputs"]
    assert source == {
        "name": "DS_PROMETHEUS",
        "label": "Prometheus",
        "description": source["description"],
        "type": "datasource",
        "pluginId": "prometheus",
        "pluginName": "Prometheus",
    }
    assert 36 <= data["schemaVersion"] <= 41
    assert data["uid"] == "mailtally"
    assert data["id"] is None
    (variable,) = data["templating"]["list"]
    assert variable["name"] == "instance"
    assert variable["type"] == "query"
    assert variable["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert variable["definition"] == "label_values(mailtally_build_info, instance)"
    assert variable["query"]["query"] == variable["definition"]
    assert "mailtally_build_info" in METRICS
    required = {item["id"] for item in data["__requires"] if item["type"] == "panel"}
    assert required == {panel["type"] for panel in data["panels"]}


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    panels = dashboard()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat", "table"}, panel["title"]
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        pos = panel["gridPos"]
        assert 0 <= pos["x"] < pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (panel["title"], cells[(x, y)])
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_use_the_input_datasource() -> None:
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    data = dashboard()
    for panel in data["panels"]:
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, (panel["title"], target["refId"])
    for annotation in data["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"] == source, annotation["name"]


def test_dashboard_queries_use_only_contract_metrics_of_the_chosen_relays() -> None:
    allowed = set(METRICS) | PROMETHEUS_SERIES
    for where, expr in dashboard_queries():
        names = metric_names(fill_variables(expr))
        assert names, where
        assert names <= allowed, (where, names - allowed)
        selectors = re.findall(r"\b[a-z_]+\{([^}]*)\}", expr)
        assert len(selectors) == len(re.findall(r"\b[a-z_]+\{", expr)), where
        assert selectors, where
        assert all('instance=~"$instance"' in s for s in selectors), (where, expr)


def test_dashboard_and_rules_cover_the_contract() -> None:
    used: set[str] = set()
    for _, expr in dashboard_queries():
        used |= metric_names(fill_variables(expr))
    for rule in rules():
        used |= metric_names(rule["expr"])
    missing = set(METRICS) - used - set(UNUSED)
    assert not missing, f"contract metrics shown nowhere: {sorted(missing)}"
    assert not set(UNUSED) & used, "UNUSED lists a metric that is now used"


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    queries = list(dashboard_queries())
    rules_file = tmp_path / "dashboard.rules.yml"
    group = {
        "name": "dashboard",
        "rules": [
            {"record": f"dashboard:query_{i}:check", "expr": fill_variables(expr)}
            for i, (_, expr) in enumerate(queries)
        ],
    }
    rules_file.write_text(yaml.safe_dump({"groups": [group]}), encoding="utf-8")
    proc = promtool("check", "rules", "--lint=none", rules_file)
    assert_clean_check(proc)
    assert f"SUCCESS: {len(queries)} rules found" in proc.stdout
