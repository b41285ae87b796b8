"""Prometheus metrics of the operator (served by `amxtune operator --metrics-port`)."""

from prometheus_client import Counter, Gauge, Histogram

JOBS = Gauge("amxtune_jobs", "Jobs by kind and phase", ["kind", "phase"])
RESTARTS = Counter("amxtune_restarts_total", "Worker restarts after failures", ["kind"])
RECONCILE_SECONDS = Histogram(
    "amxtune_reconcile_seconds", "Time of one reconciliation pass", ["kind"]
)
RECONCILE_ERRORS = Counter(
    "amxtune_reconcile_errors_total", "Reconciliation passes that failed (retried with backoff)",
    ["kind"],
)
