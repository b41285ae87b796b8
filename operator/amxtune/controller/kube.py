"""The few Kubernetes API calls the controller makes, on plain JSON dicts.

Everything returns the API's own JSON (camelCase dicts), so rendered objects, watch bodies and
read results have one shape. "Already exists" and "not found" are ordinary answers here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from amxtune import names
from amxtune.controller import metrics

log = logging.getLogger("amxtune.kube")

GROUP, VERSION = names.GROUP, "v1alpha1"
PLURALS = {"FineTuneJob": "finetunejobs", "InferenceJob": "inferencejobs"}


def now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


PLURAL_OF = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Event": "events",
    **PLURALS,
}


class Refused(Exception):
    """The API server refused an object the operator rendered (400/422: invalid, or forbidden
    by admission): rendering it again gives the same answer, so the job must say so."""

    def __init__(self, obj: dict, error: ApiException) -> None:
        try:
            detail = json.loads(error.body or b"{}").get("message") or error.reason
        except (ValueError, AttributeError):
            detail = error.reason
        super().__init__(f"the API server refused {obj['kind']} {obj['metadata']['name']}: "
                         f"{detail}")


class Kube:
    """Plain REST calls through the kubernetes client's transport (auth, TLS, proxies)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or load_api_client()
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()

    @staticmethod
    def path(kind: str, namespace: str | None, name: str | None = None, sub: str = "") -> str:
        base = f"/apis/{GROUP}/{VERSION}" if kind in PLURALS else "/api/v1"
        path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{PLURAL_OF[kind]}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        query: dict | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> bytes:
        """One API request; raises ApiException (with .status) for anything but 2xx."""
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            header_params={"Accept": "application/json, */*", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api_client.call_api(*request, _request_timeout=timeout)
        except Exception:
            metrics.API_REQUESTS.labels(method, "error").inc()
            raise
        metrics.API_REQUESTS.labels(method, str(response.status)).inc()
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=data)
        return data

    def _get(self, path: str, query: dict | None = None) -> dict | None:
        try:
            return json.loads(self.call("GET", path, query=query))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    # --- reading ---------------------------------------------------------------------------

    def get_job(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._get(self.path(kind, namespace, name))

    def list_jobs(self, kind: str, namespace: str | None) -> list[dict]:
        found = self._get(self.path(kind, namespace))
        return found["items"] if found else []

    def list_pods(self, namespace: str, job: str, kind: str) -> list[dict]:
        selector = f"{names.JOB_LABEL}={job},{names.KIND_LABEL}={kind.lower()}"
        found = self._get(self.path("Pod", namespace), {"labelSelector": selector})
        return found["items"] if found else []

    def read(self, kind: str, namespace: str, name: str) -> dict | None:
        """A core object (ConfigMap, Secret, PersistentVolumeClaim, ...); None when absent.

        For Secrets only the key names are kept: values never leave this function.
        """
        body = self._get(self.path(kind, namespace, name))
        if body is not None and kind == "Secret":
            body = {"metadata": body.get("metadata", {}), "keys": sorted(body.get("data") or {})}
        return body

    def log_tail(self, namespace: str, pod: str, lines: int = 20) -> str:
        """The last lines a pod's container printed; '' when the kubelet cannot say."""
        return self._log(namespace, pod, {"tailLines": lines})

    def log_head(self, namespace: str, pod: str, limit_bytes: int = 65536) -> str:
        """The first bytes a pod's container printed; '' when the kubelet cannot say."""
        return self._log(namespace, pod, {"limitBytes": limit_bytes})

    def _log(self, namespace: str, pod: str, query: dict) -> str:
        try:
            data = self.call(
                "GET", self.path("Pod", namespace, pod, "log"), query=query, timeout=10
            )
        except (ApiException, OSError) as error:
            log.debug("no logs for %s/%s: %s", namespace, pod, error)
            return ""
        return data.decode("utf-8", "replace")

    # --- writing ---------------------------------------------------------------------------

    def create(self, obj: dict) -> bool:
        """Create `obj`; False when it already exists (handlers are idempotent); Refused when
        the API server rejects it as invalid."""
        path = self.path(obj["kind"], obj["metadata"]["namespace"])
        try:
            self.call("POST", path, body=obj)
        except ApiException as error:
            if error.status == 409:
                return False
            if error.status in (400, 422) and obj["kind"] != "Event":
                raise Refused(obj, error) from None
            raise
        return True

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self.call(
                "DELETE", self.path(kind, namespace, name),
                body={"propagationPolicy": "Background"},
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def patch_status(self, kind: str, namespace: str, name: str, status: dict) -> None:
        """Write status through the status subresource (never the spec)."""
        self.call(
            "PATCH", self.path(kind, namespace, name, "status"), body={"status": status},
            content_type="application/merge-patch+json",
        )

    def event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        """Record a core/v1 Event on `obj` (what `kubectl describe` shows)."""
        meta = obj["metadata"]
        stamp = now_iso()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": names.MANAGED_BY},
            "reportingComponent": f"{names.GROUP}/operator",
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.create(body)
        except ApiException as error:  # an event must never break reconciliation
            log.warning("could not record event %s on %s: %s", reason, meta["name"], error.reason)
