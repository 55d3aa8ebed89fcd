"""The Grafana dashboard (deploy/grafana/muster.json) and the Prometheus alert rules
(deploy/prometheus/alerts.yml): well formed, checked and unit-tested with promtool, and
every metric they use exists on a real server's /metrics, or, for the agents' row and
rules (``muster_agent_*``), on a real agent daemon's.

promtool comes from Debian's ``prometheus`` package; without it the promtool tests skip
(CI installs it). PyYAML is not a dependency: :func:`load_yaml` reads the block-style
subset of YAML the rule files are written in, and refuses anything else.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from muster import AsyncAdminClient, AsyncClient, AuthenticationError, TaskState
from muster.agent.metrics import AgentMetrics
from muster.server.app import ServerHandle
from muster.server.quotas import policy
from muster.v1 import agent_pb2
from tests.agent.metricsutil import Relay, http_get
from tests.agent.test_metrics import AI_PAYLOAD, KEY, agent_process, until
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config
from tests.fakes.anthropic_api import FakeAnthropicAPI, Reply

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "muster.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (apt-get install prometheus); CI installs it",
)

AGENT_ROW = "Agents (daemon metrics)"
"""The dashboard row of the agents' own metrics: its panels follow $agent_job and
$agent_instance (the daemons are another scrape job than the replicas)."""
AGENT_GROUP = "muster-agents"
"""The rule group over the agents' own metrics."""
AGENT_PREFIX = "muster_agent_"

SYNTHESIZED = {"up"}
"""Series Prometheus makes itself at each scrape, never on /metrics."""

LABELS_WITHOUT_SAMPLES = {
    "muster_llm_tokens_total",
    "muster_llm_cost_usd_total",
    "muster_agent_llm_reported_cost_usd_total",
}
"""Families the test's traffic leaves without series, so only their names are checked
against /metrics, not the labels used with them: the server's need AI attempts reporting
usage (tests/server/test_ai_dispatch.py checks their labels); the agent's reported cost
needs a tool that prices itself, claude-code (tests/agent/test_metrics.py checks it)."""

CODE_DECLARED_VALUES = {
    ("muster_quota_decisions_total", "outcome"): {"allowed", "rejected", "degraded"},
    ("muster_quota_decisions_total", "limit"): {
        policy.SUBMISSIONS,
        policy.ENROLLMENTS,
        policy.RENEWALS,
        policy.AUTH_FAILURES,
        policy.INFLIGHT_TASKS,
        policy.AI_REQUESTS,
        policy.AI_TOKENS,
    },
}
"""Label values that appear only when that decision happens (a Redis outage for
``degraded``): checked against the code's names instead of the scrape."""


