"""`amxtune operator`: kopf watches, a periodic resync, liveness and metrics.

Only kopf's event-watching handlers are used: they keep no state on the objects (no
annotations, no finalizers), so the operator never blocks deletion when it is down and GitOps
tools see no drift. Each event just triggers a level-based reconcile of the affected job; a
resync loop every few seconds reads progress and enforces deadlines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import kopf

from amxtune import names
from amxtune.controller import metrics
from amxtune.controller.finetunejob import FineTuneJobController
from amxtune.controller.inferencejob import InferenceJobController, owner_finetunejob
from amxtune.controller.kube import Kube
from amxtune.settings import Settings
from amxtune_api.finetunejob import Phase

log = logging.getLogger("amxtune.operator")
TERMINAL = (Phase.Succeeded, Phase.Failed)


# A job whose reconciliation keeps failing (apiserver errors, a bug) is retried by the resync
# after 1, 2, 4, ... resync periods, at most this long apart; a watch event still retries it
# at once.
BACKOFF_CAP_SECONDS = 300.0


class Operator:
    def __init__(self, kube: Kube, settings: Settings, namespaces: list[str] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.settings = settings
        self.namespaces = namespaces
        self.clock = clock
        self._failures: dict[tuple[str, str, str], tuple[int, float]] = {}  # count, retry at
        self.controllers = {
            "FineTuneJob": FineTuneJobController(kube, settings),
            "InferenceJob": InferenceJobController(kube, settings),
        }
        self._locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(
            threading.Lock
        )
        self._locks_guard = threading.Lock()
        self.stopping = threading.Event()

    @contextmanager
    def _lock(self, key: tuple[str, str, str]) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks[key]
        with lock:
            yield

    def reconcile(self, kind: str, namespace: str, name: str, periodic: bool = False) -> None:
        """One job at a time per object; errors are logged and retried by the resync with an
        exponential backoff per object (`periodic` passes respect it, watch events do not)."""
        key = (kind, namespace, name)
        failing = self._failures.get(key)  # (watch threads may pop it meanwhile)
        if periodic and failing and self.clock() < failing[1]:
            return
        with self._lock(key):
            try:
                self.controllers[kind].reconcile(namespace, name)
            except Exception:
                count = self._failures.get(key, (0, 0.0))[0] + 1
                delay = min(BACKOFF_CAP_SECONDS,
                            self.settings.progress_interval_seconds * 2 ** (count - 1))
                self._failures[key] = (count, self.clock() + delay)
                metrics.RECONCILE_ERRORS.labels(kind).inc()
                log.exception("reconciling %s %s/%s failed (%d in a row); retrying in %.0f s",
                              kind, namespace, name, count, delay)
            else:
                self._failures.pop(key, None)

    def resync_once(self) -> None:
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for namespace in self.namespaces or [None]:
            for kind in self.controllers:
                for body in self.kube.list_jobs(kind, namespace):
                    phase = (body.get("status") or {}).get("phase") or "Pending"
                    counts[(kind, phase)] += 1
                    if phase not in TERMINAL:
                        meta = body["metadata"]
                        self.reconcile(kind, meta["namespace"], meta["name"], periodic=True)
        for kind in self.controllers:
            for phase in Phase:
                metrics.JOBS.labels(kind, phase.value).set(counts.get((kind, phase.value), 0))

    def resync_forever(self) -> None:
        while not self.stopping.wait(self.settings.progress_interval_seconds):
            try:
                self.resync_once()
            except Exception:
                log.exception("resync failed; retrying")


def build_registry(operator: Operator, metrics_port: int) -> kopf.OperatorRegistry:
    """kopf handlers; with explicit namespaces, no cluster-wide scanning (Roles suffice)."""
    registry = kopf.OperatorRegistry()
    group, version = names.GROUP, "v1alpha1"

    @kopf.on.login(registry=registry)
    def _login(**kwargs: object) -> kopf.ConnectionInfo | None:
        # a custom registry has no default login handlers: in-cluster token, else kubeconfig
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def _startup(settings: kopf.OperatorSettings, **_: object) -> None:
        settings.posting.enabled = False  # our own events have stable reasons; kopf's are noise
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 8
        # exact namespaces need no namespace/CRD scanning, which would need cluster-wide RBAC
        settings.scanning.disabled = bool(operator.namespaces)
        if metrics_port:
            from prometheus_client import start_http_server

            start_http_server(metrics_port)
        threading.Thread(target=operator.resync_forever, name="resync", daemon=True).start()

    @kopf.on.cleanup(registry=registry)
    def _cleanup(**_: object) -> None:
        operator.stopping.set()

    @kopf.on.event(group, version, "finetunejobs", registry=registry)
    def _finetunejob(type: str, body: kopf.Body, **_: object) -> None:
        if type != "DELETED":
            operator.reconcile("FineTuneJob", body.metadata.namespace, body.metadata.name)

    @kopf.on.event(group, version, "inferencejobs", registry=registry)
    def _inferencejob(type: str, body: kopf.Body, **_: object) -> None:
        namespace = body.metadata.namespace
        if type != "DELETED":
            operator.reconcile("InferenceJob", namespace, body.metadata.name)
        owner = owner_finetunejob(dict(body))
        if owner:
            operator.reconcile("FineTuneJob", namespace, owner)

    @kopf.on.event("v1", "pods", labels={"app.kubernetes.io/managed-by": names.MANAGED_BY},
                   registry=registry)
    def _pod(body: kopf.Body, **_: object) -> None:
        labels = body.metadata.labels
        kind = {"finetunejob": "FineTuneJob", "inferencejob": "InferenceJob"}.get(
            labels.get(names.KIND_LABEL, "")
        )
        if kind and labels.get(names.JOB_LABEL):
            operator.reconcile(kind, body.metadata.namespace, labels[names.JOB_LABEL])

    return registry


def run_operator(
    namespaces: list[str] | None,
    all_namespaces: bool,
    liveness: str,
    metrics_port: int,
    log_format: str,
    verbose: bool,
) -> int:
    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # one "Handler ... succeeded" line per watch event drowns our own lines
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if not namespaces and not all_namespaces:
        watched = os.environ.get("AMXTUNE_WATCH_NAMESPACES", "").strip()
        namespaces = [n for n in watched.split(",") if n] or None
    operator = Operator(Kube(), Settings.from_env(), namespaces)
    log.info("watching %s", ", ".join(namespaces) if namespaces else "all namespaces")
    kopf.run(
        registry=build_registry(operator, metrics_port),
        standalone=True,
        namespaces=namespaces or [],
        clusterwide=not namespaces,
        liveness_endpoint=liveness or None,
    )
    return 0
