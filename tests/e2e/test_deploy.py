"""The deployment artefacts under deploy/ (issue 7 item 4), checked with pyyaml, json and the stdlib only.

A manifest that parses is not yet a deployment that works, so beside the required fields this cross-checks the
pieces against each other and against the code: the config the ConfigMap mounts passes ``broker check`` with the
Deployment's own environment (file paths rewritten onto a ``broker certs`` PKI); the probes, Services,
PodDisruptionBudget and NetworkPolicies point at ports and labels that exist; the alert rules and the dashboard
use only metric names, labels and label values that broker/observability.py and the code actually produce (a
typo there is an alert that silently never fires); the systemd unit has what a drain and a reload need.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from broker.context import ROUTE_EVENTS
from broker.observability import MCP_METHOD_LABELS, Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "broker-dashboard.json"
UNIT = DEPLOY / "systemd" / "broker.service"
NAMESPACE = "broker"

Obj = dict[str, Any]

# --- loading ------------------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def objects_in(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[Obj]:
    """Every Kubernetes object under deploy/ (the rule file is not one; the Kustomization is build config)."""
    found = []
    for path in yaml_files():
        if path != ALERTS:
            found += [doc for doc in objects_in(path) if doc.get("kind") != "Kustomization"]
    return found


def the(kind: str, name: str) -> Obj:
    matches = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads() -> list[Obj]:
    return [o for o in k8s_objects() if o["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def all_containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def broker_container() -> Obj:
    return next(c for c in pod_spec(the("Deployment", "broker"))["containers"] if c["name"] == "broker")


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """matchLabels semantics: every selector pair is among the labels (an empty selector selects nothing here)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_of(container_ports: list[Obj], target: int | str) -> int | None:
    """The container port a Service/probe ``targetPort`` (number or name) resolves to, or None."""
    for port in container_ports:
        if target in (port.get("name"), port["containerPort"]):
            return int(port["containerPort"])
    return None


# --- the mounted broker.yaml ---------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")  # the loader's ${VAR} syntax
_K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(VAR) in env values

#: every file the mounted config names, and the file of a `broker certs` PKI (CONTRACT §10) the test puts there
MOUNTED_FILES = {
    "/run/broker/svid/svid.pem": "broker.pem",
    "/run/broker/svid/svid_key.pem": "broker-key.pem",
    "/run/broker/svid/svid_bundle.pem": "ca.pem",
    "/run/broker/signing/broker-signing.jwk": "broker-signing.jwk",
    "/run/broker/admin/token": "admin-token",  # not in the PKI: the test writes it (the broker-admin-token Secret)
}
#: stand-ins for what the cluster injects: the Downward API pod name and Secret values
POD_NAME = "broker-5d8f7c9b6-x2k4q"
SECRET_VALUE = "0123456789abcdef0123456789abcdef"


def config_text() -> str:
    text: str = the("ConfigMap", "broker-config")["data"]["broker.yaml"]
    return text


def deployment_env() -> dict[str, str]:
    """The broker container's environment as the kubelet builds it ($(VAR) expanded from earlier entries)."""
    env: dict[str, str] = {}
    for entry in broker_container()["env"]:
        source = entry.get("valueFrom", {})
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", entry
            env[entry["name"]] = POD_NAME
        elif "secretKeyRef" in source:
            env[entry["name"]] = SECRET_VALUE
        else:
            env[entry["name"]] = _K8S_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), entry["value"])
    return env


