"""What operators see: the `mlx-fleet` command against a real server, fleet gauges still on
Ray's metrics endpoint long after the last request, and a Grafana dashboard that asks only for
metrics the server exports.

A third application in the session's cluster, with an admin key, so that no other test's
requests touch its controller while the gauges' expiry is awaited. The model loaded then is a
vision model: the controller sets the gauges again whenever a text model's replica reports
what it holds (every 10 s), so only a fleet without a loaded text model shows whether they
stay without any change at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fleet_cli import KEY_VARIABLE, URL_VARIABLE, size
from tests.conftest import ROOT, default_app_args, free_port, run_app, wait_for

APP = "mlx-fleet-ops"
KEY = "ops-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
TEXT_MODEL = "tiny-llama"
MODEL = "tiny-qwen2-vl"  # the one loaded while the gauges' expiry is awaited
ARGS = {
    **default_app_args(),
    "admin_api_key": KEY,
    "models": [
        {"id": TEXT_MODEL, "path": "models/tiny-llama"},
        {"id": MODEL, "path": "models/tiny-qwen2-vl", "idle_ttl": "10m"},
    ],
}
DASHBOARD = ROOT / "ops" / "grafana" / "mlx-fleet-dashboard.json"
# Ray's metrics agent keeps a gauge value 20 s after the export that carried it, and a worker
# exports every 10 s: a gauge set once is gone from scrapes after at most 30 s.
GAUGE_GONE_AFTER_SECONDS = 30 + 5


@pytest.fixture(scope="module")
def ops_url(demo_models, serve_port) -> str:
    return run_app(ARGS, name=APP, route_prefix="/ops")


@pytest.fixture(scope="module")
def quiet_since(ops_url) -> float:
    """The vision model answered a request, an unknown model was asked for (so Serve's error
    counters exist); when the controller last had reason to set a gauge (time.monotonic())."""
    chat = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    answer = httpx.post(f"{ops_url}/v1/chat/completions", json=chat, timeout=120)
    assert answer.status_code == 200, answer.text
    unknown = httpx.post(f"{ops_url}/v1/chat/completions", json={**chat, "model": "no-such-model"}, timeout=30)
    assert unknown.status_code == 404
    time.sleep(1)  # the request's lease goes back a quarter second after its answer
    return time.monotonic()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (URL_VARIABLE, KEY_VARIABLE)}
    return subprocess.run(
        [sys.executable, "-m", "fleet_cli", *args],
        capture_output=True, text=True, cwd=ROOT, env={**clean, **(env or {})}, timeout=300,
    )


def table_rows(output: str) -> dict[str, dict[str, str]]:
    """The table's rows by their first cell; columns are at least two spaces apart."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NAME"))
    headers = re.split(r"\s{2,}", lines[start].strip())
    rows = [dict(zip(headers, re.split(r"\s{2,}", line.strip()))) for line in lines[start + 1 :] if line.strip()]
    return {row["NAME"]: row for row in rows}


def admin_view(url: str) -> dict:
    return httpx.get(f"{url}/admin/models", headers=ADMIN, timeout=30).json()


def model_view(url: str, model_id: str) -> dict:
    return next(m for m in admin_view(url)["models"] if m["id"] == model_id)


def assert_one_line_failure(result: subprocess.CompletedProcess, *mentions: str) -> None:
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for mention in mentions:
        assert mention in result.stderr


# -- the command ------------------------------------------------------------------------------


def test_load_pins_ps_shows_the_prompt_cache_and_unload_unloads(ops_url):
    loaded = cli("load", TEXT_MODEL, "--pin", "--url", ops_url, "--admin-key", KEY)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith(f"{TEXT_MODEL} loaded, pinned: ")

    chat = {"model": TEXT_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(f"{ops_url}/v1/chat/completions", json=chat, timeout=120).status_code == 200
    # Its replica reports the prompt it cached at the controller's next check (every 10 s).
    wait_for(lambda: model_view(ops_url, TEXT_MODEL)["prompt_cache_bytes"] > 0, "prompt cache reported", 30)
    by_env = {URL_VARIABLE: ops_url, KEY_VARIABLE: KEY}
    row = table_rows(cli("ps", env=by_env).stdout)[TEXT_MODEL]
    assert (row["STATUS"], row["PINNED"], row["IDLE UNLOAD IN"]) == ("loaded", "yes", "-")
    assert re.fullmatch(r"weights [\d.]+ [KMG]?B, process [\d.]+ [KMG]?B, prompt cache [\d.]+ [KMG]?B", row["MADE OF"]), row

    unloaded = cli("unload", TEXT_MODEL, env=by_env)
    assert (unloaded.returncode, unloaded.stdout) == (0, f"{TEXT_MODEL} unloaded\n")
    assert cli("ps", env=by_env).stdout.rstrip().endswith("no model holds memory (mlx-fleet ps -a lists unloaded ones too)")
    row = table_rows(cli("ps", "-a", env=by_env).stdout)[TEXT_MODEL]
    assert (row["STATUS"], row["PINNED"], row["MEMORY"], row["MADE OF"]) == ("unloaded", "no", "-", "-")


def test_ps_shows_memory_and_its_parts_requests_and_idle_countdown(ops_url, quiet_since):
    view = admin_view(ops_url)
    model = next(m for m in view["models"] if m["id"] == MODEL)
    result = cli("--url", ops_url, "--admin-key", KEY, "ps")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"memory: {size(view['used_bytes'])} used of {size(view['memory_limit_bytes'])} budget, "
    )
    row = table_rows(result.stdout)[MODEL]
    assert (row["TYPE"], row["FAMILY"], row["STATUS"], row["PINNED"]) == ("vision", "qwen", "loaded", "no")
    assert row["MEMORY"] == size(model["memory_bytes"])
    assert row["MADE OF"] == f"weights {size(model['weights_bytes'])}, process {size(model['process_bytes'])}"
    assert row["LEASES"] == "0"
    assert re.fullmatch(r"\d+s ago", row["LAST USED"]), row
    assert re.fullmatch(r"9m \d\ds|10m 00s", row["IDLE UNLOAD IN"]), row


