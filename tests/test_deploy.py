"""The container deployment: docker-compose.yml and what it mounts from deploy/.

Docker rarely runs where the tests do, so these files are checked without it: the compose
file is read as YAML and held against the other files (every mounted file exists, Prometheus
scrapes and nginx proxies exactly the broker services, the brokers' environment is a valid
configuration), the Grafana dashboard's queries are held against a live broker's /metrics,
and the image's healthcheck command is run against a real broker process. Where the tools
are installed, ``docker compose config``, ``promtool`` and a real image build check more.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from broker.config import load_config
from tests.conftest import (
    Broker,
    BrokerProcess,
    events_of,
    free_port,
    publish,
)

ROOT = Path(__file__).parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
NGINX_FILE = ROOT / "deploy" / "nginx.conf"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "sse-broker.json"

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
BROKERS = sorted(
    name
    for name, service in SERVICES.items()
    if isinstance(service.get("build"), dict)
    and service["build"].get("dockerfile") == "deploy/Dockerfile"
)
BROKER_PORT = load_config([], environ={}).port  # the image does not change it
PROMETHEUS: dict[str, Any] = yaml.safe_load(PROMETHEUS_FILE.read_text())
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
DATASOURCES: dict[str, Any] = yaml.safe_load(
    (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
)
PROVIDERS: dict[str, Any] = yaml.safe_load(
    (GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text()
)

METRIC_NAME = re.compile(r"\bsse_broker_[a-z_]+")
SITE = "# SITE"


def interpolate(value: object) -> str:
    """Compose's ``${NAME:-default}`` as it expands with ``NAME`` unset."""
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
    assert "$" not in text, f"an interpolation these tests cannot expand: {value!r}"
    return text


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each file or folder a service mounts from the repo."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts.append((ROOT / source, target))
    return mounts


def mount_source(service: str, target: str) -> Path:
    """The repository file a service sees at ``target``."""
    sources = [source for source, mounted in bind_mounts(SERVICES[service]) if mounted == target]
    assert len(sources) == 1, (service, target, sources)
    return sources[0]


def nginx_directives(text: str) -> list[str]:
    """A config's directive lines, without comments; a ``# SITE`` line keeps only its
    directive's name, since its value is the deployment's to choose."""
    lines = []
    for line in text.splitlines():
        code = line.split("#", 1)[0].strip()
        if code:
            lines.append(code.split()[0] if SITE in line else " ".join(code.split()))
    return lines


def dashboard_panels() -> list[dict[str, Any]]:
    return list(DASHBOARD["panels"])


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments left out."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        logical.append(pending)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    instructions = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile_instructions() if keyword == name]


def healthcheck_argv() -> list[str]:
    (healthcheck,) = instruction("HEALTHCHECK")
    _, _, command = healthcheck.partition(" CMD ")
    argv: list[str] = json.loads(command)
    return argv


