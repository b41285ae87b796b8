"""The Helm chart: lint, template, and install with least privilege on the real control plane."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.support.controlplane import ControlPlane
from tests.support.jobs import finish_all, job, running_workers, submit, wait_phase
from tests.support.operator import OperatorProcess

pytestmark = pytest.mark.cluster
CHART = Path(__file__).resolve().parents[2] / "charts" / "amxtune"


NON_DEFAULT = [
    "--set",
    "watchNamespaces={team-a,team-b}",
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "logFormat=plain",
    "--set",
    "amxNodeLabels={example.com/amx}",
    "--set",
    "hubEndpoint=https://hub-mirror.example.com",
]


@pytest.mark.parametrize("values", [[], NON_DEFAULT], ids=["default", "non-default"])
def test_chart_lints(control_plane, values):
    result = control_plane.helm("lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in result.stdout


def rendered(cp: ControlPlane, *values: str) -> list[dict]:
    text = cp.helm("template", "amxtune", str(CHART), "--namespace", "amxtune-system",
                   *values).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def test_default_install_watches_all_namespaces_with_one_cluster_role(control_plane):
    docs = rendered(control_plane)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding",
                     "Service", "ServiceAccount"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--all-namespaces" in container["args"]
    assert "--leader-election-namespace=amxtune-system" in container["args"]
    lease_role = next(d for d in docs if d["kind"] == "Role")  # the Lease, nothing else
    assert lease_role["metadata"]["namespace"] == "amxtune-system"
    assert lease_role["rules"] == [{"apiGroups": ["coordination.k8s.io"],
                                    "resources": ["leases"], "verbs": ["get", "create", "update"]}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])


def test_namespaced_install_has_roles_only_in_watched_namespaces(control_plane):
    docs = rendered(control_plane, *NON_DEFAULT)
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["amxtune-system", "team-a",
                                                                  "team-b"]
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=team-a" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AMXTUNE_AMX_NODE_LABELS"] == "example.com/amx"
    assert env["AMXTUNE_HUB_ENDPOINT"] == "https://hub-mirror.example.com"
    assert any(d["kind"] == "ServiceMonitor" for d in docs)


def test_the_grafana_dashboard_is_a_configmap_for_grafanas_sidecar(control_plane):
    docs = rendered(control_plane, "--set", "metrics.grafanaDashboard.enabled=true")
    dashboards = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(dashboards) == 1 and dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "amxtune.json").read_text())
    assert json.loads(dashboards[0]["data"]["amxtune.json"]) == shipped
    assert not [d for d in rendered(control_plane) if d["kind"] == "ConfigMap"]  # off by default


def test_values_schema_rejects_a_typo(control_plane):
    result = control_plane.helm("template", "x", str(CHART), "--set", "trainerImag=oops",
                                check=False)
    assert result.returncode != 0
    assert "trainerImag" in result.stderr


def token_kubeconfig(cp: ControlPlane, token: str, path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_file)},
                    }
                ],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "operator"}}],
                "current-context": "test",
            }
        )
    )
    return path


def test_installed_chart_grants_enough_to_run_a_job_and_nothing_more(
    control_plane, namespace, tmp_path
):
    cp = control_plane
    release_ns = f"{namespace}-op"
    cp.create_namespace(release_ns)
    try:
        cp.helm("install", "amxtune", str(CHART), "--namespace", release_ns,
                "--set", f"watchNamespaces={{{namespace}}}", "--wait=false")
        token = cp.create_token("amxtune", release_ns)
        kubeconfig = token_kubeconfig(cp, token, tmp_path / "operator.kubeconfig")
        can = cp.kubectl(
            "auth",
            "can-i",
            "create",
            "pods",
            "-n",
            namespace,
            "--kubeconfig",
            str(kubeconfig),
            check=False,
        ).stdout.strip()
        assert can == "yes"
        for verb, resource, ns in [
            ("list", "secrets", namespace),
            ("delete", "secrets", namespace),
            ("create", "pods", "default"),
            ("list", "nodes", None),
            ("update", "finetunejobs", namespace),
        ]:
            args = ["auth", "can-i", verb, resource, "--kubeconfig", str(kubeconfig)]
            args += ["-n", ns] if ns else []
            assert cp.kubectl(*args, check=False).stdout.strip() == "no", (verb, resource, ns)

        operator = OperatorProcess(
            cp, namespace, kubeconfig=kubeconfig,
            flags=["--liveness", "", "--metrics-port", "0", "--log-format", "plain",
                   "--leader-election-namespace", release_ns],
        ).start()
        try:
            submit(cp, namespace, job())
            pods = running_workers(cp, namespace, 3)
            finish_all(cp, namespace, pods)
            wait_phase(cp, namespace, "Exporting")
            # a whole-word 403: the apiserver's random port (e.g. 44403) is in every request line
            forbidden = [line for line in operator.log().splitlines()
                         if re.search(r"\b403\b|Forbidden", line)]
            assert forbidden == []
        finally:
            operator.stop()
    finally:
        cp.helm("uninstall", "amxtune", "--namespace", release_ns, check=False)
