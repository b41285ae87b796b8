"""`amxtune operator`: kopf watches feed a work queue; worker threads reconcile; a resync
paces the periodic passes; liveness and metrics.

Only kopf's event-watching handlers are used: they keep no state on the objects (no
annotations, no finalizers), so the operator never blocks deletion when it is down and GitOps
tools see no drift. A watch event only records the job in an index and queues its key, so the
many events of one job's pods collapse into one level-based reconcile. The resync reads that
index (no LIST per pass) and queues each running job again once per period, the period growing
with the number of running jobs so that the operator's request rate stays bounded however many
jobs run (progress is read from rank 0's log in those passes); a job whose activeDeadlineSeconds
has run out is queued at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import kopf

from amxtune import names
from amxtune.controller import metrics
from amxtune.controller.finetunejob import FineTuneJobController
from amxtune.controller.inferencejob import InferenceJobController, owner_finetunejob
from amxtune.controller.kube import Kube
from amxtune.controller.state import parse_time
from amxtune.controller.workqueue import WorkQueue
from amxtune.settings import Settings
from amxtune_api.finetunejob import Phase

log = logging.getLogger("amxtune.operator")
TERMINAL = (Phase.Succeeded, Phase.Failed)
JobKey = tuple[str, str, str]  # kind, namespace, name


# A job whose reconciliation keeps failing (apiserver errors, a bug) is retried by the resync
# after 1, 2, 4, ... resync periods, at most this long apart; a watch event still retries it
# at once.
BACKOFF_CAP_SECONDS = 300.0


@dataclass(frozen=True)
class JobSummary:
    """What the resync needs of a job, kept from its watch events."""

    phase: str
    deadline: float | None  # epoch seconds at which activeDeadlineSeconds runs out

    @classmethod
    def of(cls, body: dict) -> JobSummary:
        status = body.get("status") or {}
        limit = (body.get("spec") or {}).get("activeDeadlineSeconds")
        started = parse_time(status.get("startTime"))
        deadline = started.timestamp() + float(limit) if limit and started else None
        return cls(status.get("phase") or Phase.Pending, deadline)


class Operator:
    def __init__(self, kube: Kube, settings: Settings, namespaces: list[str] | None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.settings = settings
        self.namespaces = namespaces
        self.clock = clock
        self.wall_clock = wall_clock
        self.controllers = {
            "FineTuneJob": FineTuneJobController(kube, settings),
            "InferenceJob": InferenceJobController(kube, settings),
        }
        self.index: dict[JobKey, JobSummary] = {}
        self.queue: WorkQueue[JobKey] = WorkQueue()
        self._failures: dict[JobKey, tuple[int, float]] = {}  # count, retry at
        self._periodic_due: dict[JobKey, float] = {}
        self.period = settings.progress_interval_seconds
        self.stopping = threading.Event()
        self.workers: list[threading.Thread] = []

    # --- what the watches report -----------------------------------------------------------

    def observe(self, kind: str, body: dict, deleted: bool = False) -> None:
        """A job's watch event: keep its summary and metrics, and queue it."""
        meta = body["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        if deleted:
            for table in (self.index, self._failures, self._periodic_due):
                table.pop(key, None)
            metrics.forget_job(kind, key[1], key[2])
            return
        self.index[key] = JobSummary.of(body)
        metrics.observe_job(kind, body)
        self.queue.add(key)

    def enqueue(self, kind: str, namespace: str, name: str) -> None:
        self.queue.add((kind, namespace, name))

    # --- reconciling -----------------------------------------------------------------------

    def reconcile(self, kind: str, namespace: str, name: str) -> None:
        """One pass over one job; errors are logged and retried by the resync with an
        exponential backoff per job (watch events retry at once)."""
        key = (kind, namespace, name)
        if key in self.index:  # (not for a job deleted meanwhile: nothing would remove it)
            self._periodic_due[key] = self.clock() + self.period
        try:
            self.controllers[kind].reconcile(namespace, name)
        except Exception:
            if key not in self.index:
                return
            count = self._failures.get(key, (0, 0.0))[0] + 1
            delay = min(BACKOFF_CAP_SECONDS,
                        self.settings.progress_interval_seconds * 2 ** (count - 1))
            self._failures[key] = (count, self.clock() + delay)
            metrics.RECONCILE_ERRORS.labels(kind).inc()
            log.exception("reconciling %s %s/%s failed (%d in a row); retrying in %.0f s",
                          kind, namespace, name, count, delay)
        else:
            self._failures.pop(key, None)

    def process_one(self, timeout: float | None = None) -> bool:
        key = self.queue.get(timeout)
        if key is None:
            return False
        try:
            self.reconcile(*key)
        finally:
            self.queue.done(key)
        return True

    def drain(self) -> None:
        """Reconcile everything queued, in this thread (tests; the operator uses workers)."""
        while self.process_one(timeout=0):
            pass

    def work_forever(self) -> None:
        while not self.stopping.is_set():
            self.process_one(timeout=1.0)

    # --- the periodic pass -----------------------------------------------------------------

    def resync_once(self) -> None:
        """Queue each non-terminal job whose period has passed (or whose deadline has), and
        publish the jobs-by-phase gauge, all from the index."""
        jobs = list(self.index.items())
        # a terminal job's last pass (stopping its pods) is retried while it fails
        active = [(key, job) for key, job in jobs
                  if job.phase not in TERMINAL or key in self._failures]
        self.period = max(self.settings.progress_interval_seconds,
                          len(active) / self.settings.periodic_reconciles_per_second)
        metrics.PERIODIC_PERIOD.set(self.period)
        metrics.QUEUE_DEPTH.set(len(self.queue))
        now, wall = self.clock(), self.wall_clock()
        for key, job in active:
            failing = self._failures.get(key)  # (a worker may pop it meanwhile)
            if failing and now < failing[1]:
                continue
            # (a suspended job's deadline is checked when it resumes)
            deadline_passed = (job.deadline is not None and wall >= job.deadline
                               and job.phase != Phase.Suspended)
            if deadline_passed or now >= self._periodic_due.get(key, now):
                self.queue.add(key)
        counts = Counter((key[0], job.phase) for key, job in jobs)
        for kind in self.controllers:
            for phase in Phase:
                metrics.JOBS.labels(kind, phase.value).set(counts.get((kind, phase.value), 0))

    def resync_forever(self) -> None:
        while not self.stopping.wait(self.settings.progress_interval_seconds):
            try:
                self.resync_once()
            except Exception:
                log.exception("resync failed; retrying")

    def start_threads(self) -> None:
        """Start reconciling: every job already indexed, then whatever the watches queue."""
        log.info("reconciling with %d worker(s)", self.settings.reconcile_workers)
        for key in list(self.index):
            self.queue.add(key)
        threading.Thread(target=self.resync_forever, name="resync", daemon=True).start()
        for number in range(self.settings.reconcile_workers):
            worker = threading.Thread(target=self.work_forever, name=f"reconcile-{number}",
                                      daemon=True)
            worker.start()
            self.workers.append(worker)

    def stop(self, timeout: float = 10.0) -> None:
        """No new passes; wait (up to `timeout`) for the passes in flight to finish."""
        self.stopping.set()
        self.queue.close()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))


