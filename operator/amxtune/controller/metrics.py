"""Prometheus metrics of the operator (served by `amxtune operator --metrics-port`); the
chart's Grafana dashboard (charts/amxtune/dashboards) plots them."""

from contextlib import suppress

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
API_REQUESTS = Counter(
    "amxtune_api_requests_total",
    "Requests the operator's reconcilers sent to the Kubernetes API (watches not included), "
    "by verb and HTTP status code ('error' when no answer came)",
    ["verb", "code"],
)
PERIODIC_PERIOD = Gauge(
    "amxtune_periodic_period_seconds",
    "How often the resync looks at each running job (grows with the number of running jobs)",
)
# not "job": Prometheus reserves that label for the scrape job
QUEUE_DEPTH = Gauge("amxtune_workqueue_depth", "Jobs waiting for a reconcile worker")
JOB_LABELS = ["namespace", "finetunejob"]
JOB_STEP = Gauge("amxtune_job_step", "Training step of a running FineTuneJob", JOB_LABELS)
JOB_MAX_STEPS = Gauge("amxtune_job_max_steps", "Steps a running FineTuneJob trains for",
                      JOB_LABELS)
JOB_LOSS = Gauge("amxtune_job_loss", "Latest training loss of a running FineTuneJob", JOB_LABELS)
JOB_SAMPLES_PER_SECOND = Gauge(
    "amxtune_job_samples_per_second", "Training throughput of a running FineTuneJob, all ranks",
    JOB_LABELS,
)
_PROGRESS_GAUGES = {"step": JOB_STEP, "maxSteps": JOB_MAX_STEPS, "loss": JOB_LOSS,
                    "samplesPerSecond": JOB_SAMPLES_PER_SECOND}


def observe_job(kind: str, body: dict) -> None:
    """Per-job gauges while a FineTuneJob runs; removed once it is not running."""
    if kind != "FineTuneJob":
        return
    meta, status = body["metadata"], body.get("status") or {}
    if status.get("phase") != "Running":
        return forget_job(kind, meta["namespace"], meta["name"])
    progress = status.get("progress") or {}
    for field, gauge in _PROGRESS_GAUGES.items():
        if progress.get(field) is not None:
            gauge.labels(meta["namespace"], meta["name"]).set(float(progress[field]))


def forget_job(kind: str, namespace: str, name: str) -> None:
    if kind != "FineTuneJob":
        return
    for gauge in _PROGRESS_GAUGES.values():
        with suppress(KeyError):  # never set
            gauge.remove(namespace, name)