def test_models_lists_the_catalog_without_an_admin_key(ops_url, quiet_since):
    result = cli("models", "--url", ops_url)
    assert result.returncode == 0, result.stderr
    row = table_rows(result.stdout)[MODEL]
    assert (row["TYPE"], row["STATUS"], row["PINNED"]) == ("vision", "loaded", "no")
    assert {"chat", "vision"} <= set(row["CAPABILITIES"].split(", "))
    assert table_rows(result.stdout)[TEXT_MODEL]["STATUS"] == "unloaded"


def test_a_refused_admin_key_fails_in_one_line_that_says_what_to_do(ops_url):
    for key in (["--admin-key", "wrong"], []):
        assert_one_line_failure(cli("ps", "--url", ops_url, *key), "--admin-key", KEY_VARIABLE)


def test_a_server_that_is_down_fails_in_one_line_that_says_what_to_do():
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line_failure(cli("ps", "--url", url), f"cannot reach mlx-fleet at {url}", "--url", URL_VARIABLE)


def test_an_unknown_model_is_the_servers_message(ops_url):
    assert_one_line_failure(cli("load", "no-such-model", "--url", ops_url, "--admin-key", KEY), "404", "no-such-model")


def test_detect_prints_the_servers_detection_as_json(demo_models):
    result = cli("detect", str(demo_models / "tiny-qwen2-vl"), "acme/house-model-v2")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["input"], r["type"], r["family"]) for r in rows] == [
        (str(demo_models / "tiny-qwen2-vl"), "vision", "qwen"), ("acme/house-model-v2", "text-generation", "llama")
    ]


# -- metrics and the dashboard ----------------------------------------------------------------


def exported_names(metric) -> set[str]:
    """The names Ray's metrics endpoint gives a metric: prefixed `ray_`, counters ending in
    `_total`, histograms as their buckets, count and sum."""
    from ray.util.metrics import Counter, Histogram

    name = f"ray_{metric.info['name']}"
    if isinstance(metric, Histogram):
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    if isinstance(metric, Counter) and not name.endswith("_total"):
        return {f"{name}_total"}
    return {name}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    queries = [target["expr"] for panel in panels for target in panel["targets"]]
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries + variables


def metric_names(query: str) -> set[str]:
    """Every metric a PromQL query (or a Grafana label_values() variable query) selects."""
    label_values = re.fullmatch(r"label_values\((.+), *\w+\)", query)
    # Grafana's interval variables are not PromQL durations.
    expression = promql_parser.parse(re.sub(r"\$__\w+_interval|\$__range", "5m", label_values[1] if label_values else query))
    names: set[str] = set()

    def visit(node, *_) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(expression, visit)
    return names


def dashboard_metrics() -> set[str]:
    return {name for query in dashboard_queries() for name in metric_names(query)}


def test_dashboard_asks_only_for_metrics_the_server_exports():
    from deployments.fleet_metrics import fleet_metrics

    fleet = set().union(*(exported_names(metric) for metric in fleet_metrics().values()))
    used = dashboard_metrics()
    assert all(metric_names(query) for query in dashboard_queries())
    assert {name for name in used if not name.startswith("ray_serve_")} <= fleet
    # Serve's names: checked against a real scrape in the test below.
    assert {"ray_fleet_model_bytes", "ray_fleet_memory_used_bytes", "ray_fleet_models_loaded"} <= used


def scrape_ray_metrics() -> list[Sample]:
    """Every sample on this cluster's metrics endpoints: the targets Ray's Prometheus
    service discovery lists (one per node), read from the same node table it writes them from,
    since this cluster runs without the dashboard that writes the file."""
    import ray

    targets = [f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}" for node in ray.nodes() if node["Alive"]]
    text = "\n".join(httpx.get(f"http://{target}/metrics", timeout=30).text for target in targets)
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def test_gauges_stay_on_the_metrics_endpoint_long_after_the_last_request(ops_url, quiet_since):
    """Last in this file: the tests above only read, so the controller sets no gauge because
    of them; only its periodic re-publishing can keep the gauges alive this long."""
    time.sleep(max(0.0, quiet_since + GAUGE_GONE_AFTER_SECONDS - time.monotonic()))
    view = admin_view(ops_url)
    model = next(m for m in view["models"] if m["id"] == MODEL)
    samples = scrape_ray_metrics()

    def gauge(name: str, **labels: str) -> float:
        values = [
            s.value for s in samples
            if s.name == name and s.labels.get("application") == APP and labels.items() <= s.labels.items()
        ]
        assert len(values) == 1, f"{name} {labels} of {APP}: {len(values)} samples (Ray drops gauges not set again)"
        return values[0]

    assert model["status"] == "loaded" and model["memory_bytes"] > 0
    assert gauge("ray_fleet_model_bytes", model=MODEL) == model["memory_bytes"]
    assert gauge("ray_fleet_memory_used_bytes") == view["used_bytes"]
    assert gauge("ray_fleet_memory_budget_bytes") == view["memory_limit_bytes"]
    assert gauge("ray_fleet_models_loaded") == 1
    serve_metrics = {name for name in dashboard_metrics() if name.startswith("ray_serve_")}
    assert serve_metrics <= {s.name for s in samples}