def _agent_renewal_outcomes() -> set[str]:
    """The ``outcome`` values the agent's code gives a renewal that worked and one that
    failed (a real failure needs a broken server; the test run renews successfully)."""
    metrics = AgentMetrics()
    metrics.renewed(True)
    metrics.renewed(False)
    return {
        sample.labels["outcome"]
        for family in metrics.registry.collect()
        if family.name == "muster_agent_certificate_renewals"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


CODE_DECLARED_VALUES[("muster_agent_certificate_renewals_total", "outcome")] = (
    _agent_renewal_outcomes()
)


# --- a reader for the YAML the rule files use ---------------------------------------


@dataclass
class _Line:
    indent: int
    text: str


class YamlSubsetError(ValueError):
    """The file uses YAML this reader does not handle; keep to block style."""


def load_yaml(source: str) -> Any:
    """Block mappings and sequences (also indentless), plain, single- and double-quoted
    one-line scalars (all as strings), ``|`` literal blocks and the empty ``[]``/``{}``."""
    lines: list[_Line | None] = []  # None: blank or comment-only, kept for block scalars
    raw_lines = source.splitlines()
    for raw in raw_lines:
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlSubsetError(f"tab in indentation: {raw!r}")
        stripped = raw.strip()
        lines.append(
            None
            if not stripped or stripped.startswith("#")
            else _Line(len(raw) - len(raw.lstrip(" ")), stripped)
        )
    reader = _Reader(lines, raw_lines)
    start = reader.next_content(0)
    if start is None:
        return None
    line = lines[start]
    assert line is not None
    value, end = reader.node(start, line.indent)
    if reader.next_content(end) is not None:
        raise YamlSubsetError(f"unexpected indentation at line {end + 1}")
    return value


@dataclass
class _Reader:
    lines: list[_Line | None]
    raw: list[str]

    def next_content(self, i: int) -> int | None:
        while i < len(self.lines) and self.lines[i] is None:
            i += 1
        return i if i < len(self.lines) else None

    def node(self, i: int, indent: int) -> tuple[Any, int]:
        line = self.lines[i]
        assert line is not None
        if line.text == "-" or line.text.startswith("- "):
            return self.sequence(i, indent)
        return self.mapping(i, indent)

    def sequence(self, i: int, indent: int) -> tuple[list[Any], int]:
        items: list[Any] = []
        at: int | None = i
        while at is not None:
            line = self.lines[at]
            assert line is not None
            if line.indent != indent or not (line.text == "-" or line.text.startswith("- ")):
                break
            rest = line.text[1:].lstrip(" ")
            if not rest:
                child = self.next_content(at + 1)
                child_line = self.lines[child] if child is not None else None
                if child is None or child_line is None or child_line.indent <= indent:
                    items.append(None)
                    at = child
                    continue
                value, end = self.node(child, child_line.indent)
            elif _KEY.match(rest):
                # "- key: value" opens a mapping whose keys sit after the dash.
                inner = indent + (len(line.text) - len(rest))
                self.lines[at] = _Line(inner, rest)
                value, end = self.mapping(at, inner)
            else:
                value, end = _scalar(rest), at + 1
            items.append(value)
            at = self.next_content(end)
        return items, at if at is not None else len(self.lines)

    def mapping(self, i: int, indent: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        at: int | None = i
        while at is not None:
            line = self.lines[at]
            assert line is not None
            if line.indent < indent:
                break
            if line.indent > indent:
                raise YamlSubsetError(f"unexpected indentation at line {at + 1}: {line.text!r}")
            if line.text.startswith("- "):
                break  # an indentless sequence ended; the caller decides
            match = _KEY.match(line.text)
            if match is None:
                raise YamlSubsetError(f"not a 'key: value' line {at + 1}: {line.text!r}")
            key, rest = match.group(1), (match.group(2) or "").strip()
            if key in result:
                raise YamlSubsetError(f"duplicate key {key!r} at line {at + 1}")
            if rest in ("|", "|-"):
                result[key], end = self.literal(at + 1, indent, keep_newline=rest == "|")
            elif rest == "" or rest.startswith("#"):
                child = self.next_content(at + 1)
                child_line = self.lines[child] if child is not None else None
                if child is None or child_line is None:
                    result[key], end = None, at + 1
                elif child_line.indent > indent:
                    result[key], end = self.node(child, child_line.indent)
                elif child_line.indent == indent and child_line.text.startswith("- "):
                    result[key], end = self.sequence(child, indent)
                else:
                    result[key], end = None, at + 1
            else:
                result[key], end = _scalar(rest), at + 1
            at = self.next_content(end)
        return result, at if at is not None else len(self.lines)

    def literal(self, i: int, indent: int, *, keep_newline: bool) -> tuple[str, int]:
        body: list[str] = []
        block_indent: int | None = None
        while i < len(self.lines):
            raw = self.raw[i]
            if raw.strip():
                at = len(raw) - len(raw.lstrip(" "))
                if at <= indent:
                    break
                if block_indent is None:
                    block_indent = at
                if at < block_indent:
                    if self.lines[i] is None:
                        break  # a comment after the block
                    raise YamlSubsetError(f"literal block dedents at line {i + 1}")
                body.append(raw[block_indent:])
            else:
                body.append("")
            i += 1
        while body and not body[-1]:
            body.pop()
        text = "\n".join(body)
        return (text + "\n" if keep_newline and text else text), i


_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*):(?:\s+(.*)|$)")


def _scalar(text: str) -> Any:
    if text[:1] in ("'", '"'):
        if text[0] == "'":
            match = re.match(r"'((?:[^']|'')*)'", text)
            if match is None:
                raise YamlSubsetError(f"unterminated quoted scalar: {text!r}")
            value, end = match.group(1).replace("''", "'"), match.end()
        else:
            try:
                value, end = json.JSONDecoder().raw_decode(text)
            except ValueError as err:
                raise YamlSubsetError(f"bad double-quoted scalar: {text!r}") from err
        tail = text[end:].strip()
        if tail and not tail.startswith("#"):
            raise YamlSubsetError(f"trailing text after a quoted scalar: {text!r}")
        return value
    plain = re.split(r"\s#", text, maxsplit=1)[0].rstrip()
    if plain == "[]":
        return []
    if plain == "{}":
        return {}
    if plain[:1] in ("[", "{", "&", "*", "!", "|", ">", "%", "@", "`"):
        raise YamlSubsetError(f"flow style, anchors and tags are not supported: {text!r}")
    return plain


def test_the_yaml_reader_reads_the_subset_and_refuses_the_rest() -> None:
    source = (
        "# comment\n"
        "a: 1m\n"
        "b:\n"
        "- x\n"
        "- k: 'it''s'\n"
        '  v: "q"  # trailing\n'
        "c:\n"
        "  expr: |\n"
        '    up{job="a"}\n'
        "\n"
        "      == 0\n"
        "  url: docs/x.md#anchor\n"
        "  empty: []\n"
    )
    assert load_yaml(source) == {
        "a": "1m",
        "b": ["x", {"k": "it's", "v": "q"}],
        "c": {"expr": 'up{job="a"}\n\n  == 0\n', "url": "docs/x.md#anchor", "empty": []},
    }
    bad_sources = (
        "a: [1]\n",
        "a: {b: 1}\n",
        "a: 1\n  b: 2\n",
        "a: 1\na: 2\n",
        "a: &x 1\n",
        "a: 'x\n",
    )
    for bad in bad_sources:
        with pytest.raises(YamlSubsetError):
            load_yaml(bad)


# --- the rules and the dashboard as data --------------------------------------------


@dataclass(frozen=True)
class Rule:
    group: str
    name: str
    expr: str
    duration: str | None
    labels: dict[str, str]
    annotations: dict[str, str]


def alert_rules() -> list[Rule]:
    document = load_yaml(ALERTS.read_text())
    rules: list[Rule] = []
    for group in document["groups"]:
        for rule in group["rules"]:
            assert "alert" in rule, f"{group['name']}: only alerting rules live here: {rule}"
            rules.append(
                Rule(
                    group=group["name"],
                    name=rule["alert"],
                    expr=rule["expr"],
                    duration=rule.get("for"),
                    labels=rule.get("labels") or {},
                    annotations=rule.get("annotations") or {},
                )
            )
    return rules


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row holds its panels


def panel_rows(panels: list[dict[str, Any]]) -> dict[int, str]:
    """Each panel's row title: a collapsed row holds its panels, an open one the panels
    below it down to the next row."""
    rows: dict[int, str] = {}
    open_rows = sorted((p["gridPos"]["y"], p["title"]) for p in panels if p["type"] == "row")
    for panel in panels:
        if panel["type"] == "row":
            rows.update((inner["id"], panel["title"]) for inner in panel.get("panels", []))
            continue
        above = [title for y, title in open_rows if y < panel["gridPos"]["y"]]
        rows[panel["id"]] = above[-1] if above else ""
    return rows


@dataclass(frozen=True)
class Query:
    where: str
    """The panel's title, or ``$name`` of a template variable."""
    expr: str
    agent: bool
    """In the agents' row (or a variable of it): ``muster_agent_*`` from the daemons."""


def dashboard_queries() -> list[Query]:
    """Every query of the panels, and of the template variables."""
    board = dashboard()
    rows = panel_rows(board["panels"])
    found = [
        Query(panel["title"], target["expr"], rows.get(panel["id"]) == AGENT_ROW)
        for panel in all_panels(board["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            expr = query["query"] if isinstance(query, dict) else query
            found.append(Query(f"${variable['name']}", expr, variable["name"].startswith("agent_")))
    return found


def agent_metrics_only(expr: str) -> bool:
    """Every metric of ``expr`` (but ``up``) is one of the daemon's."""
    metrics = promql_uses(expr).metrics - SYNTHESIZED
    return bool(metrics) and all(metric.startswith(AGENT_PREFIX) for metric in metrics)


def no_agent_metrics(expr: str) -> bool:
    return not any(metric.startswith(AGENT_PREFIX) for metric in promql_uses(expr).metrics)


# --- PromQL: which metrics and labels an expression uses ----------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_TOKEN = re.compile(r"\d[\w.]*|[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


@dataclass
class Uses:
    """What one expression asks of the scrape."""

    metrics: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(metric, label, operator, value) of every label matcher."""
    grouping: set[str] = field(default_factory=set)
    """Labels named in by/without/on/ignoring/group_* clauses."""


def promql_uses(expr: str) -> Uses:
    uses = Uses()
    label_values = _LABEL_VALUES.match(expr)
    if label_values:  # a Grafana variable query: label_values(selector, label)
        expr, label = label_values.group(1), label_values.group(2)
        uses.grouping.add(label)
    for metric, body in _SELECTOR.findall(expr):
        rest = body
        while rest.strip():
            matcher = _MATCHER.match(rest)
            assert matcher, f"cannot read the matchers {body!r} of {metric}"
            uses.matchers.append((metric, matcher.group(1), matcher.group(2), matcher.group(3)))
            rest = rest[matcher.end() :]
    for _clause, labels in _GROUPING.findall(_STRING.sub('""', expr)):
        uses.grouping.update(label.strip() for label in labels.split(",") if label.strip())
    bare = _STRING.sub('""', expr)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = _GROUPING.sub(" ", bare)
    for token in _TOKEN.finditer(bare):
        name = token.group(0)
        if name[0].isdigit() or name in _KEYWORDS:
            continue
        if re.match(r"\s*\(", bare[token.end() :]):
            continue  # a function or an aggregation
        uses.metrics.add(name)
    return uses


def test_promql_uses_finds_metrics_labels_and_matchers() -> None:
    uses = promql_uses(
        'sum by (job, pool) (rate(a_total{x="1", y=~"b|c", job="$job"}[$__rate_interval]))'
        " / on (job) group_left max_over_time(b_seconds[5m]) > 2 * vector(0) or c offset 1h"
        ' + label_replace(d, "dst", "v", "", "")'
    )
    assert uses.metrics == {"a_total", "b_seconds", "c", "d"}
    assert uses.grouping == {"job", "pool"}
    assert ("a_total", "y", "=~", "b|c") in uses.matchers
    assert promql_uses('label_values(m{job="$job"}, instance)').metrics == {"m"}


# --- the files themselves -----------------------------------------------------------


def test_dashboard_is_importable_json_with_unique_ids_and_a_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    assert board.get("id") is None  # an import assigns it
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "agent_job", "agent_instance"} <= variables.keys()
    for name in ("job", "instance", "agent_job", "agent_instance"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    for query in dashboard_queries():
        if query.where.startswith("$"):
            scoped = agent_metrics_only if query.agent else no_agent_metrics
            assert scoped(query.expr), f"{query.where} reads the other scrape job: {query.expr}"

    panels = list(all_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    for section in ("Fleet", "Queues", "Latencies", "Errors", "Certificates", "Budgets", "Audit"):
        assert any(section in title for title in rows), f"no {section} row in {rows}"
    assert AGENT_ROW in rows
    row_of = panel_rows(board["panels"])
    assert any(row == AGENT_ROW for row in row_of.values()), "the agents' row is empty"

    for panel in panels:
        assert panel["title"], panel["id"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no queries"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        # The agents' row reads only the daemons' metrics, under their own job and
        # instances; every other panel only the replicas'.
        agent = row_of[panel["id"]] == AGENT_ROW
        job, instance = ("$agent_job", "$agent_instance") if agent else ("$job", "$instance")
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]
            scoped = agent_metrics_only if agent else no_agent_metrics
            assert scoped(target["expr"]), f"{panel['title']} reads the other scrape job"
            # Every query follows the selected job and replicas (or agents).
            for metric, label, _, value in promql_uses(target["expr"]).matchers:
                if label == "job":
                    assert value == job, (panel["title"], metric)
            for metric in promql_uses(target["expr"]).metrics:
                assert re.search(
                    rf'{metric}\{{job="\{job}", instance=~"\{instance}"', target["expr"]
                ), f"{panel['title']}: {metric} is not filtered by {job} and {instance}"

    # Panels do not overlap.
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


REQUIRED_ALERTS = {
    "MusterCACertificateExpiringSoon",
    "MusterServerCertificateExpiringSoon",
    "MusterCertificateExpiryCritical",
    "MusterAuditSpoolGrowing",
    "MusterQueueStalled",
    "MusterQuotaStoreDegraded",
    "MusterAgentsFlapping",
    "MusterSuspiciousAgentEvents",
    "MusterAgentIdentityInTwoPlaces",
}
"""The issue's list: CA or server certificate near expiry, audit spool growing, queue
oldest age, quota degraded, agents flapping, suspicious events."""


def github_anchors(markdown: str) -> set[str]:
    """The fragment GitHub gives each heading."""
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_duration_a_severity_and_a_runbook_section() -> None:
    rules = alert_rules()
    names = [rule.name for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    assert set(names) >= REQUIRED_ALERTS
    anchors = github_anchors(RUNBOOK.read_text())
    for rule in rules:
        assert rule.duration is not None and re.fullmatch(r"\d+[smh]", rule.duration), rule.name
        assert rule.labels.get("severity") in {"info", "warning", "critical"}, rule.name
        assert rule.annotations.get("summary"), rule.name
        assert rule.annotations.get("description"), rule.name
        page, _, anchor = rule.annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md", rule.name
        assert anchor == rule.name.lower(), rule.name
        assert anchor in anchors, f"{rule.name}: no '{anchor}' section in docs/operations.md"
        # The agents' group reads only the daemons' metrics, the others only the replicas'
        # (so each is checked against the right /metrics below).
        scoped = agent_metrics_only if rule.group == AGENT_GROUP else no_agent_metrics
        assert scoped(rule.expr), f"{rule.name} reads the other scrape job"


def test_every_alert_has_unit_tests_that_fire_and_that_stay_quiet() -> None:
    document = load_yaml(ALERT_TESTS.read_text())
    assert document["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
            for alert in check.get("exp_alerts") or []:
                assert alert["exp_annotations"]["runbook_url"], check["alertname"]
    names = {rule.name for rule in alert_rules()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def test_the_compose_prometheus_mounts_the_config_and_the_rules() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    for name in ("prometheus.yml", "alerts.yml"):
        mount = f"./deploy/prometheus/{name}:/etc/prometheus/{name}:ro"
        assert mount in compose, mount
    config = load_yaml((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]


# --- promtool -----------------------------------------------------------------------


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@needs_promtool
def test_promtool_check_rules() -> None:
    output = promtool("check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


@needs_promtool
def test_promtool_check_config() -> None:
    output = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in output


@needs_promtool
def test_promtool_alert_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


@needs_promtool
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool has no offline PromQL check: the panels' queries become recording rules."""
    grafana = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "6h",
        "$agent_instance": ".*",
        "$agent_job": "muster-agents",
        "$instance": ".*",
        "$job": "muster-server",
    }
    rules = []
    for i, query in enumerate(dashboard_queries()):
        title, expr = query.where, query.expr
        label_values = _LABEL_VALUES.match(expr)
        if label_values:
            expr = label_values.group(1)
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{title}: a variable the dashboard does not define: {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = promtool("check", "rules", str(path), cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in output


# --- every metric exists on a real server -------------------------------------------


@dataclass
class Scrape:
    families: dict[str, str]
    """Family name (as on the ``# TYPE`` line) to its type."""
    samples: dict[str, list[dict[str, str]]]
    """Sample name to the label sets of its series."""

    def family_of(self, name: str) -> str | None:
        if name in self.families:
            return name
        for suffix, kinds in (
            ("_bucket", ("histogram",)),
            ("_count", ("histogram", "summary")),
            ("_sum", ("histogram", "summary")),
            ("_total", ("counter",)),
        ):
            base = name.removesuffix(suffix)
            if base != name and self.families.get(base) in kinds:
                return base
        return None

    def series(self, name: str) -> list[dict[str, str]]:
        """Label sets of ``name``'s series; for a family, of all its samples."""
        if name in self.samples:
            return self.samples[name]
        family = self.family_of(name)
        return [
            labels
            for sample, sets in self.samples.items()
            if family and self.family_of(sample) == family
            for labels in sets
        ]


def parse_exposition(text: str) -> Scrape:
    families: dict[str, str] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families[name] = kind
        elif line and not line.startswith("#"):
            match = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+\S+", line)
            assert match, line
            labels = dict(
                re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', match[2] or "")
            )
            samples.setdefault(match[1], []).append(labels)
    return Scrape(families, samples)


async def fetch_metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: muster\r\nConnection: close\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    return body.decode()


async def scrape_after_traffic(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> Scrape:
    """/metrics after enough work that the labelled series the rules and panels use appear
    (an agent connected, a task run to the end, a task left waiting, a budget, a refused
    token), taken while the agent is still connected."""
    async with AsyncAdminClient(client_config(server)) as admin:
        await admin.set_budget("global", 100.0)
    agent = SimAgent.of(await enroller.enroll("dash-1"))
    await agent.hello()
    agent.keep_alive()
    try:
        task = await client.submit("echo", {"msg": "hi"})
        assignment = await agent.expect("assignment")
        agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
        await agent.finish(assignment, output=assignment.payload)
        assert (await client.wait(task.task_id, timeout=10)).state is TaskState.SUCCEEDED
        await client.submit("echo", b"x", pool="nobody-here")  # stays QUEUED
        async with AsyncClient(client_config(server, token="mst_not-a-token")) as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.get(task.task_id)
        # The queue and budget gauges are refreshed by the reaper every few seconds.
        registry = server.registry
        for _ in range(200):
            queued = registry.get_sample_value(
                "muster_queue_depth", {"pool": "nobody-here", "kind": "echo"}
            )
            limit = registry.get_sample_value("muster_budget_limit_usd", {"scope": "global"})
            if queued and limit:
                break
            await asyncio.sleep(0.05)
        assert queued == 1 and limit == 100.0
        assert server.metrics_port is not None
        return parse_exposition(await fetch_metrics(server.metrics_port))
    finally:
        await agent.close()


def check_uses(where: str, uses: Uses, scrape: Scrape) -> list[str]:
    problems = []
    for metric in sorted(uses.metrics):
        if metric in SYNTHESIZED:
            continue
        if scrape.family_of(metric) is None:
            problems.append(f"{where}: {metric} is not on /metrics")
    labels_of_expr = {"job", "instance"}  # added by the scrape
    for metric in uses.metrics - SYNTHESIZED:
        family = scrape.family_of(metric)
        if family is None or family in LABELS_WITHOUT_SAMPLES:
            labels_of_expr |= {label for _, label, _, _ in uses.matchers} | uses.grouping
            continue
        series = scrape.series(metric)
        if not series:
            problems.append(f"{where}: {metric} has no series after the traffic")
            continue
        labels_of_expr |= {label for labels in series for label in labels}
    for label in sorted(uses.grouping - labels_of_expr):
        problems.append(f"{where}: no metric of the expression has the label {label!r}")
    for metric, label, operator, value in uses.matchers:
        family = scrape.family_of(metric)
        if metric in SYNTHESIZED or family is None or family in LABELS_WITHOUT_SAMPLES:
            continue
        if label in ("job", "instance"):
            continue
        series = scrape.series(metric)
        present = {labels[label] for labels in series if label in labels}
        if not present:
            problems.append(f"{where}: {metric} has no label {label!r}")
            continue
        if operator in ("!=", "!~") or "$" in value:
            continue
        wanted = {value} if operator == "=" else set(value.split("|"))
        if operator == "=~" and not all(re.fullmatch(r"[\w.:-]+", w) for w in wanted):
            continue  # a real pattern, not a list of values
        known = present | CODE_DECLARED_VALUES.get((family, label), set())
        for missing in sorted(wanted - known):
            problems.append(f'{where}: no series {metric}{{{label}="{missing}"}}')
    return problems


@pytest.mark.slow
async def test_every_metric_of_the_dashboard_and_the_rules_is_on_a_real_servers_metrics(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    scrape = await scrape_after_traffic(server, enroller, client)

    uses = [
        (f"panel {query.where!r}", promql_uses(query.expr))
        for query in dashboard_queries()
        if not query.agent
    ]
    uses += [
        (f"alert {rule.name}", promql_uses(rule.expr))
        for rule in alert_rules()
        if rule.group != AGENT_GROUP
    ]
    problems = [problem for where, use in uses for problem in check_uses(where, use, scrape)]
    assert problems == []

    used = {metric for _, use in uses for metric in use.metrics}
    families = {scrape.family_of(metric) for metric in used - SYNTHESIZED}
    # The checks above are not vacuous: both files reach most of what the server exposes.
    muster = {
        name
        for name in scrape.families
        if name.startswith(("muster_", "grpc_server_")) and not name.endswith("_created")
    }
    assert len(families) >= 25
    assert muster - families == set(), "metrics neither a panel nor a rule shows"


async def test_a_metric_missing_from_the_scrape_is_reported(server: ServerHandle) -> None:
    assert server.metrics_port is not None
    scrape = parse_exposition(await fetch_metrics(server.metrics_port))
    problems = check_uses(
        "probe",
        promql_uses(
            'sum by (pool, flavour) (muster_queue_depthx{job="$job"})'
            ' + muster_certificate_expiry_seconds{certificate="client"}'
        ),
        scrape,
    )
    assert problems == [
        "probe: muster_queue_depthx is not on /metrics",
        'probe: no series muster_certificate_expiry_seconds{certificate="client"}',
    ]


# --- every agent metric exists on a real agent --------------------------------------

AGENT_UNSHOWN = {"muster_agent_certificate_expiry_timestamp_seconds"}
"""Agent families no panel or rule needs: the expiry as a date, beside the seconds left
that the panels and MusterAgentCertificateExpiringSoon read."""


async def scrape_agent_after_traffic(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> Scrape:
    """A real ``muster agent`` process's /metrics after it ran tasks of three kinds (one
    failing, one an AI call priced by the server), lost its stream to a network cut and
    renewed its certificate, so the labelled series the agents' row and rules use exist."""
    relay = Relay(("127.0.0.1", server.agent_port))
    relay_port = await relay.start()
    try:
        async with FakeAnthropicAPI(api_key=KEY) as api:
            api.queue(Reply(text="Hello", usage={"input_tokens": 11, "output_tokens": 5}))
            async with agent_process(
                tmp_path, server, admin, api, "dash-agent",
                "--agent-server", f"127.0.0.1:{relay_port}",
                "--metrics-addr", "127.0.0.1:0",
            ) as agent:  # fmt: skip
                echo = await client.submit("echo", b"ping")
                bad = await client.submit("sleep", {"seconds": "soon"})
                ai = await client.submit("anthropic.messages", AI_PAYLOAD, max_cost_usd=1.0)
                for task, state in (
                    (echo, TaskState.SUCCEEDED),
                    (bad, TaskState.FAILED),
                    (ai, TaskState.SUCCEEDED),
                ):
                    assert (await client.wait(task.task_id, timeout=30)).state == state

                async def once(streams: int, *names: str) -> Scrape | None:
                    """The scrape, once the server has welcomed ``streams`` streams, one is
                    up, and every one of ``names`` has series."""
                    status, _, body = await http_get(agent.url)
                    assert status == 200
                    seen = parse_exposition(body.decode())
                    up = b"\nmuster_agent_connected 1.0\n" in body
                    count = re.search(rb"\nmuster_agent_streams_total (\S+)\n", body)
                    welcomed = count is not None and float(count[1]) >= streams
                    ready = up and welcomed and all(seen.series(name) for name in names)
                    return seen if ready else None

                # A renewal (make-before-break: a second stream), then a network cut once
                # that stream is up (a third, with the reason). In this order, so the
                # server never asks a stream it lost, and the cut hits the stream in use.
                assert await admin.rotate_agents("dash-agent", reason="dashboard test") == 1
                renewed = (
                    "muster_agent_certificate_renewals_total",
                    "muster_agent_llm_cost_usd_total",
                )
                await until(lambda: once(2, *renewed), timeout=30)
                relay.cut()
                scrape: Scrape = await until(
                    lambda: once(3, "muster_agent_reconnects_total", *renewed), timeout=30
                )
                return scrape
    finally:
        await relay.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_every_agent_metric_of_the_dashboard_and_the_rules_is_on_a_real_agents_metrics(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    scrape = await scrape_agent_after_traffic(tmp_path, server, admin, client)

    uses = [
        (f"panel {query.where!r}", promql_uses(query.expr))
        for query in dashboard_queries()
        if query.agent
    ]
    uses += [
        (f"alert {rule.name}", promql_uses(rule.expr))
        for rule in alert_rules()
        if rule.group == AGENT_GROUP
    ]
    assert len(uses) >= 20
    problems = [problem for where, use in uses for problem in check_uses(where, use, scrape)]
    assert problems == []

    used = {metric for _, use in uses for metric in use.metrics}
    families = {scrape.family_of(metric) for metric in used - SYNTHESIZED}
    daemon = {
        name
        for name in scrape.families
        if name.startswith(AGENT_PREFIX) and not name.endswith("_created")
    }
    assert daemon - families == AGENT_UNSHOWN, "agent metrics neither a panel nor a rule shows"


def test_an_agent_label_value_the_code_never_gives_is_reported() -> None:
    """A renewal that failed is a value of the code (checked without a failing server);
    one the code never gives is not."""
    metrics = AgentMetrics()
    metrics.renewed(True)
    scrape = parse_exposition(generate_latest(metrics.registry).decode())
    problems = check_uses(
        "probe",
        promql_uses(
            'increase(muster_agent_certificate_renewals_total{outcome="failed"}[5m])'
            ' + muster_agent_certificate_renewals_total{outcome="expired"}'
        ),
        scrape,
    )
    assert problems == [
        'probe: no series muster_agent_certificate_renewals_total{outcome="expired"}'
    ]
