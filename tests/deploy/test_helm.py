"""The Helm chart under deploy/helm/dbgrelay, rendered by Helm and checked offline.

Rendering and lint use Helm's own Go code (``helm-python-sdk`` bundles it);
every rendered object is validated with ``kubernetes-validate --strict``
against the Kubernetes API schemas it ships, and the relay config the chart
writes is loaded by dbgrelay's own config loader.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import config_from_dict
from config.durations import parse_duration

from ._util import DEPLOY

CHART = DEPLOY / "helm" / "dbgrelay"
KUBERNETES = "1.30.0"

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk (Helm for Python) is not installed for this platform"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed"
)

VALUES: dict[str, Any] = {
    "existingSecret": "dbgrelay-secrets",
    "jwks": '{"keys": []}',
    "targets": [
        {
            "name": "build42",
            "kind": "gdbserver",
            "backend": "tcp://build42.debug.svc:2345",
            "allow": ["alice"],
            "idle_timeout": "15m",
        }
    ],
}


def render(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The chart's objects by kind, rendered with ``VALUES`` plus ``values``."""
    chart = helm.Chart.load(CHART)
    manifests = chart.render(
        VALUES | (values or {}), name="relay", namespace="debug", is_install=True
    )
    objects: dict[str, dict[str, Any]] = {}
    for text in manifests.values():
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in objects, doc["kind"]
                objects[doc["kind"]] = doc
    return objects


def relay_container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_helm_lint_is_clean_in_strict_mode() -> None:
    report = helm.lint(CHART, VALUES, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_rendered_object_passes_the_kubernetes_schema_strictly() -> None:
    objects = render()
    assert set(objects) == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_the_schema_check_would_catch_a_misspelt_field() -> None:
    deployment = render()["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_rendering_without_the_secret_or_jwks_fails_saying_what_to_set() -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match="set existingSecret"):
        chart.render({"jwks": "{}"}, name="relay", namespace="debug")
    with pytest.raises(helm.HelmError, match="set jwks"):
        chart.render({"existingSecret": "s"}, name="relay", namespace="debug")


def test_replicas_spread_over_nodes_and_a_disruption_budget_keeps_one() -> None:
    objects = render()
    spec = objects["Deployment"]["spec"]
    assert spec["replicas"] >= 2
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    )
    hard = render({"antiAffinity": "hard"})["Deployment"]["spec"]["template"]["spec"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in hard["affinity"]["podAntiAffinity"]
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert (
        pdb["minAvailable"] == 1
        and pdb["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    )


def test_the_service_is_a_load_balancer_that_keeps_the_client_address() -> None:
    service = render()["Service"]["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"
    assert service["ports"] == [
        {"name": "tunnel", "port": 443, "targetPort": "tunnel", "protocol": "TCP"}
    ]


def test_pods_run_unprivileged_on_a_read_only_root() -> None:
    pod = render()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}


def test_probes_use_the_ops_port_and_termination_matches_the_drain_grace() -> None:
    objects = render({"relay": {"shutdownGrace": 120, "preStopSleep": 7}})
    container = relay_container(objects)
    ops = {p["name"]: p["containerPort"] for p in container["ports"]}["ops"]
    # Readiness follows admission (the state backend, the drain); liveness only the process.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    config = tomllib.loads(objects["ConfigMap"]["data"]["dbgrelay.toml"])
    assert config["metrics"]["listen"] == f"0.0.0.0:{ops}"
    grace = parse_duration(config["relay"]["shutdown_grace"])
    assert grace == 120
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    # The preStop sleep, the drain, then 10 s for tunnels to end plus audit sync.
    assert pod["terminationGracePeriodSeconds"] == 7 + 120 + 15


def test_secrets_come_from_the_existing_secret_and_the_jwks_from_the_configmap() -> None:
    objects = render()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secret"]["secret"]["secretName"] == "dbgrelay-secrets"
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert objects["ConfigMap"]["data"]["jwks.json"] == VALUES["jwks"]
    config = tomllib.loads(objects["ConfigMap"]["data"]["dbgrelay.toml"])
    assert config["tls"] == {
        "cert": "/etc/dbgrelay/secret/tls.crt",
        "key": "/etc/dbgrelay/secret/tls.key",
    }
    assert config["auth"]["audit_key"] == "/etc/dbgrelay/secret/audit.key"
    assert config["state"]["dsn_file"] == "/etc/dbgrelay/secret/dsn"
    assert "password" not in objects["ConfigMap"]["data"]["dbgrelay.toml"]


def test_a_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any] | None = None) -> str:
        meta = render(values)["Deployment"]["spec"]["template"]["metadata"]
        return meta["annotations"]["checksum/config"]

    assert checksum() == checksum()
    assert checksum() != checksum({"state": {"unavailableGrace": "0s"}})
    assert checksum() != checksum({"jwks": '{"keys": [1]}'})


def test_the_schema_migration_runs_as_an_init_container_with_the_same_config() -> None:
    pod = render()["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    container = relay_container({"Deployment": {"spec": {"template": {"spec": pod}}}})
    assert init["args"] == ["state", "migrate", "--config", "/etc/dbgrelay/config/dbgrelay.toml"]
    assert container["args"] == [
        "serve",
        "--config",
        "/etc/dbgrelay/config/dbgrelay.toml",
        "--workers",
        "1",
    ]
    assert init["image"] == container["image"]


def test_the_config_the_chart_writes_is_one_dbgrelay_accepts(tmp_path: Path) -> None:
    text = render()["ConfigMap"]["data"]["dbgrelay.toml"]
    # The mounted files, in a temporary folder standing in for the pod's.
    root = tmp_path / "etc"
    for name in (
        "secret/tls.crt",
        "secret/tls.key",
        "secret/audit.key",
        "secret/dsn",
        "config/jwks.json",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    data = tomllib.loads(text.replace("/etc/dbgrelay/", f"{root}/"))
    config = config_from_dict(data, base_dir=tmp_path)
    assert config.state.backend == "postgres"
    assert config.state.unavailable_grace == 30
    assert config.state.session_lease == 15
    assert config.relay.listen == (("0.0.0.0", 7443),)
    (target,) = config.targets
    assert target.name == "build42" and target.allow == ("alice",) and target.idle_timeout == 900