def expand(value: Any, env: Mapping[str, str]) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in every string, as broker/config/loader.py does (not imported: the test
    must not lean on the module it checks the output of)."""
    if isinstance(value, dict):
        return {k: expand(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env) for v in value]
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            assert default is not None, f"${{{name}}} is not set by the Deployment"
            return default

        return _VAR.sub(sub, value)
    return value


def mounted_config() -> Obj:
    config: Obj = expand(yaml.safe_load(config_text()), deployment_env())
    return config


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)
    elif isinstance(value, str):
        yield value


def mounts_of(container: Obj) -> list[tuple[str, bool]]:
    return [(m["mountPath"], bool(m.get("readOnly"))) for m in container.get("volumeMounts", [])]


def under_mount(path: str, container: Obj, *, writable: bool) -> bool:
    return any(
        path.startswith(mount.rstrip("/") + "/") and (not writable or not read_only)
        for mount, read_only in mounts_of(container)
    )


# --- metric catalogue and a small PromQL reader ---------------------------------------------------------------

#: labels the scrape adds (Kubernetes service discovery, relabelling) on top of the broker's own
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint"})
#: closed label-value sets, per (family, label): where the code takes each from
KNOWN_VALUES: dict[tuple[str, str], frozenset[str]] = {
    # CONTRACT §9 decisions; broker/gateway/middleware.py labels a missing decision "error"
    ("broker_requests", "decision"): frozenset({"allow", "deny", "step_up", "pending", "error"}),
    ("broker_requests", "route"): frozenset(ROUTE_EVENTS),
    ("broker_request_duration_seconds", "route"): frozenset(ROUTE_EVENTS),
    ("broker_txn_tokens", "event"): frozenset({"minted", "consumed", "rejected"}),  # CONTRACT §9
    ("broker_config_reloads", "result"): frozenset({"success", "failure", "rollback"}),  # broker/admin.py
    ("broker_rotations", "result"): frozenset({"success", "failure"}),  # broker/rotation.py
    ("broker_mcp_requests", "mcp_method"): MCP_METHOD_LABELS,  # CONTRACT §16
    ("broker_mcp_request_duration_seconds", "mcp_method"): MCP_METHOD_LABELS,
}
# fmt: off
PROMQL_FUNCTIONS = frozenset({
    "sum", "count", "avg", "min", "max", "rate", "irate", "increase", "delta", "histogram_quantile", "absent",
    "absent_over_time", "clamp_min", "clamp_max", "label_replace", "topk", "bottomk", "sort", "sort_desc", "time",
    "vector", "scalar", "count_over_time",
})
PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
})
# fmt: on
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")


def metric_catalogue() -> dict[str, tuple[str, frozenset[str]]]:
    """Series name -> (family, label names), parsed from a ``Metrics()`` instance's registry."""
    metrics = Metrics()
    # label names are not exposed before a child exists; the wrappers hold them (prometheus-client internals)
    labels = {
        w._name: frozenset(w._labelnames) for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)
    }
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    catalogue = {}
    for family in metrics.registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            catalogue[family.name + suffix] = (family.name, labels[family.name] | extra)
    return catalogue


def promql_problems(expr: str, catalogue: Mapping[str, tuple[str, frozenset[str]]]) -> list[str]:
    """Metric names, label names and closed-set label values in ``expr`` that the broker does not produce."""
    problems: list[str] = []
    used_labels: set[str] = set(TARGET_LABELS)
    for match in _SELECTOR.finditer(expr):
        name, body = match.group(1), match.group(2)
        if name is None or name not in catalogue:
            continue  # reported below as an unknown metric (or a bare {…} selector, which we never write)
        family, labels = catalogue[name]
        for label, op, value in _MATCHER.findall(body):
            if label not in labels | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
            known = KNOWN_VALUES.get((family, label))
            if known is not None and op in ("=", "=~"):
                problems += [
                    f"{name}{{{label}}} never has value {v!r}" for v in value.split("|") if v not in known
                ]
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    groupings = _GROUPING.findall(stripped)
    stripped = _GROUPING.sub(" ", stripped)
    for ident in _IDENT.finditer(stripped):
        word = ident.group(0)
        if re.match(r"\s*\(", stripped[ident.end() :]):
            if word not in PROMQL_FUNCTIONS:
                problems.append(f"unknown function {word!r}")
        elif word not in PROMQL_KEYWORDS:
            if word in catalogue:
                used_labels |= catalogue[word][1]
            else:
                problems.append(f"unknown metric {word!r}")
    for _, names in groupings:
        problems += [
            f"grouping by unknown label {n!r}" for n in re.findall(r"\w+", names) if n not in used_labels
        ]
    return problems


# --- Kubernetes objects ----------------------------------------------------------------------------------------

