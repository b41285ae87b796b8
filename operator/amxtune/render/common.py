"""Pieces every rendered object shares: identity, metadata, owner references, security."""

from __future__ import annotations

from dataclasses import dataclass

from amxtune import names
from amxtune.settings import Settings
from amxtune_api.kube import Resources, Toleration

API_VERSION = f"{names.GROUP}/v1alpha1"


class RenderError(ValueError):
    """A spec the schema accepts but that cannot run; names the field and what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class JobIdentity:
    name: str
    namespace: str = "default"
    uid: str = ""  # empty when rendering outside a cluster (amxtune render / run)
    kind: str = "FineTuneJob"

    @classmethod
    def from_body(cls, body: dict, kind: str) -> JobIdentity:
        meta = body["metadata"]
        return cls(meta["name"], meta.get("namespace") or "default", meta.get("uid", ""), kind)


def owner_reference(job: JobIdentity) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": job.kind,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(job: JobIdentity, name: str, component: str, owned: bool = True) -> dict:
    meta: dict = {
        "name": name,
        "namespace": job.namespace,
        "labels": names.labels(job.name, component, job.kind),
    }
    if owned and job.uid:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def resource_list(resources: Resources) -> dict:
    """Requests equal to limits: Guaranteed QoS, so the kubelet can pin whole cores."""
    values = {"cpu": str(resources.cpu), "memory": str(resources.memory)}
    return {"requests": dict(values), "limits": dict(values)}


def pod_security(settings: Settings) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def volume_for_pvc(name: str, claim: str, read_only: bool = False) -> dict:
    source: dict = {"claimName": claim}
    if read_only:
        source["readOnly"] = True
    return {"name": name, "persistentVolumeClaim": source}


# Every container amxtune runs: no privilege escalation, no capabilities, a read-only root file
# system (what a container writes goes to its pod's volumes: /tmp, the caches, the output).
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}


def pod(
    meta: dict,
    pod_spec: dict,
    settings: Settings,
    node_selector: dict[str, str],
    tolerations: list[Toleration],
) -> dict:
    """A run-once pod without API credentials, non-root, with the user's scheduling hints."""
    spec: dict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        **pod_spec,
        "securityContext": pod_security(settings),
    }
    spec["volumes"] = [*spec.get("volumes", []), {"name": "tmp", "emptyDir": {}}]
    for container in spec["containers"]:
        container["securityContext"] = dict(CONTAINER_SECURITY)
        container["volumeMounts"] = [*container.get("volumeMounts", []), dict(TMP_MOUNT)]
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [t.to_wire() for t in tolerations]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