def build_registry(operator: Operator, metrics_port: int,
                   lease_namespace: str = "") -> kopf.OperatorRegistry:
    """kopf handlers; with explicit namespaces, no cluster-wide scanning (Roles suffice)."""
    registry = kopf.OperatorRegistry()
    group, version = names.GROUP, "v1alpha1"

    @kopf.on.login(registry=registry)
    def _login(**kwargs: object) -> kopf.ConnectionInfo | None:
        # a custom registry has no default login handlers: in-cluster token, else kubeconfig
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    releases: list[Callable[[], None]] = []  # the Lease, when elected

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
        if lease_namespace:  # followers watch and index; only the leader reconciles
            from amxtune.controller.leader import elect

            # the pod's name in a cluster; two local processes need two identities
            identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
            releases.append(elect(lease_namespace, identity, operator.start_threads))
        else:
            operator.start_threads()

    @kopf.on.cleanup(registry=registry)
    def _cleanup(**_: object) -> None:
        operator.stop()
        for release in releases:  # after the last write: the next leader starts at once
            release()

    # The handlers only index and queue: reconciling happens on the operator's own workers.
    @kopf.on.event(group, version, "finetunejobs", registry=registry)
    def _finetunejob(type: str, body: kopf.Body, **_: object) -> None:
        operator.observe("FineTuneJob", dict(body), deleted=type == "DELETED")

    @kopf.on.event(group, version, "inferencejobs", registry=registry)
    def _inferencejob(type: str, body: kopf.Body, **_: object) -> None:
        operator.observe("InferenceJob", dict(body), deleted=type == "DELETED")
        owner = owner_finetunejob(dict(body))
        if owner:
            operator.enqueue("FineTuneJob", body.metadata.namespace, owner)

    @kopf.on.event("v1", "pods", labels={"app.kubernetes.io/managed-by": names.MANAGED_BY},
                   registry=registry)
    def _pod(body: kopf.Body, **_: object) -> None:
        labels = body.metadata.labels
        kind = {"finetunejob": "FineTuneJob", "inferencejob": "InferenceJob"}.get(
            labels.get(names.KIND_LABEL, "")
        )
        if kind and labels.get(names.JOB_LABEL):
            operator.enqueue(kind, body.metadata.namespace, labels[names.JOB_LABEL])

    return registry


def run_operator(
    namespaces: list[str] | None,
    all_namespaces: bool,
    liveness: str,
    metrics_port: int,
    log_format: str,
    verbose: bool,
    lease_namespace: str = "",
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
        registry=build_registry(operator, metrics_port, lease_namespace),
        standalone=True,
        namespaces=namespaces or [],
        clusterwide=not namespaces,
        liveness_endpoint=liveness or None,
    )
    return 0