HTTPS_PORT = [{"name": "https", "containerPort": 8443}]
CROSS_CHECK_REFUSALS = [
    pytest.param(lambda: selects({}, {"app": "broker"}), id="empty-selector-selects-nothing"),
    pytest.param(lambda: selects({"app": "broker"}, {"app": "redis"}), id="selector-label-mismatch"),
    pytest.param(lambda: port_of(HTTPS_PORT, "admin") is not None, id="unknown-port-name"),
    pytest.param(lambda: port_of(HTTPS_PORT, 9090) is not None, id="unknown-port-number"),
    pytest.param(
        lambda: under_mount("/a/x", {"volumeMounts": [{"mountPath": "/a", "readOnly": True}]}, writable=True),
        id="read-only-mount-is-not-writable",
    ),
    pytest.param(
        lambda: under_mount("/ab/x", {"volumeMounts": [{"mountPath": "/a"}]}, writable=False),
        id="name-prefix-is-not-a-mount",
    ),
]


@pytest.mark.parametrize("check", CROSS_CHECK_REFUSALS)
def test_cross_check_helpers_refuse_mismatches(check: Callable[[], bool]) -> None:
    assert check() is False


def test_expansion_refuses_a_variable_the_deployment_does_not_set() -> None:
    assert expand("${A:-x}/${B}", {"B": "y"}) == "x/y"
    with pytest.raises(AssertionError, match=r"\$\{C\} is not set"):
        expand("${C}", {})