def compose_command() -> list[str] | None:
    """``docker compose`` (the CLI plugin) or the standalone ``docker-compose``."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


# --- docker-compose.yml -------------------------------------------------------------------


def test_compose_runs_redis_two_brokers_nginx_prometheus_and_grafana() -> None:
    assert set(SERVICES) == {"redis", "broker1", "broker2", "nginx", "prometheus", "grafana"}
    assert BROKERS == ["broker1", "broker2"]
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    assert "healthcheck" in redis
    for name in BROKERS:
        broker = SERVICES[name]
        assert broker["build"]["context"] == "."
        assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
        # Only nginx is published: the nodes are reached through it, or by Prometheus.
        assert "ports" not in broker
    assert set(SERVICES["nginx"]["depends_on"]) == set(BROKERS)


@pytest.mark.parametrize("name", BROKERS)
def test_broker_environment_is_a_valid_configuration_sharing_redis(name: str) -> None:
    environment = {key: interpolate(value) for key, value in SERVICES[name]["environment"].items()}
    readme = (ROOT / "README.md").read_text()
    for key in environment:
        assert f"`{key}`" in readme, f"{key} is not a documented setting"
    config = load_config([], environ=environment)
    assert config.redis_url == "redis://redis:6379/0"
    assert config.jwt_key is not None
    assert not config.allow_anonymous_publish
    # The brokers trust exactly nginx's fixed address, on the compose network's subnet.
    nginx_address = ip_address(SERVICES["nginx"]["networks"]["sse"]["ipv4_address"])
    (subnet,) = COMPOSE["networks"]["sse"]["ipam"]["config"]
    assert nginx_address in ip_network(subnet["subnet"])
    assert [nginx_address in network for network in config.trusted_proxies] == [True]
    assert config.trusted_proxies[0].num_addresses == 1


def test_every_mounted_file_exists_and_named_volumes_are_declared() -> None:
    mounted = [source for service in SERVICES.values() for source, _ in bind_mounts(service)]
    assert len(mounted) >= 4  # nginx, prometheus, grafana's provisioning and dashboards
    for source in mounted:
        assert source.exists(), f"{source.relative_to(ROOT)} is mounted but missing"
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in COMPOSE["volumes"], source


def test_prometheus_scrapes_every_broker_service() -> None:
    assert mount_source("prometheus", "/etc/prometheus/prometheus.yml") == PROMETHEUS_FILE
    targets = {
        target
        for job in PROMETHEUS["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert targets == {f"{name}:{BROKER_PORT}" for name in BROKERS}


def test_nginx_proxies_to_every_broker_service_on_its_published_port() -> None:
    config_file = mount_source("nginx", "/etc/nginx/nginx.conf")
    text = config_file.read_text()
    upstream = re.search(r"upstream sse_broker \{(.*?)\}", text, re.DOTALL)
    assert upstream is not None
    servers = re.findall(r"^\s*server\s+(\S+)", upstream.group(1), re.MULTILINE)
    assert sorted(servers) == [f"{name}:{BROKER_PORT}" for name in BROKERS]
    (listen,) = re.findall(r"^\s*listen\s+(\d+)\s*;", text, re.MULTILINE)
    assert [port.split(":")[-1] for port in SERVICES["nginx"]["ports"]] == [listen]


def test_compose_nginx_config_differs_from_deploy_nginx_only_in_site_values() -> None:
    """The compose stack runs the documented nginx.conf, not a drifting copy of it."""
    compose_config = mount_source("nginx", "/etc/nginx/nginx.conf")
    assert compose_config != NGINX_FILE
    assert nginx_directives(compose_config.read_text()) == nginx_directives(
        NGINX_FILE.read_text()
    ), f"{compose_config.name} must be deploy/nginx.conf with only '# SITE' values changed"


def test_docker_compose_accepts_the_file() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- deploy/prometheus.yml ----------------------------------------------------------------


def test_prometheus_scrapes_metrics_over_http() -> None:
    assert PROMETHEUS["scrape_configs"]
    for job in PROMETHEUS["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert job.get("scheme", "http") == "http"


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- deploy/grafana -----------------------------------------------------------------------


def test_grafana_provisions_the_prometheus_service_and_the_dashboard_folder() -> None:
    (datasource,) = DATASOURCES["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in SERVICES
    assert mount_source("grafana", "/etc/grafana/provisioning") == GRAFANA / "provisioning"
    (provider,) = PROVIDERS["providers"]
    folder = mount_source("grafana", provider["options"]["path"])
    assert DASHBOARD_FILE.parent == folder
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert folder / Path(home).relative_to(provider["options"]["path"]) == DASHBOARD_FILE


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    (datasource,) = DATASOURCES["datasources"]
    assert isinstance(DASHBOARD["schemaVersion"], int)
    assert DASHBOARD["uid"]
    assert DASHBOARD["title"]
    panels = dashboard_panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert min(grid["x"], grid["y"]) >= 0, panel["title"]
        assert min(grid["w"], grid["h"]) > 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["targets"], panel["title"]
        for source in (panel, *panel["targets"]):
            assert source["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])


def test_dashboard_shows_connections_rates_drops_replay_and_latency() -> None:
    used = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    assert {
        "sse_broker_connections",
        "sse_broker_events_published_total",
        "sse_broker_events_delivered_total",
        "sse_broker_events_dropped_total",
        "sse_broker_events_replayed_total",
        "sse_broker_publish_duration_seconds_bucket",
        "sse_broker_backend_up",
        "sse_broker_stream_lag_seconds",
        "sse_broker_disconnects_total",
    } <= used


async def test_dashboard_queries_only_metrics_and_labels_the_broker_exports(
    broker: Broker, client: httpx.AsyncClient
) -> None:
    async with aconnect_sse(client, "GET", f"{broker.url}/events", params={"topic": "t"}) as sse:
        await publish(client, broker.url, "t", "hello")
        event = await asyncio.wait_for(anext(events_of(sse)), 10)
        assert event.data == "hello"
        response = await client.get(f"{broker.url}/metrics")
    samples = [
        sample
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]
    exported = {sample.name for sample in samples}
    # Prometheus adds instance and job to every series it scrapes.
    labels = {"instance", "job"} | {label for sample in samples for label in sample.labels}
    for query in dashboard_queries():
        for name in METRIC_NAME.findall(query):
            assert name in exported, f"{name} (in {query!r}) is not exported"
        for grouping in re.findall(r"\bby \(([^)]*)\)", query):
            for label in grouping.split(","):
                assert label.strip() in labels, f"no label {label.strip()!r} for {query!r}"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    # Grafana replaces $__rate_interval before Prometheus sees a query.
    rules = [
        {"record": f"dashboard:query_{number}", "expr": query.replace("$__rate_interval", "1m")}
        for number, query in enumerate(dashboard_queries())
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- deploy/Dockerfile --------------------------------------------------------------------


def test_dockerfile_builds_a_small_unprivileged_image_with_a_healthcheck() -> None:
    (base,) = instruction("FROM")
    assert base.startswith("python:3.11-slim")
    users = instruction("USER")
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert instruction("EXPOSE") == [str(BROKER_PORT)]
    assert "/healthz" in " ".join(healthcheck_argv())
    (command,) = instruction("CMD")
    assert json.loads(command) == ["sse-broker", "serve", "--host", "0.0.0.0"]
    for copy in instruction("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    for install in (run for run in instruction("RUN") if "pip install" in run):
        assert "[" not in install, "the image installs no extras"
    ignored = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_image_healthcheck_passes_while_the_broker_serves_and_fails_after(
    broker_process: Callable[..., BrokerProcess],
) -> None:
    argv = healthcheck_argv()
    assert argv[0] == "python"
    probe = [sys.executable, *argv[1:]]
    node = broker_process()
    healthy = subprocess.run(
        probe, env={"BROKER_PORT": str(node.port)}, capture_output=True, timeout=30, check=False
    )
    assert healthy.returncode == 0, healthy.stderr
    node.stop()
    down = subprocess.run(
        probe, env={"BROKER_PORT": str(node.port)}, capture_output=True, timeout=30, check=False
    )
    assert down.returncode != 0


@pytest.fixture
def docker_daemon() -> None:
    if shutil.which("docker") is None:
        pytest.skip("the docker client is not installed")
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no usable docker daemon")


def docker(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        ["docker", *args], check=True, capture_output=True, text=True, timeout=timeout
    )
    return result.stdout.strip()


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("docker_daemon")
def test_image_builds_runs_unprivileged_and_turns_healthy() -> None:
    tag = "sse-broker:test-deploy"
    docker("build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT), timeout=780)
    port = free_port()
    container = docker("run", "--rm", "-d", "-p", f"127.0.0.1:{port}:{BROKER_PORT}", tag)
    try:
        assert docker("exec", container, "id", "-u") != "0"
        # Generous: the first health check runs one --interval (30 s) after the start.
        deadline = time.monotonic() + 90
        status = ""
        while status != "healthy":
            assert time.monotonic() < deadline, f"health: {status}"
            time.sleep(1)
            status = docker("inspect", "--format", "{{.State.Health.Status}}", container)
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert response.json() == {"status": "ok"}
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)
