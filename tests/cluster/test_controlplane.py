"""The test control plane itself: real apiserver validation, scheduling onto AMX nodes,
garbage collection, RBAC with ServiceAccount tokens, and pod outcomes driven by kwok."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest
from kubernetes import client, config

from tests.support.controlplane import (
    AMX_LABEL,
    KWOK_NODE_ANNOTATION,
    SIMULATE_AFTER_ANNOTATION,
    SIMULATE_ANNOTATION,
    SIMULATE_EXIT_CODE_ANNOTATION,
    ControlPlane,
    KubectlError,
    plain_nodes,
    read_versions,
)
from tests.support.finish_deletions import finish_deletion

pytestmark = pytest.mark.cluster


def pod_manifest(
    name: str,
    *,
    annotations: dict[str, str] | None = None,
    amx_affinity: bool = False,
    cpu: str = "1",
    owner: dict[str, Any] | None = None,
) -> str:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/amxtune/test:0",
                    "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}},
                }
            ],
        },
    }
    if amx_affinity:
        pod["spec"]["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": AMX_LABEL, "operator": "In", "values": ["true"]}
                            ]
                        }
                    ]
                }
            }
        }
    if owner is not None:
        pod["metadata"]["ownerReferences"] = [owner]
    return json.dumps(pod)


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "blockOwnerDeletion": True,
    }


# ----------------------------------------------------------------------------- basics


def test_binaries_and_server_report_the_pinned_versions(control_plane: ControlPlane) -> None:
    versions = read_versions()
    server = control_plane.kubectl_json("version")["serverVersion"]
    assert server["gitVersion"] == versions["K8S_VERSION"]
    assert server["minor"] == versions["K8S_VERSION"].split(".")[1]
    out = subprocess.run(
        [str(control_plane.binary("etcd")), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert versions["ETCD_VERSION"].lstrip("v") in out
    helm = subprocess.run(
        [str(control_plane.binary("helm")), "version", "--short"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert helm.startswith(versions["HELM_VERSION"])


def test_simulated_nodes_carry_nfd_amx_labels_and_capacity(control_plane: ControlPlane) -> None:
    nodes = control_plane.kubectl_json("get", "nodes")["items"]
    amx = [n for n in nodes if n["metadata"]["labels"].get(AMX_LABEL) == "true"]
    plain = [n for n in nodes if AMX_LABEL not in n["metadata"]["labels"]]
    assert len(amx) >= 2 and len(plain) >= 1
    for node in amx:
        labels = node["metadata"]["labels"]
        assert labels["feature.node.kubernetes.io/cpu-cpuid.AMXTILE"] == "true"
        assert labels["feature.node.kubernetes.io/cpu-cpuid.AMXINT8"] == "true"
        assert node["status"]["allocatable"]["cpu"] == "112"
        assert node["status"]["allocatable"]["memory"] == "512Gi"
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"


# ----------------------------------------------------------------------------- CRDs

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.cptest.amxtune.io
spec:
  group: cptest.amxtune.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [replicas]
            x-kubernetes-validations:
            - rule: "!has(self.minReplicas) || self.minReplicas <= self.replicas"
              message: minReplicas must not exceed replicas
            properties:
              replicas: {type: integer, minimum: 1}
              minReplicas: {type: integer, minimum: 1}
              size: {type: string, enum: [small, large], default: small}
          status:
            type: object
            properties:
              phase: {type: string}
"""