def test_every_variable_the_mounted_config_reads_is_set_by_the_deployment() -> None:
    strings = strings_in(yaml.safe_load(config_text()))  # parsed: commented-out lines do not count
    without_default = {
        m.group(1) for text in strings for m in _VAR.finditer(text) if m.group(1) and m.group(2) is None
    }
    assert without_default and without_default <= set(deployment_env())


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_under_deploy_parses_into_mappings(path: Path) -> None:
    docs = objects_in(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize(
    "obj", k8s_objects(), ids=lambda o: f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"
)
def test_every_object_has_kind_apiversion_name_and_our_namespace(obj: Obj) -> None:
    assert isinstance(obj.get("apiVersion"), str) and obj["apiVersion"]
    assert isinstance(obj.get("kind"), str) and obj["kind"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"])
    expected = None if obj["kind"] == "Namespace" else NAMESPACE
    assert obj["metadata"].get("namespace") == expected


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    (kustomization,) = objects_in(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert kustomization["namespace"] == NAMESPACE


def test_deployment_runs_replicas_of_one_worker_each() -> None:
    deployment = the("Deployment", "broker")
    assert deployment["spec"]["replicas"] >= 3
    assert selects(
        deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]
    )
    args = broker_container()["args"]
    assert args[:3] == ["run", "-c", "/etc/broker/broker.yaml"] and args[3:] == ["--workers", "1"]


@pytest.mark.parametrize(
    ("probe", "path"),
    [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")],
    ids=["readiness", "liveness", "startup"],
)
def test_probes_hit_the_admin_listener(probe: str, path: str) -> None:
    container = broker_container()
    get = container[probe]["httpGet"]
    admin = mounted_config()["server"]["admin_listen"]
    assert get["path"] == path
    assert port_of(container["ports"], get["port"]) == int(admin.rpartition(":")[2])
    # the kubelet probes the pod IP: loopback would fail every probe
    assert admin.rpartition(":")[0] in ("0.0.0.0", "[::]")


def test_main_listener_is_the_https_container_port() -> None:
    listen = mounted_config()["server"]["listen"]
    assert port_of(broker_container()["ports"], "https") == int(listen.rpartition(":")[2])


def test_resources_are_requested_and_memory_is_limited() -> None:
    for workload in workloads():
        for container in all_containers(workload):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert "memory" in resources["limits"], container["name"]


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_pods_are_locked_down(workload: Obj) -> None:
    pod = pod_spec(workload)["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec(workload)["automountServiceAccountToken"] is False
    for container in all_containers(workload):
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"], container["name"]
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault", container["name"]


def test_termination_grace_outlasts_prestop_plus_shutdown_grace() -> None:
    spec = pod_spec(the("Deployment", "broker"))
    command = broker_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = mounted_config()["server"]["shutdown_grace_seconds"]
    assert spec["terminationGracePeriodSeconds"] > int(command[1]) + grace


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_every_mount_has_a_volume_and_every_volume_is_used(workload: Obj) -> None:
    volumes = {v["name"] for v in pod_spec(workload).get("volumes", [])}
    volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    mounted = {m["name"] for c in all_containers(workload) for m in c.get("volumeMounts", [])}
    assert mounted == volumes


def test_svids_come_from_the_spiffe_csi_driver_through_spiffe_helper() -> None:
    spec = pod_spec(the("Deployment", "broker"))
    csi = [v for v in spec["volumes"] if "csi" in v]
    assert [v["csi"]["driver"] for v in csi] == ["csi.spiffe.io"]
    helper = the("ConfigMap", "spiffe-helper")["data"]["helper.conf"]
    settings = dict(re.findall(r'^\s*(\w+)\s*=\s*"([^"]*)"', helper, re.MULTILINE))
    tls = mounted_config()["server"]["tls"]
    for field, key in (
        ("cert", "svid_file_name"),
        ("key", "svid_key_file_name"),
        ("client_ca", "svid_bundle_file_name"),
    ):
        assert tls[field] == f"{settings['cert_dir']}/{settings[key]}"
    sidecar = next(c for c in spec["initContainers"] if c.get("restartPolicy") == "Always")
    assert any(
        m["mountPath"] == settings["cert_dir"] and not m.get("readOnly") for m in sidecar["volumeMounts"]
    )


def test_every_file_the_config_names_is_on_a_mounted_volume() -> None:
    config, container = mounted_config(), broker_container()
    for path in MOUNTED_FILES:
        assert path in config_text(), f"MOUNTED_FILES names {path}, which the config no longer uses"
        assert under_mount(path, container, writable=False), path
    # the audit chain goes to PostgreSQL, its URL (with the password) from a Secret, never from the ConfigMap;
    # every process starts a chain of its own there, so no per-pod file (nor writable volume) is needed
    assert "file" not in config["audit"]
    assert config["audit"]["store"] == SECRET_VALUE


def test_referenced_configmaps_exist_and_secrets_are_created_in_the_readme() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for workload in workloads():
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                the("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                assert f"create secret generic {volume['secret']['secretName']} " in readme
        for container in all_containers(workload):
            for entry in container.get("env", []):
                if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                    assert f"create secret generic {ref['name']} " in readme


def test_redis_url_points_at_the_redis_service() -> None:
    state = mounted_config()["state"]
    assert state["backend"] == "redis"
    match = re.fullmatch(
        r"redis://:([^@]+)@([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)/\d+", state["redis_url"]
    )
    assert match, state["redis_url"]
    assert match.group(1) == SECRET_VALUE  # the password comes from the Secret, not from the ConfigMap
    service = the("Service", match.group(2))
    assert match.group(3) == NAMESPACE
    assert int(match.group(4)) in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize(
    "service",
    [o for o in k8s_objects() if o["kind"] == "Service"],
    ids=lambda s: s["metadata"]["name"],
)
def test_services_select_a_workload_and_target_its_ports(service: Obj) -> None:
    targets = [
        w
        for w in workloads()
        if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(targets) == 1
    ports = [p for c in pod_spec(targets[0])["containers"] for p in c.get("ports", [])]
    for port in service["spec"]["ports"]:
        assert port_of(ports, port["targetPort"]) is not None, port


def test_pdb_selects_the_deployment_and_leaves_room_to_drain() -> None:
    pdb, deployment = the("PodDisruptionBudget", "broker"), the("Deployment", "broker")
    assert selects(
        pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]
    )
    assert pdb["spec"]["minAvailable"] == 2 < deployment["spec"]["replicas"]


def test_hpa_scales_the_deployment_above_the_pdb_floor() -> None:
    hpa = the("HorizontalPodAutoscaler", "broker")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "broker"}
    assert hpa["spec"]["minReplicas"] > the("PodDisruptionBudget", "broker")["spec"]["minAvailable"]


def test_admin_port_is_open_to_prometheus_only() -> None:
    policy = the("NetworkPolicy", "broker")
    labels = the("Deployment", "broker")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    admin = port_of(broker_container()["ports"], "admin")
    rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == admin for p in r["ports"])]
    assert len(rules) == 1 and rules[0]["from"]  # an empty `from` would admit everyone
    assert all("ipBlock" not in peer for peer in rules[0]["from"])
    assert the("NetworkPolicy", "default-deny")["spec"] == {
        "podSelector": {},
        "policyTypes": ["Ingress", "Egress"],
    }


@pytest.mark.slow
def test_mounted_config_passes_broker_check(tmp_path: Path) -> None:
    certs = subprocess.run(
        [sys.executable, "-m", "broker", "certs", "--out", str(tmp_path / "pki")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert certs.returncode == 0, certs.stderr
    (tmp_path / "pki" / "admin-token").write_text(SECRET_VALUE)
    text = config_text()
    for path in strings_in(yaml.safe_load(text)):
        assert not path.startswith("/") or path in MOUNTED_FILES, f"add {path} to MOUNTED_FILES"
    for path, pki_file in MOUNTED_FILES.items():
        text = text.replace(path, str(tmp_path / "pki" / pki_file))
    (tmp_path / "broker.yaml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "EXPENSE_"))}
    # the broker-audit-db Secret's url (broker check validates it, it does not connect)
    env |= deployment_env() | {"BROKER_AUDIT_STORE": "postgresql://broker:pw@audit-db.broker.svc:5432/audit"}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check", "-c", str(tmp_path / "broker.yaml")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ") and " 2 tools, " in result.stdout


# --- alerts and dashboard --------------------------------------------------------------------------------------

ALERT_RULES = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
PANELS = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


P = pytest.param
PROMQL_REFUSALS = [
    P("rate(broker_request_total[5m])", "unknown metric 'broker_request_total'", id="metric-typo"),
    P(
        'sum(broker_approvals_total{status="x"})',
        "broker_approvals_total has no label 'status'",
        id="label-typo",
    ),
    P(
        'rate(broker_requests_total{decision="denied"}[5m])',
        "broker_requests_total{decision} never has value 'denied'",
        id="decision-value",
    ),
    P(
        'rate(broker_requests_total{route=~"invoke|tools"}[5m])',
        "broker_requests_total{route} never has value 'tools'",
        id="route-value",
    ),
    P(
        "sum by (route) (rate(broker_state_errors_total[5m]))",
        "grouping by unknown label 'route'",
        id="by-label",
    ),
    P("up == 0", "unknown metric 'up'", id="foreign-metric"),
    P("rates(broker_audit_errors_total[5m])", "unknown function 'rates'", id="function"),
    P(
        'broker_request_duration_seconds_bucket{tool="x"}',
        "broker_request_duration_seconds_bucket has no label 'tool'",
        id="histogram-label",
    ),
]


@pytest.mark.parametrize(("expr", "problem"), PROMQL_REFUSALS)
def test_promql_reader_refuses_what_the_broker_does_not_produce(expr: str, problem: str) -> None:
    assert promql_problems(expr, metric_catalogue()) == [problem]


@pytest.mark.parametrize("rule", ALERT_RULES, ids=lambda r: r.get("alert", "?"))
def test_alert_rule_is_complete_and_uses_only_broker_metrics(rule: Obj) -> None:
    assert re.fullmatch(r"Broker[A-Z][A-Za-z]+", rule["alert"])
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
    assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s"))
    assert rule["labels"]["severity"] in ("page", "warning")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert promql_problems(rule["expr"], metric_catalogue()) == []


def test_alert_names_are_unique_and_cover_the_failure_modes() -> None:
    names = [rule["alert"] for rule in ALERT_RULES]
    assert len(names) == len(set(names))
    exprs = " ".join(rule["expr"] for rule in ALERT_RULES)
    for needle in (
        'broker_requests_total{decision=~"deny|error"',  # refusal spike
        "broker_dpop_replays_total",  # replay attempts
        "broker_state_errors_total",  # state store down
        'broker_config_reloads_total{result="failure"}',  # reload failures
        "broker_audit_errors_total",  # audit errors
        "broker_audit_disk_free_bytes",  # audit disk low (/readyz turns 503 below audit.min_free_bytes)
        "broker_audit_resume_unverified_total",  # an audit_resume record: someone must look
        "broker_request_duration_seconds_bucket",  # latency
        "broker_upstream_duration_seconds_bucket",  # upstream latency
    ):
        assert needle in exprs


def test_dashboard_is_grafana_json_with_unique_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(
        {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for p in dashboard["panels"]
    )
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert metric and metric.group(1) in metric_catalogue()


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_dashboard_panel_queries_use_only_broker_metrics(panel: Obj) -> None:
    assert panel["targets"] and panel["datasource"]["type"] == "prometheus"
    for target in panel["targets"]:
        assert promql_problems(target["expr"], metric_catalogue()) == [], target["expr"]


def test_dashboard_shows_every_broker_metric() -> None:
    exprs = " ".join(t["expr"] for p in PANELS for t in p["targets"])
    shown = {family for name, (family, _) in metric_catalogue().items() if re.search(rf"\b{name}\b", exprs)}
    missing = {family for family, _ in metric_catalogue().values()} - shown
    assert not missing, f"add a panel for {sorted(missing)} to deploy/grafana/broker-dashboard.json"


# --- systemd and the container build ---------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """``[Service]`` key -> every value, in order (keys like ExecReload may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


CheckUnit = Callable[[dict[str, list[str]]], bool]
UNIT_ROWS: list[tuple[str, CheckUnit]] = [
    ("type-exec", lambda s: s["Type"] == ["exec"]),
    ("user", lambda s: s["User"] == ["broker"]),
    (
        "execstart-workers",
        lambda s: bool(
            re.fullmatch(r"\S+/broker run -c \S+ --workers \$\{BROKER_WORKERS\}", s["ExecStart"][0])
        ),
    ),
    ("execreload-sighup", lambda s: s["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"),
    ("killsignal", lambda s: s["KillSignal"] == ["SIGTERM"]),
    ("timeout-stop", lambda s: int(s["TimeoutStopSec"][0]) > 10 + 5),  # default grace + the parent's margin
    ("env-file-optional", lambda s: s["EnvironmentFile"] == ["-/etc/broker/broker.env"]),
    ("no-new-privileges", lambda s: s["NoNewPrivileges"] == ["yes"]),
    (
        "protect-system",
        lambda s: s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == ["/var/lib/broker"],
    ),
    ("no-capabilities", lambda s: s["CapabilityBoundingSet"] == [""]),
    ("address-families", lambda s: s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]),
    ("syscalls", lambda s: s["SystemCallFilter"] == ["@system-service"]),
    ("private-tmp-home", lambda s: s["PrivateTmp"] == ["yes"] and s["ProtectHome"] == ["yes"]),
]


@pytest.mark.parametrize("check", [c for _, c in UNIT_ROWS], ids=[i for i, _ in UNIT_ROWS])
def test_systemd_unit(check: CheckUnit) -> None:
    assert check(unit_settings(UNIT.read_text()))


def test_env_example_sets_every_variable_the_expense_config_reads() -> None:
    lines = [
        ln
        for ln in (DEPLOY / "systemd" / "broker.env.example").read_text().splitlines()
        if ln and ln[0] != "#"
    ]
    example = dict(line.split("=", 1) for line in lines)
    wanted = set(_VAR.findall((ROOT / "config" / "examples" / "expense.yaml").read_text()))
    assert {name for name, _ in wanted} - set(example) == set()
    assert "BROKER_WORKERS" in example


def test_containerfile_is_multi_stage_non_root_without_dev_dependencies() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", code, re.MULTILINE)
    assert re.findall(r"^FROM (.+)$", code, re.MULTILINE) == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]
    assert "COPY --from=builder /opt/venv /opt/venv" in code
    assert re.search(r"^USER 10001:10001$", code, re.MULTILINE)  # numeric: runAsNonRoot can verify it
    assert re.search(r'^ENTRYPOINT \["broker"\]$', code, re.MULTILINE)
    assert "[dev]" not in code and "pytest" not in code