def widget(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "cptest.amxtune.io/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def test_crd_becomes_established_and_the_apiserver_validates_objects(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    cp.apply_yaml(WIDGET_CRD)
    try:
        cp.wait_for_jsonpath(
            "crd/widgets.cptest.amxtune.io",
            '{.status.conditions[?(@.type=="Established")].status}',
            "True",
            timeout=30,
        )
        # A valid object is stored, with the schema default filled in by the server.
        cp.wait_for(
            lambda: cp.create_yaml(widget("ok", {"replicas": 2}), namespace=namespace),
            timeout=20,
            what="the Widget API to be served",
        )
        stored = cp.get("widget", "ok", namespace)
        assert stored is not None
        assert stored["spec"] == {"replicas": 2, "size": "small"}

        # OpenAPI schema: the apiserver's field error.
        with pytest.raises(KubectlError) as schema_error:
            cp.create_yaml(widget("bad", {"replicas": 0}), namespace=namespace)
        assert "spec.replicas: Invalid value: 0" in schema_error.value.stderr
        assert "should be greater than or equal to 1" in schema_error.value.stderr

        with pytest.raises(KubectlError) as enum_error:
            cp.create_yaml(widget("bad", {"replicas": 1, "size": "huge"}), namespace=namespace)
        assert 'spec.size: Unsupported value: "huge"' in enum_error.value.stderr

        # CEL rule (x-kubernetes-validations).
        with pytest.raises(KubectlError) as cel_error:
            cp.create_yaml(widget("bad", {"replicas": 2, "minReplicas": 5}), namespace=namespace)
        assert "spec: Invalid value" in cel_error.value.stderr
        assert "minReplicas must not exceed replicas" in cel_error.value.stderr

        assert cp.get("widget", "bad", namespace) is None

        # The status subresource: a main-resource update does not change status.
        cp.kubectl(
            "patch", "widget", "ok", "-n", namespace, "--type=merge",
            "-p", '{"status": {"phase": "Ignored"}}',
        )  # fmt: skip
        assert "status" not in (cp.get("widget", "ok", namespace) or {})
        cp.kubectl(
            "patch", "widget", "ok", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", '{"status": {"phase": "Ready"}}',
        )  # fmt: skip
        assert (cp.get("widget", "ok", namespace) or {})["status"] == {"phase": "Ready"}
    finally:
        cp.kubectl("delete", "crd", "widgets.cptest.amxtune.io", "--wait=false", check=False)


# ----------------------------------------------------------------------------- scheduling


def test_pods_with_amx_affinity_bind_only_to_amx_nodes(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    amx_names = {
        n["metadata"]["name"]
        for n in cp.kubectl_json("get", "nodes", f"-l{AMX_LABEL}=true")["items"]
    }
    assert amx_names
    names = [f"amx-{i}" for i in range(6)]
    for name in names:
        cp.create_yaml(pod_manifest(name, amx_affinity=True, cpu="8"), namespace=namespace)
    for name in names:
        cp.wait_for_jsonpath(f"pod/{name}", "{.status.phase}", "Running", namespace=namespace)
    pods = cp.kubectl_json("get", "pods", "-n", namespace)["items"]
    bound_to = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
    assert set(bound_to) == set(names)
    assert set(bound_to.values()) <= amx_names, bound_to
    scheduled = cp.events_for(kind="Pod", name=names[0], namespace=namespace)
    assert any(e["reason"] == "Scheduled" for e in scheduled)


def test_without_amx_nodes_the_pod_stays_pending_with_the_schedulers_reason(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    with cp.node_set(plain_nodes(2, prefix="noamx-")):
        assert not cp.kubectl_json("get", "nodes", f"-l{AMX_LABEL}=true")["items"]
        cp.create_yaml(pod_manifest("wants-amx", amx_affinity=True), namespace=namespace)
        message = cp.wait_for_jsonpath(
            "pod/wants-amx",
            '{.status.conditions[?(@.type=="PodScheduled")].message}',
            lambda m: "node affinity" in m,
            namespace=namespace,
        )
        pod = cp.get("pod", "wants-amx", namespace)
        assert pod is not None
        assert pod["status"]["phase"] == "Pending"
        assert "nodeName" not in pod["spec"]
        condition = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
        assert condition["status"] == "False"
        assert condition["reason"] == "Unschedulable"
        assert "0/2 nodes are available" in message
        assert "didn't match Pod's node affinity/selector" in message
        events = cp.wait_for(
            lambda: [e for e in cp.events_for(pod) if e["reason"] == "FailedScheduling"],
            timeout=30,
            what="a FailedScheduling event",
        )
        assert "node affinity" in events[-1]["message"]
        cp.kubectl("delete", "pod", "wants-amx", "-n", namespace, "--wait=false")
    # The default node set is back.
    assert cp.kubectl_json("get", "nodes", f"-l{AMX_LABEL}=true")["items"]


# ----------------------------------------------------------------------------- GC


def test_deleting_an_owner_garbage_collects_its_dependents(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    cp.kubectl("create", "configmap", "owner", "-n", namespace, "--from-literal=a=b")
    owner = cp.get("configmap", "owner", namespace)
    assert owner is not None
    ref = owner_ref(owner)
    dependent_cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [ref]},
        "data": {"x": "y"},
    }
    cp.create_yaml(json.dumps(dependent_cm), namespace=namespace)
    cp.create_yaml(pod_manifest("dependent-pod", owner=ref), namespace=namespace)
    cp.wait_for_jsonpath("pod/dependent-pod", "{.status.phase}", "Running", namespace=namespace)

    cp.kubectl("delete", "configmap", "owner", "-n", namespace, "--cascade=background")
    cp.wait_for(
        lambda: (
            cp.get("configmap", "dependent", namespace) is None
            and cp.get("pod", "dependent-pod", namespace) is None
        ),
        timeout=60,
        what="the garbage collector to delete the dependents",
    )


def test_foreground_deletion_waits_for_dependents(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    cp.kubectl("create", "configmap", "parent", "-n", namespace)
    parent = cp.get("configmap", "parent", namespace)
    assert parent is not None
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "child", "ownerReferences": [owner_ref(parent)]},
    }
    cp.create_yaml(json.dumps(child), namespace=namespace)
    cp.kubectl("delete", "configmap", "parent", "-n", namespace, "--cascade=foreground", timeout=90)
    assert cp.get("configmap", "child", namespace) is None


# ----------------------------------------------------------------------------- RBAC

ROLE = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: pod-reader}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: read-pods}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: pod-reader-reads-pods}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-pods}
subjects:
- {kind: ServiceAccount, name: pod-reader}
"""


def test_a_service_account_limited_by_a_role_is_denied_the_rest(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    cp.apply_yaml(ROLE, namespace=namespace)
    token = cp.create_token("pod-reader", namespace)
    user = f"system:serviceaccount:{namespace}:pod-reader"

    whoami = json.loads(cp.kubectl("auth", "whoami", "-o", "json", token=token).stdout)
    assert whoami["status"]["userInfo"]["username"] == user

    # Allowed by the Role.
    allowed = cp.kubectl("get", "pods", "-n", namespace, token=token)
    assert allowed.returncode == 0

    # Not granted: another resource, another verb, another namespace.
    denied = [
        ("get", "secrets", "-n", namespace),
        ("delete", "pod", "anything", "-n", namespace),
        ("get", "pods", "-n", "default"),
    ]
    for args in denied:
        proc = cp.kubectl(*args, token=token, check=False)
        assert proc.returncode != 0, args
        assert "Forbidden" in proc.stderr, proc.stderr
        assert f'User "{user}" cannot' in proc.stderr, proc.stderr

    created = cp.kubectl(
        "create", "-f", "-", "-n", namespace, input=pod_manifest("x"), token=token, check=False
    )
    assert created.returncode != 0
    assert f'User "{user}" cannot create resource "pods"' in created.stderr

    # An invalid token is not authenticated at all.
    bad = cp.kubectl("get", "pods", "-n", namespace, token=token[:-4] + "AAAA", check=False)
    assert bad.returncode != 0
    assert "Unauthorized" in bad.stderr or "provide credentials" in bad.stderr


def test_the_token_controller_fills_the_root_ca_config_map(
    control_plane: ControlPlane, namespace: str
) -> None:
    cm = control_plane.wait_for(
        lambda: control_plane.get("configmap", "kube-root-ca.crt", namespace),
        timeout=30,
        what="kube-root-ca.crt",
    )
    assert cm["data"]["ca.crt"].strip() == control_plane.ca_file.read_text().strip()


# ----------------------------------------------------------------------------- kwok stages


def terminated_state(cp: ControlPlane, name: str, namespace: str) -> dict[str, Any]:
    pod = cp.get("pod", name, namespace)
    assert pod is not None
    return dict(pod["status"]["containerStatuses"][0]["state"]["terminated"])


def test_bare_pods_complete_or_fail_on_demand(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    cp.create_yaml(
        pod_manifest("ok", annotations={SIMULATE_ANNOTATION: "succeed"}), namespace=namespace
    )
    cp.create_yaml(
        pod_manifest(
            "broken",
            annotations={SIMULATE_ANNOTATION: "fail", SIMULATE_EXIT_CODE_ANNOTATION: "3"},
        ),
        namespace=namespace,
    )
    cp.create_yaml(pod_manifest("keeps-running"), namespace=namespace)

    cp.wait_for_jsonpath("pod/ok", "{.status.phase}", "Succeeded", namespace=namespace)
    ok = terminated_state(cp, "ok", namespace)
    assert ok["exitCode"] == 0 and ok["reason"] == "Completed"

    cp.wait_for_jsonpath("pod/broken", "{.status.phase}", "Failed", namespace=namespace)
    broken = terminated_state(cp, "broken", namespace)
    assert broken["exitCode"] == 3 and broken["reason"] == "Error"

    # Without the annotation a pod runs until a test (or the operator) decides.
    cp.wait_for_jsonpath("pod/keeps-running", "{.status.phase}", "Running", namespace=namespace)
    time.sleep(3)
    assert (cp.get("pod", "keeps-running", namespace) or {})["status"]["phase"] == "Running"
    cp.kubectl("annotate", "pod", "keeps-running", "-n", namespace, f"{SIMULATE_ANNOTATION}=fail")
    cp.wait_for_jsonpath("pod/keeps-running", "{.status.phase}", "Failed", namespace=namespace)
    assert terminated_state(cp, "keeps-running", namespace)["exitCode"] == 1


def test_a_delayed_outcome_is_running_first(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    annotations = {SIMULATE_ANNOTATION: "succeed", SIMULATE_AFTER_ANNOTATION: "4s"}
    cp.create_yaml(pod_manifest("slow", annotations=annotations), namespace=namespace)
    cp.wait_for_jsonpath("pod/slow", "{.status.phase}", "Running", namespace=namespace)
    started = time.monotonic()
    cp.wait_for_jsonpath("pod/slow", "{.status.phase}", "Succeeded", namespace=namespace)
    assert time.monotonic() - started > 1.5


def test_job_pods_follow_the_same_annotation(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "simulated"},
        "spec": {
            "backoffLimit": 0,
            "template": json.loads(
                pod_manifest("", annotations={SIMULATE_ANNOTATION: "succeed"}, amx_affinity=True)
            ),
        },
    }
    del job["spec"]["template"]["metadata"]["name"]
    del job["spec"]["template"]["apiVersion"], job["spec"]["template"]["kind"]
    cp.create_yaml(json.dumps(job), namespace=namespace)
    cp.wait_for_jsonpath(
        "job/simulated",
        '{.status.conditions[?(@.type=="Complete")].status}',
        "True",
        namespace=namespace,
        timeout=90,
    )


def test_a_deleted_pod_goes_and_a_late_deletion_spares_its_successor(
    control_plane: ControlPlane, namespace: str
) -> None:
    """A kubelet confirms a deletion with the pod's UID: a deletion seen late (the previous
    pod of that name) must not remove the pod that now holds the name."""
    cp = control_plane
    cp.create_yaml(pod_manifest("again"), namespace=namespace)
    cp.wait_for_jsonpath("pod/again", "{.status.phase}", "Running", namespace=namespace)
    api = client.CoreV1Api(config.new_client_from_config(str(cp.kubeconfig)))
    previous = api.read_namespaced_pod("again", namespace)
    cp.kubectl("delete", "pod", "again", "-n", namespace, "--wait=false")
    cp.wait_for(lambda: cp.get("pod", "again", namespace) is None, timeout=30,
                what="the deleted pod to go")

    cp.create_yaml(pod_manifest("again"), namespace=namespace)
    cp.wait_for_jsonpath("pod/again", "{.status.phase}", "Running", namespace=namespace)
    previous.metadata.deletion_timestamp = previous.metadata.creation_timestamp
    assert not finish_deletion(api, previous, KWOK_NODE_ANNOTATION)
    successor = cp.get("pod", "again", namespace)
    assert successor is not None
    assert successor["metadata"]["uid"] != previous.metadata.uid
    assert "deletionTimestamp" not in successor["metadata"]
